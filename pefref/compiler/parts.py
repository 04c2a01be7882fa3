"""Split parameters: a declared tensor stored as one tensor per index of its leading dimensions.

A parameter declared with ``split: k`` keeps its declared shape (counts,
typology, diagrams and costs read that shape), but a unit stores it as
separate tensors, one per index of its first ``k`` dimensions, named
``name_i`` or ``name_i_j`` (state-dict keys ``prompt.Whh_0_1``). Each piece is
a tensor of its own for the optimizer: torch's AdamW makes temporaries the
size of each tensor it updates, and a backward into one slice of a stacked
tensor allocates the whole stack's shape, so per-piece storage keeps both at
the size of a piece.

Pieces are registered index by index, at the place of the first split tensor
of the module: every split tensor's piece ``[0]`` (declaration order), then
``[0, 0]``, ``[0, 1]``, ..., ``[1]``, ... (indices in lexicographic order), the
way ``torch.nn.LSTM`` orders its weights per layer and direction. An
optimizer walking the parameters in order then meets pieces of different
tensors in turn rather than all pieces of the largest tensor in a row (AdamW
keeps one tensor's temporary while it computes the next one's).

Expressions see one value. An op registered with ``parts=True`` receives the
pieces as nested lists indexed like the leading dimensions (no copy); any
other use of the name (another op, arithmetic) receives them stacked back into
one tensor by :func:`join`, computed once per forward.
"""

from __future__ import annotations

import ast
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.ops import PRIMITIVES

__all__ = ["MAX_PARTS", "split", "piece_name", "flatten", "owners", "nest", "entry", "lead", "example", "view", "join", "piecewise_names", "env_values", "read", "write"]

MAX_PARTS = 4096
"""Most pieces one split parameter may have (each is a module attribute and an optimizer tensor)."""


def split(t: torch.Tensor, k: int, trainable: bool, where: str = "") -> list[Any]:
    """``t`` as nested lists along its first ``k`` dimensions, each piece its own (contiguous) tensor."""
    n = math.prod(t.shape[:k])
    if n > MAX_PARTS:
        raise PefrefError(f"{where}: split: {k} makes {n} pieces of shape {tuple(t.shape)} (at most {MAX_PARTS})")

    def rec(x: torch.Tensor, depth: int) -> list[Any]:
        if depth == 1:
            return [nn.Parameter(x[i].clone(), requires_grad=True) if trainable else x[i].clone() for i in range(x.shape[0])]
        return [rec(x[i], depth - 1) for i in range(x.shape[0])]

    return rec(t.detach() if trainable else t, k)


def piece_name(name: str, index: tuple[int, ...]) -> str:
    """The attribute holding the piece ``index`` of the split tensor ``name``."""
    return "_".join((name, *map(str, index)))


def _indexed(t: list[Any], prefix: tuple[int, ...] = ()) -> Iterable[tuple[tuple[int, ...], torch.Tensor]]:
    for i, x in enumerate(t):
        if isinstance(x, list):
            yield from _indexed(x, (*prefix, i))
        else:
            yield (*prefix, i), x


