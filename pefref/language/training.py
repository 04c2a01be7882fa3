"""Checks of a technique's training-time behaviour (``training:``): the modules, tensors and names its hooks read.

Each hook kind sees a fixed set of names (:func:`hook_names`); the runtime
(:mod:`pefref.runtime.training`) binds exactly these.
"""

from __future__ import annotations

from typing import Any

from pefref.language.errors import Location, Problem
from pefref.language.expr import Expr, parse_expr
from pefref.language.loader import dotted, suggest
from pefref.language.schema.technique import AfterStepHook, AuxLossHook, GradProjectionHook, ScheduleHook
from pefref.language.shapecheck import EXAMPLE_SIZES, _run, _width, connection_shapes
from pefref.language.yamlsrc import Positions
from pefref.ops import PRIMITIVES
from pefref.ops.shapes import Shape

__all__ = ["check_training", "hook_names", "HOOK_OPS", "STEP", "GRAD", "INITIAL"]

STEP, GRAD, INITIAL = "step", "grad", "initial"
"""The names a schedule (the optimiser step), a gradient projection (the gradient) and an after-step projection
(the tensor's value when the adapter was applied) read besides the hyperparameters and the module's tensors."""

HOOK_OPS = frozenset(k for k, p in PRIMITIVES.items() if not p.stochastic and k != "dropout")
"""The ops a training hook may call (deterministic ones: hooks run outside the forward pass)."""


def hook_names(hook: Any, params: set[str], hps: set[str], schedules: set[str]) -> dict[str, set[str]]:
    """Field -> the names its expression may read, for one hook (``params``: its module's tensors)."""
    if isinstance(hook, ScheduleHook):
        return {"value": {STEP} | hps}
    if isinstance(hook, GradProjectionHook):
        return {"value": {GRAD} | params | hps | schedules}
    if isinstance(hook, AfterStepHook):
        return {"value": {INITIAL} | params | hps | schedules}
    assert isinstance(hook, AuxLossHook)
    return {"value": params | hps | schedules | set(hook.inputs), "weight": hps | schedules}


def _problem(pos: Positions, path: tuple[Any, ...], msg: str, column: int | None = None) -> Problem:
    """A problem at ``path``; ``column``: the offset within an expression (a quoted one starts after its quote)."""
    loc = pos.at(path)
    col = 0 if column is None else column + (1 if path in pos.quoted else 0)
    return Problem(Location(loc.file, loc.line, loc.column + col), dotted(path), msg)


def _names(e: Expr, allowed: set[str], pos: Positions, path: tuple[Any, ...], what: str) -> list[Problem]:
    cols = e.name_columns()
    out = [_problem(pos, path, f"unknown name {n!r} in {what}{suggest(n, allowed)} (available: {', '.join(sorted(allowed))})", cols.get(n, 0))
           for n in sorted(e.names - allowed)]
    out += [_problem(pos, path, f"op {o!r} cannot be used in {what}{suggest(o, HOOK_OPS)} (deterministic registered ops only)", cols.get(o, 0))
            for o in sorted(e.ops - HOOK_OPS)]
    return out


def _module_of(hook: Any, modules: dict[str, Any], hp: tuple[Any, ...], pos: Positions) -> tuple[Any, str | None, list[Problem]]:
    """The module (and tensor name) a hook acts on, or the problems naming them."""
    ref = getattr(hook, "tensor", None)
    mname, tname = ref.split(".") if ref else (getattr(hook, "module", None), None)
    fld = "tensor" if ref else "module"
    if mname is None:
        return None, None, []
    if mname not in modules:
        return None, None, [_problem(pos, hp + (fld,), f"unknown module {mname!r}{suggest(mname, modules)} (modules: {', '.join(modules)})")]
    m = modules[mname]
    if tname is not None and tname not in m.params:
        return None, None, [_problem(pos, hp + (fld,), f"module {mname!r} has no tensor {tname!r}{suggest(tname, m.params)} "
                                     f"(tensors: {', '.join(m.params) or 'none'})")]
    if isinstance(hook, GradProjectionHook) and tname is not None and not m.params[tname].trainable:
        return None, None, [_problem(pos, hp + (fld,), f"tensor {ref!r} is not trainable: it has no gradient to project")]
    if isinstance(hook, GradProjectionHook) and tname is not None and (m.params[tname].split or m.params[tname].stacked != "none"):
        return None, None, [_problem(pos, hp + (fld,), f"tensor {ref!r} is stored split or stacked: a gradient projection needs it whole")]
    return m, tname, []


