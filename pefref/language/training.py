"""Checks of a technique's training-time behaviour (``training:``): the modules, tensors and names its hooks read.

Each hook kind sees a fixed set of names (:func:`hook_names`); the runtime
(:mod:`pefref.runtime.training`) binds exactly these.
"""

from __future__ import annotations

import ast
from typing import Any

from pefref.language.errors import Location, Problem
from pefref.language.expr import Expr, parse_expr
from pefref.language.loader import dotted, suggest
from pefref.language.schema.technique import AfterStepHook, AuxLossHook, GradProjectionHook, MaskHook, ScheduleHook, StateHook
from pefref.language.shapecheck import EXAMPLE_SIZES, _run, _width, connection_shapes
from pefref.language.yamlsrc import Positions
from pefref.ops import PRIMITIVES
from pefref.ops.inits import INTEGER
from pefref.ops.shapes import IntShape, Shape

__all__ = ["check_training", "hook_names", "states_of", "HOOK_OPS", "STEP", "GRAD", "INITIAL", "TOTAL", "UNITS", "ACTIVE", "KEPT"]

STEP, GRAD, INITIAL = "step", "grad", "initial"
"""The names a schedule (the optimiser step), a gradient projection and a state (the gradient) and an after-step
projection (the tensor's value when the adapter was applied) read besides the hyperparameters and the module's tensors."""
TOTAL, UNITS, ACTIVE = "total", "units", "active"
"""The names a mask's ``keep`` reads: the ranked items over all units of the module, their number, and the items
not frozen (a freezing mask's; ``total`` otherwise)."""
KEPT = "kept"
"""The name a mask's ``also`` expressions read: the mask of the ranked items (1 stays, 0 masked)."""
RESERVED = frozenset({STEP, GRAD, INITIAL, TOTAL, UNITS, ACTIVE, KEPT})

HOOK_OPS = frozenset(k for k, p in PRIMITIVES.items() if not p.stochastic and k != "dropout")
"""The ops a training hook may call (deterministic ones: hooks run outside the forward pass)."""


def hook_names(hook: Any, params: set[str], hps: set[str], schedules: set[str], states: set[str] | None = None) -> dict[str, set[str]]:
    """Field -> the names its expression may read, for one hook (``params``: its module's tensors, ``states``: its
    module's states)."""
    states = states or set()
    if isinstance(hook, ScheduleHook):
        return {"value": {STEP} | hps}
    if isinstance(hook, GradProjectionHook):
        return {"value": {GRAD} | params | hps | schedules | states}
    if isinstance(hook, AfterStepHook):
        return {"value": {INITIAL} | params | hps | schedules | states}
    if isinstance(hook, StateHook):
        return {"value": {GRAD} | params | hps | schedules | states}
    if isinstance(hook, MaskHook):
        return {"score": params | hps | schedules | states, "keep": {TOTAL, UNITS, ACTIVE} | hps | schedules}
    assert isinstance(hook, AuxLossHook)
    return {"value": params | hps | schedules | states | set(hook.inputs), "weight": hps | schedules}


def states_of(training: list[Any]) -> dict[str, list[StateHook]]:
    """Module name -> its state hooks, in the order of the ``training:`` list."""
    out: dict[str, list[StateHook]] = {}
    for h in training:
        if isinstance(h, StateHook):
            out.setdefault(h.tensor.split(".")[0], []).append(h)
    return out


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
    what = ("a gradient projection" if isinstance(hook, GradProjectionHook)
            else "a state (it reads the gradient)" if isinstance(hook, StateHook)
            else "a freezing mask" if isinstance(hook, MaskHook) and hook.effect == "freeze" else None)
    if what is not None and tname is not None and not m.params[tname].trainable:
        return None, None, [_problem(pos, hp + (fld,), f"tensor {ref!r} is not trainable: it has no gradient for {what}")]
    if what is not None and tname is not None and (m.params[tname].split or m.params[tname].stacked != "none"):
        return None, None, [_problem(pos, hp + (fld,), f"tensor {ref!r} is stored split or stacked: {what} needs it whole")]
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
        known = all(isinstance(d, (int, float)) for d in dims)
        out[pname] = (IntShape if _integer_init(spec.init) else Shape)(int(d) for d in dims) if known else None
    return {**names, **out}


