"""Cross-reference checks that span files: sites, names, ops, shapes, module reuse.

pydantic checks each file's structure; these checks tie a technique to the
reference architecture and the primitive registry, and an architecture map to
the sites it binds. Each returns located problems (never raises), so a whole
catalog is reported in one run.
"""

from __future__ import annotations

from typing import Any, cast

from pefref.language.connections import check_connections, check_hook_inputs
from pefref.language.errors import Location, PefrefError, Problem
from pefref.language.expr import Expr, parse_expr
from pefref.language.forms import FORMS, form_of
from pefref.language.loader import dotted, suggest
from pefref.language.schema import ArchitectureMap, ModuleUse, ReferenceArchitecture, Technique
from pefref.language.schema.technique import ParamSpec, PrependModule
from pefref.language.shapecheck import check_module_shapes
from pefref.language.templates import template_problem
from pefref.language.token_loss import check_loss
from pefref.language.training import check_training
from pefref.language.yamlsrc import Positions
from pefref.ops import PRIMITIVES
from pefref.ops.inits import INITS

__all__ = ["check_technique", "check_family", "expand_modules", "use_cycle", "HOST_SIZES", "HOST_TENSORS", "INIT_SEED", "LAYER_WEIGHTS", "MODEL_FLAGS", "EXPR_FIELDS", "reads_of"]

HOST_SIZES = ("d_in", "d_out")
"""Widths of the host a module is attached to, usable in shapes and expressions."""

MODEL_FLAGS = ("causal",)
"""Facts of the model family usable in expressions (1 or 0)."""

INIT_SEED = "init_seed"
LAYER_WEIGHTS = "W_layers"
"""The host weights of every layer a module is placed at, stacked [L, out, in]: visible only to the initialiser of a
tensor shared across layers (``shared: layers``), which sees every layer of its site at once."""
"""A name initialisers may read: an integer drawn once per unit from torch's global generator (only when some
initialiser of the module reads it), the seed of the unit's shared draws (:mod:`pefref.ops.draws`)."""

HOST_TENSORS = ("x", "h", "W", "b", "mask")
"""The host tensors a unit binds (the compiled forward's arguments of these names): what expression fields may
read, narrowed by the field (:func:`reads_of`) and the site kind's ``reads``. The compiler binds exactly these
(a test checks the compiled forward's signature against this list). A module's own tensor of one of these names
shadows the host's (a scaling vector named ``b``), in validation and in the compiled code alike."""

EXPR_FIELDS = (*dict.fromkeys(fld for f in FORMS.values() for fld in f.reads), "host_update")
"""Every expression field a module may declare (the forms' fields, in the registry's order, and host_update)."""

# which host tensors each expression field may read, before the site kind narrows it (the forms' registry)
_FIELD_READS: dict[tuple[str, str], set[str]] = {(f.name, fld): set(r) for f in FORMS.values() for fld, r in f.reads.items()}
_OWN_READS = {(f.name, fld) for f in FORMS.values() for fld in f.own_reads}
"""Fields whose reads are not narrowed by the site kind (they read a tensor of the layer, not of the site)."""


def reads_of(form: str, fld: str) -> set[str]:
    """Host tensors an expression field may read (before the site kind narrows it)."""
    if fld == "host_update":
        return {"W"}
    return _FIELD_READS.get((form, fld), set())


def use_cycle(t: Technique, pool: dict[str, Technique]) -> list[str] | None:
    """The technique ids of a ``use:`` cycle through ``t`` (``[a, b, a]``; ``[a, a]`` for self-use), or None."""
    path: list[str] = []
    done: set[str] = set()

    def visit(tid: str, tech: Technique) -> list[str] | None:
        if tid in path:
            return path[path.index(tid):] + [tid]
        if tid in done:
            return None
        path.append(tid)
        for m in tech.modules:
            if isinstance(m, ModuleUse):
                dep = m.use.split(".")[0]
                src = tech if dep == tid else pool.get(dep)
                if src is not None:
                    found = visit(dep, src)
                    if found:
                        return found
        path.pop()
        done.add(tid)
        return None

    return visit(t.id, t)


