"""Magnitudes of tensor entries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefref.ops import primitive
from pefref.ops.shapes import Shape, shape_rule

if TYPE_CHECKING:
    import torch

__all__ = ["abs_"]


@primitive(nonlinear=True, name="abs")
def abs_(a: torch.Tensor) -> torch.Tensor:
    """Entrywise magnitude :math:`|a|` (e.g. ranking a weight's entries by size, as magnitude-based sparse
    fine-tuning selects its support)."""
    return a.abs()


@shape_rule("abs")
def _abs(a: Shape) -> Shape:
    return a
