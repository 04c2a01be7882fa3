"""Numerical parity with HF peft 0.21.2 for the LoRA family and its weight-space relatives.

rsLoRA, DoRA, PiSSA, VeRA, LoHa, LoKr, AdaLoRA (SVD form) and FourierFT, each on
tiny Llama, Qwen2 and BERT: one seeded base model is deep-copied into a peft
model and a pefref model; peft's trainable tensors are perturbed (so no factor
sits at its neutral initial value) and copied into pefref's units, together
with VeRA's shared frozen projections. Both run the same padded batch in fp32,
eval mode. Checked per case:

* outputs agree within 1e-5 and differ from the base model's (not vacuous);
* trainable counts are equal;
* gradients of a fixed loss agree tensor by tensor (DoRA's detached norm,
  AdaLoRA's scaling and VeRA's vectors all show here);
* what is *not* copied agrees by construction: PiSSA's SVD initialisation of A
  and B and its residual host weights, FourierFT's seeded spectral positions.

peft's target modules are the pefref family's paths of the technique's sites
(full module names), so both sides adapt exactly the same projections.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .parity import max_diff, padded_batch

TOL = 1e-5
GRAD_TOL = 1e-4  # gradients sum over every position and token, so their rounding grows with them (fp32)
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-qwen2", "tiny-bert"]
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
OUTPUT = {"llama": "logits", "qwen2": "logits", "bert": "last_hidden_state"}


@dataclass(frozen=True)
class Case:
    """pefref hyperparameters, the peft config for given targets, and pefref tensor → peft tensor (under the tuner layer)."""

    hps: dict[str, Any]
    config: Callable[[str, list[str]], Any]
    tensors: dict[str, str]
    copy: tuple[str, ...] = ()  # names copied from peft (default: every name in ``tensors``)


LORA_AB = {"A": "lora_A.default.weight", "B": "lora_B.default.weight"}
R, ALPHA = 4, 8.0  # alpha != r so that every scaling convention shows

CASES: dict[str, Case] = {
    "rslora": Case(
        {"r": R, "alpha": ALPHA, "dropout": 0.0},
        lambda task, t: peft.LoraConfig(task_type=task, target_modules=t, r=R, lora_alpha=ALPHA, lora_dropout=0.0, use_rslora=True),
        LORA_AB,
    ),
    "dora": Case(
        {"r": R, "alpha": ALPHA},
        lambda task, t: peft.LoraConfig(task_type=task, target_modules=t, r=R, lora_alpha=ALPHA, lora_dropout=0.0, use_dora=True),
        {**LORA_AB, "m": "lora_magnitude_vector.default.weight"},
    ),
    "pissa": Case(
        {"r": R, "alpha": ALPHA},
        lambda task, t: peft.LoraConfig(task_type=task, target_modules=t, r=R, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights="pissa"),
        LORA_AB,
    ),
    "vera": Case(
        {"r": 16, "d_initial": 0.1, "dropout": 0.0},
        lambda task, t: peft.VeraConfig(task_type=task, target_modules=t, r=16, d_initial=0.1, vera_dropout=0.0, save_projection=True),
        {"A": "vera_A.default", "B": "vera_B.default", "d": "vera_lambda_d.default", "b": "vera_lambda_b.default"},
    ),
    "loha": Case(
        {"r": R, "alpha": ALPHA},
        lambda task, t: peft.LoHaConfig(task_type=task, target_modules=t, r=R, alpha=ALPHA, rank_dropout=0.0, module_dropout=0.0),
        {"w1a": "hada_w1_a.default", "w1b": "hada_w1_b.default", "w2a": "hada_w2_a.default", "w2b": "hada_w2_b.default"},
    ),
    # r=2 < max(b, d)/2 for the tiny widths (32 = 4*8, 16 = 4*4), so peft keeps W2 low-rank as pefref does
    "lokr": Case(
        {"r": 2, "alpha": 4.0, "factor": -1},
        lambda task, t: peft.LoKrConfig(task_type=task, target_modules=t, r=2, alpha=4.0, decompose_factor=-1, decompose_both=False,
                                        rank_dropout=0.0, module_dropout=0.0),
        {"w1": "lokr_w1.default", "w2a": "lokr_w2_a.default", "w2b": "lokr_w2_b.default"},
    ),
    "adalora": Case(
        {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_r": 2, "total_step": 10},
        lambda task, t: peft.AdaLoraConfig(task_type=task, target_modules=t, init_r=R, target_r=2, lora_alpha=ALPHA, lora_dropout=0.0,
                                           total_step=10),
        {"A": "lora_A.default", "E": "lora_E.default", "B": "lora_B.default"},
    ),
    "fourierft": Case(
        {"n": 200, "alpha": 10.0, "seed": 777},
        lambda task, t: peft.FourierFTConfig(task_type=task, target_modules=t, n_frequency=200, scaling=10.0, random_loc_seed=777),
        {"c": "fourierft_spectrum.default"},
    ),
}
TECHNIQUES = list(CASES)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


# --- building the pair -------------------------------------------------------------------------------


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def host_paths(technique: str, shape: str) -> dict[tuple[str, str, int], str]:
    """(module, site, layer) → the family's module path of every placement of the technique."""
    fam = CATALOG.family(family_of(shape))
    L = base_model(shape).config.num_hidden_layers
    modules, _ = expand_modules(CATALOG.technique(technique), CATALOG.techniques)
    return {(m.name, s, i): fam.sites[s].path.format(i=i) for m in modules for s in m.sites for i in range(L)}


