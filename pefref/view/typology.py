"""The PEFT-Ref typology, derived from a technique's structure.

Every property of docs/typology.md is computed from the modules' forms,
sites, expressions, primitives and sharing declarations; a technique may
declare a value only where the structure cannot decide, and the result says
which values were declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pefref.language.check import expand_modules
from pefref.language.forms import form_of
from pefref.language.schema import TYPOLOGY_PROPERTIES, ReferenceArchitecture, Technique
from pefref.language.schema.reference import WORKSPACES
from pefref.ops import PRIMITIVES
from pefref.view.analysis import connected_modules, integration_kind, module_exprs, module_mergeable, ops_used, reads, uses_matmul

__all__ = ["Typology", "derive_typology", "module_typology", "training_time", "initialisation", "INTRA_ORDER", "TRAINING_TIME",
           "HOOK_LABELS", "INITIALISATION"]

INTRA_ORDER = ("attention", "kronecker/hypercomplex", "orthogonal", "sparse", "dense", "low-rank", "none")
"""When a module combines several structures, the first in this order names it."""

TRAINING_TIME = "training_time"
"""The derived value naming a technique's training-time behaviour (its ``training:`` hook kinds), beside the
PEFT-Ref properties: 'none', or the kinds' labels joined with ' + ' in the order of :data:`HOOK_LABELS`."""
INITIALISATION = "initialisation"
"""The derived value naming what a technique's initialisation reads, beside the PEFT-Ref properties: 'calibration
data' (some module declares calibration statistics), 'host weights' (an initialiser or host update reads ``W``),
or 'data-free'."""
TOKEN_LOSS = "weighted token loss"
"""The training-time behaviour of a technique that declares a ``loss:`` (the model's loss replaced by a weighted one)."""
HOOK_LABELS = {"schedule": "schedule", "grad_projection": "gradient projection", "after_step": "after-step projection",
               "aux_loss": "auxiliary loss", "state": "running statistic", "mask": "global mask"}


@dataclass
class Typology:
    """One technique's row: property → value, and which values were declared."""

    id: str
    values: dict[str, str] = field(default_factory=dict)
    declared: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.values, "declared": list(self.declared)}


def _join(values: list[str]) -> str:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return " + ".join(seen)


def _insertion(m: Any) -> str:
    return form_of(m).insertion


def _integration(m: Any) -> str:
    fixed = form_of(m).integration_form
    return fixed if fixed is not None else integration_kind(m.integrate, m.params) or "other"


def _intra(m: Any) -> str:
    """From the ops of the module's own computation (a gate in its integration is not its connectivity)."""
    used = ops_used(m, computation_only=True)
    tags = {PRIMITIVES[o].intra for o in used if o in PRIMITIVES and PRIMITIVES[o].intra}
    if uses_matmul(m):
        tags.add("dense")
    if "dense" in tags:
        nonlinear = any(PRIMITIVES[o].nonlinear for o in used if o in PRIMITIVES)
        tags.discard("dense")
        tags.add("dense" if nonlinear else "low-rank")
    for t in INTRA_ORDER:
        if t in tags:
            return t
    return "none"


def _sharing(m: Any) -> list[str]:
    out = []
    for p in m.params.values():
        if p.shared in ("layers", "all"):
            out.append("across layers")
        if p.shared == "sites" or (p.shared == "all" and len(m.sites) > 1):
            out.append("across sites")
        if p.group:
            out.append("across modules")
    return out


def _hidden_connections(m: Any) -> set[str]:
    """Connections of ``m`` its computation reads that carry hidden states (another module's output, a site's x or h)."""
    hidden = {n for n, c in (getattr(m, "inputs", None) or {}).items() if c.module is not None or c.tensor in ("x", "h")}
    used: set[str] = set()
    for f, e in module_exprs(m).items():
        if f not in ("integrate", "host_update"):
            used |= e.names
    return hidden & used


def _input(m: Any) -> str:
    fixed = form_of(m).input_type
    if fixed is not None:
        return fixed
    r = reads(m)
    if r & {"x", "h"} or _hidden_connections(m):
        return "hidden states"
    if "W" in r:
        return "weights"
    return "none"


