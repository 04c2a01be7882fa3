"""The features a sliced site owns in a fused projection: a contiguous block, or one block per period.

A fused projection computes several sites at once. GPT-2's ``c_attn`` stacks
them (q is features ``[0, d)``); GPT-NeoX's ``query_key_value`` interleaves them
per head (``[h0q, h0k, h0v, h1q, ...]``), so q is the first ``d_head`` features
of every period of ``3 * d_head``. A site's features are

.. math:: \\{\\, j \\cdot p + s + t : 0 \\le j < n/p,\\ 0 \\le t < k \\,\\}

for start ``s``, size ``k`` and period ``p`` (``p = 0``: one block, ``p = n``),
in that order, where ``n`` is the module's width along the dimension. Reading
and replacing them are views and one ``torch.cat``: no index tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

__all__ = ["take", "replace", "replace_each", "disjoint", "site_width"]


def _unfold(t: torch.Tensor, dim: int, period: int) -> tuple[torch.Tensor, int]:
    """``t`` with ``dim`` split into (periods, period), and the index of the period axis."""
    n = t.shape[dim]
    if n % period:
        raise ValueError(f"width {n} is not a multiple of the slice's period {period}")
    dim = dim % t.dim()
    return t.unflatten(dim, (n // period, period)), dim + 1


def take(t: torch.Tensor, dim: int, start: int, size: int, period: int = 0) -> torch.Tensor:
    """The site's features of ``t`` along ``dim`` (all of them when ``size`` is 0)."""
    if not size:
        return t
    if not period:
        return t.narrow(dim, start, size)
    u, ax = _unfold(t, dim, period)
    return u.narrow(ax, start, size).flatten(ax - 1, ax)


def replace(t: torch.Tensor, dim: int, start: int, size: int, period: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``t`` with the site's features along ``dim`` replaced by ``fn`` of them (differentiable, out of place)."""
    return replace_each(t, dim, [(start, size)], period, [fn])


def replace_each(t: torch.Tensor, dim: int, spans: Sequence[tuple[int, int]], period: int,
                 fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """``t`` with each of several disjoint spans (start, size) of one period replaced by its ``fn``, in one cat."""
    if len(spans) == 1 and not spans[0][1]:
        return fns[0](t)
    if period:
        u, ax = _unfold(t, dim, period)
        width = period
    else:
        u, ax, width = t, dim % t.dim(), t.shape[dim]
    pieces: list[torch.Tensor] = []
    pos = 0
    for (s, k), fn in sorted(zip(spans, fns), key=lambda p: p[0][0]):
        if s > pos:
            pieces.append(u.narrow(ax, pos, s - pos))
        block = u.narrow(ax, s, k)
        if period:
            pieces.append(fn(block.flatten(ax - 1, ax)).unflatten(ax - 1, (u.shape[ax - 1], k)))
        else:
            pieces.append(fn(block))
        pos = s + k
    if pos < width:
        pieces.append(u.narrow(ax, pos, width - pos))
    out = torch.cat(pieces, dim=ax)
    return out.flatten(ax - 1, ax) if period else out


def disjoint(spans: Sequence[tuple[int, int, int]]) -> bool:
    """Whether slices (start, size, period), all sliced and of one period, own no feature twice."""
    if not spans or not all(k for _s, k, _p in spans) or len({p for _s, _k, p in spans}) != 1:
        return False
    s = sorted(spans)
    return all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(s))


def site_width(width: int, start: int, size: int, period: int) -> int:
    """How many of a module's ``width`` features a slice owns; ValueError when it does not fit."""
    if start < 0 or size <= 0:
        raise ValueError(f"slice start {start}, size {size}: the start must be >= 0 and the size > 0")
    if not period:
        if start + size > width:
            raise ValueError(f"slice [{start}, {start + size}) is outside the {width} output features")
        return size
    if start + size > period:
        raise ValueError(f"slice [{start}, {start + size}) does not fit in its period {period}")
    if period <= 0 or width % period:
        raise ValueError(f"the {width} output features are not a whole number of periods of {period}")
    return size * (width // period)