@dataclass
class Pair:
    base: nn.Module
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    hosts: dict[str, str]  # unit key → module path
    output: str
    at_init: dict[str, Any]  # peft and pefref tensors before perturbation (PiSSA's initialisation)


def unit_key(module: str, site: str, layer: int) -> str:
    return f"{module}__{site.replace('.', '_')}__{layer}"


def build(shape: str, technique: str, case: Case | None = None) -> Pair:
    """``case``: instead of the technique's case in :data:`CASES` (other hyperparameters and config)."""
    case, family = case or CASES[technique], family_of(shape)
    paths = host_paths(technique, shape)
    base = base_model(shape)
    pm = peft.get_peft_model(copy.deepcopy(base), case.config(TASK[family], sorted(set(paths.values())))).eval()
    model = copy.deepcopy(base)
    adapter = apply(model, technique, **case.hps)
    hosts = {unit_key(*k): p for k, p in paths.items()}
    assert set(hosts) == set(adapter.units)
    at_init = {
        "peft": {k: {n: _tensor(pm.get_base_model().get_submodule(p), t).detach().clone() for n, t in case.tensors.items()} for k, p in hosts.items()},
        "pefref": {k: {n: getattr(adapter.units[k], n).detach().clone() for n in case.tensors} for k in hosts},
    }
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # B, E, w2b, w1, lambda_b start at 0 and magnitudes at ||W||: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        for key, path in hosts.items():
            layer = pm.get_base_model().get_submodule(path)
            for name, peft_name in case.tensors.items():
                mine = getattr(adapter.units[key], name)
                mine.copy_(_tensor(layer, peft_name).reshape(mine.shape))  # DoRA's magnitude: [out] → [out, 1]
    return Pair(base, pm, model, adapter, hosts, OUTPUT[family], at_init)


def output(model: nn.Module, key: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return getattr(model(**inputs), key)


# --- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_gradients_and_counts_match_peft(shape: str, technique: str) -> None:
    pair = build(shape, technique)
    inputs = padded_batch(shape)
    with torch.no_grad():
        want = output(pair.peft_model, pair.output, inputs)
        got = output(pair.model, pair.output, inputs)
        base = output(pair.base, pair.output, inputs)
    assert max_diff(got, want) <= TOL
    assert max_diff(base, want) > 1e-3  # the adapter changes the model: the comparison is not vacuous

    n_peft = sum(p.numel() for p in pair.peft_model.parameters() if p.requires_grad)
    assert pair.adapter.report.trainable == n_peft
    assert sum(p.numel() for p in pair.adapter.trainable_parameters()) == n_peft

    # the same loss gives the same gradient on every trained tensor
    target = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    (output(pair.peft_model, pair.output, inputs) * target).sum().backward()
    (output(pair.model, pair.output, inputs) * target).sum().backward()
    compared = 0
    for key, path in pair.hosts.items():
        layer = pair.peft_model.get_base_model().get_submodule(path)
        for name, peft_name in CASES[technique].tensors.items():
            mine, theirs = getattr(pair.adapter.units[key], name), _tensor(layer, peft_name)
            if not theirs.requires_grad:
                continue
            assert mine.grad is not None and theirs.grad is not None, (key, name)
            assert max_diff(mine.grad, theirs.grad.reshape(mine.shape)) <= GRAD_TOL, (key, name)
            compared += 1
    assert compared >= len(pair.hosts)


@pytest.mark.parametrize("shape", SHAPES)
def test_pissa_initialisation_and_residual_weights_match_peft(shape: str) -> None:
    """A and B from the top-r SVD (same signs: the same deterministic SVD) and the residual host weights."""
    pair = build(shape, "pissa")
    for key, path in pair.hosts.items():
        for name in ("A", "B"):
            assert max_diff(pair.at_init["pefref"][key][name], pair.at_init["peft"][key][name]) <= TOL, (key, name)
        theirs = pair.peft_model.get_base_model().get_submodule(path).base_layer.weight
        mine = pair.model.get_submodule(path).weight
        original = pair.base.get_submodule(path).weight
        assert max_diff(mine, theirs) <= TOL, path
        assert max_diff(mine, original) > 1e-3, path  # the host weight really is the residual
    # at initialisation the model computes the base function; remove() restores the original weights
    fresh = copy.deepcopy(base_model(shape))
    a = apply(fresh, "pissa", **CASES["pissa"].hps)
    inputs = padded_batch(shape)
    with torch.no_grad():
        base = output(pair.base, pair.output, inputs)
        assert max_diff(output(fresh, pair.output, inputs), base) <= TOL
        a.remove()
        assert all(torch.equal(fresh.get_submodule(p).weight, pair.base.get_submodule(p).weight) for p in pair.hosts.values())


@pytest.mark.parametrize("shape", SHAPES)
def test_fourierft_positions_match_peft(shape: str) -> None:
    """The spectral positions are not copied: pefref's seeded draw reproduces peft's."""
    pair = build(shape, "fourierft")
    for key, path in pair.hosts.items():
        theirs = pair.peft_model.get_base_model().get_submodule(path).indices["default"]
        mine = pair.adapter.units[key].loc
        assert mine.dtype == torch.int64
        assert torch.equal(mine, theirs), key


@pytest.mark.parametrize("shape", SHAPES)
def test_dora_merge_matches_peft(shape: str) -> None:
    """Merged DoRA weights (magnitude times normalised direction) equal peft's merge_and_unload."""
    pair = build(shape, "dora")
    pair.adapter.merge()
    merged = pair.peft_model.merge_and_unload()
    for path in set(pair.hosts.values()):
        assert max_diff(pair.model.get_submodule(path).weight, merged.get_submodule(path).weight) <= TOL, path