def expand_modules(t: Technique, pool: dict[str, Technique], _stack: tuple[str, ...] = ()) -> tuple[list[Any], dict[str, Any]]:
    """Concrete modules of ``t`` (``use`` entries replaced by the used module, overrides applied)
    and the effective hyperparameters (own ones override those imported with used modules).

    A ``use:`` cycle (a technique that uses itself, directly or through others)
    is a :class:`~pefref.language.errors.PefrefError` naming the cycle."""
    if t.id in _stack:
        raise PefrefError(f"use: cycle {' -> '.join([*_stack[_stack.index(t.id):], t.id])}")
    stack = (*_stack, t.id)
    hps: dict[str, Any] = {}
    out: list[Any] = []
    for m in t.modules:
        if isinstance(m, ModuleUse):
            tid, mname = m.use.split(".")
            src = t if tid == t.id else pool.get(tid)
            if src is None:
                raise PefrefError(f"{t.id}: use {m.use!r}: unknown technique {tid!r}")
            src_modules, src_hps = expand_modules(src, pool, stack)
            base = next((x for x in src_modules if x.name == mname), None)
            if base is None:
                raise PefrefError(f"{t.id}: use {m.use!r}: technique {tid!r} has no module {mname!r}")
            for k, v in src_hps.items():
                hps.setdefault(k, v)
            upd: dict[str, Any] = {"name": m.name or base.name}
            if m.sites is not None:
                upd["sites"] = m.sites
            if m.layers is not None:
                upd["layers"] = m.layers
            if m.params:
                upd["params"] = {**base.params, **m.params}
            if m.integrate is not None:
                upd["integrate"] = m.integrate
            out.append(base.model_copy(update=upd))
        else:
            out.append(m)
    hps.update(t.hyperparameters)
    return out, hps


def _module_names(t: Technique, pool: dict[str, Technique]) -> list[str]:
    """Names of a technique's modules, ``use:`` entries included (their own name or the used module's)."""
    return [m.name or m.use.split(".")[1] if isinstance(m, ModuleUse) else m.name for m in t.modules]


def _expr_problem(pos: Positions, path: tuple[Any, ...], column: int, msg: str) -> Problem:
    loc = pos.at(path)
    col = column + (1 if path in pos.quoted else 0)
    return Problem(Location(loc.file, loc.line, loc.column + col), dotted(path), msg)


def _check_names(e: Expr, allowed: set[str], ops: set[str], pos: Positions, path: tuple[Any, ...], what: str) -> list[Problem]:
    out = []
    cols = e.name_columns()
    for n in sorted(e.names - allowed):
        out.append(_expr_problem(pos, path, cols.get(n, 0), f"unknown name {n!r} in {what}{suggest(n, allowed)} (available: {', '.join(sorted(allowed))})"))
    for o in sorted(e.ops - ops):
        out.append(_expr_problem(pos, path, cols.get(o, 0), f"unknown op {o!r}{suggest(o, ops)} (registered: {', '.join(sorted(ops))})"))
    return out


