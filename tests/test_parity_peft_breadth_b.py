"""Numerical parity with HF peft 0.21 for RandLoRA, SHiRA, TinyLoRA, VB-LoRA, PSOFT, PEANuT, Super-Tuning and
multitask prompt tuning (one task here; several in tests/test_call_inputs.py).

For each case one seeded tiny model (``build_model``) is deep-copied into a peft
model and a pefref model with the same hyperparameters; peft's trainable
tensors are perturbed (so nothing passes because an adapter is still at its
initialisation), every adapter tensor of peft's (trained and frozen: random
bases, SVD factors, positions) is copied into pefref's units, and both run the
same left-padded batch in fp32, eval mode. Outputs agree within 1e-5, the
adapter changes the base model's outputs, and the trainable counts are equal.
Where pefref computes the frozen tensors itself the same way as peft (SVD
factors, seeded positions, the magnitude support), a second test checks that
its own initialisation already equals peft's.

Families: tiny Llama and, per technique, the second family peft supports: GPT-2
(its fused ``c_attn`` Conv1D as one site) where peft adapts Conv1D, else BERT.
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
QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
SITES = {"gpt2": ["attn.qkv"]}  # peft adapts GPT-2's fused c_attn as one module
N_VIRTUAL = 4
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # peft SHiRA's sparse delta


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


Copy = Callable[[nn.Module, nn.Module], None]  # (pefref unit, peft layer at its host)


@dataclass(frozen=True)
class Case:
    """A technique with its hyperparameters, peft's config for the same adapter, how tensors copy, and where."""

    technique: str
    hps: dict[str, Any]
    config: Callable[[str], Any]  # family -> peft config
    copy: Copy | None  # per placement; None: a prompt (copied by _copy_prompt)
    shapes: tuple[str, ...]


def _copy_shira(unit: nn.Module, layer: nn.Module) -> None:
    unit.c.copy_(layer.shira_weight["default"])
    unit.loc.copy_(layer.shira_indices["default"].long())


def _copy_tinylora(unit: nn.Module, layer: nn.Module) -> None:
    for mine, theirs in (("A", layer.tinylora_A), ("B", layer.tinylora_B), ("P", layer.tinylora_P)):
        getattr(unit, mine).copy_(theirs["default"])
    unit.v.copy_(layer.tinylora_v["default"][layer._tinylora_v_key["default"]])


def _copy_vblora(unit: nn.Module, layer: nn.Module) -> None:
    unit.bank.copy_(layer.vblora_vector_bank["default"])  # shared: every placement writes the same bank
    unit.la.copy_(layer.vblora_logits_A["default"])
    unit.lb.copy_(layer.vblora_logits_B["default"])


def _copy_randlora(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.randlora_A["default"])  # shared, full size: each placement reads its leading block
    unit.B.copy_(layer.randlora_B["default"])
    unit.lam.copy_(layer.randlora_lambda["default"])
    unit.gam.copy_(layer.randlora_gamma["default"])


def _copy_psoft(unit: nn.Module, layer: nn.Module) -> None:
    A, B = layer._get_psoft_ab_cache_buffers("default")
    R = layer.psoft_R["default"]
    for mine, theirs in (("A", A), ("B", B), ("q", R.weight), ("a", R.vector_a), ("b", R.vector_b)):
        getattr(unit, mine).copy_(theirs)


def _copy_peanut(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.peanut_A["default"].weight)
    unit.B.copy_(layer.peanut_B["default"].weight)


def _copy_supertuning(unit: nn.Module, layer: nn.Module) -> None:
    unit.idx.copy_(layer.supertuning_indices["default"].long())
    unit.c.copy_(layer.supertuning_values["default"])


def _copy_prompt(pm: Any, adapter: Adapter) -> None:
    (unit,) = adapter.units.values()
    enc = pm.prompt_encoder["default"]
    unit.P.copy_(enc.embedding.weight)
    unit.U.copy_(enc.prefix_task_cols)
    unit.V.copy_(enc.prefix_task_rows)


LLAMA_GPT2, LLAMA_BERT = ("tiny-llama", "tiny-gpt2"), ("tiny-llama", "tiny-bert")