def _param_shapes(m: Any, hps: dict[str, Any], ref: Any, pos: Positions) -> dict[str, Any]:
    """The shapes of a module's tensors at its first site, on the reference sizes (None where one does not resolve)."""
    sizes = {**EXAMPLE_SIZES, **{k: 16 for k in ref.sizes if k not in EXAMPLE_SIZES}}
    site = next((ref.sites[s] for s in m.sites if s in ref.sites), None)
    if site is None:
        return {}
    d_out = _width(site.out, sizes) or 0
    names: dict[str, Any] = {**sizes, "d_in": _width(site.in_, sizes) or d_out, "d_out": d_out, "causal": 1, **hps}
    out: dict[str, Any] = {}
    for pname, spec in m.params.items():
        dims = [d if isinstance(d, int) else _run(d, names, pos, ())[0] for d in spec.shape]
        out[pname] = Shape(int(d) for d in dims) if all(isinstance(d, (int, float)) for d in dims) else None
    return {**names, **out}


def _check_shape(hook: Any, tname: str | None, env: dict[str, Any], pos: Positions, hp: tuple[Any, ...]) -> list[Problem]:
    """What the hook's value gives, on shapes: the tensor's own shape (projections), one value (losses, schedules)."""
    got, out = _run(hook.value, env, pos, hp + ("value",))
    if out or got is None:
        return out
    scalar = not isinstance(got, Shape) or len(got) == 0 or got == Shape((1,))
    if tname is not None and not isinstance(hook, ScheduleHook):
        want = env.get(tname)
        if want is not None and isinstance(got, Shape) and got != want:
            return [_problem(pos, hp + ("value",), f"the value has shape {got}; the tensor {hook.tensor!r} is {want}")]
    elif not scalar:
        what = "an aux loss" if isinstance(hook, AuxLossHook) else "a schedule"
        return [_problem(pos, hp + ("value",), f"the value has shape {got}; {what} gives one value (reduce it, e.g. with sum)")]
    return []


def check_training(training: list[Any], modules: list[Any], hps: dict[str, Any], pos: Positions, ref: Any = None,
                   published: dict[str, Any] | None = None) -> list[Problem]:
    """Located problems of the training hooks (modules and tensors named, names and ops read, schedule names, and with
    ``ref`` the shapes their values give on the reference sizes). ``hps``: the hyperparameters' defaults; ``published``:
    the output shapes of the modules (name -> shape), read by an auxiliary loss's inputs."""
    out: list[Problem] = []
    by_name = {m.name: m for m in modules}
    schedules: set[str] = set()
    every = {h.name for h in training if isinstance(h, ScheduleHook)}
    for i, hook in enumerate(training):
        hp = ("training", i)
        if isinstance(hook, ScheduleHook):
            if hook.name in hps or hook.name in schedules:
                what = "a hyperparameter" if hook.name in hps else "another schedule"
                out.append(_problem(pos, hp + ("name",), f"schedule name {hook.name!r} is already the name of {what}"))
            schedules.add(hook.name)
        m, tname, found = _module_of(hook, by_name, hp, pos)
        out += found
        if found:
            continue
        params = set(m.params) if m is not None else set()
        clash = sorted(set(getattr(hook, "inputs", None) or {}) & (params | set(hps) | every))
        if clash:
            out.append(_problem(pos, hp + ("inputs", clash[0]), f"input name {clash[0]!r} is already the name of a tensor, "
                                "hyperparameter or schedule"))
            continue
        allowed = hook_names(hook, params, set(hps), every)
        if isinstance(hook, AfterStepHook) and tname is not None:
            allowed["value"] |= {tname}
        found = []
        for fld, names in allowed.items():
            text = getattr(hook, fld)
            if isinstance(text, str):
                found += _names(parse_expr(text), names, pos, hp + (fld,), f"the {hook.kind} {fld}")
        out += found
        if not found and ref is not None:
            env = {**(_param_shapes(m, hps, ref, pos) if m is not None else hps), **{n: 1.0 for n in every}, STEP: 1, GRAD: None}
            sizes = {**EXAMPLE_SIZES, **{k: 16 for k in ref.sizes if k not in EXAMPLE_SIZES}}
            env |= connection_shapes(getattr(hook, "inputs", None) or {}, published or {}, ref, sizes)
            if tname is not None:
                env[GRAD] = env[INITIAL] = env.get(tname)
            out += _check_shape(hook, tname, env, pos, hp)
    return out
