"""Routing found in a module's expression: a router's gates weighting a stack of experts.

A module computes a mixture of experts when its ``compute`` holds an
``einsum`` as its whole output, one of whose operands is normalised routing weights (it applies
``softmax``; with ``topk`` the routing is sparse) indexed by a letter that the
einsum sums over and that indexes at least one other operand (the experts).
Nothing here knows a technique: the structure alone says router, experts and
their weighted sum, which :mod:`pefref.render.attach` draws as three nodes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from pefref.language.expr import parse_expr
from pefref.render.mathtext import Math, einsum_math, tree_math
from pefref.render.style import pretty

__all__ = ["Routing", "find_routing", "mixed_stack", "mixes_by"]

_SHAPING = {"unflatten", "reshape", "unsqueeze", "squeeze", "dropout"}


@dataclass(frozen=True)
class Routing:
    """A mixture found in one expression.

    Attributes:
        letter: the einsum index over the experts (summed).
        gates: the routing weights ``s`` as math (``softmax(W_g·x)``; for top-k routing, the softmax over the k largest).
        sparse: the number of experts each token uses (an expression), or None for soft routing over all.
        experts: each expert's output ``δ_e`` as math (the einsum of the other operands, ``e`` kept free).
        count: the number of experts as an expression (from a tensor's shape), or None where the shape does not say.
        router_params: the module's tensors the routing weights read (drawn with the router, not the experts).
        router_reads: the other names only the routing weights read (a connection feeding the router alone).
        gate_reads: every name the routing weights read other than the module's tensors (``x`` where the router reads the input).
    """

    letter: str
    gates: Math
    sparse: str | None
    experts: Math
    count: str | None
    router_params: frozenset[str]
    router_reads: frozenset[str] = frozenset()
    gate_reads: frozenset[str] = frozenset()


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _letters(term: str) -> tuple[str, bool]:
    """A term's index letters and whether it starts with an ellipsis (its letters then count from the end)."""
    return term.replace("...", ""), term.startswith("...")


def _count(letter: str, terms: list[str], operands: list[ast.AST], params: dict[str, Any]) -> str | None:
    """The size of ``letter`` from a tensor's declared shape (a tensor, or a tensor unflattened along that axis)."""
    for term, op in zip(terms, operands):
        letters, from_end = _letters(term)
        if letter not in letters or from_end:
            continue
        pos = letters.index(letter)
        while isinstance(op, ast.Call) and isinstance(op.func, ast.Name) and op.func.id in ("dropout", "detach") and op.args:
            op = op.args[0]
        shape = getattr(params.get(op.id), "shape", None) if isinstance(op, ast.Name) else None
        if shape is not None and pos < len(shape):
            return pretty(shape[pos])
        if (isinstance(op, ast.Call) and isinstance(op.func, ast.Name) and op.func.id == "unflatten" and len(op.args) == 3
                and isinstance(op.args[0], ast.Name) and isinstance(op.args[1], ast.Constant) and op.args[1].value == pos
                and isinstance(op.args[2], ast.Tuple) and op.args[2].elts):
            return pretty(ast.unparse(op.args[2].elts[0]))
    return None


def _gates(op: ast.AST) -> tuple[Math, str | None]:
    """The routing weights as math, and the top-k count when only the k largest scores are kept."""
    tops = _calls(op, "topk")
    if tops and len(tops[0].args) >= 2:
        soft = _calls(op, "softmax")[0]
        return tree_math(soft), pretty(ast.unparse(tops[0].args[1]))
    return tree_math(op), None


def _root_einsum(tree: ast.AST) -> tuple[str, list[ast.AST]] | None:
    """The einsum that is the whole expression (under reshaping only): its subscripts and operands."""
    node = tree
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SHAPING and node.args:
        node = node.args[0]
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "einsum" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return None
    return node.args[0].value.replace(" ", ""), list(node.args[1:])


def find_routing(expr: object, params: dict[str, Any]) -> Routing | None:
    """The routing in ``expr`` (a module's compute), or None where it holds no mixture of experts."""
    try:
        found = _root_einsum(parse_expr(str(expr)).tree)
    except Exception:
        return None
    if found is None or "->" not in found[0]:
        return None
    spec, operands = found
    ins, _, out = spec.partition("->")
    terms = ins.split(",")
    if len(terms) != len(operands):
        return None
    for i, (term, op) in enumerate(zip(terms, operands)):
        letters, _ = _letters(term)
        if not letters or not _calls(op, "softmax"):
            continue
        letter = letters[-1]
        rest_terms = [t for j, t in enumerate(terms) if j != i]
        rest_ops = [o for j, o in enumerate(operands) if j != i]
        if letter in out or not any(letter in t for t in rest_terms):
            continue
        gates, sparse = _gates(op)
        return Routing(letter=letter, gates=gates, sparse=sparse,
                       experts=einsum_math(",".join(rest_terms) + "->" + out + letter, rest_ops),
                       count=_count(letter, rest_terms, rest_ops, params),
                       router_params=frozenset((_names(op) - set().union(*map(_names, rest_ops))) & set(params)),
                       router_reads=frozenset((_names(op) - set().union(*map(_names, rest_ops))) - set(params)),
                       gate_reads=frozenset(_names(op) - set(params)))
    return None


def mixes_by(expr: object, name: str, params: dict[str, Any]) -> bool:
    """Whether ``expr`` mixes a stack of its own tensors by ``name`` (:func:`mixed_stack`). A module whose output
    another reads this way is that module's router."""
    return mixed_stack(expr, name, params) is not None


def mixed_stack(expr: object, name: str, params: dict[str, Any]) -> str | None:
    """How many tensors ``expr`` mixes by ``name``: an einsum one of whose operands reads ``name`` and sums over a
    letter that also indexes an operand reading one of ``params`` (weights over a stack of experts). The count is the
    letter's size from a tensor's declared shape, ``"E"`` where the shape does not say; None where nothing is mixed."""
    try:
        tree = parse_expr(str(expr)).tree
    except Exception:
        return None
    for call in _calls(tree, "einsum"):
        if not (call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            continue
        ins, sep, out = call.args[0].value.replace(" ", "").partition("->")
        terms, ops = ins.split(","), list(call.args[1:])
        if not sep or len(terms) != len(ops):
            continue
        for term, op in zip(terms, ops):
            if name not in _names(op):
                continue
            for letter in sorted(set(_letters(term)[0]) - set(out)):
                stacked = [(t, o) for t, o in zip(terms, ops) if o is not op and letter in t and _names(o) & set(params)]
                if stacked:
                    return _count(letter, [t for t, _o in stacked], [o for _t, o in stacked], params) or "E"
    return None