def check_technique(t: Technique, pos: Positions, ref: ReferenceArchitecture, pool: dict[str, Technique]) -> list[Problem]:
    """Cross-reference problems of one technique (empty when it is sound)."""
    out = _check_references(t, pos, pool)
    if out:
        return out
    cycle = use_cycle(t, pool)
    if cycle:
        uses = [i for i, m in enumerate(t.modules) if isinstance(m, ModuleUse)]
        i = next((i for i in uses if t.modules[i].use.split(".")[0] in cycle[1:]), uses[0])  # type: ignore[union-attr]
        what = "uses itself" if len(cycle) == 2 else f"is part of a use: cycle {' -> '.join(cycle)}"
        return [Problem(pos.at(("modules", i, "use")), f"modules[{i}].use", f"technique {t.id!r} {what}")]
    modules, hps = expand_modules(t, pool)
    out = _check_defaults(t, pos)
    defaults_sound = not out  # shapes are inferred on the defaults only when they are valid
    published: dict[str, Any] = {}  # output shapes of the modules checked so far, for connections
    for i, m in enumerate(modules):
        found = _check_module(m, ("modules", i), hps, ref, pos)
        if defaults_sound and not found:  # names and sites sound: infer shapes
            found += check_module_shapes(m, ("modules", i), {k: v.default for k, v in hps.items()}, ref, pos, published)
        out += found + _check_prepend(m, ("modules", i), ref, pos)
    out += _check_groups(modules, pos)
    trained = any(p.trainable for m in modules for p in m.params.values()) or not all(form_of(m).has_unit for m in modules)
    if modules and not trained and not t.frozen:
        out.append(Problem(pos.at(("modules",)), "modules", "no module declares a trainable tensor: there would be nothing to train "
                           "(a technique that reuses fixed tensors only says frozen: true)"))
    elif t.frozen and any(p.trainable for m in modules for p in m.params.values()):
        out.append(Problem(pos.at(("frozen",)), "frozen", "the technique says it trains nothing, but a module declares a trainable tensor"))
    if not out:
        out += check_connections(modules, ref, pos) + check_hook_inputs(modules, t.training, ref, pos)
    defaults = {k: v.default for k, v in hps.items()}
    return (out + check_training(t.training, modules, defaults, pos, ref if defaults_sound else None, published)
            + (check_loss(t, modules, defaults, pos) if defaults_sound else []))


def _check_references(t: Technique, pos: Positions, pool: dict[str, Technique]) -> list[Problem]:
    """Techniques named by ``extends`` and modules named by ``use`` must exist."""
    out: list[Problem] = []
    for i, tid in enumerate(t.extends):
        if tid not in pool or tid == t.id:
            why = "a technique cannot extend itself" if tid == t.id else f"unknown technique {tid!r}{suggest(tid, pool)}"
            out.append(Problem(pos.at(("extends", i)), f"extends[{i}]", why))
    for i, m in enumerate(t.modules):
        if isinstance(m, ModuleUse):
            tid, mname = m.use.split(".")
            if tid not in pool:
                out.append(Problem(pos.at(("modules", i, "use")), f"modules[{i}].use", f"unknown technique {tid!r}{suggest(tid, pool)}"))
            elif mname not in (names := _module_names(pool[tid], pool)):
                out.append(Problem(pos.at(("modules", i, "use")), f"modules[{i}].use", f"technique {tid!r} has no module {mname!r}{suggest(mname, names)} (modules: {', '.join(names)})"))
    return out


def _check_defaults(t: Technique, pos: Positions) -> list[Problem]:
    """Each hyperparameter's default lies within its bounds and among its choices."""
    out: list[Problem] = []
    for name, hp in t.hyperparameters.items():
        p = ("hyperparameters", name)
        lo, hi = getattr(hp, "min", None), getattr(hp, "max", None)
        for v in hp.default if isinstance(hp.default, list) else [hp.default]:
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                why = f"below the minimum {lo}" if lo is not None and v < lo else f"above the maximum {hi}"
                out.append(Problem(pos.at(p + ("default",)), dotted(p + ("default",)), f"default {hp.default} is {why}"))
                break
        if getattr(hp, "choices", None) is not None and hp.default not in cast(Any, hp).choices:
            out.append(Problem(pos.at(p + ("default",)), dotted(p + ("default",)), f"default {hp.default} is not one of the choices {cast(Any, hp).choices}"))
    return out


