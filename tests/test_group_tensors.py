"""Tensors shared across modules of one technique (``group``): one tensor, counted, saved and trained once."""

from __future__ import annotations

from pathlib import Path

import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.runtime.api import apply
from pefref.view.params import count_params
from pefref.view.typology import derive_typology
from tests.conftest import TINY, model_inputs, output_of, tiny_model

BANK = """\
id: {tid}
name: probe
paper: {{title: "x", authors: y, year: 2021, arxiv: "2106.09685"}}
hyperparameters:
  r: {{type: int, default: 4, min: 1}}
modules:
  - name: qm
    sites: [attn.q]
    form: parallel
    params:
      bank: {{shape: [r, d], init: "normal(std=0.1)", shared: {shared}, group: g}}
      B: {{shape: [d_out, r], init: "normal(std=0.1)"}}
    compute: linear(linear(x, bank), B)
    integrate: h + delta
  - name: vm
    sites: [attn.v]
    form: parallel
    params:
      rows: {{shape: [r, d], init: "{init}", shared: {shared}, group: g}}
      B: {{shape: [d_out, r], init: "normal(std=0.1)"}}
    compute: linear(linear(x, rows), B)
    integrate: h + delta
"""


def _load(tmp_path: Path, shared: str = "all", init: str = "normal(std=0.1)", tid: str = "bank_probe"):
    p = tmp_path / f"{tid}.yaml"
    p.write_text(BANK.format(tid=tid, shared=shared, init=init), encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    return loaded.get(tid), problems


def test_a_group_tensor_is_one_tensor_for_every_module(tmp_path: Path) -> None:
    t, problems = _load(tmp_path)
    assert not problems, problems
    cat = default_catalog()
    model = tiny_model("llama")
    cfg = model.config
    d, L, r = cfg.hidden_size, cfg.num_hidden_layers, 4
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    want = r * d + L * (d * r + kv * r)
    ad = apply(model, t)
    assert ad.num_trainable() == want == count_params(t, cat.shape(TINY["llama"]), cat).trainable
    banks = [k for k in ad.state_dict() if k.endswith((".bank", ".rows"))]
    assert len(banks) == 1  # saved once
    q0, v1 = ad.units["qm__attn_q__0"], ad.units["vm__attn_v__1"]
    assert q0.own("bank").data_ptr() == v1.own("rows").data_ptr()
    output_of(model, model_inputs("llama")).sum().backward()
    assert q0.own("bank").grad is not None
    assert "across modules" in derive_typology(t, cat.reference, cat.techniques).values["parameter_sharing"]
    # save and load round-trip
    state = ad.state_dict()
    m2 = tiny_model("llama")
    ad2 = apply(m2, t)
    ad2.load_state_dict(state)
    inputs = model_inputs("llama")
    assert torch.equal(output_of(model, inputs), output_of(m2, inputs))


def test_a_group_scoped_per_layer_is_one_tensor_per_layer(tmp_path: Path) -> None:
    t, problems = _load(tmp_path, shared="sites", tid="bank_layers")
    assert not problems, problems
    model = tiny_model("llama")
    ad = apply(model, t)
    assert ad.units["qm__attn_q__0"].own("bank").data_ptr() == ad.units["vm__attn_v__0"].own("rows").data_ptr()
    assert ad.units["qm__attn_q__0"].own("bank").data_ptr() != ad.units["qm__attn_q__1"].own("bank").data_ptr()
    cat = default_catalog()
    assert ad.num_trainable() == count_params(t, cat.shape(TINY["llama"]), cat).trainable


def test_group_declarations_must_agree(tmp_path: Path) -> None:
    _t, problems = _load(tmp_path, init="zeros()", tid="bank_bad")
    assert len(problems) == 1 and "group 'g' is one tensor" in problems[0].message and problems[0].field == "modules[1].params.rows.init"
