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


# --- SSF (catalog): the paper's y = γ ⊙ h + β after every projection, against forward hooks ---------

SSF_HOSTS = {  # site -> (module path, output slice) in each family, written here (not read from pefref's maps)
    "llama": {"attn.q": ("model.layers.{i}.self_attn.q_proj", None), "attn.k": ("model.layers.{i}.self_attn.k_proj", None),
              "attn.v": ("model.layers.{i}.self_attn.v_proj", None), "attn.o": ("model.layers.{i}.self_attn.o_proj", None),
              "ffn.up": ("model.layers.{i}.mlp.up_proj", None), "ffn.down": ("model.layers.{i}.mlp.down_proj", None)},
    "gpt2": {"attn.q": ("transformer.h.{i}.attn.c_attn", (0, 32)), "attn.k": ("transformer.h.{i}.attn.c_attn", (32, 64)),
             "attn.v": ("transformer.h.{i}.attn.c_attn", (64, 96)), "attn.o": ("transformer.h.{i}.attn.c_proj", None),
             "ffn.up": ("transformer.h.{i}.mlp.c_fc", None), "ffn.down": ("transformer.h.{i}.mlp.c_proj", None)},
    "bert": {"attn.q": ("encoder.layer.{i}.attention.self.query", None), "attn.k": ("encoder.layer.{i}.attention.self.key", None),
             "attn.v": ("encoder.layer.{i}.attention.self.value", None), "attn.o": ("encoder.layer.{i}.attention.output.dense", None),
             "ffn.up": ("encoder.layer.{i}.intermediate.dense", None), "ffn.down": ("encoder.layer.{i}.output.dense", None)},
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_ssf_matches_plain_torch_merges_where_derived_and_trains(family: str) -> None:
    from pefref.language.errors import PefrefError
    from pefref.view.analysis import modules_mergeable
    from pefref.view.costs import efficiency

    cat = default_catalog()
    model, ref = tiny_model(family), tiny_model(family)
    inputs = model_inputs(family)
    base = output_of(model, inputs)
    ad = apply(model, "ssf")
    units = dict(ad.units.items())
    # hand-written reference: one hook per host, scaling and shifting each site's slice of the output
    L = 2
    for i in range(L):
        per_host: dict[str, list] = {}
        for site, (path, sl) in SSF_HOSTS[family].items():
            u = units[f"ssf__{site.replace('.', '_')}__{i}"]
            per_host.setdefault(path.format(i=i), []).append((sl, u))

        for path, parts in per_host.items():
            def post(_m, _a, out, parts=parts):
                pieces, at = [], 0
                for sl, u in sorted(parts, key=lambda p: (p[0] or (0, 0))[0]):
                    a, b = sl or (0, out.shape[-1])
                    pieces.append(out[..., at:a])
                    pieces.append(out[..., a:b] * u.gamma.detach() + u.beta.detach())
                    at = b
                pieces.append(out[..., at:])
                return torch.cat(pieces, dim=-1)
            ref.get_submodule(path).register_forward_hook(post)
    with torch.no_grad():
        ours, theirs = output_of(model, inputs), output_of(ref, inputs)
    assert (theirs - base).abs().max() > 1e-3  # γ ~ N(1, 0.02), β ~ N(0, 0.02): not the identity
    assert (ours - theirs).abs().max() <= 1e-5
    c = model.config
    d = c.hidden_size
    d_ff = 4 * d if family == "gpt2" else c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads) if family == "llama" else d
    assert ad.num_trainable() == L * 2 * (d + kv + kv + d + d_ff + d)  # γ and β per output channel
    # mergeable exactly where the view says so (the hosts have biases), folding into W and b
    view = modules_mergeable(cat.technique("ssf").modules, cat.reference, cat.family(family))
    assert view == efficiency(cat.technique("ssf"), cat.shape(TINY_SHAPE[family]), cat).mergeable == (family != "llama")
    if view:
        ad.merge()
        assert (output_of(model, inputs) - theirs).abs().max() <= 1e-5
        ad.unmerge()
    else:
        with pytest.raises(PefrefError):
            ad.merge()
    # trains: the loss falls over a few steps
    model.train()
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (output_of(model, inputs) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ad.remove()
    model.eval()
    assert torch.equal(output_of(model, inputs), base)


TINY_SHAPE = {"llama": "tiny-llama", "gpt2": "tiny-gpt2", "bert": "tiny-bert"}
