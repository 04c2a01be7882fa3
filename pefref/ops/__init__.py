"""The primitive registry: every op a technique's expressions may call.

Each primitive is registered once with :func:`primitive`, with its math and the
facts the view derives typology from:

* ``intra``: the intra-connectivity it contributes (``dense``, ``attention``,
  ``kronecker/hypercomplex``, ``orthogonal``, ``sparse``), or ``None``;
* ``nonlinear``: True when it breaks linearity (activations);
* ``linear_in``: indices of the arguments the op is linear in, given the other
  arguments do not depend on the input (mergeability analysis);
* ``dynamic``: True when it mixes positions of the sequence (attention);
* ``offset_args``: arguments that add an input-independent offset (a bias);
* ``parts``: True when the op also takes a *split* tensor (a parameter declared
  with ``split: k``, stored as one tensor per index of its first ``k``
  dimensions) as its pieces, nested lists indexed like the tensor's leading
  dimensions, instead of one stacked tensor (the compiler passes the pieces
  as they are; any other op gets them stacked).

Primitives live in the modules of this package, grouped by topic; every module
here is imported (found by listing the package), so adding a primitive means
writing one decorated function. Ops are plain functions of torch tensors and
Python numbers; torch is imported inside them, so the registry's metadata is
available without torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Primitive", "PRIMITIVES", "TORCH_SETUP", "primitive", "op_table"]


@dataclass(frozen=True)
class Primitive:
    name: str
    fn: Callable[..., Any]
    doc: str
    intra: str | None = None
    nonlinear: bool = False
    linear_in: tuple[int, ...] = ()
    dynamic: bool = False
    leaf: bool = False
    scalar: bool = False
    offset_args: tuple[int, ...] = ()
    tags: frozenset[str] = field(default_factory=frozenset)
    parts: bool = False


PRIMITIVES: dict[str, Primitive] = {}

TORCH_SETUP: list[Callable[[], None]] = []
"""Callbacks the compiler runs once, after importing torch: what a primitive must build with torch before any
traced call (an autograd function defined inside code that torch.compile traces would break its graph)."""


def primitive(
    name: str | None = None,
    *,
    intra: str | None = None,
    nonlinear: bool = False,
    linear_in: tuple[int, ...] = (),
    dynamic: bool = False,
    leaf: bool = False,
    scalar: bool = False,
    offset_args: tuple[int, ...] = (),
    parts: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a primitive op under ``name`` (default: the function's name)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__.rstrip("_")
        if key in PRIMITIVES:
            raise ValueError(f"primitive {key!r} registered twice")
        PRIMITIVES[key] = Primitive(key, fn, (fn.__doc__ or "").strip(), intra, nonlinear, linear_in, dynamic, leaf, scalar, offset_args, parts=parts)
        return fn

    return deco


def op_table() -> dict[str, Callable[..., Any]]:
    """Name → function, for :func:`pefref.expr.evaluate`."""
    return {k: p.fn for k, p in PRIMITIVES.items()}




for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")
