"""Raw parameter sites: LoRA on the stacked expert weights of a mixture-of-experts layer, against peft's
``LoraConfig(target_parameters=...)`` (one update per expert)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.language.schema.family import installed_transformers

CATALOG = default_catalog()
MAPPED = CATALOG.family("mixtral").transformers.holds(installed_transformers() or (99,))  # type: ignore[union-attr]
"""Whether the installed transformers lays Mixtral out as the map says (5.x: stacked experts); elsewhere the family is
refused (tested below) and the tests that build on it do not apply."""
needs_map = pytest.mark.skipif(not MAPPED, reason="the mixtral map is written for transformers >= 5.0 (stacked experts)")
SITES = ["ffn.experts.gate_up", "ffn.experts.down"]
PARAMS = {"ffn.experts.gate_up": "gate_up_proj", "ffn.experts.down": "down_proj"}
R, ALPHA, E = 4, 8.0, 4


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _copy_peft_into(pm: torch.nn.Module, ad: pefref.Adapter, L: int) -> None:
    """peft keeps one lora_A [r*E, in] and lora_B [out, r*E] per parameter: expert e's A is rows e*r..(e+1)*r of
    lora_A, its B the columns e, E+e, 2E+e ... of lora_B (get_delta_weight's reshapes)."""
    units = dict(ad.units.items())
    for i in range(L):
        for site, pname in PARAMS.items():
            wrapper = next(mod for n, mod in pm.named_modules()
                           if f"layers.{i}.mlp.experts" in n and getattr(mod, "parameter_name", None) == pname)
            A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            for e in range(E):
                u = units[f"lora__{site.replace('.', '_')}__{i}__s{e}"]
                with torch.no_grad():
                    u.own("A").copy_(A.reshape(E, R, -1)[e])
                    u.own("B").copy_(B.reshape(B.shape[0], R, E)[:, :, e])


def _peft_model(base: MixtralForCausalLM) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return peft.get_peft_model(copy.deepcopy(base), cfg)


@needs_map
def test_lora_on_expert_parameters_matches_peft() -> None:
    """Same trainable count, fp32 outputs within 1e-5 once peft's randomised factors are copied over, and the update
    changes the output; removing the adapter gives the base back bit-exactly."""
    base = _mixtral()
    x = torch.randint(0, 64, (2, 7))
    y0 = base(x).logits.detach()
    before = _state(base)
    pm = _peft_model(base)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.3)
    want = pm(input_ids=x).logits.detach()
    ad = pefref.apply(base, "lora", catalog=CATALOG, sites=SITES, r=R, alpha=ALPHA)
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert ad.num_trainable() == n_peft == 2 * E * R * ((16 + 48) + (24 + 16))
    _copy_peft_into(pm, ad, 2)
    got = base(x).logits.detach()
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - y0).abs().max().item() > 1e-3  # the adapter changes the output
    ad.remove()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()) and set(before) == set(base.state_dict())
    assert torch.equal(base(x).logits.detach(), y0)
    assert not [k for m in base.modules() for k in m.__dict__ if k.startswith("_pefref")]


@needs_map
def test_expert_updates_train_and_merge() -> None:
    """Gradients reach every expert's factors; merging folds each expert's update into its slice of the stack
    (same output), unmerging gives the stack back."""
    base = _mixtral()
    x = torch.randint(0, 64, (2, 7))
    ad = pefref.apply(base, "lora", catalog=CATALOG, sites=["ffn.experts.down"], r=R, alpha=ALPHA)
    for u in ad.units.values():
        with torch.no_grad():
            u.own("B").normal_()
    base(x).logits.sum().backward()
    grads = [u.own("A").grad for u in ad.units.values()]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= E  # routed experts get a gradient
    stack = base.model.layers[0].mlp.experts.down_proj.detach().clone()
    with torch.no_grad():
        y = base(x).logits
        ad.merge()
        assert (base(x).logits - y).abs().max().item() <= 1e-5
        assert not torch.equal(base.model.layers[0].mlp.experts.down_proj, stack)
        ad.unmerge()
        assert (base.model.layers[0].mlp.experts.down_proj - stack).abs().max().item() <= 1e-6


def test_family_without_experts_refuses() -> None:
    """A family that binds no raw parameter site: placing there is a located error, and the model is untouched."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    before = _state(m)
    with pytest.raises(PefrefError, match="ffn.experts.gate_up"):
        pefref.apply(m, "lora", catalog=CATALOG, sites=["ffn.experts.gate_up"])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_all_linear_leaves_experts_out() -> None:
    """peft's all-linear targets modules, never raw parameters: the selector keeps to linear sites."""
    from pefref.language.placement import expand_sites

    fam = CATALOG.families["mixtral"]
    chosen = [s for s, _ in expand_sites(["all-linear"], CATALOG.reference, fam)]
    assert chosen and not [s for s in chosen if s.startswith("ffn.experts")]
    assert {s for s, _ in expand_sites(["ffn.experts.*"], CATALOG.reference, fam)} == set(SITES)


@needs_map
def test_module_that_does_not_fold_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A slice runs as the weight read off its map: a module not linear in its input is refused, nothing changed."""
    f = tmp_path / "nonlin.yaml"
    f.write_text("""id: nonlin
