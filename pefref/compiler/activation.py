"""The activation-space forward of a reparameterised unit: :math:`x W'^\\top` without forming :math:`W'`.

The compiler traces it beside the unit's ``weight`` program (see :mod:`pefref.ops.linear_maps` for the
algebra and the rules the primitives register). :func:`linear_forward` evaluates the weight expression
with every tensor as a :class:`~pefref.ops.linear_maps.Leaf` and applies the map it reaches to ``x``;
:class:`~pefref.ops.linear_maps.NoLinearRule` means the expression has no such reading (the unit then
has none, and its host runs with the formed weight).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from pefref.language.expr import Expr, evaluate
from pefref.ops.linear_maps import LINEAR_RULES, Leaf, LinearMap, NoLinearRule, dense

__all__ = ["linear_forward", "NoLinearRule"]


def _has_map(values: Iterable[Any]) -> bool:
    return any(isinstance(v, LinearMap) or (isinstance(v, tuple) and _has_map(v)) for v in values)


def _involves_w(values: Iterable[Any]) -> bool:
    return any((isinstance(v, LinearMap) and v.involves_w) or (isinstance(v, tuple) and _involves_w(v)) for v in values)


def _lifted(name: str, fn: Callable[..., Any], ops: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """``fn`` taking maps: the op's linear rule where it has one, else the op on the values (a new leaf)."""
    rule = LINEAR_RULES.get(name)

    def call(*args: Any, **kwargs: Any) -> Any:
        w = False
        if _has_map(args) or _has_map(kwargs.values()):
            if rule is not None:
                return rule(ops, *args, **kwargs)
            w = _involves_w(args) or _involves_w(kwargs.values())
            args = dense(ops, tuple(args))
            kwargs = {k: dense(ops, v) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return Leaf(out, involves_w=w) if isinstance(out, (fx.Proxy, torch.Tensor)) else out

    return call


def linear_forward(expr: Expr, env: Mapping[str, Any], ops: Mapping[str, Callable[..., Any]], x: Any,
                   shapes: Mapping[str, tuple[int, ...]], w_shape: tuple[int, int]) -> Any:
    """:math:`x W'^\\top` for the weight expression ``expr`` (no bias), read in activation space.

    ``env``: the names as the formed program sees them (``W``, the unit's tensors, constants); ``shapes``: the
    unit's tensors' shapes; ``w_shape``: ``W``'s ([out, in]). Raises :class:`NoLinearRule` where a node has no
    activation-space reading."""
    lenv: dict[str, Any] = {}
    for k, v in env.items():
        if k == "W":
            lenv[k] = Leaf(v, w_shape, named=True, involves_w=True)
        elif k in shapes:
            lenv[k] = Leaf(v, tuple(shapes[k]), named=True)
        elif isinstance(v, (fx.Proxy, torch.Tensor)):
            lenv[k] = Leaf(v)
        else:
            lenv[k] = v
    lifted = {name: _lifted(name, fn, ops) for name, fn in ops.items()}
    root = evaluate(expr, lenv, lifted)
    if not isinstance(root, LinearMap) or not root.involves_w:
        raise NoLinearRule("the weight does not act through W")
    return root.apply(ops, x)