def _integer_init(text: str) -> bool:
    """Whether an initialiser gives an integer tensor (indices: an op or init that returns them)."""
    tree = parse_expr(text).tree
    name = tree.func.id if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) else None
    return name is not None and (name in INTEGER or (name in PRIMITIVES and PRIMITIVES[name].int_out))


def _check_shape(hook: Any, tname: str | None, env: dict[str, Any], pos: Positions, hp: tuple[Any, ...]) -> list[Problem]:
    """What the hook's value gives, on shapes: the tensor's own shape (projections, states, a mask's score), one value
    (losses, schedules, a mask's keep)."""
    fields = ("score", "keep") if isinstance(hook, MaskHook) else ("value",)
    out: list[Problem] = []
    for fld in fields:
        got, found = _run(getattr(hook, fld), env, pos, hp + (fld,))
        if found or got is None:
            out += found
            continue
        scalar = not isinstance(got, Shape) or len(got) == 0 or got == Shape((1,))
        if tname is not None and fld != "keep" and not isinstance(hook, ScheduleHook):
            want = env.get(tname)
            if want is not None and isinstance(got, Shape) and got != want and not (fld == "score" and _broadcasts(got, want)):
                out.append(_problem(pos, hp + (fld,), f"the {fld} has shape {got}; the tensor {hook.tensor!r} is {want}"))
        elif not scalar:
            what = "an aux loss" if isinstance(hook, AuxLossHook) else "a mask's keep" if isinstance(hook, MaskHook) else "a schedule"
            out.append(_problem(pos, hp + (fld,), f"the {fld} has shape {got}; {what} gives one value (reduce it, e.g. with sum)"))
    return out


def _broadcasts(got: Shape, want: Shape) -> bool:
    """Whether a shape broadcasts to ``want`` (and gives it)."""
    if len(got) > len(want):
        return False
    return all(g in (1, w) for g, w in zip(reversed(tuple(got)), reversed(tuple(want))))


def _check_also(hook: MaskHook, m: Any, names: set[str], env: dict[str, Any] | None, pos: Positions, hp: tuple[Any, ...]) -> list[Problem]:
    """A mask's ``also``: tensors of its module (trainable where it freezes), expressions reading ``kept``, the module's
    tensors and the hyperparameters, and with ``env`` (shapes) masks that broadcast to their tensors."""
    out: list[Problem] = []
    for tn, text in hook.also.items():
        path = hp + ("also", tn)
        if tn not in m.params:
            out.append(_problem(pos, path, f"module {m.name!r} has no tensor {tn!r}{suggest(tn, m.params)} (tensors: {', '.join(m.params)})"))
            continue
        if hook.effect == "freeze" and not m.params[tn].trainable:
            out.append(_problem(pos, path, f"tensor {tn!r} is not trainable: there is nothing to freeze"))
            continue
        if hook.effect == "freeze" and (m.params[tn].split or m.params[tn].stacked != "none"):
            out.append(_problem(pos, path, f"tensor {tn!r} is stored split or stacked: a freezing mask needs it whole"))
            continue
        found = _names(parse_expr(text), names, pos, path, "a mask's also")
        if found or env is None:
            out += found
            continue
        got, found = _run(text, env, pos, path)
        out += found
        want = env.get(tn)
        if not found and isinstance(got, Shape) and isinstance(want, Shape) and not _broadcasts(got, want):
            out.append(_problem(pos, path, f"the mask of {tn!r} has shape {got}; it must broadcast to the tensor's {want}"))
    return out


def _check_names(hook: Any, hp: tuple[Any, ...], hps: dict[str, Any], taken: set[str], pos: Positions) -> list[Problem]:
    """A schedule's or a state's name against the hyperparameters, the reserved names and the names already taken
    (other schedules; the module's tensors and other states)."""
    if not isinstance(hook, (ScheduleHook, StateHook)):
        return []
    what = ("a hyperparameter" if hook.name in hps else "a name the hooks bind" if hook.name in RESERVED
            else "another schedule or state, or a tensor of its module" if hook.name in taken else None)
    return [] if what is None else [_problem(pos, hp + ("name",), f"{hook.kind} name {hook.name!r} is already the name of {what}")]