def _check_module(m: Any, mp: tuple[Any, ...], hps: dict[str, Any], ref: ReferenceArchitecture, pos: Positions) -> list[Problem]:
    """Sites and the names in every expression of one expanded module (at ``mp``)."""
    out: list[Problem] = []
    sizes = set(ref.sizes) | set(HOST_SIZES)
    for j, s in enumerate(m.sites):
        if s not in ref.sites:
            out.append(Problem(pos.at(mp + ("sites", j)), dotted(mp + ("sites", j)), f"unknown site {s!r}{suggest(s, ref.sites)} (sites: {', '.join(ref.sites)})"))
            continue
        kind = ref.site_kinds[ref.sites[s].kind]
        if m.form not in kind.forms:
            out.append(Problem(pos.at(mp + ("sites", j)), dotted(mp + ("sites", j)), f"form {m.form!r} cannot attach to site {s!r} (a {ref.sites[s].kind} site accepts: {', '.join(kind.forms)})"))
    site_reads = set.intersection(*[set(ref.site_kinds[ref.sites[s].kind].reads) for s in m.sites if s in ref.sites] or [set()])
    stats = set(getattr(m, "calibration", None) or {})
    out += _check_calibration(m, mp, set(hps) | sizes, site_reads, pos)
    for k, (pname, spec) in enumerate(m.params.items()):
        init_reads = ({"W"} & site_reads) | {INIT_SEED} | set(list(m.params)[:k]) | stats  # tensors declared before, statistics
        if "W" in site_reads and spec.shared == "layers":
            init_reads.add(LAYER_WEIGHTS)
        out += _check_param(m, spec, mp + ("params", pname), set(hps), init_reads, ref, pos)
    base = set(hps) | sizes | set(m.params) | set(getattr(m, "inputs", {}))
    for fld in EXPR_FIELDS:
        text = getattr(m, fld, None)
        if text is None:
            continue
        allowed = base | set(MODEL_FLAGS) | (reads_of(m.form, fld) & (site_reads | {"delta"}))
        if (m.form, fld) in _OWN_READS:
            allowed |= reads_of(m.form, fld)
        if fld == "host_update":
            allowed |= stats
        if fld == "length":
            allowed = set(hps) | sizes
        out += _check_names(parse_expr(text), allowed, set(PRIMITIVES), pos, mp + (fld,), f"{m.form} {fld}")
    return out


_STAT_READS = {"input_cov": "x", "output_cov": "h", "weight_grad": "W", "input_pca": "x", "input_ipca": "x"}
"""The host tensor each calibration statistic is gathered from (the module's sites must let it read it)."""


def _check_calibration(m: Any, mp: tuple[Any, ...], scalars: set[str], site_reads: set[str], pos: Positions) -> list[Problem]:
    """Calibration statistics: names free (not a tensor, host tensor, size or hyperparameter), gathered from a host
    tensor every site of the module has, from a module that has a unit to initialise."""
    out: list[Problem] = []
    for name, st in (getattr(m, "calibration", None) or {}).items():
        p = mp + ("calibration", name)
        taken = ("a tensor of the module" if name in m.params else "a host tensor" if name in HOST_TENSORS
                 else "a size or hyperparameter" if name in scalars else "a connection" if name in (getattr(m, "inputs", None) or {}) else "")
        if taken:
            out.append(Problem(pos.at(p), dotted(p), f"statistic {name!r}: the name is already {taken}"))
        need = _STAT_READS[st.kind]
        if need not in site_reads or not form_of(m).has_unit:
            out.append(Problem(pos.at(p + ("kind",)), dotted(p + ("kind",)), f"statistic {name!r} ({st.kind}) reads the host's {need}, "
                               f"which a {m.form} module at {', '.join(m.sites)} does not have"))
        if st.kind == "weight_grad" and st.normalise != "none":
            out.append(Problem(pos.at(p + ("normalise",)), dotted(p + ("normalise",)), "normalise applies to covariances, not to weight_grad"))
        ops = {k for k, q in PRIMITIVES.items() if q.scalar}
        for f in ("components", "q"):
            if isinstance(getattr(st, f, None), str):
                out += _check_names(parse_expr(getattr(st, f)), scalars | set(HOST_SIZES), ops, pos, p + (f,), f"a statistic's {f}")
    return out


