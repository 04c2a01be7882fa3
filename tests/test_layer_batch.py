"""Stacked per-layer tensors (``stacked: layers``) and layer-batched prefixes.

A stacked tensor keeps the copies of every layer in one tensor (the optimizer
sees one); the key/value prefixes of every layer then run as one generated
program (shared subexpressions once, stacked heads as one product). Here: what
the program computes equals what each layer's unit computes (also through the
per-layer fallback of ops without a rule and of arithmetic), the model's output
and gradients are the same with and without it, counts stay per layer, the
state saves and loads, and misuse is a located error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.compiler.batched import batchable
from pefref.language.catalog import default_catalog, load_techniques
from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model

CAT = default_catalog()

MIXED = """\
id: mixed_stack
name: Stacked tensors through ops with and without a rule over layers
paper: {title: "Prefix-Tuning: Optimizing Continuous Prompts for Generation", authors: Li and Liang, year: 2021, arxiv: "2101.00190"}
hyperparameters:
  n: {type: int, default: 3, min: 1}
modules:
  - name: prefix
    sites: [attn.kv]
    layers: LAYERS
    form: prepend
    length: n
    params:
      E: {shape: [n, d_out], init: normal(std=1.0), shared: layers}
      S: {shape: [n, d_out], init: normal(std=1.0), stacked: layers}
      M: {shape: [d_out, d_out], init: normal(std=0.2), stacked: layers}
    keys: tanh(E) * S + 2 * S - sigmoid(S)
    values: -matmul(E, M) / 3 + E
"""


def _technique(tmp_path: Path, text: str, tid: str) -> object:
    p = tmp_path / f"{tid}.yaml"
    p.write_text(text, encoding="utf-8")
    loaded, _s, _p, problems = load_techniques([p], CAT.reference, CAT.techniques)
    assert not problems, problems
    return loaded[tid]


def _root_entries(model: torch.nn.Module) -> list:
    root = next(v for k, v in vars(model).items() if k.startswith("_pefref") and hasattr(v, "live"))
    return [e for e in root.entries if e.layer is not None]


def _step(model: torch.nn.Module, ad: object, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = ad.trainable_parameters()  # type: ignore[attr-defined]
    for p in params:
        p.grad = None
    out = output_of(model, inputs)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("tid", ["prefix_tuning", "unipelt"])
def test_prefix_heads_are_stacked_and_run_as_one_program(tid: str) -> None:
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    ad = apply(model, tid, n=4, hidden=16)
    model.train()
    L = model.config.num_hidden_layers
    units = [ad.units[f"prefix__attn_kv__{i}"] for i in range(L)]
    wkv = units[0].Wkv
    assert wkv.shape == (L, *units[0].own("Wkv").shape) and wkv.shape[-1] == 16 and all(u.Wkv is wkv for u in units)  # one tensor
    assert [u.picks["Wkv"] for u in units] == list(range(L))
    # counts stay per layer: the report's rows and the adapter's total count each layer's slice once
    row = next(r for r in ad.report.rows if r.module == "prefix")
    per_layer = sum(units[0].own(n).numel() for n, p in units[0].named_parameters() if p.requires_grad)
    assert row.params == L * per_layer == sum(u.own_numel() for u in units)
    entries = _root_entries(model)
    assert len(entries) == L and entries[0].batch is not None and all(e.batch is entries[0].batch for e in entries)
    keys, values = entries[0].batch(False)
    for e in entries:
        k, v = e.unit(None, None, None, False)
        assert torch.equal(keys[e.pick], k) and torch.equal(values[e.pick], v)
    # the model computes the same with the program as with each layer's unit, and so do the gradients
    torch.manual_seed(0)
    out_b, grads_b = _step(model, ad, inputs)
    for e in entries:
        e.batch = None
    torch.manual_seed(0)
    out_u, grads_u = _step(model, ad, inputs)
    assert (out_b - out_u).abs().max() <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(grads_b, grads_u))
    assert any(g.abs().sum() > 0 for g in grads_b)


def test_prefix_tuning_trains_as_many_tensors_as_peft() -> None:
    """E, W1, b1 and the stacked heads (weight, bias): peft's embedding, Linear(d, hidden) and Linear(hidden, L*2*d)."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ad = apply(model, "prefix_tuning", n=4, hidden=16)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)
    pm = peft.get_peft_model(tiny_model("llama"), cfg)
    theirs = [p for p in pm.parameters() if p.requires_grad]
    assert len(ad.trainable_parameters()) == len(theirs) == 5
    assert ad.num_trainable() == sum(p.numel() for p in theirs)