def _check_windows(hook: Any, hps: set[str], pos: Positions, hp: tuple[Any, ...]) -> list[Problem]:
    """The step windows' bounds: expressions over the hyperparameters."""
    out: list[Problem] = []
    for fld in ("when", "hold"):
        for j, w in enumerate(getattr(hook, fld, None) or []):
            for bound in ("first", "last", "every"):
                text = getattr(w, bound)
                if isinstance(text, str):
                    out += _names(parse_expr(text), hps, pos, hp + (fld, j, bound), f"a step window's {bound}")
    return out


def check_training(training: list[Any], modules: list[Any], hps: dict[str, Any], pos: Positions, ref: Any = None,
                   published: dict[str, Any] | None = None) -> list[Problem]:
    """Located problems of the training hooks (modules and tensors named, names and ops read, schedule and state names,
    step windows, and with ``ref`` the shapes their values give on the reference sizes). ``hps``: the hyperparameters'
    defaults; ``published``: the output shapes of the modules (name -> shape), read by an auxiliary loss's inputs."""
    out: list[Problem] = []
    by_name = {m.name: m for m in modules}
    schedules: set[str] = set()
    taken: dict[str, set[str]] = {}  # module -> its tensors' and states' names so far
    every = {h.name for h in training if isinstance(h, ScheduleHook)}
    states = {k: {h.name for h in v} for k, v in states_of(training).items()}
    for i, hook in enumerate(training):
        hp = ("training", i)
        m, tname, found = _module_of(hook, by_name, hp, pos)
        out += found
        mname = getattr(m, "name", None)
        seen = schedules if isinstance(hook, ScheduleHook) else taken.setdefault(mname or "", set(getattr(m, "params", {})) | every)
        out += _check_names(hook, hp, hps, seen, pos)
        if isinstance(hook, (ScheduleHook, StateHook)):
            seen.add(hook.name)
        out += _check_windows(hook, set(hps), pos, hp)
        if found:
            continue
        params = set(m.params) if m is not None else set()
        clash = sorted(set(getattr(hook, "inputs", None) or {}) & (params | set(hps) | every))
        if clash:
            out.append(_problem(pos, hp + ("inputs", clash[0]), f"input name {clash[0]!r} is already the name of a tensor, "
                                "hyperparameter or schedule"))
            continue
        allowed = hook_names(hook, params, set(hps), every, states.get(mname or "", set()))
        if isinstance(hook, AfterStepHook) and tname is not None:
            allowed["value"] |= {tname}
        found = []
        for fld, names in allowed.items():
            text = getattr(hook, fld)
            if isinstance(text, str):
                found += _names(parse_expr(text), names, pos, hp + (fld,), f"the {hook.kind} {fld}")
        out += found
        env: dict[str, Any] | None = None
        if not found and ref is not None:
            env = {**(_param_shapes(m, hps, ref, pos) if m is not None else hps), **{n: 1.0 for n in every}, STEP: 1, GRAD: None,
                   TOTAL: 16, UNITS: 2}
            if m is not None:
                env.update({h.name: env.get(h.tensor.split(".")[1]) for h in states_of(training).get(m.name, [])})
            sizes = {**EXAMPLE_SIZES, **{k: 16 for k in ref.sizes if k not in EXAMPLE_SIZES}}
            env |= connection_shapes(getattr(hook, "inputs", None) or {}, published or {}, ref, sizes)
            if tname is not None:
                env[GRAD] = env[INITIAL] = env.get(tname)
            out += _check_shape(hook, tname, env, pos, hp)
        if isinstance(hook, MaskHook) and m is not None:
            out += _check_also(hook, m, {KEPT} | params | set(hps), _also_env(hook, env, pos), pos, hp)
    return out


def _also_env(hook: MaskHook, env: dict[str, Any] | None, pos: Positions) -> dict[str, Any] | None:
    """The shapes a mask's ``also`` expressions read: ``kept`` has the score's shape."""
    if env is None or not hook.also:
        return None
    got, found = _run(hook.score, env, pos, ())
    return None if found or not isinstance(got, Shape) else {**env, KEPT: got}
