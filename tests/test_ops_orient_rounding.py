"""The primitives orient (a [max, min] matrix laid on [out, in]), floor and ceil (counts in shapes), abs."""

from __future__ import annotations

import pytest
import torch

from pefref.language.sizes import eval_scalar
from pefref.ops import PRIMITIVES
from pefref.ops.shapes import SHAPE_RULES, Shape, ShapeMismatch


def test_orient_returns_the_matrix_or_its_transpose() -> None:
    orient = PRIMITIVES["orient"].fn
    m = torch.arange(6.0).reshape(3, 2)
    assert orient(m, 3, 2) is m
    assert torch.equal(orient(m, 2, 3), m.t())
    sq = torch.arange(4.0).reshape(2, 2)
    assert orient(sq, 2, 2) is sq  # square: as it is
    with pytest.raises(ValueError, match="orient"):
        orient(m, 4, 2)


def test_orient_shape_rule() -> None:
    rule = SHAPE_RULES["orient"]
    assert rule(Shape((96, 32)), 96, 32) == (96, 32)
    assert rule(Shape((96, 32)), 32, 96) == (32, 96)
    with pytest.raises(ShapeMismatch):
        rule(Shape((96, 32)), 32, 32)


def test_floor_and_ceil_give_integers_in_size_expressions() -> None:
    names = {"d_in": 32, "d_out": 32, "sparsity": 0.9, "r": 8, "n": 17}
    value = eval_scalar("floor(d_out * d_in * (1 - sparsity))", names)
    assert value == int(32 * 32 * (1 - 0.9)) == 102 and isinstance(value, int)
    assert eval_scalar("ceil(n / r)", names) == 3
    assert eval_scalar("ceil(d_in / r)", names) == 4
    assert PRIMITIVES["floor"].scalar and PRIMITIVES["ceil"].scalar


def test_abs_is_the_entrywise_magnitude() -> None:
    a = torch.tensor([[-2.0, 0.5], [0.0, -0.25]])
    assert torch.equal(PRIMITIVES["abs"].fn(a), a.abs())
    assert SHAPE_RULES["abs"](Shape((2, 2))) == (2, 2)
    assert PRIMITIVES["abs"].nonlinear
