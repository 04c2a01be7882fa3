"""Entrywise and normalising primitives: sine, cosine, clamping, layer normalisation, flattening, lookup.

Each follows torch's semantics; dimensions are integers (negative from the end) so expressions stay
independent of the batch and sequence sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["sin", "cos", "clamp", "layer_norm", "flatten", "take", "strided"]


@primitive(nonlinear=True)
def sin(a: torch.Tensor) -> torch.Tensor:
    """Entrywise sine :math:`\\sin a` (periodic features and rotations, e.g. RoAd's 2×2 rotations,
    Liao et al. 2024, https://arxiv.org/abs/2409.00119)."""
    import torch
    return torch.sin(a)


@primitive(nonlinear=True)
def cos(a: torch.Tensor) -> torch.Tensor:
    """Entrywise cosine :math:`\\cos a` (see :func:`sin`)."""
    import torch
    return torch.cos(a)


@primitive(nonlinear=True)
def clamp(a: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    """Entrywise :math:`\\min(\\max(a, \\text{min}), \\text{max})` (either bound may be left out), :func:`torch.clamp`."""
    import torch
    return torch.clamp(a, min=min, max=max)


@primitive(nonlinear=True)
def layer_norm(a: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension (Ba et al. 2016, https://arxiv.org/abs/1607.06450),

    :math:`y = \\frac{a - \\mathrm{E}[a]}{\\sqrt{\\mathrm{Var}[a] + \\epsilon}} \\odot \\gamma + \\beta`

    with the biased variance, optional gain ``weight`` :math:`\\gamma` and shift ``bias`` :math:`\\beta` of the
    last dimension's width (:func:`torch.nn.functional.layer_norm`)."""
    import torch.nn.functional as F
    return F.layer_norm(a, (a.shape[-1],), weight, bias, eps)


@primitive(linear_in=(0,), layout=True)
def flatten(a: torch.Tensor, start: int = -2, end: int = -1) -> torch.Tensor:
    """Dimensions ``start`` .. ``end`` (inclusive) merged into one, the others kept: [..., E, r] becomes [..., E·r]
    with the defaults, the inverse of ``unflatten(a, -1, (E, r))`` (:func:`torch.flatten`). Linear in ``a``."""
    return a.flatten(start, end)


@primitive(linear_in=(0,), int_args=("index",))
def take(a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` picked by an integer tensor of any shape, :math:`y[i_1..i_k] = a[\\mathrm{index}[i_1..i_k]]`
    (``a[index]``; shape ``index.shape + a.shape[1:]``): a shared bank read at stored positions, as UniLoRA builds
    its factors from one vector (Li et al. 2025, https://arxiv.org/abs/2506.00799). Linear in ``a``."""
    return a[index.long()]


@primitive(linear_in=(0,))
def strided(a: torch.Tensor, dim: int, start: int, step: int) -> torch.Tensor:
    """Every ``step``-th entry of ``a`` along ``dim`` from ``start``, ``a[..., start::step, ...]`` (e.g. the even and
    odd rows of one orthogonal draw, as peft's orthogonal LoRA initialisation splits it). Linear in ``a``."""
    index = [slice(None)] * a.dim()
    index[dim] = slice(start, None, step)
    return a[tuple(index)]
