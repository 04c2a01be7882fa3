"""Hyperparameter values and symbolic shapes (no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.limits import current
from pefref.language.loader import suggest
from pefref.language.sizes import scalar_ops
from pefref.ops import PRIMITIVES

__all__ = ["resolve_hyperparameters", "shape_of", "layer_run", "placement_group", "share_run"]


def resolve_hyperparameters(decl: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults with overrides applied, type-converted and bounds-checked."""
    out = {k: tuple(v.default) if isinstance(v.default, list) else v.default for k, v in decl.items()}
    for k, raw in (overrides or {}).items():
        if k not in decl:
            raise PefrefError(f"unknown hyperparameter {k!r}{suggest(k, decl)} (declared: {', '.join(decl) or 'none'})")
        hp = decl[k]
        v = _convert_list(k, hp, raw) if hp.type == "ints" else _convert(k, hp, raw)
        lo, hi = getattr(hp, "min", None), getattr(hp, "max", None)
        for e in v if isinstance(v, tuple) else (v,):
            if lo is not None and e < lo:
                raise PefrefError(f"hyperparameter {k!r} = {_shown(v)} is below its minimum {lo}")
            if hi is not None and e > hi:
                raise PefrefError(f"hyperparameter {k!r} = {_shown(v)} is above its maximum {hi}")
        if getattr(hp, "choices", None) is not None and v not in hp.choices:
            raise PefrefError(f"hyperparameter {k!r} = {v} is not one of {hp.choices}")
        out[k] = v
    return out


def _shown(v: Any) -> str:
    return ", ".join(map(str, v)).join("[]") if isinstance(v, tuple) else str(v)


def _convert_list(k: str, hp: Any, raw: Any) -> tuple[int, ...]:
    """``raw`` (a list or tuple of integers, or text '3, 7, 12' from the command line) as a tuple of integers."""
    items = [t for t in raw.strip().strip("[]").split(",") if t.strip()] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not items:
        raise PefrefError(f"hyperparameter {k!r} must be a non-empty list of integers, found {raw!r}")
    one = SimpleNamespace(type="int")
    try:
        return tuple(_convert(k, one, e) for e in items)
    except PefrefError:
        raise PefrefError(f"hyperparameter {k!r} must be a non-empty list of integers, found {raw!r}") from None


_SCALAR_OPS: dict[str, Any] = {}
_DIMS: dict[tuple[Any, ...], Any] = {}  # (dimension text, values of the names it reads) -> value


def _convert(k: str, hp: Any, raw: Any) -> Any:
    """``raw`` (a Python value, or text from the command line) as the hyperparameter's type.

    Booleans are not numbers here (``r=True`` is refused), and a real number
    must be finite (NaN and infinities are refused)."""
    bad = PefrefError(f"hyperparameter {k!r} must be {hp.type}, found {raw!r}")
    if hp.type == "bool":
        if isinstance(raw, bool):
            return raw
        v = {"true": True, "false": False, "1": True, "0": False}.get(str(raw).strip().lower())
        if v is None:
            raise bad
        return v
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise bad
    try:
        if isinstance(raw, str):
            text = raw.strip()
            num: Any = int(text) if text.lstrip("+-").isdigit() else float(text)
        else:
            num = raw
    except (ValueError, OverflowError):
        raise bad from None
    if isinstance(num, float) and not math.isfinite(num):
        raise PefrefError(f"hyperparameter {k!r} must be a finite number, found {raw!r}")
    if hp.type == "choice":
        return next((c for c in hp.choices if c == num), num)  # the declared value (bounds checked by the caller)
    if hp.type == "int":
        if isinstance(num, float):
            if not num.is_integer():
                raise bad
            num = int(num)
        if num.bit_length() > 64:
            raise PefrefError(f"hyperparameter {k!r} = {num} is too large")
        return num
    return float(num)


def _scalar_ops() -> dict[str, Any]:
    if not _SCALAR_OPS:
        _SCALAR_OPS.update({k: p.fn for k, p in PRIMITIVES.items() if p.scalar})
    return _SCALAR_OPS


def _dim(d: str, names: Mapping[str, Any]) -> Any:
    """One symbolic dimension's value; memoised on the values of the names it reads (scalar ops are pure)."""
    e = parse_expr(d)
    try:
        key = (d, *(names[n] for n in sorted(e.names)))
        hash(key)
    except (KeyError, TypeError):
        return evaluate(e, names, _scalar_ops())  # reports the unknown name
    if key not in _DIMS:
        if len(_DIMS) > 65536:
            _DIMS.clear()
        _DIMS[key] = evaluate(e, names, _scalar_ops())
    return _DIMS[key]


def shape_of(spec: Any, names: Mapping[str, Any]) -> tuple[int, ...]:
    """Resolve a ParamSpec's symbolic shape to integers, each positive and at most ``max_dim``."""
    lim = current()
    dims = []
    for d in spec.shape:
        v = d if isinstance(d, int) else _dim(d, names)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PefrefError(f"shape dimension {d!r} resolves to {v!r}; expected a positive integer")
        if v > lim.max_dim:
            raise PefrefError(f"shape dimension {d!r} resolves to {v}, over the limit of {lim.max_dim}")
        dims.append(v)
    return tuple(dims)


def placement_group(spec: Any, pos: int | None, n: int | None, names: Mapping[str, Any]) -> int | None:
    """The group (``groups``) of the ``pos``-th of ``n`` placements in the model's module order, for a tensor shared by all
    placements in groups; None: not grouped (one for all)."""
    groups = getattr(spec, "groups", None)
    if groups is None or spec.shared != "all" or pos is None or not n:
        return None
    g = max(1, int(groups if isinstance(groups, int) else evaluate(parse_expr(groups), {**names, "n": n}, scalar_ops())))
    return min(pos // max(1, n // g), g - 1)


def share_run(spec: Any, layer_pos: int | None, place_pos: int | None, place_count: int | None, names: Mapping[str, Any]) -> int | None:
    """Which copy of a tensor shared in runs a placement reads: its run of layers (``every``) or its group of placements
    (``groups``); None: the one copy of its sharing scope."""
    return layer_run(spec, layer_pos, names) if spec.shared == "layers" else placement_group(spec, place_pos, place_count, names)


def layer_run(spec: Any, pos: int | None, names: Mapping[str, Any]) -> int | None:
    """The run of consecutive layers (``every``) that the placement at position ``pos`` among its site's placed layers
    belongs to, for a tensor shared across layers in runs; None: not shared in runs (one for all layers)."""
    every = getattr(spec, "every", None)
    if every is None or spec.shared != "layers" or pos is None:
        return None
    return pos // max(1, int(every if isinstance(every, int) else names[every]))
