"""Weights applied without being formed: the activation-space reading of a weight expression.

A reparameterised host runs :math:`h = x W'^\\top + b` with :math:`W' = f(W, \\theta)`
([out, in]). Computed that way, autograd keeps the formed :math:`W'` for the
backward pass (and whatever its expression saved), an ``out × in`` matrix per
host that the reference implementations never hold: they transform the
activations instead. Many weight expressions are made of operations that are
linear in the matrix they act on, and for those :math:`x W'^\\top` can be
computed from :math:`x` directly:

.. math::

    x (U + V)^\\top = x U^\\top + x V^\\top,\\quad x (cU)^\\top = c\\,(x U^\\top),\\quad
    x (BA)^\\top = (x A^\\top) B^\\top,\\quad x (\\operatorname{diag}(s) U)^\\top = (x U^\\top) \\odot s,

and each primitive that allows it registers its own reading with :func:`linear_rule`
(``blockdiag_matmul``: the input is rotated block by block; ``weight_norm`` with a
detached norm: the rows' norms are computed once without a graph and rescale the
output). A :class:`LinearMap` stands for one matrix of such an expression, known by
how it acts on activations: :meth:`~LinearMap.apply` (:math:`x M^\\top`),
:meth:`~LinearMap.apply_t` (:math:`y M`) and :meth:`~LinearMap.value` (the matrix
itself, formed without gradients only where a rule needs its value, such as a
norm, or with gradients where it does not involve ``W``).

The compiler evaluates a weight expression with every tensor wrapped as a
:class:`Leaf`: arithmetic and ops with a rule build maps, ops without one compute
their value as usual (the blocks of a rotation, a magnitude). Where the map reached
would have to form a matrix involving ``W`` with gradients, or apply a *computed*
matrix to the activations (it would be kept for backward just as the formed weight
is), :class:`NoLinearRule` is raised and the weight is formed as before. Merging,
typology and counts read the expression itself and are unaffected.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from pefref.ops.rules import registrar

__all__ = ["LinearMap", "Leaf", "NoLinearRule", "LINEAR_RULES", "linear_rule", "dense", "as_map"]

Ops = Mapping[str, Callable[..., Any]]
Shape = tuple[int | None, ...] | None


class NoLinearRule(Exception):
    """A node of a weight expression has no activation-space reading: the weight is formed instead."""


LinearRule = Callable[..., "LinearMap"]
LINEAR_RULES: dict[str, LinearRule] = {}
"""Op name -> its activation-space rule: ``rule(ops, *args, **kwargs)`` gets the op's arguments (tensors as
:class:`LinearMap`, numbers as numbers) and ``ops`` (the primitives, as the compiler traces them) and returns the
:class:`LinearMap` of the op's result, or raises :class:`NoLinearRule`."""


