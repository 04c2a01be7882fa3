"""Documentation of the primitive registry: every op and initialiser with its signature and doc.

Read from the registries themselves (:data:`pefref.ops.PRIMITIVES`,
:data:`pefref.ops.inits.INITS`), so the CLI (``pefref ops``) and the site list
exactly what expressions may call.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

from pefref.ops import PRIMITIVES
from pefref.ops.inits import INITS, INTEGER, MIN_DIMS

__all__ = ["PrimitiveDoc", "primitive_docs"]

_INIT_BOUND = 3  # an initialiser's (shape, dtype, device): bound by the compiler, not written in YAML


@dataclass(frozen=True)
class PrimitiveDoc:
    """One callable of the expression language."""

    name: str
    kind: str  # 'op' or 'initialiser'
    signature: str  # as written in an expression, e.g. 'narrow(a, dim, start, length)'
    doc: str
    facts: dict[str, Any]  # registry metadata the view derives from (ops only)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _signature(name: str, fn: Any, skip: int = 0, drop: tuple[str, ...] = ()) -> str:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    parts = []
    for p in params:
        if p.name in drop:
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
        elif p.default is inspect.Parameter.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def primitive_docs() -> list[PrimitiveDoc]:
    """Every registered op, then every initialiser, each sorted by name."""
    out = []
    for name in sorted(PRIMITIVES):
        p = PRIMITIVES[name]
        facts = {"intra": p.intra, "nonlinear": p.nonlinear, "linear_in": list(p.linear_in), "dynamic": p.dynamic,
                 "scalar": p.scalar, "offset_args": list(p.offset_args), "parts": p.parts, "stochastic": p.stochastic,
                 "choices": {k: list(v) for k, v in p.choices}, "complex_in": p.complex_in, "int_args": list(p.int_args), "int_out": p.int_out}
        out.append(PrimitiveDoc(name, "op", _signature(name, p.fn, drop=("training",) if p.leaf else ()), inspect.getdoc(p.fn) or "", facts))
    for name in sorted(INITS):
        fn = INITS[name]
        facts = {"min_dims": str(MIN_DIMS[name]) if name in MIN_DIMS else None, "integer": name in INTEGER}
        out.append(PrimitiveDoc(name, "initialiser", _signature(name, fn, skip=_INIT_BOUND), inspect.getdoc(fn) or "", facts))
    return out
