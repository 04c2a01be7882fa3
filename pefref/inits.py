"""The initialiser registry: calls a ParamSpec's ``init`` may make.

An initialiser receives the parameter's resolved shape and the host's dtype and
device (bound by :func:`init_table`), plus the keyword arguments written in
YAML. Data-dependent initialisers read the host weight ``W`` ([out, in]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .ops import PRIMITIVES

__all__ = ["INITS", "initialiser", "init_table"]

Init = Callable[..., torch.Tensor]
INITS: dict[str, Init] = {}


def initialiser(fn: Init) -> Init:
    """Register an initialiser ``fn(shape, dtype, device, **kwargs)`` under its name."""
    key = fn.__name__.rstrip("_")
    if key in INITS:
        raise ValueError(f"initialiser {key!r} registered twice")
    INITS[key] = fn
    return fn


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@initialiser
def zeros(shape, dtype, device) -> torch.Tensor:  # noqa: ANN001
    """All zeros (makes a parallel update vanish at initialisation)."""
    return torch.zeros(shape, dtype=dtype, device=device)


@initialiser
def ones(shape, dtype, device) -> torch.Tensor:  # noqa: ANN001
    """All ones (the neutral rescaling)."""
    return torch.ones(shape, dtype=dtype, device=device)


@initialiser
def constant(shape, dtype, device, value: float = 0.0) -> torch.Tensor:  # noqa: ANN001
    """Every entry equal to ``value``."""
    return torch.full(shape, float(value), dtype=dtype, device=device)


@initialiser
def normal(shape, dtype, device, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:  # noqa: ANN001
    """:math:`\\mathcal{N}(\\mu, \\sigma^2)` entries."""
    return nn.init.normal_(_empty(shape, dtype, device), mean, std)


@initialiser
def uniform(shape, dtype, device, a: float = -1.0, b: float = 1.0) -> torch.Tensor:  # noqa: ANN001
    """:math:`\\mathcal{U}(a, b)` entries."""
    return nn.init.uniform_(_empty(shape, dtype, device), a, b)


@initialiser
def kaiming_uniform(shape, dtype, device, a: float = 0.0) -> torch.Tensor:  # noqa: ANN001
    """He et al. (2015) uniform init with negative slope ``a`` (torch.nn.Linear's default is a=sqrt(5))."""
    return nn.init.kaiming_uniform_(_empty(shape, dtype, device), a=a)


@initialiser
def xavier_uniform(shape, dtype, device, gain: float = 1.0) -> torch.Tensor:  # noqa: ANN001
    """Glorot & Bengio (2010) uniform init."""
    return nn.init.xavier_uniform_(_empty(shape, dtype, device), gain=gain)


@initialiser
def orthogonal(shape, dtype, device, gain: float = 1.0) -> torch.Tensor:  # noqa: ANN001
    """A (semi-)orthogonal matrix (Saxe et al. 2014)."""
    t = nn.init.orthogonal_(torch.empty(shape, dtype=torch.float32, device="cpu" if str(device) == "meta" else device), gain=gain)
    return t.to(dtype=dtype, device=device)


@initialiser
def eye(shape, dtype, device) -> torch.Tensor:  # noqa: ANN001
    """Identity matrix (or a stack of identities over leading dimensions)."""
    n, m = shape[-2], shape[-1]
    return torch.eye(n, m, dtype=dtype, device=device).expand(shape).clone()


def init_table(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> dict[str, Callable[..., Any]]:
    """Ops for evaluating one ``init`` expression: initialisers bound to this shape, plus scalar primitives."""
    table: dict[str, Callable[..., Any]] = {k: p.fn for k, p in PRIMITIVES.items() if p.scalar}
    for k, fn in INITS.items():
        table[k] = lambda *a, _fn=fn, **kw: _fn(shape, dtype, device, *a, **kw)
    return table