name: a nonlinear parallel update
paper: {title: "none", authors: none, year: 2024, url: "https://example.org"}
hyperparameters: {r: {type: int, default: 2, min: 1}}
modules:
  - name: nl
    sites: [ffn.experts.down]
    layers: all
    form: parallel
    params: {A: {shape: [r, d_in], init: "normal(0, 0.1)"}, B: {shape: [d_out, r], init: "normal(0, 0.1)"}}
    compute: linear(relu(linear(x, A)), B)
    integrate: h + delta
""")
    base = _mixtral()
    before = _state(base)
    with pytest.raises(PefrefError, match="does not fold into a weight"):
        pefref.apply(base, f, catalog=CATALOG)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not [k for m in base.modules() for k in m.__dict__ if k.startswith("_pefref")]


@needs_map
def test_analytic_count_matches_the_applied_one() -> None:
    """``pefref params``' count (one update per expert, in the formula too) is the count of the units applied."""
    from pefref.language.schema import ModelShape
    from pefref.view.params import count_params

    base = _mixtral()
    cfg = {k: v for k, v in base.config.to_dict().items() if isinstance(v, (int, float, bool))}
    shape = ModelShape.model_validate({"name": "tiny-mixtral", "family": "mixtral", "config": cfg})
    c = count_params(CATALOG.techniques["lora"], shape, CATALOG, {"r": R}, sites=SITES)
    ad = pefref.apply(base, "lora", catalog=CATALOG, sites=SITES, r=R)
    assert c.trainable == ad.num_trainable()
    assert "experts" in c.formula
    assert c.base == sum(p.numel() for n, p in base.named_parameters() if "adapters" not in n)  # the family's base_params


@needs_map
def test_peft_export_refuses_raw_parameter_sites_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Not written in peft's format yet: a clear refusal naming the sites, not a wrong file."""
    from pefref.interop.peft_format import save_pretrained

    ad = pefref.apply(_mixtral(), "lora", catalog=CATALOG, sites=["ffn.experts.down"], r=R)
    with pytest.raises(PefrefError, match="raw parameter sites .ffn.experts.down."):
        save_pretrained(ad, tmp_path)
    assert not list(tmp_path.iterdir())


@needs_map
def test_own_format_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pefref's own file keeps every expert's update: loaded into a fresh application, the outputs are the same."""
    x = torch.randint(0, 64, (2, 7))
    a, b = _mixtral(), _mixtral()
    ad = pefref.apply(a, "lora", catalog=CATALOG, sites=SITES, r=R)
    for u in ad.units.values():
        with torch.no_grad():
            u.own("B").normal_()
    ad.save(tmp_path / "a.safetensors")
    ad2 = pefref.apply(b, "lora", catalog=CATALOG, sites=SITES, r=R)
    ad2.load(tmp_path / "a.safetensors")
    assert torch.equal(a(x).logits, b(x).logits)


def test_family_map_checks_parameter_bindings() -> None:
    """A raw parameter binds only a sliced site, a sliced site needs one, and a family binding an experts site must
    give the number of experts: each a located problem."""
    from pefref.language.check import check_family
    from pefref.language.yamlsrc import Positions

    fam = CATALOG.families["mixtral"]
    sites = dict(fam.sites)
    sites["attn.q"] = sites["attn.q"].model_copy(update={"parameter": "weight"})
    sites["ffn.experts.down"] = sites["ffn.experts.down"].model_copy(update={"parameter": None})
    sizes = {k: v for k, v in fam.sizes.items() if k != "experts"}
    bad = fam.model_copy(update={"sites": sites, "sizes": sizes})
    msgs = [p.message for p in check_family(bad, Positions("<mixtral>"), CATALOG.reference)]
    assert any("only sliced sites bind a raw parameter" in m for m in msgs)
    assert any("bind it with parameter:" in m for m in msgs)
    assert any("size 'experts' is missing" in m for m in msgs)
    assert not check_family(fam, Positions("<mixtral>"), CATALOG.reference)
    assert not check_family(CATALOG.families["llama"], Positions("<llama>"), CATALOG.reference)  # no experts: none needed


def test_mixtral_8x7b_counts() -> None:
    """Mixtral-8x7B: the family's base count is the published 46,702,792,704; LoRA r=8 on both expert parameters
    trains L * experts * r * ((d + 2 d_ff) + (d_ff + d)) = 104,857,600, as peft's target_parameters does."""
    from pefref.view.params import count_params

    c = count_params(CATALOG.techniques["lora"], CATALOG.shapes["mixtral-8x7b"], CATALOG, {"r": 8}, sites=["ffn.experts.*"])
    assert c.base == 46_702_792_704
    assert c.trainable == 32 * 8 * 8 * ((4096 + 2 * 14336) + (14336 + 4096)) == 104_857_600



def test_the_family_is_refused_under_transformers_it_is_not_mapped_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under transformers 4.x Mixtral keeps each expert as its own modules: the map (written for 5.x) refuses, naming
    the range, instead of binding paths that are not there."""
    from pefref.language.schema import family as family_schema

    monkeypatch.setattr(family_schema, "installed_transformers", lambda: (4, 57, 6))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = _state(model)
    with pytest.raises(PefrefError, match=r"mixtral.*transformers >= 5\.0.*4\.57\.6"):
        pefref.apply(model, "lora", family="mixtral")
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