CASES: dict[str, Case] = {
    "randlora": Case("randlora", {"r": 8, "alpha": 16.0}, lambda fam: peft.RandLoraConfig(
        r=8, randlora_alpha=16, target_modules=QV[fam]), _copy_randlora, LLAMA_GPT2),
    "shira": Case("shira", {"r": 2, "seed": 5}, lambda fam: peft.ShiraConfig(
        r=2, random_seed=5, target_modules=QV[fam]), _copy_shira, LLAMA_BERT),
    "tinylora": Case("tinylora", {"r": 2, "u": 4}, lambda fam: peft.TinyLoraConfig(
        r=2, u=4, target_modules=QV[fam]), _copy_tinylora, LLAMA_GPT2),
    "vblora": Case("vblora", {"r": 2, "nv": 6, "vl": 8, "k": 2}, lambda fam: peft.VBLoRAConfig(
        r=2, num_vectors=6, vector_length=8, topk=2, target_modules=QV[fam]), _copy_vblora, LLAMA_GPT2),
    "psoft": Case("psoft", {"r": 4, "alpha": 8.0}, lambda fam: peft.PsoftConfig(
        r=4, psoft_alpha=8, target_modules=QV[fam]), _copy_psoft, LLAMA_BERT),
    "peanut": Case("peanut", {"r": 4, "scaling": 2.0}, lambda fam: peft.PeanutConfig(
        r=4, scaling=2.0, target_modules=QV[fam]), _copy_peanut, LLAMA_BERT),
    "supertuning": Case("supertuning", {"sparsity": 0.9}, lambda fam: peft.SupertuningConfig(
        sparsity=0.9, target_modules=QV[fam]), _copy_supertuning, LLAMA_BERT),
    "multitask_prompt_tuning": Case("multitask_prompt_tuning", {"n": N_VIRTUAL, "k": 2}, lambda fam: peft.MultitaskPromptTuningConfig(
        task_type=task(fam), num_virtual_tokens=N_VIRTUAL, num_tasks=1, num_ranks=2), None, LLAMA_GPT2),
}
PAIRS = [(s, n) for n, c in CASES.items() for s in c.shapes]


def _host_path(unit_key: str, family: str) -> str:
    """The module path of a pefref unit's host ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return CATALOG.family(family).sites[site].path.format(i=int(layer))


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    base: nn.Module
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    fresh: dict[str, dict[str, torch.Tensor]]  # pefref's own initial tensors per unit, before the copy


def build(shape: str, name: str) -> Pair:
    case, family = CASES[name], family_of(shape)
    base = base_model(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), case.config(family)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # zero updates, unit scales: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    adapter = apply(model, case.technique, sites=SITES.get(family) if case.copy else None, **case.hps)
    fresh = {k: {n: t.detach().clone() for n, t in u.named_parameters()} | {n: t.clone() for n, t in u.named_buffers()}
             for k, u in adapter.units.items()}
    with torch.no_grad():
        if case.copy is None:
            _copy_prompt(pm, adapter)
        else:
            for key, unit in adapter.units.items():
                case.copy(unit, pm.get_base_model().get_submodule(_host_path(key, family)))
    return Pair(base, pm, model, adapter, fresh)


def output(model: Any, inputs: dict[str, torch.Tensor], tasks: bool = False) -> torch.Tensor:
    """fp32 outputs; peft's multitask prompt takes the task of each example (task 0 here)."""
    extra = {"task_ids": torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)} if tasks else {}
    with torch.no_grad():
        return output_of(model, {**inputs, **extra})


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    inputs = padded_batch(shape)
    want = output(pair.peft_model, inputs, tasks=CASES[name].copy is None)
    got = output(pair.model, inputs)
    assert max_diff(got, want) <= TOL
    base = output(pair.base, inputs)  # not vacuous: the adapter changes the outputs at the real positions
    assert max_diff(want[:, -base.shape[1]:], base) > 1e-3
    n_peft = n_trainable(pair.peft_model)
    assert pair.adapter.report.trainable == n_peft
    assert n_trainable(pair.model) == n_peft


MERGE = [(s, n) for s, n in PAIRS if CASES[n].copy is not None]


