"""The initialiser registry: calls a ParamSpec's ``init`` may make.

Initialisers register with :func:`initialiser`, here or beside the primitives
of their topic in :mod:`pefref.ops`.

An initialiser receives the parameter's resolved shape and the host's dtype and
device (bound by :func:`init_table`), plus the keyword arguments written in
YAML. Data-dependent initialisers read the host weight ``W`` ([out, in]).

A *filler* (``@initialiser(filler=True)``) makes a floating tensor of exactly the
bound shape and dtype whose values alone depend on it. On the meta device
(a model built without weights, loaded later) there are no values to make, so
:func:`init_table` binds fillers to an empty meta tensor: no random draw, no
decomposition of ``uniform_`` and friends, the same shapes and dtypes. Every other
device runs the filler itself (bit-identical results).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



__all__ = ["INITS", "FILLERS", "MIN_DIMS", "INTEGER", "initialiser", "init_table"]

Init = Callable[..., Any]
INITS: dict[str, Init] = {}
FILLERS: set[str] = set()
"""Initialisers whose result is a floating tensor of the bound shape and dtype (values only depend on them)."""


MIN_DIMS: dict[str, int] = {}
"""Initialisers that need a tensor of at least so many dimensions (fan in and out, a matrix), checked at validate."""


INTEGER: set[str] = set()
"""Initialisers that make integer tensors (indices; stored ``trainable: false``)."""


def initialiser(fn: Init | None = None, *, filler: bool = False, min_dims: int = 0, integer: bool = False) -> Any:
    """Register an initialiser ``fn(shape, dtype, device, **kwargs)`` under its name.

    ``filler=True``: ``fn`` returns a floating tensor of exactly ``shape`` and ``dtype`` (its values are all it
    decides), so on the meta device an empty tensor stands for it (see the module's docstring).
    ``min_dims``: the fewest dimensions the parameter may have (validate refuses fewer); ``integer``: it makes an
    integer tensor (validate tracks it as indices, and refuses it trainable)."""

    def register(f: Init) -> Init:
        key = f.__name__.rstrip("_")
        if key in INITS:
            raise ValueError(f"initialiser {key!r} registered twice")
        INITS[key] = f
        if filler:
            FILLERS.add(key)
        if min_dims:
            MIN_DIMS[key] = min_dims
        if integer:
            INTEGER.add(key)
        return f

    return register if fn is None else register(fn)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    import torch
    return torch.empty(shape, dtype=dtype, device=device)


@initialiser(filler=True)
def zeros(shape, dtype, device) -> torch.Tensor:
    """All zeros (makes a parallel update vanish at initialisation)."""
    import torch
    return torch.zeros(shape, dtype=dtype, device=device)


@initialiser(filler=True)
def ones(shape, dtype, device) -> torch.Tensor:
    """All ones (the neutral rescaling)."""
    import torch
    return torch.ones(shape, dtype=dtype, device=device)


@initialiser(filler=True)
def constant(shape, dtype, device, value: float = 0.0) -> torch.Tensor:
    """Every entry equal to ``value``."""
    import torch
    return torch.full(shape, float(value), dtype=dtype, device=device)


@initialiser(filler=True)
def normal(shape, dtype, device, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """:math:`\\mathcal{N}(\\mu, \\sigma^2)` entries."""
    import torch
    return torch.nn.init.normal_(_empty(shape, dtype, device), mean, std)


@initialiser(filler=True)
def uniform(shape, dtype, device, a: float = -1.0, b: float = 1.0) -> torch.Tensor:
    """:math:`\\mathcal{U}(a, b)` entries."""
    import torch
    return torch.nn.init.uniform_(_empty(shape, dtype, device), a, b)


@initialiser(filler=True, min_dims=2)
def kaiming_uniform(shape, dtype, device, a: float = 0.0) -> torch.Tensor:
    """He et al. (2015) uniform init with negative slope ``a`` (torch.nn.Linear's default is a=sqrt(5))."""
    import torch
    return torch.nn.init.kaiming_uniform_(_empty(shape, dtype, device), a=a)


@initialiser(filler=True, min_dims=2)
def xavier_uniform(shape, dtype, device, gain: float = 1.0) -> torch.Tensor:
    """Glorot & Bengio (2010) uniform init."""
    import torch
    return torch.nn.init.xavier_uniform_(_empty(shape, dtype, device), gain=gain)


@initialiser(filler=True, min_dims=2)
def orthogonal(shape, dtype, device, gain: float = 1.0) -> torch.Tensor:
    """A (semi-)orthogonal matrix (Saxe et al. 2014)."""
    import torch
    t = torch.nn.init.orthogonal_(torch.empty(shape, dtype=torch.float32, device="cpu" if str(device) == "meta" else device), gain=gain)
    return t.to(dtype=dtype, device=device)


@initialiser(filler=True, min_dims=2)
def eye(shape, dtype, device) -> torch.Tensor:
    """Identity matrix (or a stack of identities over leading dimensions)."""
    import torch
    n, m = shape[-2], shape[-1]
    return torch.eye(n, m, dtype=dtype, device=device).expand(shape).clone()


@initialiser
def rows(shape, dtype, device, W: torch.Tensor, ids: Any) -> torch.Tensor:
    """Rows ``ids`` of a host tensor ``W`` ([n, width]), repeated in order until ``shape[0]`` rows are filled
    (and cut there): :math:`P_j = W_{\\mathrm{ids}[j \\bmod |\\mathrm{ids}|]}`. At an embedding site ``W`` is the
    token embedding table, so ``rows(W, ids=(101, 2023, 3319))`` starts a prompt from the embeddings of chosen
    vocabulary tokens, as Lester et al. (2021, https://arxiv.org/abs/2104.08691) and peft's text initialisation
    do; only the selected rows are copied, never the table."""
    import torch
    ids = [int(i) for i in (ids if isinstance(ids, (tuple, list)) else (ids,))]
    if not ids or min(ids) < -W.shape[0] or max(ids) >= W.shape[0]:
        raise ValueError(f"rows: ids must be rows of W (0..{W.shape[0] - 1}), found {ids}")
    if tuple(shape[1:]) != tuple(W.shape[1:]):
        raise ValueError(f"rows: W's rows have shape {tuple(W.shape[1:])}, the parameter's rows {tuple(shape[1:])}")
    picked = [ids[j % len(ids)] for j in range(shape[0])]
    return W.detach()[torch.tensor(picked, dtype=torch.long, device=W.device)].to(dtype=dtype, device=device).clone()


@initialiser
def sampled_rows(shape, dtype, device, W: torch.Tensor, high: int = 0) -> torch.Tensor:
    """``shape[0]`` rows of a host tensor ``W`` drawn uniformly at random with replacement among its first
    ``high`` rows (all rows when 0): Lester et al.'s (2021, https://arxiv.org/abs/2104.08691) prompt
    initialisation from sampled vocabulary embeddings (they sample among the 5,000 most common tokens)."""
    import torch
    n = W.shape[0] if not high else min(int(high), W.shape[0])
    picked = torch.randint(0, n, (shape[0],), device=W.device)
    return rows(shape, dtype, device, W, tuple(picked.tolist()))


def init_table(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> dict[str, Callable[..., Any]]:
    """Ops for evaluating one ``init`` expression: initialisers bound to this shape, plus every primitive
    (data-dependent initialisations compute from the host weight ``W``). On the meta device fillers give
    an empty meta tensor. The table is made once per (shape, dtype, device); do not modify it."""
    return _table(tuple(shape), dtype, str(device), tuple(INITS.values()))  # the registry's functions are part of the key


def _arg_names(fn: Init) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(fn).parameters)[3:]  # after shape, dtype, device


def _meta_fill(fn: Init, names: tuple[str, ...], shape: tuple[int, ...], dtype: torch.dtype, *a: Any, **kw: Any) -> torch.Tensor:
    """A filler on the meta device: an empty tensor (arguments it does not take go to ``fn``, which reports them)."""
    if len(a) > len(names) or not set(kw) <= set(names[len(a):]):
        return fn(shape, dtype, "meta", *a, **kw)
    return _empty(shape, dtype, "meta")


@functools.lru_cache(maxsize=256)
def _table(shape: tuple[int, ...], dtype: torch.dtype, device: str, _fns: tuple[Init, ...]) -> dict[str, Callable[..., Any]]:
    from pefref.ops import PRIMITIVES  # here, not at import: primitive modules register initialisers too

    table: dict[str, Callable[..., Any]] = {k: p.fn for k, p in PRIMITIVES.items()}
    meta = device == "meta"
    for k, fn in INITS.items():
        if meta and k in FILLERS:
            table[k] = functools.partial(_meta_fill, fn, _arg_names(fn), shape, dtype)
        else:
            table[k] = lambda *a, _fn=fn, **kw: _fn(shape, dtype, device, *a, **kw)
    return table
