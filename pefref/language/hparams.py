"""Hyperparameter values and symbolic shapes (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.loader import suggest
from pefref.ops import PRIMITIVES

__all__ = ["resolve_hyperparameters", "shape_of"]


def resolve_hyperparameters(decl: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults with overrides applied, type-converted and bounds-checked."""
    out = {k: v.default for k, v in decl.items()}
    for k, raw in (overrides or {}).items():
        if k not in decl:
            raise PefrefError(f"unknown hyperparameter {k!r}{suggest(k, decl)} (declared: {', '.join(decl) or 'none'})")
        hp = decl[k]
        try:
            if hp.type == "int":
                v: Any = int(raw) if not isinstance(raw, float) or float(raw).is_integer() else None
                if v is None:
                    raise ValueError
            elif hp.type == "float":
                v = float(raw)
            elif hp.type == "bool":
                v = raw if isinstance(raw, bool) else {"true": True, "false": False, "1": True, "0": False}[str(raw).lower()]
            else:
                v = type(hp.default)(raw)
        except (ValueError, KeyError):
            raise PefrefError(f"hyperparameter {k!r} must be {hp.type}, found {raw!r}") from None
        lo, hi = getattr(hp, "min", None), getattr(hp, "max", None)
        if lo is not None and v < lo:
            raise PefrefError(f"hyperparameter {k!r} = {v} is below its minimum {lo}")
        if hi is not None and v > hi:
            raise PefrefError(f"hyperparameter {k!r} = {v} is above its maximum {hi}")
        if getattr(hp, "choices", None) is not None and v not in hp.choices:
            raise PefrefError(f"hyperparameter {k!r} = {v} is not one of {hp.choices}")
        out[k] = v
    return out


_SCALAR_OPS: dict[str, Any] = {}
_DIMS: dict[tuple[Any, ...], Any] = {}  # (dimension text, values of the names it reads) -> value


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
    """Resolve a ParamSpec's symbolic shape to integers."""
    dims = []
    for d in spec.shape:
        v = d if isinstance(d, int) else _dim(d, names)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or v <= 0:
            raise PefrefError(f"shape dimension {d!r} resolves to {v!r}; expected a positive integer")
        dims.append(v)
    return tuple(dims)