def flatten(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute name -> tensor, in registration order: unsplit tensors in declaration order, the pieces of the
    split ones index by index at the place of the first split tensor (see the module's docstring)."""
    out: dict[str, Any] = {}
    pieces = sorted(((idx, j, piece_name(n, idx), p) for j, (n, t) in enumerate(tensors.items()) if isinstance(t, list) for idx, p in _indexed(t)),
                    key=lambda e: (e[0], e[1]))
    for n, t in tensors.items():
        if not isinstance(t, list):
            out[n] = t
        elif pieces:
            out.update((name, p) for _idx, _j, name, p in pieces)
            pieces = []
    return out


def owners(tensors: Mapping[str, Any]) -> dict[str, str]:
    """Attribute name -> the declared tensor it belongs to (itself, or the split tensor of a piece)."""
    return {piece_name(n, idx) if idx else n: n for n, t in tensors.items() for idx, _p in (_indexed(t) if isinstance(t, list) else [((), t)])}


def nest(get: Callable[[str], Any], name: str, lead: tuple[int, ...]) -> Any:
    """The pieces of the split tensor ``name`` (leading dimensions ``lead``) as nested lists, read with ``get``."""

    def rec(prefix: tuple[int, ...]) -> Any:
        if len(prefix) == len(lead):
            return get(piece_name(name, prefix))
        return [rec((*prefix, i)) for i in range(lead[len(prefix)])]

    return rec(())


def entry(t: Any) -> tuple[tuple[int, ...], int]:
    """(full shape, number of split dimensions) of a tensor or of nested pieces."""
    lead: list[int] = []
    while isinstance(t, list):
        lead.append(len(t))
        t = t[0]
    return (*lead, *t.shape), len(lead)


def lead(t: Any) -> tuple[int, ...]:
    """The split dimensions of nested pieces (``()`` for a tensor)."""
    shape, k = entry(t)
    return shape[:k]


def example(shape: tuple[int, ...], k: int) -> Any:
    """A meta tensor of ``shape``, split along its first ``k`` dimensions (for tracing)."""
    t = torch.empty(shape, device="meta")
    return split(t, k, False) if k else t


def view(t: Any, local: tuple[int, ...]) -> Any:
    """The leading ``local`` block of a tensor or of nested pieces (a shared tensor larger than this unit needs)."""
    if isinstance(t, list):
        return [view(x, local[1:]) for x in t[: local[0]]]
    return t[tuple(slice(0, s) for s in local)]


def join(pieces: list[Any]) -> torch.Tensor:
    """The nested pieces stacked back into one tensor."""
    return torch.stack([join(p) if isinstance(p, list) else p for p in pieces])


def piecewise_names(exprs: Iterable[Any], names: Iterable[str]) -> set[str]:
    """Those of ``names`` that every expression uses only as direct arguments of ops taking parts."""
    names = set(names)
    bad: set[str] = set()
    for e in exprs:
        tree = getattr(e, "tree", e)
        direct: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                prim = PRIMITIVES.get(node.func.id)
                if prim is not None and prim.parts:
                    direct.update(id(a) for a in itertools.chain(node.args, (kw.value for kw in node.keywords)) if isinstance(a, ast.Name))
        bad.update(node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in names and id(node) not in direct)
    return names - bad


def env_values(module: nn.Module, splits: Mapping[str, tuple[int, ...]], names: Iterable[str], views: Mapping[str, tuple[int, ...]],
               piecewise: set[str], stack: Callable[[Any], Any]) -> dict[str, Any]:
    """What expressions see for each tensor of ``module``: the tensor (or its view); a split one (leading
    dimensions in ``splits``) as its pieces where every use takes pieces, else ``stack(pieces)``."""
    out: dict[str, Any] = {}
    for n in names:
        lead = splits.get(n)
        t = nest(lambda a: getattr(module, a), n, lead) if lead else getattr(module, n)
        v = views.get(n)
        if v:
            t = view(t, v)
        out[n] = stack(t) if lead and n not in piecewise else t
    return out


def read(unit: nn.Module, name: str) -> torch.Tensor:
    """A unit's declared tensor ``name``: the stored tensor, its slice of a tensor stacked over layers
    (``stacked: layers``, a view), or a split one's pieces stacked (a new tensor: write with :func:`write`)."""
    lead = getattr(type(unit), "splits", {}).get(name)
    if lead:
        return join(nest(lambda a: getattr(unit, a), name, lead))
    pick = getattr(type(unit), "picks", {}).get(name)
    return getattr(unit, name) if pick is None else getattr(unit, name)[pick]


def write(unit: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` (the declared shape) into a unit's tensor ``name``, piece by piece for a split one (no autograd)."""
    lead = getattr(type(unit), "splits", {}).get(name)
    with torch.no_grad():
        if not lead:
            read(unit, name).copy_(value)  # a stacked tensor: this unit's slice
            return
        for idx in itertools.product(*map(range, lead)):
            getattr(unit, piece_name(name, idx)).copy_(value[idx])
