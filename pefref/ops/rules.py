"""Per-op rule tables: one registering decorator for every kind of rule an op may carry.

Shape rules, workspace rules, activation-space (linear) rules and rules over a
layer dimension are each a table from op name to a function; a name is
registered once per table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["registrar"]

F = TypeVar("F", bound=Callable[..., Any])


def registrar(table: dict[str, F], what: str) -> Callable[..., Callable[[F], F]]:
    """A decorator factory ``register(*names)`` that enters a function in ``table`` under each of ``names``.

    Args:
        table: the rule table (op name -> function).
        what: the rule's kind, for the error on a second registration (e.g. "shape rule").
    """

    def register(*names: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for n in names:
                if n in table:
                    raise ValueError(f"{what} for {n!r} registered twice")
                table[n] = fn
            return fn

        return deco

    return register
