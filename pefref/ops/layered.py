"""Primitives over a leading layer dimension: how an op runs for every layer's slice at once.

A tensor declared ``stacked: layers`` holds the copies of all layers at one site
in one tensor ``[layers, *shape]``. When the units of every layer are evaluated
together (the key/value prefixes that fill the attention cache at once), an
op whose arguments include such stacked values computes, for each layer ``l``,
``op(a_l, b_l, ...)`` with shared arguments read whole; its result is stacked
again ``[layers, ...]``. The compiler does that by default one layer at a time
(unbind, call, stack); a primitive listed here has a *rule*: for a given
pattern of stacked arguments it names one function computing all layers at
once (e.g. ``linear`` of a shared input by stacked weights is one matrix product
by the weights laid end to end, as a single ``Linear(hidden, layers*out)``).
A rule returns None for patterns it does not cover, and the per-layer loop runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pefref.ops.rules import registrar

if TYPE_CHECKING:
    import torch

__all__ = ["OVER_LAYERS", "over_layers", "rule_for"]

Rule = Callable[[tuple[bool, ...]], "Callable[..., Any] | None"]

OVER_LAYERS: dict[str, Rule] = {}
"""Primitive name → rule: given which positional arguments are stacked, the function computing every layer at once (or None)."""


over_layers = registrar(OVER_LAYERS, "rule over layers")
"""``@over_layers(*names)``: register a rule for the primitives ``names``."""


def rule_for(name: str, stacked: tuple[bool, ...]) -> Callable[..., Any] | None:
    """The function computing primitive ``name`` for every layer at once, given which arguments are stacked; None: per layer."""
    rule = OVER_LAYERS.get(name)
    return None if rule is None else rule(stacked)


def linear_stacked_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:math:`x W_l^\\top + b_l` for every layer ``l`` of ``weight`` [layers, out, in] (``bias`` [layers, out]) with one
    matrix product by the weights laid end to end ([layers*out, in], a view); result [layers, ..., out]."""
    import torch.nn.functional as F

    n_l, out, d_in = weight.shape
    y = F.linear(x, weight.reshape(n_l * out, d_in), None if bias is None else bias.reshape(n_l * out))
    return y.unflatten(-1, (n_l, out)).movedim(-2, 0)


@over_layers("linear")
def _linear(stacked: tuple[bool, ...]) -> Callable[..., Any] | None:
    if len(stacked) >= 2 and not stacked[0] and stacked[1] and all(stacked[2:]):  # shared input, stacked weight (and bias)
        return linear_stacked_weight
    return None


def narrow_stacked(a: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """Every layer's ``narrow(a_l, dim, start, length)``: the same slice, one dimension further in."""
    return a.narrow(dim + 1 if dim >= 0 else dim, start, length)


@over_layers("narrow")
def _narrow(stacked: tuple[bool, ...]) -> Callable[..., Any] | None:
    return narrow_stacked if stacked[:1] == (True,) and not any(stacked[1:]) else None


def _elementwise_rule(name: str) -> Rule:
    def rule(stacked: tuple[bool, ...]) -> Callable[..., Any] | None:
        from pefref.ops import PRIMITIVES

        return PRIMITIVES[name].fn  # elementwise: a stacked tensor is only more elements
    return rule


for _name in ("tanh", "sigmoid", "relu", "gelu", "gelu_tanh", "silu", "exp"):
    over_layers(_name)(_elementwise_rule(_name))
