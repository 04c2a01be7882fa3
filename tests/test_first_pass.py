"""Two-pass routing (a connection with ``pass: first``): validation, and the runtime on a technique of its own.

The technique here is not X-LoRA (tests/test_parity_xlora.py checks that one against
peft): a gate on the query projections computed from the final norm's output in a
first pass, on GPT-2 (fused attention, a later site than its reader), written out in
plain torch as the reference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pefref
from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.errors import Problem
from pefref.models.build import build_model

from .parity import max_diff, padded_batch

HEAD = "# yaml-language-server: $schema=../schemas/technique.schema.json\n"
BODY = """id: {id}
name: a gate from the first pass
paper: {{title: "test", authors: test, year: 2026, url: "https://example.org"}}
hyperparameters: {{}}
identity_at_init: false
modules:
  - name: gate
    sites: [ffn.up]
    form: parallel
    inputs:
{inputs}
    params:
      w: {{shape: [d], init: "normal(std=0.5)"}}
    compute: "unsqueeze(sigmoid(sum(z * w, -1)), -1)"
    integrate: h * delta
"""


def _write(tmp: Path, tid: str, inputs: str) -> Path:
    text = HEAD + BODY.format(id=tid, inputs=inputs)
    p = tmp / f"{tid}.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def _problems(p: Path) -> list[Problem]:
    cat = default_catalog()
    return load_techniques([p], cat.reference, cat.techniques)[3]


def test_a_later_site_is_read_from_the_first_pass_only(tmp_path: Path) -> None:
    ok = _write(tmp_path, "first_ok", "      z: {site: final.norm, tensor: h, pass: first, no_grad: true}")
    assert _problems(ok) == []
    same = _write(tmp_path, "same_pass", "      z: {site: final.norm, tensor: h}")
    (p,) = _problems(same)
    assert "runs after" in p.message and p.field == "modules[0].inputs.z"


@pytest.mark.parametrize(("inputs", "field", "message"), [
    ("      z: {module: gate, pass: first}", "modules[0].inputs.z", "pass: first reads a site's hidden state"),
    ("      z: {site: final.norm, tensor: h, no_grad: true}", "modules[0].inputs.z", "no_grad goes with pass: first"),
    ("      z: {site: final.norm, tensor: h, pass: second}", "modules[0].inputs.z.pass", "'same' or 'first'"),
    ("      z: {site: final.norm, tensor: h, pass: first, during: off}", "modules[0].inputs.z.during", "'base'"),
    ("      z: {site: final.norm, tensor: h, pass: first, no_grad: true}\n      y: {site: attn.o, tensor: x, pass: first}",
     "modules[0].inputs.y", "one first pass runs per call"),
])
def test_invalid_first_pass_reads_are_located(tmp_path: Path, inputs: str, field: str, message: str) -> None:
    probs = _problems(_write(tmp_path, "bad_first", inputs))
    assert any(p.field == field and message in p.message for p in probs), [(p.field, p.message) for p in probs]
    assert all(p.location.line > 0 for p in probs)


def test_runs_two_passes_on_gpt2_as_the_plain_torch_reference(tmp_path: Path) -> None:
    path = _write(tmp_path, "first_gate", "      z: {site: final.norm, tensor: h, pass: first, no_grad: true}")
    base = build_model("tiny-gpt2", seed=0).eval()
    model = copy.deepcopy(base)
    adapter = pefref.apply(model, str(path))
    inputs = padded_batch("tiny-gpt2")
    with torch.no_grad():
        got = model(**inputs).logits
        z = base.transformer(**inputs).last_hidden_state  # the first pass: the base model, its final norm's output
        ref = copy.deepcopy(base)
        ws = {int(k.split("__")[-1]): u.w for k, u in adapter.units.items() if k.startswith("gate__")}
        for i, block in enumerate(ref.transformer.h):
            gate = torch.sigmoid((z * ws[i]).sum(-1, keepdim=True))
            block.mlp.c_fc.register_forward_hook(lambda _m, _a, out, g=gate: out * g)
        want = ref(**inputs).logits
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, base(**inputs).logits) > 1e-3
    out = model(**inputs).logits
    out.sum().backward()  # no_grad first pass: the gate's weights still get a gradient through the real pass's product
    assert all(u.w.grad is not None for u in adapter.units.values() if hasattr(u, "w"))
    adapter.remove()
    assert torch.equal(model(**inputs).logits, base(**inputs).logits)
