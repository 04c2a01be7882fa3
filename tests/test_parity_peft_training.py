"""Numerical parity with HF peft 0.21 for techniques whose training-time behaviour is part of the method: OSF.

One seeded tiny model is deep-copied into a peft model and a pefref model; what
peft trains is perturbed and copied into pefref's units, and both run the same
batch in fp32. Checked: outputs within 1e-5 (and different from the base
model's), equal trainable counts, and the trained tensors after several SGD
steps of the same loop within 1e-5, where peft runs its own training-time
behaviour (OSF: gradient hooks) and pefref the technique's ``training:`` hooks
(``adapter.before_optimizer_step`` / ``after_optimizer_step``). Each check is
shown not vacuous: the same pefref loop without the hooks ends elsewhere.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-bert"]
LINEAR = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
          "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


@dataclass(frozen=True)
class Case:
    """A technique with its hyperparameters, peft's config per family, and its trained tensors: pefref name -> peft
    name under the host module (or a callable giving peft's tensor for a pefref unit key)."""

    technique: str
    hps: dict[str, Any]
    config: Callable[[str], Any]
    tensors: dict[str, str]


CASES: dict[str, Case] = {
    "osf": Case("osf", {"frac": 0.125}, lambda fam: peft.OSFConfig(task_type=task(fam), target_modules=LINEAR[fam], effective_rank=0.125),
                {"U": "osf_svd_params.default.U_low", "S": "osf_svd_params.default.S_low", "V": "osf_svd_params.default.V_low"}),
}


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    tensors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]  # (unit key, name) -> (pefref tensor, peft tensor)


def _host(pm: Any, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family(family).sites[site].path.format(i=int(layer)))


def build(shape: str, name: str, perturb: bool = True) -> Pair:
    """peft and pefref models of one case; peft's trained tensors perturbed (seeded) and copied into pefref's."""
    case, family = CASES[name], family_of(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), case.config(family)).eval()
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, case.technique, **case.hps)
    tensors = {(key, n): (getattr(unit, n), _host(pm, key, family).get_parameter(pn))
               for key, unit in adapter.units.items() for n, pn in case.tensors.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for mine, theirs in tensors.values():
            if perturb:
                theirs.add_(0.3 * torch.randn_like(theirs))
            mine.copy_(theirs)
    return Pair(pm, model, adapter, tensors)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batch(shape: str) -> dict[str, torch.Tensor]:
    return padded_batch(shape)


def _loss(model: nn.Module, shape: str) -> torch.Tensor:
    """A fixed loss of the output: its mean against seeded random weights (a normalised output's squares sum to a constant)."""
    out = output_of(model, _batch(shape))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * w).mean() + 0.1 * (out * w).pow(2).mean()


def train_both(pair: Pair, shape: str, steps: int = 4, lr: float = 0.5, hooks: bool = True) -> float:
    """Both models trained ``steps`` SGD steps of one loop on a fixed loss (peft runs its own training-time behaviour,
    pefref its hooks unless ``hooks`` is False); the largest difference of the trained tensors afterwards."""
    pm, model, ad = pair.peft_model.eval(), pair.model.eval(), pair.adapter  # no dropout: both see one function
    p_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=lr)
    for step in range(steps):
        _loss(pm, shape).backward()
        p_opt.step()
        p_opt.zero_grad()
        (_loss(model, shape) + (ad.aux_loss() if hooks else 0.0)).backward()
        if hooks:
            ad.before_optimizer_step(step)
        opt.step()
        if hooks:
            ad.after_optimizer_step(step)
        opt.zero_grad()
    return max(max_diff(a.detach(), b.detach()) for a, b in pair.tensors.values())


PAIRS = [(s, n) for n in CASES for s in SHAPES]


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    with torch.no_grad():
        want, got, base = (output_of(m, _batch(shape)) for m in (pair.peft_model, pair.model, base_model(shape)))
    assert max_diff(got, want) <= TOL
    assert max_diff(want, base) > 1e-3  # the adapter changes the output
    assert pair.adapter.report is not None
    assert pair.adapter.report.trainable == n_trainable(pair.model) == n_trainable(pair.peft_model)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_initialisation_matches_peft(shape: str, name: str) -> None:
    """Unperturbed, pefref's initial tensors are peft's (OSF: the same SVD of each weight)."""
    pair = build(shape, name, perturb=False)
    case = CASES[name]
    for key, unit in pair.adapter.units.items():
        layer = _host(pair.peft_model, key, family_of(shape))
        for n, pn in case.tensors.items():
            assert max_diff(getattr(unit, n).detach(), layer.get_parameter(pn).detach()) <= TOL, (key, n)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_training_steps_match_peft(shape: str, name: str) -> None:
    assert train_both(build(shape, name), shape) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_training_without_the_hooks_departs_from_peft(name: str) -> None:
    """Not vacuous: the same steps without the technique's training hooks end elsewhere."""
    assert train_both(build(SHAPES[0], name), SHAPES[0], hooks=False) > 1e-4


def test_osf_gradients_stay_orthogonal_to_the_frozen_subspace() -> None:
    pair = build(SHAPES[0], "osf")
    _loss(pair.model, SHAPES[0]).backward()
    units = list(pair.adapter.units.values())
    assert all(u.U.grad is not None and float((u.Uh.T @ u.U.grad).abs().max()) > 1e-6 for u in units)  # not vacuous
    pair.adapter.before_optimizer_step(0)
    assert all(float((u.Uh.T @ u.U.grad).abs().max()) < 1e-6 and float((u.V.grad @ u.Vh.T).abs().max()) < 1e-6 for u in units)