def _check_param(m: Any, spec: ParamSpec, pp: tuple[Any, ...], hps: set[str], init_reads: set[str], ref: ReferenceArchitecture,
                 pos: Positions) -> list[Problem]:
    """One tensor of a module (at ``pp``): names in its shape, initialiser and learning-rate scale; stacking and splitting.

    ``hps``: the technique's hyperparameters; ``init_reads``: what its initialiser may read besides them and the sizes.
    """
    out: list[Problem] = []
    scalars = hps | set(ref.sizes) | set(HOST_SIZES)
    scalar_ops = {k for k, p in PRIMITIVES.items() if p.scalar}
    for k, dim in enumerate(spec.shape):
        if isinstance(dim, str):
            out += _check_names(parse_expr(dim), scalars, scalar_ops, pos, pp + ("shape", k), "a shape")
    init = parse_expr(spec.init)
    if LAYER_WEIGHTS in init.names and LAYER_WEIGHTS not in init_reads:
        why = "shared: layers" if spec.shared != "layers" else "a host weight W at every one of its sites"
        out.append(_expr_problem(pos, pp + ("init",), init.name_columns().get(LAYER_WEIGHTS, 0), f"the init reads {LAYER_WEIGHTS} (the host "
                                 f"weights of every layer, stacked [L, out, in]), which only the initialiser of a tensor with {why} sees"))
        init_reads = init_reads | {LAYER_WEIGHTS}  # reported once, not again as an unknown name
    out += _check_names(init, scalars | init_reads, set(PRIMITIVES) | set(INITS), pos, pp + ("init",), "an initialiser")
    out += _check_init_reads(m, spec, pp, pos)
    if isinstance(spec.lr_scale, str):
        out += _check_names(parse_expr(spec.lr_scale), hps, scalar_ops, pos, pp + ("lr_scale",), "a learning-rate scale")
    if spec.every is not None and (spec.shared != "layers" or (isinstance(spec.every, str) and spec.every not in hps) or LAYER_WEIGHTS in init.names):
        why = (f"runs of layers share a tensor shared across layers (shared: layers), not shared: {spec.shared}" if spec.shared != "layers" else
               f"every reads a hyperparameter; {spec.every!r} is none" if isinstance(spec.every, str) and spec.every not in hps else
               f"the init reads {LAYER_WEIGHTS}, the weights of every layer, not of one run")
        out.append(Problem(pos.at(pp + ("every",)), dotted(pp + ("every",)), why))
    if spec.groups is not None and spec.shared != "all":
        out.append(Problem(pos.at(pp + ("groups",)), dotted(pp + ("groups",)), f"groups of placements share a tensor shared by all (shared: all), not shared: {spec.shared}"))
    elif isinstance(spec.groups, str):
        out += _check_names(parse_expr(spec.groups), hps | {"n"}, scalar_ops, pos, pp + ("groups",), "a number of groups (over hyperparameters and n)")
    if spec.stacked != "none" and spec.shared != "none":
        out.append(Problem(pos.at(pp + ("stacked",)), dotted(pp + ("stacked",)),
                           f"stacked: {spec.stacked} stores the per-layer copies of an unshared tensor together; this one is shared: {spec.shared}"))
    if spec.stacked != "none" and spec.split:
        out.append(Problem(pos.at(pp + ("stacked",)), dotted(pp + ("stacked",)), "a tensor is either stacked over layers or split into pieces, not both"))
    if spec.stacked != "none" and any(s in ref.sites and not ref.sites[s].per_layer for s in m.sites):
        out.append(Problem(pos.at(pp + ("stacked",)), dotted(pp + ("stacked",)),
                           "stacked: layers needs per-layer sites; this module also attaches once per model"))
    if spec.split >= len(spec.shape):
        out.append(Problem(pos.at(pp + ("split",)), dotted(pp + ("split",)), f"split: {spec.split} must be below the number of dimensions ({len(spec.shape)}): each piece keeps at least one"))
    return out