def test_ops_without_a_rule_and_arithmetic_run_per_layer(tmp_path: Path) -> None:
    t = _technique(tmp_path, MIXED.replace("LAYERS", "all"), "mixed_stack")
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    ad = apply(model, t)  # type: ignore[arg-type]
    entries = _root_entries(model)
    placed = model.config.num_hidden_layers
    assert len(entries) == placed and ad.units[entries[0].unit_key].S.shape[0] == placed
    assert ad.num_trainable() == sum(p.numel() for p in ad.trainable_parameters())
    assert sum(e.unit.own_numel() for e in entries) == placed * 2 * 3 * entries[0].unit.own("S").shape[1] + placed * entries[0].unit.own("M").numel()
    assert batchable([e.unit for e in entries])
    keys, values = entries[0].batch(False)
    for e in entries:
        k, v = e.unit(None, None, None, False)
        assert (keys[e.pick] - k).abs().max() <= 1e-6 and (values[e.pick] - v).abs().max() <= 1e-6
    # the slices differ by layer: the comparison is not vacuous
    assert (keys[0] - keys[1]).abs().max() > 1e-3
    model.train()  # one program gives every layer: the model takes its prefixes from it
    out_b, grads_b = _step(model, ad, inputs)
    for e in entries:
        e.batch = None
    out_u, grads_u = _step(model, ad, inputs)
    assert (out_b - out_u).abs().max() <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(grads_b, grads_u))


LORA = """\
id: LORA_ID
name: LoRA, its factors kept STORAGE
paper: {title: "LoRA: Low-Rank Adaptation of Large Language Models", authors: Hu et al., year: 2021, arxiv: "2106.09685"}
hyperparameters:
  r: {type: int, default: 4, min: 1}
modules:
  - name: lora
    sites: [attn.q, attn.v]
    layers: LAYERS
    form: parallel
    params:
      A: {shape: [r, d_in], init: "kaiming_uniform(a=sqrt(5))"STACK}
      B: {shape: [d_out, r], init: normal(std=0.1)STACK}
    compute: linear(linear(x, A), B)
    integrate: h + delta
"""


@pytest.mark.parametrize("layers", ["all", "[1]"])
def test_stacking_changes_storage_only(tmp_path: Path, layers: str) -> None:
    """The same initial values (drawn in the same order), outputs, gradients and counts as per-layer tensors."""
    def make(stack: bool) -> object:
        text = (LORA.replace("LORA_ID", "lora_stacked" if stack else "lora_apart").replace("STORAGE", "stacked" if stack else "apart")
                .replace("LAYERS", layers).replace("STACK", ", stacked: layers" if stack else ""))
        return _technique(tmp_path, text, "lora_stacked" if stack else "lora_apart")

    inputs = model_inputs("llama")
    runs = []
    for stack in (False, True):
        model = tiny_model("llama")
        torch.manual_seed(3)
        ad = apply(model, make(stack))  # type: ignore[arg-type]
        model.train()
        out, grads = _step(model, ad, inputs)
        own = {k: u.own("A").detach().clone() for k, u in ad.units.items()}
        runs.append((ad, out, grads, own))
    (apart, out_a, g_a, own_a), (stacked, out_s, g_s, own_s) = runs
    n_units = len(apart.units)
    assert n_units == 2 * (2 if layers == "all" else 1)
    assert len(apart.trainable_parameters()) == 2 * n_units and len(stacked.trainable_parameters()) == 4  # A and B per site
    assert apart.num_trainable() == stacked.num_trainable()
    assert [r.params for r in apart.report.rows] == [r.params for r in stacked.report.rows]
    assert own_a.keys() == own_s.keys() and all(torch.equal(own_a[k], own_s[k]) for k in own_a)
    assert torch.equal(out_a, out_s)
    ga = torch.cat([g.flatten() for g in g_a]).sort().values
    gs = torch.cat([g.flatten() for g in g_s]).sort().values
    assert torch.allclose(ga, gs, atol=1e-6) and ga.abs().sum() > 0


def test_a_stacked_state_saves_and_loads(tmp_path: Path) -> None:
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    ad = apply(model, "prefix_tuning", n=4, hidden=16)
    state = ad.state_dict()
    L = model.config.num_hidden_layers
    stacked = [k for k in state if k.endswith(".Wkv")]
    assert len(stacked) == 1 and state[stacked[0]].shape[0] == L  # saved once, whole
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ad.save(tmp_path / "a.safetensors")
    with torch.no_grad():
        want = output_of(model, inputs)
    other = tiny_model("llama")
    ad2 = apply(other, "prefix_tuning", n=4, hidden=16)
    ad2.load(tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(output_of(other, inputs), want)


@pytest.mark.parametrize(("param", "message"), [
    ("{shape: [n, d_out], init: zeros(), shared: layers, stacked: layers}", "stores the per-layer copies of an unshared tensor"),
    ("{shape: [n, d_out], init: zeros(), shared: all, stacked: layers}", "this one is shared: all"),
])
def test_stacking_a_shared_tensor_is_a_located_error(tmp_path: Path, param: str, message: str) -> None:
    text = MIXED.replace("LAYERS", "all").replace("{shape: [n, d_out], init: normal(std=1.0), stacked: layers}", param)
    p = tmp_path / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    _l, _s, _p, problems = load_techniques([p], CAT.reference, CAT.techniques)
    assert any(message in str(pr) and "params.S.stacked" in str(pr) and ":" in str(pr) for pr in problems), problems
