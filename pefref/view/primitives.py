"""Documentation of the registered primitives: every op and initialiser a technique may call.

Gathered from the registries themselves (:data:`pefref.ops.PRIMITIVES` and
:data:`pefref.ops.inits.INITS`), so the reference cannot drift from what an
expression may call. Initialisers are shown as a YAML ``init`` calls them: the
shape, dtype and device that pefref binds are left out of the signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PrimitiveDoc", "primitive_docs", "BOUND_INIT_ARGS"]

BOUND_INIT_ARGS = ("shape", "dtype", "device")
"""Arguments of an initialiser that pefref binds (a YAML ``init`` call never writes them)."""


@dataclass(frozen=True)
class PrimitiveDoc:
    """One registered primitive, as a reference page shows it.

    Attributes:
        name: the name an expression calls.
        kind: ``"op"`` or ``"initialiser"``.
        signature: the call as written in YAML, e.g. ``linear(x, weight, bias=None)``.
        doc: the docstring (with its math), dedented; empty when there is none.
        module: the Python module that defines it (e.g. ``pefref.ops.core``).
        facts: what the view derives typology and mergeability from (ops only): a
            sorted list of ``(fact, value)`` pairs, only the facts that are set.
    """

    name: str
    kind: str
    signature: str
    doc: str
    module: str
    facts: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "signature": self.signature, "doc": self.doc,
                "module": self.module, "facts": dict(self.facts)}


def _params_text(fn: Any, skip: tuple[str, ...] = ()) -> str:
    """The parameters of ``fn`` without annotations, e.g. ``x, weight, bias=None``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "..."
    parts: list[str] = []
    star_done = False
    for p in sig.parameters.values():
        if p.name in skip:
            continue
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star_done:
                parts.append("*")
                star_done = True
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts)


def _op_facts(p: Any) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    if p.intra:
        facts.append(("intra-connectivity", str(p.intra)))
    if p.nonlinear:
        facts.append(("nonlinear", "yes"))
    if p.linear_in:
        facts.append(("linear in arguments", ", ".join(map(str, p.linear_in))))
    if p.offset_args:
        facts.append(("offset arguments", ", ".join(map(str, p.offset_args))))
    if p.dynamic:
        facts.append(("mixes positions (dynamic)", "yes"))
    if p.scalar:
        facts.append(("usable in shapes and scales", "yes"))
    if p.leaf:
        facts.append(("leaf", "yes"))
    return sorted(facts)


def primitive_docs() -> list[PrimitiveDoc]:
    """Every registered op, then every initialiser, each sorted by name."""
    from pefref.ops import PRIMITIVES
    from pefref.ops.inits import INITS

    ops = [
        PrimitiveDoc(name, "op", f"{name}({_params_text(p.fn)})", inspect.cleandoc(p.doc) if p.doc else "",
                     p.fn.__module__, _op_facts(p))
        for name, p in sorted(PRIMITIVES.items())
    ]
    inits = [
        PrimitiveDoc(name, "initialiser", f"{name}({_params_text(fn, BOUND_INIT_ARGS)})",
                     inspect.cleandoc(fn.__doc__ or ""), fn.__module__)
        for name, fn in sorted(INITS.items())
    ]
    return ops + inits