def _check_init_reads(m: Any, spec: ParamSpec, pp: tuple[Any, ...], pos: Positions) -> list[Problem]:
    """An initialiser reads only earlier tensors shared as its own is (a shared tensor starts once, at its largest shape),
    or, for a tensor of one placement, a tensor shared across the layers of its site (the same at every layer there)."""
    out: list[Problem] = []
    for read in sorted(parse_expr(spec.init).names & set(m.params)):
        other = m.params[read]
        site_wide = (spec.shared, spec.group, other.shared, other.group) == ("none", None, "layers", None)  # its site's tensor: one shape there
        if (other.shared, other.group) != (spec.shared, spec.group) and not site_wide:
            out.append(Problem(pos.at(pp + ("init",)), dotted(pp + ("init",)), f"the init reads {read!r}, shared {other.shared!r}"
                               f"{' in group ' + repr(other.group) if other.group else ''}; an initialiser reads only tensors shared "
                               f"as this one is ({spec.shared!r}{' in group ' + repr(spec.group) if spec.group else ''}), or, for one placement's tensor, one shared across layers"))
    return out


def _check_prepend(m: Any, mp: tuple[Any, ...], ref: ReferenceArchitecture, pos: Positions) -> list[Problem]:
    """A prepend module's tokens go to embedding sites, its keys and values to attention key/value sites."""
    if not isinstance(m, PrependModule):
        return []
    out: list[Problem] = []
    kinds = {ref.sites[s].kind for s in m.sites if s in ref.sites}
    if m.tokens is not None and kinds - {"embedding"}:
        out.append(Problem(pos.at(mp + ("tokens",)), dotted(mp + ("tokens",)), "tokens are prepended at embedding sites only; use keys and values at attention key/value sites"))
    if m.keys is not None and kinds - {"kv"}:
        out.append(Problem(pos.at(mp + ("keys",)), dotted(mp + ("keys",)), "keys and values are prepended at attention key/value sites only"))
    return out


_GROUP_FIELDS = ("shape", "init", "trainable", "shared", "lr_scale", "weight_decay")


def _check_groups(modules: list[Any], pos: Positions) -> list[Problem]:
    """A ``group`` tensor is one tensor: its declarations agree (shape, init, trainable, shared, training metadata),
    and it is neither stacked nor split (per-module storage)."""
    out: list[Problem] = []
    first: dict[str, tuple[Any, str, Any]] = {}
    for i, m in enumerate(modules):
        for pname, spec in m.params.items():
            if not spec.group:
                continue
            pp = ("modules", i, "params", pname)
            if spec.stacked != "none" or spec.split:
                out.append(Problem(pos.at(pp + ("group",)), dotted(pp + ("group",)), f"a group tensor ({spec.group!r}) is neither stacked nor split"))
                continue
            if spec.group not in first:
                first[spec.group] = (m, pname, spec)
                continue
            m0, p0, s0 = first[spec.group]
            for fld in _GROUP_FIELDS:
                if getattr(spec, fld) != getattr(s0, fld):
                    out.append(Problem(pos.at(pp + (fld,)), dotted(pp + (fld,)),
                                       f"group {spec.group!r} is one tensor: its {fld} here ({getattr(spec, fld)!r}) differs from "
                                       f"{m0.name}.{p0}'s ({getattr(s0, fld)!r})"))
                    break
    return out


