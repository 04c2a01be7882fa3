"""Rounding of numbers in shape and size expressions."""

from __future__ import annotations

import math
from typing import Any

from pefref.ops import primitive

__all__ = ["floor", "ceil", "round_"]


@primitive(scalar=True)
def floor(v: Any) -> int:
    """The largest integer not above a number, :math:`\\lfloor v \\rfloor`, as an integer (a count from a
    fraction, e.g. ``floor(d_in * d_out * (1 - sparsity))`` entries, which Python's ``int()`` gives for a
    positive number)."""
    return math.floor(v)


@primitive(scalar=True)
def ceil(v: Any) -> int:
    """The smallest integer not below a number, :math:`\\lceil v \\rceil`, as an integer (how many pieces of
    size ``r`` cover ``n``: ``ceil(n / r)``)."""
    return math.ceil(v)


@primitive(scalar=True)
def round_(v: Any) -> int:
    """The nearest integer to a number, a half to the even neighbour (Python's ``round``: ``round(2.5)`` is 2), as an
    integer (a count from a fraction of another, e.g. ``round(n * (1 - weight_tying))`` groups)."""
    return round(v)
