"""bf16 parity with peft's adapter dtype policy, as data shared by the tests and the measurement script.

peft builds an adapter on a bf16 model (its ``autocast_adapter_dtype=True`` keeps the adapter's tensors in
fp32), perturbs and saves it; pefref loads the folder onto the same bf16 model (default policy, and
``adapter_dtype="host"``) and onto its fp32 copy. ``measure`` returns the output differences and, for
mergeable techniques, whether the merged weights equal peft's bit for bit.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from torch import nn

import pefref
from pefref.language.catalog import default_catalog
from pefref.models.build import build_model

from .interop_cases import CASES, out, perturb

__all__ = ["BF16_CASES", "Bf16Record", "measure"]

BF16_CASES = ["lora", "dora", "ia3", "prefix_direct"]


@functools.cache
def bf16_base(shape: str) -> nn.Module:
    return build_model(shape, seed=0).to(torch.bfloat16)


@dataclass(frozen=True)
class Bf16Record:
    vs_peft: float  # max |pefref - peft| of the outputs, both on the bf16 model
    to_fp32: float  # max |pefref - fp32 result| (the same adapter on the fp32 copy of the model)
    host_to_fp32: float  # the same with adapter_dtype="host"
    peft_to_fp32: float
    mean_to_fp32: float  # mean |pefref - fp32 result|
    host_mean_to_fp32: float  # the same with adapter_dtype="host"
    merged_equal: bool | None  # merged host weights torch.equal to peft's (None: not mergeable)
    merged_max: float  # their max abs difference
    adapter_dtypes: frozenset[torch.dtype]  # of pefref's trainable tensors (default policy)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, -n:].float() - b[:, -n:].float()).abs().max())


def _mean(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, -n:].float() - b[:, -n:].float()).abs().mean())


def measure(shape: str, name: str, folder: Path) -> Bf16Record:
    case = CASES[name]
    assert case.peft is not None
    family = default_catalog().shape(shape).family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(bf16_base(shape)), case.peft(family)).eval()
    perturb(p for p in pm.parameters() if p.requires_grad)
    theirs = out(pm, shape)
    pm.save_pretrained(folder)
    mine = pefref.from_pretrained(copy.deepcopy(bf16_base(shape)), folder)
    host = pefref.from_pretrained(copy.deepcopy(bf16_base(shape)), folder, adapter_dtype="host")
    full = pefref.from_pretrained(copy.deepcopy(bf16_base(shape)).float(), folder)
    got, ref = out(mine.model, shape), out(full.model, shape)
    equal, worst = None, 0.0
    if mine.mergeable_units and len(mine.mergeable_units) == len(mine.units):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = pm.merge_and_unload()
        mine.merge()
        theirs_w = dict(merged.named_parameters())
        pairs = [(p, theirs_w[n]) for n, p in mine.model.named_parameters() if n in theirs_w]
        changed = [(a, b) for a, b in pairs if not torch.equal(a, bf16_base(shape).get_parameter(_name(mine.model, a)))]
        assert changed
        equal = all(torch.equal(a, b) for a, b in pairs)
        worst = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    hosted = out(host.model, shape)
    return Bf16Record(_diff(got, theirs), _diff(got, ref), _diff(hosted, ref), _diff(theirs, ref), _mean(got, ref), _mean(hosted, ref), equal, worst,
                      frozenset(p.dtype for p in mine.trainable_parameters()))


def _name(model: nn.Module, t: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is t)
