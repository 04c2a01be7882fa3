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
from pefref.language.yamlsrc import Positions
from pefref.ops import PRIMITIVES

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
    return {"value": params | hps | schedules, "weight": hps | schedules}


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


def check_training(training: list[Any], modules: list[Any], hps: set[str], pos: Positions) -> list[Problem]:
    """Located problems of the training hooks (modules and tensors named, names and ops read, schedule names)."""
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
        allowed = hook_names(hook, params, hps, every)
        if isinstance(hook, AfterStepHook) and tname is not None:
            allowed["value"] |= {tname}
        for fld, names in allowed.items():
            text = getattr(hook, fld)
            if isinstance(text, str):
                out += _names(parse_expr(text), names, pos, hp + (fld,), f"the {hook.kind} {fld}")
    return out
