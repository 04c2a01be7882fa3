"""Shaping, indexing and routing primitives: reshape, einsum, gather, top-k and friends.

These are the tensor-shaping ops that mixtures of experts and routers need
(MoLoRA, Zadouri et al. 2023, https://arxiv.org/abs/2309.05444: a softmax router
over low-rank experts; top-k routing as in Shazeer et al. 2017,
https://arxiv.org/abs/1701.06538). They follow torch's semantics; dimensions
are integers (negative counts from the end), so expressions stay independent of
the batch and sequence sizes by indexing from the end (``dim=-1``) and by
``einsum``'s ellipsis. ``topk`` returns the values and ``topk_indices`` the
indices, so either can be used in an expression (which has no tuple unpacking);
``scatter`` puts values back at indices (e.g. a sparse gate over all experts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["reshape", "unflatten", "unsqueeze", "squeeze", "einsum", "gather", "index_select", "narrow", "topk", "topk_indices",
           "argmax", "scatter", "zeros_like", "mean", "cat", "index_copy", "count", "as_values", "amax", "distinct_above"]


@primitive(linear_in=(0,), layout=True)
def reshape(a: torch.Tensor, shape: Any) -> torch.Tensor:
    """The same entries in a new shape (a tuple; one dimension may be -1), as :func:`torch.reshape`."""
    return a.reshape(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))


@primitive(linear_in=(0,), layout=True)
def unflatten(a: torch.Tensor, dim: int, sizes: Any) -> torch.Tensor:
    """Dimension ``dim`` split into ``sizes`` (a tuple whose product is its length), the others kept:
    [..., E·r] becomes [..., E, r] for ``unflatten(a, -1, (E, r))`` whatever the leading (batch, sequence) sizes."""
    return a.unflatten(dim, tuple(sizes))


@primitive(linear_in=(0,), layout=True)
def unsqueeze(a: torch.Tensor, dim: int) -> torch.Tensor:
    """A new dimension of size 1 at ``dim``: shape [..., n] becomes [..., 1, n] for ``dim=-2``."""
    return a.unsqueeze(dim)


@primitive(linear_in=(0,), layout=True)
def squeeze(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Drops dimension ``dim`` of size 1 (the inverse of :func:`unsqueeze`)."""
    return a.squeeze(dim)


@primitive(intra="dense", linear_in=(1, 2, 3, 4, 5, 6))
def einsum(subscripts: str, *operands: torch.Tensor) -> torch.Tensor:
    """Einstein summation :math:`y_{\\ldots o} = \\sum_{e,r} g_{\\ldots e} B_{e o r} z_{\\ldots e r}` and the like,
    written as in :func:`torch.einsum`, e.g. ``einsum('...e,eor,...er->...o', g, B, z)`` (the subscripts are
    the only string literal the expression language admits). Linear in each operand."""
    import torch
    return torch.einsum(subscripts, *operands)


