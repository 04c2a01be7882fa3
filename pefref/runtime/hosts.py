"""Host kinds: the few kinds of real module a site can resolve to.

A host kind knows the host's widths, its weight in the reference orientation
(``W`` of shape [out, in], so ``h = x W^T + b``) and how to run the host with a
replacement weight. Linear, transformers' Conv1D (weight stored [in, out]), one slice of a raw stacked parameter
(:mod:`pefref.runtime.param_slices`),
Embedding and norms (1-D gain) are the kinds; any other module is a *block*.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefref.runtime.param_slices import ParameterSlice

__all__ = ["HostKind", "host_kind", "HOST_KINDS", "bias_of"]


@dataclass(frozen=True)
class HostKind:
    name: str
    matches: Callable[[Any], bool]
    widths: Callable[[Any], tuple[int, int]]
    get_weight: Callable[[Any], torch.Tensor] | None = None
    set_weight: Callable[[Any, torch.Tensor], None] | None = None
    run: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    bias: Callable[[Any], torch.Tensor | None] | None = None  # linear hosts (h = x W^T + b): their bias

    @property
    def has_weight(self) -> bool:
        return self.get_weight is not None


def _is_conv1d(m: nn.Module) -> bool:
    tf = sys.modules.get("transformers.pytorch_utils")
    return tf is not None and isinstance(m, tf.Conv1D)


def _copy_into(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value)


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, (nn.Linear, nn.Embedding)) and not list(m.children())


def _is_param_slice(m: nn.Module) -> bool:
    return isinstance(m, ParameterSlice)


HOST_KINDS: list[HostKind] = [
    HostKind(
        "parameter",
        _is_param_slice,
        lambda m: (m.in_features, m.out_features),
        lambda m: m.weight,
        lambda m, w: m.set_weight(w),
        lambda m, x, w: F.linear(x, w),
        lambda m: None,
    ),
    HostKind(
        "linear",
        lambda m: isinstance(m, nn.Linear),
        lambda m: (m.in_features, m.out_features),
        lambda m: m.weight,
        lambda m, w: _copy_into(m.weight, w),
        lambda m, x, w: F.linear(x, w, m.bias),
        lambda m: m.bias,
    ),
    HostKind(
        "conv1d",
        _is_conv1d,
        lambda m: (m.weight.shape[0], m.weight.shape[1]),
        lambda m: m.weight.t(),
        lambda m, w: _copy_into(m.weight, w.t()),
        lambda m, x, w: F.linear(x, w, m.bias),
        lambda m: m.bias,
    ),
    HostKind(
        "embedding",
        lambda m: isinstance(m, nn.Embedding),
        lambda m: (m.num_embeddings, m.embedding_dim),
        lambda m: m.weight,
        lambda m, w: _copy_into(m.weight, w),
        lambda m, x, w: F.embedding(x, w, m.padding_idx),
    ),
    HostKind(
        "norm",
        _is_norm,
        lambda m: (m.weight.shape[0], m.weight.shape[0]),
        lambda m: m.weight,
        lambda m, w: _copy_into(m.weight, w),
    ),
    HostKind("block", lambda m: True, lambda m: (0, 0)),
]


def host_kind(m: nn.Module) -> HostKind:
    """The kind of a real module (the first that matches)."""
    return next(k for k in HOST_KINDS if k.matches(m))


def bias_of(kind: HostKind, host: nn.Module) -> torch.Tensor | None:
    """The host's bias ``b`` as an expression reads it: a linear host's bias (``h = x W^T + b``), a norm's shift,
    and zeros of the output width where the host has none (nn.Linear(bias=False), RMSNorm): the host then computes
    exactly ``h = x W^T + 0``, so a module reading ``b`` means the same on every family. None for other kinds."""
    if kind.bias is not None:
        b = kind.bias(host)
    elif kind.name == "norm":
        b = getattr(host, "bias", None)
        b = b if isinstance(b, torch.Tensor) else None
    else:
        return None
    if b is not None:
        return b
    w = kind.get_weight(host) if kind.get_weight is not None else None
    if w is None:
        return None
    return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
