"""Reparameterised weights read in activation space: x W'^T computed without forming W' (pefref.compiler.activation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import pefref
from pefref.models.build import build_model
from pefref.runtime.patches import HostPatch


@contextmanager
def _formed() -> Iterator[None]:
    """Every host runs with its formed weight (the reading before activation space)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HostPatch, "_lean", lambda self, weights: False)
        yield


def _perturb(ad: pefref.Adapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)


def _step(model: torch.nn.Module, ad: pefref.Adapter, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the adapter's gradients of one forward/backward."""
    for p in ad.trainable_parameters():
        p.grad = None
    out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    return out.detach(), [p.grad.detach().clone() for p in ad.trainable_parameters()]  # type: ignore[union-attr]


def _diff(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> float:
    ds = [(x.float() - y.float()).abs().max().item() for x, y in zip([a[0], *a[1]], [b[0], *b[1]], strict=True)]
    return max(ds)


def _ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))


Step = tuple[torch.Tensor, list[torch.Tensor]]


def _lean_and_formed(model: torch.nn.Module, ad: pefref.Adapter, ids: torch.Tensor) -> tuple[Step, Step]:
    """One step read in activation space, and the same step with the weights formed."""
    lean = _step(model, ad, ids)
    with _formed():
        return lean, _step(model, ad, ids)


@pytest.mark.parametrize("tid", ["oft", "dora"])
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"])
def test_activation_space_equals_formed_weight(shape: str, tid: str) -> None:
    """Outputs and gradients agree with the formed weight; fused projections (GPT-2's stacked and GPT-NeoX's
    interleaved q, k, v slices) and biases included."""
    model = build_model(shape, seed=0)
    ad = pefref.apply(model, tid)
    assert all(type(u).linear_forward is not None for u in ad.units.values())
    _perturb(ad)
    ids = _ids(model)
    lean, formed = _lean_and_formed(model, ad, ids)
    assert _diff(lean, formed) <= 1e-5
    assert (lean[0] - build_model(shape, seed=0)(input_ids=ids).logits).abs().max().item() > 1e-3  # the adapter acts


def test_activation_space_in_bf16() -> None:
    model = build_model("tiny-llama", seed=0).to(torch.bfloat16)
    ad = pefref.apply(model, "dora")
    _perturb(ad)
    ids = _ids(model)
    lean, formed = _lean_and_formed(model, ad, ids)
    assert lean[0].dtype == torch.bfloat16
    scale = formed[0].float().abs().max().item()
    assert _diff(lean, formed) <= 2e-2 * max(scale, 1.0)


def _adapted_weights(ad: pefref.Adapter, model: torch.nn.Module) -> set[tuple[int, int]]:
    shapes = set()
    for u in ad.units.values():
        d_out, d_in = dict(u.program.consts)["d_out"], dict(u.program.consts)["d_in"]
        shapes |= {(d_out, d_in), (d_in, d_out)}
    return shapes


def _weight_sized_saved(model: torch.nn.Module, ad: pefref.Adapter, ids: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward that have a host weight's shape and are not the model's own."""
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes = _adapted_weights(ad, model)
    kept: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and tuple(t.shape) in shapes and t.data_ptr() not in own:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    return kept


@pytest.mark.parametrize("tid", ["oft", "dora"])
def test_no_weight_sized_tensor_is_kept_for_backward(tid: str) -> None:
    model = build_model("tiny-llama", seed=0)
    ad = pefref.apply(model, tid)
    _perturb(ad)
    ids = _ids(model)
    assert _weight_sized_saved(model, ad, ids) == []
    with _formed():  # the check sees the formed weights (so the empty list above means something)
        assert _weight_sized_saved(model, ad, ids)


@pytest.mark.parametrize("tid", ["hra", "boft"])
def test_computed_matrices_acting_on_activations_keep_the_formed_weight(tid: str) -> None:
    """A matrix computed from parameters (a Householder chain, a butterfly) would be kept for backward in
    activation space as the formed weight is: those units have no activation-space reading."""
    model = build_model("tiny-llama", seed=0)
    ad = pefref.apply(model, tid)
    assert all(type(u).linear_forward is None for u in ad.units.values())


def _technique(tmp_path: Path, params: dict[str, object], weight: str) -> Path:
    doc = {"id": "algebra", "name": "Algebra", "paper": {"title": "t", "authors": "a", "year": 2024, "arxiv": "2401.00001"},
           "hyperparameters": {"r": {"type": "int", "default": 4}},
           "modules": [{"name": "m", "sites": ["attn.q", "attn.v"], "form": "reparameterise",
                        "params": params, "weight": weight}]}
    p = tmp_path / "algebra.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


CASES = {
    "sums, scalings, transposed product": (
        {"C": {"shape": ["d_in", "r"], "init": "normal(std=0.2)"}, "D": {"shape": ["r", "d_out"], "init": "normal(std=0.2)"},
         "s": {"shape": ["d_out", 1], "init": "ones()"}, "c": {"shape": [1, "d_in"], "init": "ones()"}},
        "s * (W - 0.5 * t(C @ D)) * c / 2 + -W",
    ),
    "transposed block product, weight norm": (
        {"R": {"shape": [4, "d_out // 4", "d_out // 4"], "init": "normal(std=0.2)"}, "g": {"shape": ["d_out", 1], "init": "ones()"}},
        "weight_norm(t(blockdiag_matmul(t(W), R)), g, detach=True)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_rules_compose(tmp_path: Path, case: str) -> None:
    """Each rule of the algebra (sums, number and vector scalings, products, transposes, block products, detached
    weight norms) gives the formed weight's outputs and gradients."""
    params, weight = CASES[case]
    model = build_model("tiny-llama", seed=0)
    ad = pefref.apply(model, _technique(tmp_path, params, weight))
    assert all(type(u).linear_forward is not None for u in ad.units.values())
    _perturb(ad)
    ids = _ids(model)
    lean, formed = _lean_and_formed(model, ad, ids)
    assert _diff(lean, formed) <= 1e-5
    assert _weight_sized_saved(model, ad, ids) == []