linear_rule = registrar(LINEAR_RULES, "linear rule")
"""``@linear_rule(*names)``: register a function as the activation-space rule of the ops ``names`` (see :data:`LINEAR_RULES`)."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def dense(ops: Ops, v: Any) -> Any:
    """``v`` as a value: a map's matrix (with gradients; :class:`NoLinearRule` where that would form a matrix
    involving ``W``), anything else unchanged (tuples element by element)."""
    if isinstance(v, LinearMap):
        return v.value(ops, False)
    if isinstance(v, tuple):
        return tuple(dense(ops, a) for a in v)
    return v


def as_map(v: Any) -> LinearMap:
    """``v`` as a :class:`LinearMap` (:class:`NoLinearRule` for a number: no matrix to act with)."""
    if isinstance(v, LinearMap):
        return v
    raise NoLinearRule(f"{type(v).__name__} where a matrix is needed")


def _same(a: Shape, b: Shape) -> bool:
    """Two shapes that can be told equal (every entry known and equal)."""
    return a is not None and b is not None and len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


class LinearMap:
    """A matrix :math:`M` [out, in] known by how it acts on activations.

    ``shape``: its shape where known (entries may be None); ``involves_w``: whether it depends on the host weight
    (forming it with gradients is what the activation-space reading avoids)."""

    shape: Shape = None
    involves_w: bool = False

    def apply(self, ops: Ops, x: Any) -> Any:
        """:math:`x M^\\top` for ``x`` [..., in]."""
        raise NoLinearRule(f"{type(self).__name__} cannot act on activations")

    def apply_t(self, ops: Ops, y: Any) -> Any:
        """:math:`y M` for ``y`` [..., out]."""
        raise NoLinearRule(f"{type(self).__name__} cannot act transposed")

    def value(self, ops: Ops, detached: bool) -> Any:
        """The matrix itself; ``detached``: as a constant (no graph is built)."""
        raise NoLinearRule(f"{type(self).__name__} has no value")

    def _formable(self, detached: bool) -> None:
        if not detached and self.involves_w:
            raise NoLinearRule("forming a matrix that involves W with gradients")

    # --- arithmetic: linear combinations and products stay maps; anything else is computed on values ---

    def _values(self, other: Any, fn: Callable[[Any, Any], Any], swap: bool = False) -> LinearMap:
        a, b = (other, self) if swap else (self, other)
        return Leaf(fn(_plain(a), _plain(b)))

    def __add__(self, other: Any) -> LinearMap:
        if isinstance(other, LinearMap) and _same(self.shape, other.shape):
            return Sum(self, other, 1.0)
        return self._values(other, operator.add)

    def __radd__(self, other: Any) -> LinearMap:
        return self._values(other, operator.add, swap=True)

    def __sub__(self, other: Any) -> LinearMap:
        if isinstance(other, LinearMap) and _same(self.shape, other.shape):
            return Sum(self, other, -1.0)
        return self._values(other, operator.sub)

    def __rsub__(self, other: Any) -> LinearMap:
        return self._values(other, operator.sub, swap=True)

    def __mul__(self, other: Any) -> LinearMap:
        if _number(other):
            return Scaled(float(other), self)
        if isinstance(other, LinearMap):
            scaled = _vector_scale(other, self) or _vector_scale(self, other)
            if scaled is not None:
                return scaled
        return self._values(other, operator.mul)

    def __rmul__(self, other: Any) -> LinearMap:
        if _number(other):
            return Scaled(float(other), self)
        return self._values(other, operator.mul, swap=True)

    def __truediv__(self, other: Any) -> LinearMap:
        if _number(other) and other != 0:
            return Scaled(1.0 / float(other), self)
        return self._values(other, operator.truediv)

    def __rtruediv__(self, other: Any) -> LinearMap:
        return self._values(other, operator.truediv, swap=True)

    def __matmul__(self, other: Any) -> LinearMap:
        if isinstance(other, LinearMap):
            return Product(self, other)
        return self._values(other, operator.matmul)

    def __rmatmul__(self, other: Any) -> LinearMap:
        return self._values(other, operator.matmul, swap=True)

    def __floordiv__(self, other: Any) -> LinearMap:
        return self._values(other, operator.floordiv)

    def __rfloordiv__(self, other: Any) -> LinearMap:
        return self._values(other, operator.floordiv, swap=True)

    def __mod__(self, other: Any) -> LinearMap:
        return self._values(other, operator.mod)

    def __rmod__(self, other: Any) -> LinearMap:
        return self._values(other, operator.mod, swap=True)

    def __pow__(self, other: Any) -> LinearMap:
        return self._values(other, operator.pow)

    def __rpow__(self, other: Any) -> LinearMap:
        return self._values(other, operator.pow, swap=True)

    def __neg__(self) -> LinearMap:
        return Scaled(-1.0, self)

    def __pos__(self) -> LinearMap:
        return self


def _plain(v: Any) -> Any:
    """A value for an operation without a linear reading: a leaf's tensor, a composite's matrix where that
    involves no ``W`` (computed the way the formed weight computes it; ops are not needed for that)."""
    if isinstance(v, Leaf):
        return v.t
    if isinstance(v, LinearMap):
        raise NoLinearRule(f"{type(v).__name__} used where no linear rule applies")
    return v


class Leaf(LinearMap):
    """A tensor. ``named``: one of the unit's own tensors or ``W`` (it exists anyway, so acting with it keeps
    nothing new alive); a *computed* tensor (an op's result) is not applied to activations: autograd would keep it
    just as it keeps a formed weight."""

    def __init__(self, t: Any, shape: Shape = None, named: bool = False, involves_w: bool = False) -> None:
        self.t, self.shape, self.named, self.involves_w = t, shape, named, involves_w

    def _matrix(self) -> None:
        if not self.named or self.shape is None or len(self.shape) != 2:
            raise NoLinearRule("only the unit's own matrices and W act on activations (a computed matrix would be kept)")

    def apply(self, ops: Ops, x: Any) -> Any:
        self._matrix()
        return ops["linear"](x, self.t)

    def apply_t(self, ops: Ops, y: Any) -> Any:
        self._matrix()
        return ops["matmul"](y, self.t)

    def value(self, ops: Ops, detached: bool) -> Any:
        return ops["detach"](self.t) if detached else self.t


class Sum(LinearMap):
    """:math:`A + sB` (s = ±1)."""

    def __init__(self, a: LinearMap, b: LinearMap, sign: float) -> None:
        self.a, self.b, self.sign = a, b, sign
        self.shape, self.involves_w = a.shape, a.involves_w or b.involves_w

    def _join(self, u: Any, v: Any) -> Any:
        return u + v if self.sign > 0 else u - v

    def apply(self, ops: Ops, x: Any) -> Any:
        return self._join(self.a.apply(ops, x), self.b.apply(ops, x))

    def apply_t(self, ops: Ops, y: Any) -> Any:
        return self._join(self.a.apply_t(ops, y), self.b.apply_t(ops, y))

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        return self._join(self.a.value(ops, detached), self.b.value(ops, detached))


class Scaled(LinearMap):
    """:math:`cM` for a number :math:`c`."""

    def __init__(self, c: float, m: LinearMap) -> None:
        self.c, self.m = c, m
        self.shape, self.involves_w = m.shape, m.involves_w

    def _inner(self) -> bool:
        """Scale the narrower side: the input when the map widens it (e.g. the rank-r input of ``c * B``)."""
        sh = self.shape
        return sh is not None and len(sh) == 2 and sh[0] is not None and sh[1] is not None and sh[1] < sh[0]

    def apply(self, ops: Ops, x: Any) -> Any:
        return self.m.apply(ops, self.c * x) if self._inner() else self.c * self.m.apply(ops, x)

    def apply_t(self, ops: Ops, y: Any) -> Any:
        return self.c * self.m.apply_t(ops, y) if self._inner() else self.m.apply_t(ops, self.c * y)

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        return self.c * self.m.value(ops, detached)


class Product(LinearMap):
    """:math:`AB`: :math:`x (AB)^\\top = (x B^\\top) A^\\top`, never forming :math:`AB`."""

    def __init__(self, a: LinearMap, b: LinearMap) -> None:
        self.a, self.b = a, b
        sa, sb = a.shape, b.shape
        self.shape = (sa[0], sb[1]) if sa is not None and sb is not None and len(sa) == 2 and len(sb) == 2 else None
        self.involves_w = a.involves_w or b.involves_w

    def apply(self, ops: Ops, x: Any) -> Any:
        return self.a.apply(ops, self.b.apply(ops, x))

    def apply_t(self, ops: Ops, y: Any) -> Any:
        return self.b.apply_t(ops, self.a.apply_t(ops, y))

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        return ops["matmul"](self.a.value(ops, detached), self.b.value(ops, detached))


class Transposed(LinearMap):
    """:math:`M^\\top`."""

    def __init__(self, m: LinearMap) -> None:
        self.m, self.involves_w = m, m.involves_w
        self.shape = (m.shape[1], m.shape[0]) if m.shape is not None and len(m.shape) == 2 else None

    def apply(self, ops: Ops, x: Any) -> Any:
        return self.m.apply_t(ops, x)

    def apply_t(self, ops: Ops, y: Any) -> Any:
        return self.m.apply(ops, y)

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        return ops["t"](self.m.value(ops, detached))


class VectorScaled(LinearMap):
    """:math:`\\operatorname{diag}(v) M` (``rows``: ``v`` is [out, 1]) or :math:`M \\operatorname{diag}(v)` (``v`` is [1, in])."""

    def __init__(self, v: Leaf, m: LinearMap, rows: bool) -> None:
        self.v, self.m, self.rows = v, m, rows
        self.shape, self.involves_w = m.shape, m.involves_w or v.involves_w

    def apply(self, ops: Ops, x: Any) -> Any:
        v = self.v.t.reshape(-1)
        return self.m.apply(ops, x) * v if self.rows else self.m.apply(ops, x * v)

    def apply_t(self, ops: Ops, y: Any) -> Any:
        v = self.v.t.reshape(-1)
        return self.m.apply_t(ops, y * v) if self.rows else self.m.apply_t(ops, y) * v

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        return self.v.value(ops, detached) * self.m.value(ops, detached)


def _vector_scale(v: LinearMap, m: LinearMap) -> LinearMap | None:
    """``v * m`` as a row or column scaling of the matrix ``m``, when ``v`` is a tensor of shape [out, 1] or [1, in]."""
    if not isinstance(v, Leaf) or v.shape is None or len(v.shape) != 2 or m.shape is None or len(m.shape) != 2:
        return None
    if v.shape[1] == 1 and v.shape[0] is not None and v.shape[0] == m.shape[0]:
        return VectorScaled(v, m, rows=True)
    if v.shape[0] == 1 and v.shape[1] is not None and v.shape[1] == m.shape[1]:
        return VectorScaled(v, m, rows=False)
    return None


class Mapped(LinearMap):
    """A map given by closures (what a primitive's rule returns): ``apply``, optionally ``apply_t`` and ``value``."""

    def __init__(self, shape: Shape, involves_w: bool, apply: Callable[[Any], Any], apply_t: Callable[[Any], Any] | None = None,
                 value: Callable[[bool], Any] | None = None) -> None:
        self.shape, self.involves_w = shape, involves_w
        self._apply, self._apply_t, self._value = apply, apply_t, value

    def apply(self, ops: Ops, x: Any) -> Any:
        return self._apply(x)

    def apply_t(self, ops: Ops, y: Any) -> Any:
        if self._apply_t is None:
            raise NoLinearRule("no transposed reading")
        return self._apply_t(y)

    def value(self, ops: Ops, detached: bool) -> Any:
        self._formable(detached)
        if self._value is None:
            raise NoLinearRule("no value")
        return self._value(detached)


# --- rules of the linear-algebra primitives ---------------------------------------------------------


@linear_rule("matmul")
def _matmul(ops: Ops, a: Any, b: Any) -> LinearMap:
    return as_map(a) @ as_map(b)


@linear_rule("t")
def _t(ops: Ops, a: Any) -> LinearMap:
    m = as_map(a)
    if m.shape is None or len(m.shape) != 2:  # a batch of matrices: transposed as a value
        return Leaf(ops["t"](dense(ops, m)))
    return Transposed(m)
