"""Prefixes gated by the layer's input (UniPELT's G_P), and prefixes on a subset of layers.

The plain-torch reference of UniPELT's gate is in ``tests/test_reference_impls.py``
(Llama, GPT-2, BERT within 1e-5); here: the gate trains, it is drawn, a gated
prefix leaves nothing behind, and prefix positions go to the layers they are
declared for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.errors import PefrefError
from pefref.render.diagram import technique_graph
from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model
from .parity import cache_kw

CAT = default_catalog()

SPLIT = """\
id: split_prefix
name: Two prefixes, one per half of the layers
paper: {title: "Prefix-Tuning: Optimizing Continuous Prompts for Generation", authors: Li and Liang, year: 2021, arxiv: "2101.00190"}
hyperparameters:
  n: {type: int, default: 3, min: 1}
modules:
  - name: early
    sites: [attn.kv]
    layers: {first: 1}
    form: prepend
    length: n
    params:
      K: {shape: [n, d_out], init: normal(std=1.0)}
      V: {shape: [n, d_out], init: normal(std=1.0)}
    keys: K
    values: V
  - name: late
    sites: [attn.kv]
    layers: {last: 1}
    form: prepend
    length: n
    params:
      K: {shape: [n, d_out], init: normal(std=1.0)}
      V: {shape: [n, d_out], init: normal(std=1.0)}
    keys: K
    values: V
"""


def _technique(tmp_path: Path, text: str, tid: str):
    p = tmp_path / f"{tid}.yaml"
    p.write_text(text, encoding="utf-8")
    loaded, _s, _p, problems = load_techniques([p], CAT.reference, CAT.techniques)
    assert not problems, problems
    return loaded[tid]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prefixes_on_a_subset_of_layers_go_to_their_layers(tmp_path: Path, family: str) -> None:
    from transformers import DynamicCache

    t = _technique(tmp_path, SPLIT, "split_prefix")
    model, ref = tiny_model(family), tiny_model(family)
    inputs = model_inputs(family)
    ad = apply(model, t)
    with torch.no_grad():
        ours = output_of(model, inputs)[:, -inputs["input_ids"].shape[1]:]
        # reference: layer 0 gets 'early', layer 1 'late', as [batch, kv_heads, n, d_head] cache entries
        c = model.config
        kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        dh = c.hidden_size // c.num_attention_heads
        b = inputs["input_ids"].shape[0]
        layers = []
        for name in ("early", "late"):
            u = ad.units[f"{name}__attn_kv__{0 if name == 'early' else 1}"]
            k, v = (t.reshape(3, kvh, dh).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1) for t in (u.K, u.V))
            layers.append((k, v))
        mask = torch.cat([torch.ones(b, 3, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], dim=1)
        theirs = output_of(ref, {**inputs, "attention_mask": mask, cache_kw(ref): DynamicCache(layers)})
        swapped = output_of(tiny_model(family), {**inputs, "attention_mask": mask, cache_kw(ref): DynamicCache(layers[::-1])})
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - swapped).abs().max() > 1e-3  # the layer assignment matters: the check is not vacuous


def test_a_prefix_missing_from_some_layers_is_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    with pytest.raises(PefrefError, match=r"layer 0: 0, layer 1: 10.*every layer needs the same prefix length"):
        apply(model, "prefix_tuning", layers=[-1])
    assert torch.equal(output_of(model, inputs), base)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_prefix_gate_trains_and_leaves_nothing_behind(family: str) -> None:
    model = tiny_model(family)
    inputs = model_inputs(family)
    base = output_of(model, inputs)
    ad = apply(model, "unipelt", n=4, hidden=16)
    gate = ad.units["prefix__attn_kv__0"]
    assert set(dict(gate.named_parameters())) >= {"Wgp", "bgp"}
    assert "gate_unit" not in dict(gate.named_modules()) and not any("gate_unit" in k for k in ad.state_dict())  # one copy of each tensor
    model.train()
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2)
    target = torch.randn(output_of(model, inputs).shape, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (output_of(model, inputs) - target).pow(2).mean()
        loss.backward()
        assert gate.Wgp.grad is not None and gate.Wgp.grad.abs().sum() > 0  # the gate is in the graph
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    root = model.__dict__.get("_pefref_root") or next(v for k, v in vars(model).items() if k.startswith("_pefref") and hasattr(v, "live"))
    assert root.live is None  # the pass's cache is not kept
    ad.remove()
    model.eval()
    assert torch.equal(output_of(model, inputs), base)


def test_the_gate_is_drawn() -> None:
    g = technique_graph(CAT, [CAT.technique("unipelt")])
    prefix = [a for _n, a in g.nodes(data=True) if a.get("role") == "module" and a.get("module") == "prefix"]
    text = prefix[0]["html"].replace("<BR/>  ", "").replace("<BR/>", " ") if prefix else ""
    assert "K, V ← g·K, g·V" in text and "g = mean(σ(W_gp·x + b_gp))" in text  # drawn as math (the YAML is the box's title)
