"""Sizes and layer selections: model facts read from configs (no torch)."""

from __future__ import annotations

from typing import Any

from pefref.language.errors import PefrefError, SiteError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.schema import ArchitectureMap, LayerRange
from pefref.ops import PRIMITIVES

__all__ = ["scalar_ops", "eval_scalar", "model_sizes", "select_layers"]


_SCALAR: list[Any] = [-1, {}]  # (number of primitives it was made from, the table)


def scalar_ops() -> dict[str, Any]:
    """The scalar primitives (sqrt, min, max, log2) for shape and size expressions (one shared table: do not modify it)."""
    if _SCALAR[0] != len(PRIMITIVES):
        _SCALAR[:] = [len(PRIMITIVES), {k: p.fn for k, p in PRIMITIVES.items() if p.scalar}]
    return _SCALAR[1]


def eval_scalar(text: str | int, names: dict[str, Any]) -> Any:
    return text if isinstance(text, int) else evaluate(parse_expr(text), names, scalar_ops())


def model_sizes(fam: ArchitectureMap, config: dict[str, Any]) -> dict[str, int]:
    """The reference sizes of a model, from its config through the family's size expressions."""
    out = {}
    for k, e in fam.sizes.items():
        try:
            out[k] = int(eval_scalar(e, config))
        except Exception as ex:
            raise PefrefError(f"family {fam.family}: size {k} = {e!r} cannot be read from the model config ({ex})") from None
    for name, st in fam.stacks.items():  # encoder-decoder: each stack's number of layers, L_<stack>
        try:
            out[f"L_{name}"] = int(eval_scalar(st.count, config))
        except Exception as ex:
            raise PefrefError(f"family {fam.family}: stack {name}: count = {st.count!r} cannot be read from the model config ({ex})") from None
    counts = {f"L_{n}": out[f"L_{n}"] for n in fam.stacks}
    if counts and sum(counts.values()) != out.get("L"):
        parts = ", ".join(f"{k} = {v}" for k, v in counts.items())
        raise PefrefError(f"family {fam.family}: L = {out.get('L')} is not the total of its stacks' layers ({parts})")
    return out


def select_layers(sel: Any, L: int) -> list[int]:
    """Layer indices chosen by a layer selection ('all', indices, or first/last/every)."""
    if sel == "all":
        return list(range(L))
    if isinstance(sel, LayerRange):
        idx = list(range(L))
        if sel.first is not None:
            idx = idx[: sel.first]
        if sel.last is not None:
            idx = idx[L - sel.last :] if sel.last else []
        if sel.every is not None:
            idx = idx[:: sel.every]
        return idx
    out = []
    for i in sel:
        j = i + L if i < 0 else i
        if not 0 <= j < L:
            raise SiteError(f"layer {i} does not exist; the model has {L} layers (0..{L - 1})")
        out.append(j)
    return sorted(set(out))