@primitive(linear_in=(0,), int_args=("index",))
def gather(a: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """:math:`y[\\ldots i \\ldots] = a[\\ldots \\mathrm{index}[\\ldots i \\ldots] \\ldots]` along ``dim``
    (:func:`torch.gather`: ``index`` has ``a``'s rank; other dimensions must fit ``a``'s)."""
    import torch
    return torch.gather(a, dim, index)


@primitive(linear_in=(0, 3), int_args=("index",))
def index_copy(a: torch.Tensor, dim: int, index: Any, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``a`` whose entries at positions ``index`` (a 1-D tensor or a tuple of distinct integers) along ``dim``
    are ``src``'s, in order (out-of-place :func:`torch.index_copy`): ``index_copy(W, 0, rows, R)`` is the table ``W``
    with the rows ``rows`` replaced by ``R`` (training a subset of an embedding's rows, as peft's trainable tokens
    do). Linear in ``a`` and ``src`` together."""
    import torch
    if not isinstance(index, torch.Tensor):
        index = torch.tensor(list(index) if isinstance(index, (tuple, list)) else [index], dtype=torch.long, device=a.device)
    return a.index_copy(dim, index, src.to(a.dtype))


@primitive()
def as_values(v: Any, like: torch.Tensor) -> torch.Tensor:
    """A list of integers (an ``ints`` hyperparameter) as a [n] tensor with ``like``'s dtype and device, e.g. per-token
    types that arithmetic turns into per-token masks or bounds: ``min(as_values(types, W) % 4, 1)``."""
    import torch
    return torch.tensor(list(v) if isinstance(v, (tuple, list)) else [v], dtype=like.dtype, device=like.device)


@primitive(linear_in=(0, 3), int_args=("index",))
def index_add(a: torch.Tensor, dim: int, index: Any, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``a`` with ``src``'s slices along ``dim`` added at positions ``index`` (out-of-place
    :func:`torch.index_add`; repeated positions sum): ``index_add(zeros_like(s), 0, c, x)`` sums the rows of ``x``
    per group ``c`` (a segment sum)."""
    import torch
    if not isinstance(index, torch.Tensor):
        index = torch.tensor(list(index) if isinstance(index, (tuple, list)) else [index], dtype=torch.long, device=a.device)
    return a.index_add(dim, index.long(), src.to(a.dtype))


@primitive(scalar=True)
def count(v: Any) -> int:
    """The number of entries of a list of integers (an ``ints`` hyperparameter), e.g. the rows of a table a module
    trains: ``shape: [count(rows), d]``."""
    return len(v) if isinstance(v, (tuple, list)) else 1


@primitive(linear_in=(0,), int_args=("index",))
def index_select(a: torch.Tensor, dim: int, index: Any) -> torch.Tensor:
    """The entries of ``a`` at positions ``index`` (a 1-D tensor or a tuple of integers) along ``dim``."""
    import torch
    if not isinstance(index, torch.Tensor):
        index = torch.tensor(list(index) if isinstance(index, (tuple, list)) else [index], dtype=torch.long, device=a.device)
    return torch.index_select(a, dim, index)


@primitive(linear_in=(0,), layout=True)
def narrow(a: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """The slice ``a[..., start:start+length, ...]`` along ``dim`` (the expression language has no subscripts)."""
    return a.narrow(dim, start, length)


@primitive(nonlinear=True)
def topk(a: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """The ``k`` largest values along ``dim``, in descending order (:func:`torch.topk`'s values);
    their positions are :func:`topk_indices` with the same arguments."""
    import torch
    return torch.topk(a, k, dim=dim).values


@primitive(nonlinear=True, int_out=True)
def topk_indices(a: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Positions (int64) of the ``k`` largest values along ``dim``, in the order :func:`topk` returns them."""
    import torch
    return torch.topk(a, k, dim=dim).indices


@primitive(nonlinear=True, int_out=True)
def argmax(a: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Position (int64) of the largest value along ``dim``, :math:`\\arg\\max_j a_{\\ldots j}`."""
    import torch
    return torch.argmax(a, dim=dim, keepdim=keepdim)


@primitive(nonlinear=True, int_args=("index",))
def scatter(a: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``a`` with ``src`` written at ``index`` along ``dim`` (out-of-place :func:`torch.scatter`):
    ``scatter(zeros_like(l), -1, topk_indices(l, k), softmax(topk(l, k)))`` is a top-k gate over all of ``l``'s entries."""
    import torch
    return torch.scatter(a, dim, index, src)


@primitive()
def zeros_like(a: torch.Tensor) -> torch.Tensor:
    """Zeros of ``a``'s shape, dtype and device."""
    import torch
    return torch.zeros_like(a)


@primitive(linear_in=(0,))
def mean(a: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Mean over one dimension, :math:`\\frac{1}{n}\\sum_j a_{\\ldots j}`."""
    return a.mean(dim, keepdim=keepdim)


@primitive(linear_in=(0,))
def cat(tensors: Any, dim: int = -1) -> torch.Tensor:
    """Concatenation of a tuple of tensors along ``dim``, :func:`torch.cat`."""
    import torch
    return torch.cat(tuple(tensors), dim=dim)


@primitive(nonlinear=True)
def amax(a: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """The largest value along ``dim``, :math:`\\max_j a_{\\ldots j}` (:func:`torch.amax`)."""
    import torch
    return torch.amax(a, dim=dim, keepdim=keepdim)


@primitive(nonlinear=True)
def distinct_above(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For each entry of each row (the last dimension), how many distinct values the row's masked entries
    (``mask`` nonzero) take above its own, :math:`k_{\\ldots j} = |\\{x_{\\ldots i} : m_{\\ldots i} \\ne 0,\\ x_{\\ldots i} > x_{\\ldots j}\\}|`
    (counts, ``x``'s shape): a rank among a row's groups, the largest group 0, e.g. an exponential decay over
    in-context examples, ``decay ** distinct_above(type, keep)``."""
    import torch
    m = torch.broadcast_to(mask, x.shape) != 0
    big = torch.finfo(torch.float64).min
    v = torch.where(m, x.to(torch.float64), big)  # unmasked entries never count
    s = v.sort(dim=-1).values
    first = torch.ones_like(m)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    first &= s != big  # each distinct masked value once
    above = (s.unsqueeze(-2) > x.to(torch.float64).unsqueeze(-1)) & first.unsqueeze(-2)
    return above.sum(-1)
