"""Laying a matrix built over (larger, smaller) dimensions onto a host's [out, in] orientation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.shapes import Shape, ShapeMismatch, shape_rule

if TYPE_CHECKING:
    import torch

__all__ = ["orient"]


@primitive(linear_in=(0,))
def orient(m: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The matrix ``m`` if it is [rows, cols], else its transpose :math:`m^\\top` (which must be): a matrix
    built over a weight's larger and smaller dimensions, [max(out, in), min(out, in)], laid on the host's
    [out, in] whichever is larger (RandLoRA's bases, Albert et al. 2025, https://arxiv.org/abs/2502.00987,
    are drawn over the larger and smaller dimensions). A square ``m`` is returned as it is."""
    if tuple(m.shape[-2:]) == (rows, cols):
        return m
    if tuple(m.shape[-2:]) != (cols, rows):
        raise ValueError(f"orient: a [{rows}, {cols}] matrix or its transpose expected, found {list(m.shape)}")
    return m.transpose(-2, -1)


@shape_rule("orient")
def _orient(m: Shape, rows: Any, cols: Any) -> Shape:
    if len(m) < 2:
        raise ShapeMismatch(f"orient needs a matrix, found {m}")
    if (m[-2], m[-1]) == (rows, cols):
        return m
    if (m[-2], m[-1]) != (cols, rows):
        raise ShapeMismatch(f"orient: {m} is neither [{rows}, {cols}] nor its transpose")
    return Shape((*m[:-2], rows, cols))
