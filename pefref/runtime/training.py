"""A technique's training-time behaviour at run time: schedules, gradient projections, after-step projections,
auxiliary losses, states and masks (the ``training:`` hooks of its YAML, checked by :mod:`pefref.language.training`).

:class:`TrainingHooks` evaluates each hook's expression on every unit of the module it names, with the names
validation allowed it. A training loop calls ``Adapter.aux_loss`` (added to the task loss),
``Adapter.before_optimizer_step`` (after the backward pass) and ``Adapter.after_optimizer_step``; a loop that
calls none of them trains the forward pass alone, and the first such training forward warns once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pefref.compiler import parts
from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.schema.technique import AfterStepHook, AuxLossHook, GradProjectionHook, MaskHook, ScheduleHook, StateHook, StepWindow
from pefref.language.training import ACTIVE, GRAD, HOOK_OPS, INITIAL, KEPT, STEP, TOTAL, UNITS
from pefref.ops import PRIMITIVES
from pefref.runtime.patches import _INPUTS

if TYPE_CHECKING:
    from pefref.runtime.adapter import Adapter

__all__ = ["TrainingHooks", "HOOKS_UNUSED", "hooked", "aux_loss_of", "before_step_of", "after_step_of", "hooks_state_of",
           "load_hooks_state_of"]

HOOKS_UNUSED = ("technique {tid!r} (adapter {name!r}) declares training-time behaviour ({kinds}) that this training loop "
                "does not run: call adapter.aux_loss(), adapter.before_optimizer_step(step) and adapter.after_optimizer_step(step) "
                "(pefref run does; for transformers.Trainer use pefref.experiments.trainer.TrainingHooksCallback), "
                "or the adapter trains its forward pass alone")
"""The one-time warning of a training loop that calls no hook method while the technique declares hooks."""

_OPS: dict[str, Any] = {k: PRIMITIVES[k].fn for k in HOOK_OPS}


@dataclass
class TrainingHooks:
    """The state of one adapter's training hooks: current schedule values, the tensors' initial values, the states
    (``(unit key, state name)``), the last masks (``(hook index, unit key)``, the score's shape) and the frozen entries
    of freezing masks (``(hook index, unit key, tensor name)``: the tensor-shaped mask of those still training and the
    values the others keep)."""

    adapter: Adapter
    schedules: dict[str, Any] = field(default_factory=dict)
    initial: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    states: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    trains: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)
    frozen: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)
    called: bool = False
    forwards: int = 0
    handle: Any = None

    def start(self) -> None:
        """Snapshot what after-step projections read as ``initial``, set the schedules at step 0 and watch for a loop
        that never calls the hooks (a forward pre-hook on the model, removed with the adapter)."""
        for h in self.adapter.technique.training:
            if isinstance(h, (AfterStepHook, StateHook)):
                mod, tname = h.tensor.split(".")
                for key, unit in self._units(mod):
                    t = parts.read(unit, tname).detach()
                    if isinstance(h, AfterStepHook):
                        self.initial[(key, tname)] = t.clone()
                    else:
                        self.states[(key, h.name)] = torch.zeros_like(t)
        self.set_schedules(0)
        self.handle = self.adapter.model.register_forward_pre_hook(_Watch(self))
        self.adapter._hooks.append(self.handle)

    def watch(self, module: nn.Module) -> None:
        """Count a forward pass of the model; the second in training mode with no hook method called warns (once)."""
        if not module.training or self.called:
            return
        self.forwards += 1
        if self.forwards >= 2:  # a loop that ran a training step without calling any hook method
            if all(self._inert(h) for h in self.adapter.technique.training):  # off with these hyperparameters: nothing is missed
                self.called = True
                return
            kinds = ", ".join(dict.fromkeys(h.kind for h in self.adapter.technique.training))
            warnings.warn(HOOKS_UNUSED.format(tid=self.adapter.technique.id, name=self.adapter.name, kinds=kinds), UserWarning, stacklevel=2)
            self.called = True  # once

    def _inert(self, h: Any) -> bool:
        """Whether a hook does nothing with the adapter's hyperparameters: a schedule writing no tensor, a state or mask
        whose step windows are all empty."""
        if isinstance(h, ScheduleHook):
            return h.tensor is None
        if not isinstance(h, (StateHook, MaskHook)) or (isinstance(h, StateHook) and not h.when):
            return False
        def bound(v: Any, default: int) -> Any:
            return default if v is None else evaluate(parse_expr(v), self.adapter.hyperparameters, _OPS)
        return all(bound(w.last, 0) < max(bound(w.first, 0), 0) for w in h.when if w.last is not None) and all(w.last is not None for w in h.when)

    def _called(self) -> None:
        """A hook method ran: the loop runs the hooks, and the watch comes off the model (no cost per forward after)."""
        self.called = True
        if self.handle is not None:
            self.handle.remove()
            if self.handle in self.adapter._hooks:
                self.adapter._hooks.remove(self.handle)
            self.handle = None

    def _units(self, module: str) -> list[tuple[str, nn.Module]]:
        return [(k, u) for k, u in self.adapter.units.items() if getattr(self.adapter.unit_modules.get(k), "name", None) == module]

    def _env(self, unit: nn.Module, key: str) -> dict[str, Any]:
        spec = self.adapter.unit_modules[key]
        env: dict[str, Any] = dict(self.adapter.hyperparameters)
        env.update(self.schedules)
        env.update({n: parts.read(unit, n) for n in spec.params})
        env.update({n: v for (k, n), v in self.states.items() if k == key})
        return env

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the hooks carry from step to step (states, last masks, the tensors' initial values), for a resumable
        checkpoint: names ``state/<unit>/<name>``, ``mask/<hook index>/<unit>``, ``initial/<unit>/<tensor>``, and for
        frozen entries ``trains/<hook index>:<tensor>/<unit>`` and ``frozen/<hook index>:<tensor>/<unit>``."""
        out = {f"state/{k}/{n}": v.detach().clone() for (k, n), v in self.states.items()}
        out.update({f"initial/{k}/{n}": v.clone() for (k, n), v in self.initial.items()})
        out.update({f"mask/{i}/{k}": m.clone() for (i, k), m in self.masks.items()})
        out.update({f"trains/{i}:{t}/{k}": m.clone() for (i, k, t), m in self.trains.items()})
        out.update({f"frozen/{i}:{t}/{k}": m.clone() for (i, k, t), m in self.frozen.items()})
        return out

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (onto the adapter's device)."""
        p = next(iter(self.adapter.trainable_parameters()), None)
        for name, v in saved.items():
            kind, a, b = name.split("/")
            v = v if p is None else v.to(p.device)
            if kind == "mask":
                self.masks[(int(a), b)] = v
            elif kind in ("trains", "frozen"):
                i, t = a.split(":")
                (self.trains if kind == "trains" else self.frozen)[(int(i), b, t)] = v
            else:
                (self.states if kind == "state" else self.initial)[(a, b)] = v

    def set_schedules(self, step: int) -> None:
        """Every schedule's value at ``step``, written into its tensor where it names one."""
        for h in self.adapter.technique.training:
            if not isinstance(h, ScheduleHook):
                continue
            v = evaluate(parse_expr(h.value), {**self.adapter.hyperparameters, STEP: step}, _OPS)
            self.schedules[h.name] = v
            if h.tensor is not None:
                mod, tname = h.tensor.split(".")
                for _key, unit in self._units(mod):
                    t = parts.read(unit, tname)
                    parts.write(unit, tname, torch.as_tensor(v, dtype=t.dtype, device=t.device).expand_as(t))

    def aux_loss(self) -> torch.Tensor:
        """The sum of the auxiliary loss terms (a scalar tensor; 0 when there are none)."""
        self._called()
        total: torch.Tensor | None = None
        for h in self.adapter.technique.training:
            if not isinstance(h, AuxLossHook):
                continue
            terms = [evaluate(parse_expr(h.value), {**self._env(u, k), **read}, _OPS)
                     for k, u in self._units(h.module) if (read := self._read(h, k)) is not None]
            if not terms:
                continue
            term = torch.stack([torch.as_tensor(t).reshape(()) for t in terms])
            term = term.mean() if h.reduce == "mean" else term.sum()
            w = h.weight if not isinstance(h.weight, str) else evaluate(parse_expr(h.weight), {**self.adapter.hyperparameters, **self.schedules}, _OPS)
            total = term * w if total is None else total + term * w
        if total is None:
            p = next(iter(self.adapter.trainable_parameters()), None)
            return torch.zeros((), device=None if p is None else p.device)
        return total

    def _read(self, h: AuxLossHook, key: str) -> dict[str, Any] | None:
        """The values of the last forward pass the hook's inputs read at unit ``key``'s placement (None where one is
        missing: a call without labels, an adapter that did not run)."""
        if not h.inputs:
            return {}
        cell = self.adapter.model.__dict__.get(_INPUTS)
        entry = next((e for _p, e in self.adapter.entries if e.unit_key == key), None)
        if cell is None or entry is None or self.adapter.wiring is None:
            return None
        out: dict[str, Any] = {}
        for name, keys in self.adapter.wiring.reads(h, entry.layer, entry.site).items():
            got = cell.call.get(keys[0][1]) if keys[0][0] == "call" else next((cell.values[k] for k in keys if k in cell.values), None)
            if got is None:
                return None
            out[name] = got
        return out

    def before_step(self, step: int) -> None:
        """Schedules at ``step``, then every gradient projection, state and mask that runs before the optimiser step
        (after the backward pass), in the order of the list."""
        self._called()
        self.set_schedules(step)
        self._freeze(grads=True)
        for i, h in enumerate(self.adapter.technique.training):
            if isinstance(h, GradProjectionHook):
                self._each(h, lambda p, env, _h=h: _set_grad(p, evaluate(parse_expr(_h.value), {**env, GRAD: p.grad}, _OPS)))
            elif isinstance(h, (StateHook, MaskHook)) and h.at == "before_step":
                self._state_or_mask(i, h, step)

    def after_step(self, step: int) -> None:
        """Every after-step projection (assigned back without gradient), state and mask that runs after the optimiser
        step, in the order of the list."""
        self._called()
        self._freeze(grads=False)
        for i, h in enumerate(self.adapter.technique.training):
            if isinstance(h, AfterStepHook):
                tname = h.tensor.split(".")[1]
                for key, unit in self._units(h.tensor.split(".")[0]):
                    with torch.no_grad():
                        v = evaluate(parse_expr(h.value), {**self._env(unit, key), INITIAL: self.initial[(key, tname)]}, _OPS)
                        parts.write(unit, tname, v)
            elif isinstance(h, (StateHook, MaskHook)) and h.at == "after_step":
                self._state_or_mask(i, h, step)

    def _in(self, windows: list[StepWindow], step: int) -> bool:
        """Whether ``step`` is in any of ``windows``."""
        def bound(v: Any) -> Any:
            return None if v is None else evaluate(parse_expr(v), self.adapter.hyperparameters, _OPS)
        for w in windows:
            first, last, every = bound(w.first), bound(w.last), bound(w.every)
            if (first is None or step >= first) and (last is None or step <= last) and step % every == 0:
                return True
        return False

    def _state_or_mask(self, i: int, h: StateHook | MaskHook, step: int) -> None:
        if isinstance(h, StateHook):
            if not h.when or self._in(h.when, step):
                self._update_state(h)
        elif self._in(h.when, step):
            self._mask(i, h)
        elif self._in(h.hold, step):
            self._apply_masks(i, h)

    def _update_state(self, h: StateHook) -> None:
        """Each unit's new value of the state, from its previous one and the gradient of its tensor (zero when it has none)."""
        mod, tname = h.tensor.split(".")
        with torch.no_grad():
            for key, unit in self._units(mod):
                p = unit._parameters.get(tname)
                if p is None:
                    raise PefrefError(f"training hook on {h.tensor!r}: the tensor is stored stacked or split; a state needs it whole")
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                v = evaluate(parse_expr(h.value), {**self._env(unit, key), GRAD: g}, _OPS)
                prev = self.states[(key, h.name)]
                self.states[(key, h.name)] = torch.as_tensor(v, dtype=prev.dtype, device=prev.device).expand_as(prev).detach().clone()

    def _mask(self, i: int, h: MaskHook) -> None:
        """Rank the scores of every unit together (a freezing mask: those still training); mask the items scoring at
        most the (active - keep)-th lowest score."""
        mod, tname = h.tensor.split(".")
        units = self._units(mod)
        if not units:
            return
        with torch.no_grad():
            scores = {key: _score(evaluate(parse_expr(h.score), self._env(u, key), _OPS), parts.read(u, tname)) for key, u in units}
            before = {key: self.masks.get((i, key)) if h.effect == "freeze" else None for key in scores}
            live = {key: s if before[key] is None else s[before[key]] for key, s in scores.items()}
            flat = torch.cat([s.reshape(-1) for s in live.values()])
            if flat.numel() == 0:  # everything is frozen
                return
            total = sum(s.numel() for s in scores.values())
            env = {**self.adapter.hyperparameters, **self.schedules, TOTAL: total, ACTIVE: flat.numel(), UNITS: len(units)}
            k = flat.numel() - int(evaluate(parse_expr(h.keep), env, _OPS))
            if k <= 0:
                return
            threshold = torch.kthvalue(flat, min(k, flat.numel()))[0].item()
            for key, s in scores.items():
                m = before[key]
                self.masks[(i, key)] = s > threshold if m is None else m & (s > threshold)
        if h.effect == "freeze":
            self._start_freezing(i, h)
        else:
            self._apply_masks(i, h)

    def _tensor_masks(self, i: int, h: MaskHook, key: str, unit: nn.Module) -> dict[str, torch.Tensor]:
        """Tensor name -> where its entries stay (bool, the tensor's shape): the masked tensor's from the ranked items'
        mask broadcast, each ``also`` tensor's from its expression of ``kept``."""
        tname = h.tensor.split(".")[1]
        kept = self.masks[(i, key)]
        out = {tname: kept.expand_as(parts.read(unit, tname))}
        env = {**self.adapter.hyperparameters, **{n: parts.read(unit, n) for n in self.adapter.unit_modules[key].params}}
        for tn, text in h.also.items():
            m = torch.as_tensor(evaluate(parse_expr(text), {**env, KEPT: kept.to(parts.read(unit, tn).dtype)}, _OPS))
            out[tn] = (m > 0.5).expand_as(parts.read(unit, tn))
        return out

    def _apply_masks(self, i: int, h: MaskHook) -> None:
        """Zero each unit's entries outside its last mask (nothing before a mask was computed; a freezing mask holds by itself)."""
        if h.effect == "freeze":
            return
        with torch.no_grad():
            for key, unit in self._units(h.tensor.split(".")[0]):
                if (i, key) not in self.masks:
                    continue
                for tn, keep in self._tensor_masks(i, h, key, unit).items():
                    parts.write(unit, tn, parts.read(unit, tn).masked_fill(~keep, 0.0))

    def _start_freezing(self, i: int, h: MaskHook) -> None:
        """Record each unit's entries outside its last mask, with the values they keep from now on."""
        with torch.no_grad():
            for key, unit in self._units(h.tensor.split(".")[0]):
                if (i, key) not in self.masks:
                    continue
                for tn, keep in self._tensor_masks(i, h, key, unit).items():
                    self.trains[(i, key, tn)] = keep.clone()
                    self.frozen[(i, key, tn)] = parts.read(unit, tn).detach().clone()

    def _freeze(self, grads: bool) -> None:
        """The frozen entries of freezing masks: their gradient zeroed (``grads``, before the step) or their value
        restored (after it: the optimiser's update, momentum and weight decay undone)."""
        with torch.no_grad():
            for (_i, key, tn), keep in self.trains.items():
                p = self.adapter.units[key]._parameters.get(tn)
                if p is None:
                    raise PefrefError(f"a freezing mask on {tn!r}: the tensor is stored stacked or split; freezing needs it whole")
                if grads:
                    if p.grad is not None:
                        p.grad.masked_fill_(~keep, 0.0)
                else:
                    p.copy_(torch.where(keep, p, self.frozen[(_i, key, tn)]))

    def _each(self, h: GradProjectionHook, fn: Any) -> None:
        """Run ``fn(parameter, env)`` once per distinct tensor the hook names that has a gradient."""
        mod, tname = h.tensor.split(".")
        seen: set[int] = set()
        for key, unit in self._units(mod):
            p = unit._parameters.get(tname)
            if p is None:
                raise PefrefError(f"training hook on {h.tensor!r}: the tensor is stored stacked or split; gradient projections need it whole")
            if id(p) in seen or p.grad is None:
                continue
            seen.add(id(p))
            with torch.no_grad():
                fn(p, self._env(unit, key))


class _Watch:
    """The model's forward pre-hook that watches for a loop not calling the hooks (it keeps the adapter's hooks alive:
    a model applied without keeping the adapter still warns); a copy of the model (deepcopy, pickle) gets an inert one."""

    def __init__(self, hooks: TrainingHooks | None) -> None:
        self.hooks = hooks

    def __call__(self, module: nn.Module, _args: Any) -> None:
        if self.hooks is not None:
            self.hooks.watch(module)

    def __deepcopy__(self, memo: Any) -> _Watch:
        return _Watch(None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Watch, (None,))


def _score(v: Any, t: torch.Tensor) -> torch.Tensor:
    """A mask's scores as a tensor on ``t``'s device: its own shape (one per ranked item), a single number spread over
    every entry of ``t``."""
    s = torch.as_tensor(v, device=t.device)
    return s.expand_as(t) if s.dim() == 0 else s


def _set_grad(p: torch.Tensor, g: Any) -> None:
    assert p.grad is not None
    p.grad.copy_(torch.as_tensor(g, dtype=p.grad.dtype, device=p.grad.device).expand_as(p.grad))


def hooked(adapters: list[Any]) -> list[Any]:
    """The adapters among ``adapters`` (a composition's members included) whose technique declares training-time behaviour."""
    out: list[Any] = []
    for a in adapters:
        members = getattr(a, "adapters", None)
        if isinstance(members, dict):
            out += hooked(list(members.values()))
        elif getattr(getattr(a, "technique", None), "training", None):
            out.append(a)
    return out


def aux_loss_of(adapters: list[Any]) -> torch.Tensor | float:
    """The auxiliary losses of every adapter that declares training-time behaviour (0 when none does)."""
    terms = [a.aux_loss() for a in hooked(adapters)]
    return sum(terms[1:], terms[0]) if terms else 0.0


def before_step_of(adapters: list[Any], step: int) -> None:
    """``before_optimizer_step(step)`` of every adapter that declares training-time behaviour."""
    for a in hooked(adapters):
        a.before_optimizer_step(step)


def after_step_of(adapters: list[Any], step: int) -> None:
    """``after_optimizer_step(step)`` of every adapter that declares training-time behaviour."""
    for a in hooked(adapters):
        a.after_optimizer_step(step)


def hooks_state_of(adapters: list[Any]) -> list[dict[str, torch.Tensor]]:
    """The hooks' states and masks of every adapter that declares training-time behaviour, in :func:`hooked`'s order."""
    return [a._training_hooks().state_dict() for a in hooked(adapters)]


def load_hooks_state_of(adapters: list[Any], saved: list[dict[str, torch.Tensor]]) -> None:
    """Restore :func:`hooks_state_of` into the same adapters."""
    for a, s in zip(hooked(adapters), saved):
        a._training_hooks().load_state_dict(s)