def _insertions(modules: list[Any], ref: ReferenceArchitecture) -> str:
    per_layer, const = 0, 0
    fixed = 0
    for m in modules:
        for s in m.sites:
            if not ref.sites[s].per_layer:
                const += 1
            elif m.layers == "all":
                per_layer += 1
            elif isinstance(m.layers, list):
                fixed += len(m.layers)
            else:
                per_layer += 1  # a first/last/every range: proportional to L
    parts = []
    if per_layer:
        parts.append("L" if per_layer == 1 else f"{per_layer}L")
    if const + fixed:
        parts.append(str(const + fixed))
    return " + ".join(parts) or "0"


def _inter(m: Any) -> str:
    """Fixed or dynamic (attention-mediated) mixing with the model's states, plus the module's connections:
    reading another module of the same layer, a state carried from the previous layer, another site, or a site's
    state in a first forward pass of the model."""
    base = "dynamic" if form_of(m).dynamic or any(PRIMITIVES[o].dynamic for o in ops_used(m) if o in PRIMITIVES) else "fixed"
    kinds = []
    for c in (getattr(m, "inputs", None) or {}).values():
        if getattr(c, "first_pass", False):
            kinds.append("reads a first forward pass")
        elif c.module is None:
            kinds.append("reads another site")
        elif c.layer == "previous":
            kinds.append("carried layer to layer")
        else:
            kinds.append("reads another module")
    kinds = sorted(set(kinds))
    return f"{base}, {', '.join(kinds)}" if kinds else base


def module_typology(m: Any, ref: ReferenceArchitecture, connected: bool = False) -> dict[str, str]:
    """The typology of one concrete module (``connected``: it takes part in a connection).

    Its parameter adaptation is a reparameterisation when it folds into its
    hosts' weights where they have what it needs (a bias for an affine shift):
    the derivation ``merge()`` uses.
    """
    return {
        "workspace": _join([ref.sites[s].workspace for s in m.sites]),
        "insertion_form": _insertion(m),
        "integration_form": _integration(m),
        "parameter_adaptation": form_of(m).adaptation or ("reparameterisation" if module_mergeable(m, ref, True, connected) else "addition"),
        "intra_connectivity": _intra(m),
        "inter_connectivity": _inter(m),
        "parameter_sharing": _join(_sharing(m)) or "none",
        "input_type": _input(m),
    }


def derive_typology(t: Technique, ref: ReferenceArchitecture, pool: dict[str, Technique]) -> Typology:
    """The technique's typology row (module values joined with ' + ', declared values marked)."""
    modules, _ = expand_modules(t, {**pool, t.id: t})
    conn = connected_modules(modules)
    rows = [module_typology(m, ref, m.name in conn) for m in modules]
    values: dict[str, str] = {}
    for prop in TYPOLOGY_PROPERTIES:
        if prop == "insertions":
            values[prop] = _insertions(modules, ref)
        elif prop == "workspace":
            ws = {w for r in rows for w in r["workspace"].split(" + ")}
            values[prop] = " + ".join(w for w in WORKSPACES if w in ws)
        elif prop == "parameter_sharing":
            vals = [v for r in rows for v in r[prop].split(" + ") if v != "none"]
            values[prop] = _join(sorted(set(vals))) or "none"
        elif prop == "intra_connectivity":
            kinds = {r[prop] for r in rows}
            values[prop] = next((v for v in INTRA_ORDER if v in kinds), "none") if len(kinds - {"none"}) <= 1 else _join([v for v in INTRA_ORDER if v in kinds and v != "none"])
        else:
            values[prop] = _join([r[prop] for r in rows])
    values[TRAINING_TIME] = training_time(t)
    values[INITIALISATION] = initialisation(modules)
    declared = []
    for prop, v in t.typology.items():
        values[prop] = v if isinstance(v, str) else " + ".join(v)
        declared.append(prop)
    return Typology(t.id, values, declared)


def training_time(t: Technique) -> str:
    """The technique's training-time behaviour from its ``training:`` hooks (kinds in a fixed order) and its ``loss:``
    (a weighted token loss replacing the model's), or 'none'."""
    kinds = {h.kind for h in t.training}
    labels = [label for k, label in HOOK_LABELS.items() if k in kinds] + ([TOKEN_LOSS] if t.loss is not None else [])
    return " + ".join(labels) or "none"


def initialisation(modules: list[Any]) -> str:
    """What the concrete modules' initialisation reads: 'calibration data', 'host weights' or 'data-free'."""
    from pefref.language.expr import parse_expr

    if any(getattr(m, "calibration", None) for m in modules):
        return "calibration data"
    if any(getattr(m, "host_update", None) or any("W" in parse_expr(p.init).names for p in m.params.values()) for m in modules):
        return "host weights"
    return "data-free"