def _check_binding(s: str, b: Any, p: tuple[Any, ...], layers: str, pos: Positions, ref: ReferenceArchitecture) -> list[Problem]:
    """Problems of one site binding written at ``p`` (``layers``: the path pattern of a layer it sits in)."""
    out: list[Problem] = []
    if s not in ref.sites:
        return [Problem(pos.key_at(p), dotted(p), f"unknown site {s!r}{suggest(s, ref.sites)}")]
    if b.cache and ref.sites[s].kind != "kv":
        out.append(Problem(pos.at(p), dotted(p), "only key/value sites are reached through the cache"))
    if b.path and ref.sites[s].per_layer and "{i}" not in b.path and b.path != layers:
        out.append(Problem(pos.at(p + ("path",)), dotted(p + ("path",)), f"a per-layer site needs '{{i}}' in its path; found {b.path!r}"))
    for fld in ("path", "input_path"):
        text = getattr(b, fld)
        bad = template_problem(text) if text else None
        if bad is not None:
            out.append(_expr_problem(pos, p + (fld,), bad[1], f"{bad[0]}; found {text!r}"))
    sliced = ref.sites[s].slices is not None
    if sliced != (b.parameter is not None):
        what = (f"site {s!r} is a stack of slices (a raw parameter); bind it with parameter: the parameter's name" if sliced
                else f"only sliced sites bind a raw parameter ({', '.join(n for n, x in ref.sites.items() if x.slices) or 'none'}); {s!r} is a module site")
        out.append(Problem(pos.at(p), dotted(p), what))
    if b.slice is not None:
        for fld in ("start", "size", "period"):
            if getattr(b.slice, fld) is None:
                continue
            e = parse_expr(getattr(b.slice, fld))
            out += _check_names(e, set(ref.sizes), {k for k, q in PRIMITIVES.items() if q.scalar}, pos, p + ("slice", fld), "a slice")
    return out


def check_family(fam: ArchitectureMap, pos: Positions, ref: ReferenceArchitecture) -> list[Problem]:
    """Problems of one architecture map (unknown sites, size expressions over unknown sizes)."""
    out: list[Problem] = []
    in_stacks = {s for st in fam.stacks.values() for s in st.sites}
    for s, b in fam.sites.items():
        if s not in in_stacks:  # a stack's site is checked where it is written, below
            out += _check_binding(s, b, ("sites", s), fam.layers, pos, ref)
    for name, st in fam.stacks.items():
        for s, b in st.sites.items():
            p = ("stacks", name, "sites", s)
            if s in ref.sites and not ref.sites[s].per_layer:
                out.append(Problem(pos.key_at(p), dotted(p), f"site {s!r} is not per layer; bind it under sites, not in a stack"))
            out += _check_binding(s, b, p, st.layers, pos, ref)
        bad = template_problem(st.layers)
        if bad is not None:
            out.append(_expr_problem(pos, ("stacks", name, "layers"), bad[1], f"{bad[0]}; found {st.layers!r}"))
    for cls, mc in fam.classes.items():
        for j, sname in enumerate(mc.stacks or []):
            if sname not in fam.stacks:
                out.append(Problem(pos.at(("classes", cls, "stacks", j)), f"classes.{cls}.stacks[{j}]", f"unknown stack {sname!r}{suggest(sname, fam.stacks)}"))
    bad = template_problem(fam.layers)
    if bad is not None:
        out.append(_expr_problem(pos, ("layers",), bad[1], f"{bad[0]}; found {fam.layers!r}"))
    for k in fam.sizes:
        if k not in ref.sizes:
            out.append(Problem(pos.key_at(("sizes", k)), f"sizes.{k}", f"unknown size {k!r}{suggest(k, ref.sizes)}"))
    return out + _missing_sizes(fam, pos, ref)


def _missing_sizes(fam: ArchitectureMap, pos: Positions, ref: ReferenceArchitecture) -> list[Problem]:
    """Sizes the family must give: every size not optional, and an optional one that a site it binds is measured in."""
    bound = set(fam.sites) | {s for st in fam.stacks.values() for s in st.sites}
    out = []
    for k, spec in ref.sizes.items():
        if k in fam.sizes:
            continue
        users = [s for s in bound if s in ref.sites and any(e is not None and k in parse_expr(e).names
                                                             for e in (ref.sites[s].in_, ref.sites[s].out, ref.sites[s].slices))]
        if not spec.optional or users:
            why = f" (its site {users[0]!r} is measured in it)" if users else ""
            out.append(Problem(pos.at(("sizes",)), "sizes", f"size {k!r} is missing{why}"))
    return out