@pytest.mark.parametrize(("shape", "name"), MERGE)
def test_merged_weights_match_peft(shape: str, name: str) -> None:
    """Every placement merges (derived), to peft's merged weight, and unmerges to the base weight."""
    pair = build(shape, name)
    inputs = padded_batch(shape)
    unmerged = output(pair.model, inputs)
    assert len(pair.adapter.mergeable_units) == len(pair.adapter.units)
    paths = sorted({_host_path(key, family_of(shape)) for key in pair.adapter.units})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pair.peft_model.merge_and_unload()
    pair.adapter.merge()
    for path in paths:
        assert max_diff(pair.model.get_submodule(path).weight, merged.get_submodule(path).weight) <= TOL, path
    assert max_diff(output(pair.model, inputs), unmerged) <= TOL
    pair.adapter.unmerge()
    for path in paths:
        assert max_diff(pair.model.get_submodule(path).weight, pair.base.get_submodule(path).weight) <= 1e-6, path


# Frozen tensors that pefref computes exactly as peft does: its own initialisation already equals peft's.
SAME_INIT: dict[str, Callable[[nn.Module], dict[str, torch.Tensor]]] = {
    "tinylora": lambda layer: {"A": layer.tinylora_A["default"], "B": layer.tinylora_B["default"]},
    "psoft": lambda layer: dict(zip("AB", layer._get_psoft_ab_cache_buffers("default"))),
}
SAME_SET: dict[str, Callable[[nn.Module], set[int]]] = {
    # positions (flat indices into the weight) that peft and pefref draw or select: their order differs, the set does not
    "shira": lambda layer: {int(i) * layer.in_features + int(j) for i, j in layer.shira_indices["default"].t()},
    "supertuning": lambda layer: {int(i) for i in layer.supertuning_indices["default"]},
}


@pytest.mark.parametrize(("shape", "name"), [(s, n) for s, n in PAIRS if n in SAME_INIT or n in SAME_SET])
def test_pefref_initialisation_equals_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    family = family_of(shape)
    for key, fresh in pair.fresh.items():
        layer = pair.peft_model.get_base_model().get_submodule(_host_path(key, family))
        if name in SAME_INIT:
            for tname, theirs in SAME_INIT[name](layer).items():
                assert max_diff(fresh[tname], theirs) <= 1e-6, (key, tname)
        else:
            flat = fresh["loc"][0] * layer.in_features + fresh["loc"][1] if "loc" in fresh else fresh["idx"]
            assert {int(i) for i in flat} == SAME_SET[name](layer), key


# --- peft's format: forms without an exact catalog counterpart are refused, and change nothing ---------------


def _saved(tmp_path: Any, name: str, config: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model("tiny-llama")), config)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_peft_forms_without_a_catalog_form_are_refused(tmp_path: Any) -> None:
    import pefref
    from pefref.language.errors import PefrefError

    qv = QV["llama"]
    cases = {
        "topk_only": (peft.VBLoRAConfig(r=2, num_vectors=6, vector_length=8, save_only_topk_weights=True, target_modules=qv),
                      "vblora needs save_only_topk_weights=False"),
        "deep": (peft.PeanutConfig(r=4, depth=1, target_modules=qv), "peanut needs depth=0"),
        "bottom": (peft.SupertuningConfig(sparsity=0.9, select_top=False, target_modules=qv), "supertuning needs select_top=True"),
        "supra": (peft.SupertuningConfig(sparsity=0.9, r=2, target_modules=qv), "supertuning needs"),
        "neumann": (peft.PsoftConfig(r=4, use_cayley_neumann=True, target_modules=qv), "psoft needs"),
        "sparse": (peft.RandLoraConfig(r=8, sparse=True, target_modules=qv), "randlora needs"),
    }
    model = copy.deepcopy(base_model("tiny-llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (config, message) in cases.items():
        with pytest.raises(PefrefError, match=message):
            pefref.from_pretrained(model, _saved(tmp_path, name, config))
    assert not hasattr(model, "pefref_adapters")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("technique", ["shira", "psoft", "peanut", "supertuning"])
def test_linear_only_methods_are_refused_on_conv1d_and_write_nothing(technique: str, tmp_path: Any) -> None:
    import pefref
    from pefref.language.errors import PefrefError

    a = pefref.apply(copy.deepcopy(base_model("tiny-gpt2")), technique, sites=["attn.qkv"])
    with pytest.raises(PefrefError, match="adapts only linear modules"):
        a.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
