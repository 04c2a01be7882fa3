"""Composition.merge(): every adapter folded as the blocks combine them; refused (changing nothing) when it cannot fold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.runtime.api import apply
from pefref.runtime.compose import apply_composition, compose

from .conftest import model_inputs, output_of, tiny_model

CAT = default_catalog()
ROOT = Path(__file__).resolve().parents[1] / "catalog" / "compositions"
FOLDING = ["lora_average", "lora_ia3_stack", "lora_loha_parallel", "oft_dora_stack"]


def _perturb(params: list[torch.nn.Parameter], seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("pefref_adapters")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cid", FOLDING)
def test_merge_equals_the_composed_model_and_comes_out_exactly(cid: str, family: str) -> None:
    model = tiny_model(family)
    inputs = model_inputs(family)
    base_state, base = _state(model), output_of(model, inputs)
    comp = apply_composition(model, ROOT / f"{cid}.yaml", catalog=CAT)
    _perturb(comp.trainable_parameters())
    adapted = output_of(model, inputs)
    assert (adapted - base).abs().max() > 1e-3
    hosts = comp.merge()
    assert hosts and comp.merged and all(ad.merged and not ad.active for ad in comp.adapters.values())
    assert (output_of(model, inputs) - adapted).abs().max().item() <= 1e-5
    with pytest.raises(PefrefError, match="merged as part of composition"):
        next(iter(comp.adapters.values())).unmerge()
    comp.unmerge()
    assert not comp.merged and all(ad.active for ad in comp.adapters.values())
    assert all(torch.equal(v, base_state[k]) for k, v in _state(model).items())  # the weights beneath, bit for bit
    assert torch.equal(output_of(model, inputs), adapted)
    comp.merge()
    comp.remove()  # merged: the composition's remove takes the merge out first
    assert all(torch.equal(v, base_state[k]) for k, v in _state(model).items())
    assert torch.equal(output_of(model, inputs), base)


def test_average_folds_as_the_weighted_mean_of_the_updates() -> None:
    """lora_average on Llama: W' = W + 0.7 (16/8) B_w A_w + 0.3 (2/sqrt(2)) B_n A_n at q and v of the last two layers."""
    model = tiny_model("llama")
    comp = apply_composition(model, ROOT / "lora_average.yaml", catalog=CAT)
    _perturb(comp.trainable_parameters())
    W0 = {i: model.model.layers[i].self_attn.q_proj.weight.detach().clone() for i in range(2)}
    comp.merge()
    for i in range(2):
        uw = comp.adapters["wide"].units[f"lora__attn_q__{i}"]
        un = comp.adapters["narrow"].units[f"lora__attn_q__{i}"]
        expected = W0[i] + 0.7 * (16 / 8) * uw.B @ uw.A + 0.3 * (comp.adapters["narrow"].hyperparameters["alpha"] / 2 ** 0.5) * un.B @ un.A
        assert (model.model.layers[i].self_attn.q_proj.weight - expected).abs().max() <= 1e-5
    comp.remove()


def test_stack_folds_as_the_composed_maps_with_the_bias() -> None:
    """lora_ia3_stack on GPT-2 at v: h' = (h + c B A x) ⊙ l, so W_v' = diag(l)(W_v + c B A) and b_v' = l ⊙ b_v."""
    model = tiny_model("gpt2")
    comp = apply_composition(model, ROOT / "lora_ia3_stack.yaml", catalog=CAT)
    _perturb(comp.trainable_parameters())
    attn = model.transformer.h[0].attn.c_attn
    W, b = attn.weight.detach().t()[64:96].clone(), attn.bias.detach()[64:96].clone()
    lora = comp.adapters["lora"].units["lora__attn_v__0"]
    l_v = comp.adapters["ia3"].units["kv__attn_v__0"].l.detach()
    comp.merge()
    assert (attn.weight.t()[64:96] - l_v[:, None] * (W + (8 / 4) * lora.B @ lora.A)).abs().max() <= 1e-5
    assert (attn.bias[64:96] - l_v * b).abs().max() <= 1e-6
    comp.remove()


def test_fusion_is_refused_before_anything_changes() -> None:
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2")
    comp = apply_composition(model, ROOT / "adapter_fusion.yaml", catalog=CAT)
    _perturb(comp.trainable_parameters())
    before, out = _state(model), output_of(model, inputs)
    with pytest.raises(PefrefError, match=r"blocks\[0\] \(fusion over task_a, task_b, task_c\) cannot be merged"):
        comp.merge()
    assert not comp.merged and not any(ad.merged for ad in comp.adapters.values())
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert torch.equal(output_of(model, inputs), out)
    comp.remove()


def test_a_member_that_cannot_fold_is_named_and_nothing_changes() -> None:
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    a, b = apply(model, "lora", name="a"), apply(model, "pfeiffer_adapter", name="b")
    comp = compose(model, [a, b])
    _perturb(comp.trainable_parameters())
    before, out = _state(model), output_of(model, inputs)
    with pytest.raises(PefrefError, match=r"adapter 'b' \(pfeiffer_adapter\): module adapter cannot be merged"):
        comp.merge()
    assert not a.merged and all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert torch.equal(output_of(model, inputs), out)
    comp.deactivate("b")
    with pytest.raises(PefrefError, match="'b' is deactivated"):
        comp.merge()
    comp.remove()
    assert torch.equal(output_of(model, inputs), base)
