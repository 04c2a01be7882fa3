"""Affine modules (a scale and a shift) merge where the host has a bias; ``rescale`` works at embedding sites."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.runtime.api import apply
from pefref.view.analysis import affine, degree, mergeability, mergeable
from tests.conftest import model_inputs, output_of, tiny_model

AFFINE = """\
# yaml-language-server: $schema=../schemas/technique.schema.json
id: affine_probe
name: Scale and shift
paper: {title: "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", authors: Lian et al., year: 2022, arxiv: "2210.08823"}
modules:
  - name: ss
    sites: [attn.o, ffn.down]
    form: sequential
    params:
      g: {shape: [d_out], init: ones()}
      t: {shape: [d_out], init: zeros()}
    compute: h * g + t
    integrate: delta
  - name: emb
    sites: [embed.output]
    form: rescale
    params:
      s: {shape: [d_out], init: ones()}
    scale: s
"""


def _technique(tmp_path: Path):
    p = tmp_path / "affine_probe.yaml"
    p.write_text(AFFINE, encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    assert not problems, "\n".join(map(str, problems))
    return loaded["affine_probe"]


def test_affine_degree() -> None:
    from pefref.language.expr import parse_expr

    assert degree(parse_expr("h * g + t"), "h") is None  # an offset: not linear
    assert affine(parse_expr("h * g + t"), "h") == 1
    assert affine(parse_expr("linear(h, A, b)"), "h") == 1
    assert affine(parse_expr("h * h"), "h") is None
    assert affine(parse_expr("relu(h) + t"), "h") is None
    assert affine(parse_expr("linear(linear(x, A, b), B) * 2 + c"), "x") == 1


def test_affine_mergeability_is_derived(tmp_path: Path) -> None:
    t = _technique(tmp_path)
    ss, emb = t.modules
    assert mergeability(ss, ["linear"]) == "with a host bias"
    assert mergeable(ss, ["linear"], host_bias=True) and not mergeable(ss, ["linear"])
    assert mergeability(ss, ["block"]) == "no"
    assert mergeability(emb, ["embedding"]) == "no"  # the embedding is a table lookup, not a projection


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_affine_merge_folds_into_weight_and_bias(tmp_path: Path, family: str) -> None:
    t = _technique(tmp_path)
    model = tiny_model(family)
    inputs = model_inputs(family)
    base = output_of(model, inputs)
    ad = apply(model, t, sites=["attn.o", "ffn.down"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    adapted = output_of(model, inputs)
    assert (adapted - base).abs().max() > 1e-3
    if family == "llama":  # Llama's projections have no bias: the shift cannot fold
        assert not ad.mergeable_units
        with pytest.raises(Exception, match="cannot be merged"):
            ad.merge()
    else:
        assert len(ad.mergeable_units) == len(ad.units)
        ad.merge()
        assert all(not e.owner.active for _p, e in ad.entries)  # merged: the units no longer run
        assert (output_of(model, inputs) - adapted).abs().max() <= 1e-5
        ad.unmerge()
    ad.remove()
    assert torch.equal(output_of(model, inputs), base)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_rescale_at_the_embedding(tmp_path: Path, family: str) -> None:
    t = _technique(tmp_path)
    model = tiny_model(family)
    inputs = model_inputs(family)
    base = output_of(model, inputs)
    ad = apply(model, t, sites=["embed.output"])
    assert ad.num_trainable() == model.get_input_embeddings().embedding_dim
    assert torch.equal(output_of(model, inputs), base)  # ones: identity
    (s,) = ad.trainable_parameters()
    with torch.no_grad():
        s.mul_(torch.linspace(0.5, 1.5, s.numel()))
    # reference: a forward hook scaling the embedding's output (GPT-2 ties the table to its LM head)
    ref = tiny_model(family)
    scale = s.detach().clone()
    ref.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out * scale)
    assert (output_of(model, inputs) - output_of(ref, inputs)).abs().max() <= 1e-5
    model.train()
    out = output_of(model, inputs)
    out.float().pow(2).mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    ad.remove()
    model.eval()
    assert torch.equal(output_of(model, inputs), base)
