"""Bookkeeping of what adapters change in a host model, so that any order of operations restores it.

Two ledgers, both kept on the model's own objects and removed when empty:

* :class:`WeightLedger` (one per host module): the ordered *layers* written
  into its weight and bias (a one-time ``host_update`` at apply time, a
  ``merge``). The host's tensors always hold the fold of the active layers over
  the original value. Removing or deactivating a layer in the middle restores
  the value below it and re-applies the layers above: a ``merge`` layer is
  recomputed from the new value beneath it, an ``update`` layer re-adds its
  delta (and writes back its exact result when the value beneath is
  unchanged). When the last layer goes, the bottom layer's saved value, the
  original, is written back bit for bit.
* :class:`FreezeLedger` (one per model): the base parameters' original
  ``requires_grad`` flags, saved by the first adapter and restored when the
  last one is removed, and which adapters train which host tensors in place
  (``select``), so a tensor one adapter trains is never folded by another.

Every change goes through a :class:`~pefref.runtime.transaction.Transaction`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.runtime.hosts import HostKind
from pefref.runtime.param_slices import virtual_hosts
from pefref.runtime.transaction import Transaction

__all__ = ["Layer", "WeightLedger", "ledger_of", "host_change", "all_ledgers", "FreezeLedger", "freeze_ledger", "freeze", "release", "check_not_selected"]

_LEDGER = "_pefref_weights"
_FREEZE = "_pefref_freeze"

Value = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(eq=False)
class Layer:
    """One write into a host's weight (and bias): who made it, how to redo it on a new value beneath."""

    owner: Any
    kind: str  # 'update' | 'merge'
    compute: Callable[[], Value]  # the new (W, b) from the host's current tensors
    touches_bias: bool = False
    active: bool = True
    before: Value | None = field(default=None, repr=False)
    first_before: Value | None = field(default=None, repr=False)
    first_after: Value | None = field(default=None, repr=False)

    def redo(self, ledger: WeightLedger, txn: Transaction) -> Value:
        """The value after this layer, given the value beneath it (:attr:`before`)."""
        assert self.before is not None and self.first_before is not None and self.first_after is not None
        if _same(self.before, self.first_before):
            return self.first_after
        if self.kind == "update":
            W = self.before[0] + (self.first_after[0] - self.first_before[0])
            return W, self.before[1]
        ledger._write(txn, self.before)  # a merge is recomputed from the host's tensors
        return self.compute()


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.is_meta or b.is_meta:  # no values to compare: the same shapes count as the same
        return a.shape == b.shape and a.is_meta and b.is_meta
    return torch.equal(a, b)


def _same(a: Value, b: Value) -> bool:
    if not _equal(a[0], b[0]):
        return False
    return (a[1] is None and b[1] is None) or (a[1] is not None and b[1] is not None and _equal(a[1], b[1]))


class WeightLedger:
    """The layers written into one host's weight and bias, bottom first."""

    def __init__(self, host: nn.Module, kind: HostKind) -> None:
        self.host, self.kind = host, kind
        self.layers: list[Layer] = []

    # --- the host's tensors ---------------------------------------------------------------------------

    def value(self) -> Value:
        W = self.kind.get_weight(self.host).detach().clone()  # type: ignore[misc]
        b = getattr(self.host, "bias", None)
        return W, (None if b is None else b.detach().clone())

    def _write(self, txn: Transaction, v: Value) -> None:
        raw = cast(torch.Tensor, self.host.weight)
        txn.save(raw)
        self.kind.set_weight(self.host, v[0])  # type: ignore[misc]
        b = getattr(self.host, "bias", None)
        if b is not None and v[1] is not None and not _equal(b, v[1]):
            txn.write(b, v[1])

    def tensors(self, touches_bias: bool) -> list[torch.Tensor]:
        """The host tensors a layer writes."""
        out = [self.host.weight]
        if touches_bias and getattr(self.host, "bias", None) is not None:
            out.append(self.host.bias)
        return cast(list[torch.Tensor], out)

    # --- layers ---------------------------------------------------------------------------------------

    def _snapshot(self, txn: Transaction) -> None:
        layers = list(self.layers)
        state = [(ly, ly.active, ly.before) for ly in layers]

        def restore() -> None:
            self.layers[:] = layers
            for ly, active, before in state:
                ly.active, ly.before = active, before

        txn.on_undo(restore)

    def push(self, txn: Transaction, layer: Layer, after: Value | None = None) -> None:
        """Add ``layer`` on top and write its value (``after``, or computed now)."""
        self._snapshot(txn)
        layer.before = layer.first_before = self.value()
        after = after if after is not None else layer.compute()
        layer.first_after = (after[0].detach().clone(), None if after[1] is None else after[1].detach().clone())
        self.layers.append(layer)
        self._write(txn, layer.first_after)

    def _refold(self, txn: Transaction, k: int) -> None:
        """Rewrite the host from layer ``k`` up (the layers below are unchanged)."""
        if k >= len(self.layers):
            return
        v = self.layers[k].before
        assert v is not None
        for ly in self.layers[k:]:
            ly.before = v
            if ly.active:
                v = ly.redo(self, txn)
        self._write(txn, v)

    def remove(self, txn: Transaction, owner: Any, kinds: tuple[str, ...] = ("update", "merge")) -> None:
        """Take out every layer of ``owner`` of the given kinds (the layers above are re-applied)."""
        idx = [i for i, ly in enumerate(self.layers) if ly.owner is owner and ly.kind in kinds]
        if not idx:
            return
        self._snapshot(txn)
        k = idx[0]
        bottom = self.layers[k].before
        assert bottom is not None
        self.layers[:] = [ly for i, ly in enumerate(self.layers) if i not in idx]
        if k < len(self.layers):
            self.layers[k].before = bottom
            self._refold(txn, k)
        else:
            self._write(txn, bottom)
        if not self.layers:
            self._detach(txn)

    def set_active(self, txn: Transaction, owner: Any, active: bool, kinds: tuple[str, ...] = ("update", "merge")) -> None:
        """Suspend (or resume) ``owner``'s layers; the layers above are re-applied."""
        idx = [i for i, ly in enumerate(self.layers) if ly.owner is owner and ly.kind in kinds and ly.active != active]
        if not idx:
            return
        self._snapshot(txn)
        for i in idx:
            self.layers[i].active = active
        self._refold(txn, idx[0])

    def owners(self) -> list[Any]:
        return [ly.owner for ly in self.layers]

    def _detach(self, txn: Transaction) -> None:
        if self.host.__dict__.get(_LEDGER) is self:
            del self.host.__dict__[_LEDGER]
            txn.on_undo(lambda: self.host.__dict__.__setitem__(_LEDGER, self))


def ledger_of(txn: Transaction, host: nn.Module, kind: HostKind, create: bool = True) -> WeightLedger | None:
    """The host's weight ledger (created on first use, within ``txn``)."""
    led = host.__dict__.get(_LEDGER)
    if led is None and create:
        led = WeightLedger(host, kind)
        host.__dict__[_LEDGER] = led
        txn.on_undo(lambda: host.__dict__.pop(_LEDGER, None) if not led.layers else None)
    return led


def host_change(host: nn.Module, owner: Any) -> torch.Tensor | None:
    """What ``owner``'s one-time update took off the host's weight when it was written ([out, in]: the value beneath
    minus the value it wrote), or None where it wrote none."""
    led = host.__dict__.get(_LEDGER)
    for ly in led.layers if led is not None else []:
        if ly.owner is owner and ly.kind == "update" and ly.first_before is not None and ly.first_after is not None:
            return ly.first_before[0] - ly.first_after[0]
    return None


def all_ledgers(model: nn.Module) -> list[WeightLedger]:
    """Every host ledger in ``model``."""
    hosts = [h for m in model.modules() for h in (m, *virtual_hosts(m))]  # slices of raw parameters are no submodules
    return [h.__dict__[_LEDGER] for h in hosts if _LEDGER in h.__dict__]


class FreezeLedger:
    """The base model's original ``requires_grad`` flags, and which adapters train which host tensors in place."""

    def __init__(self, flags: dict[int, tuple[torch.Tensor, bool]]) -> None:
        self.flags = flags  # id(param) -> (param, original flag)
        self.owners: list[Any] = []
        self.selected: dict[int, list[Any]] = {}  # id(param) -> adapters training it in place

    def selectors(self, t: torch.Tensor) -> list[Any]:
        return list(self.selected.get(id(t), []))

    def snapshot(self) -> Callable[[], None]:
        """A function that puts ``owners`` and ``selected`` back as they are now (for a transaction's undo)."""
        owners = list(self.owners)
        sel = {k: list(v) for k, v in self.selected.items()}

        def restore() -> None:
            self.owners[:] = owners
            self.selected.clear()
            self.selected.update(sel)

        return restore


def freeze_ledger(model: nn.Module) -> FreezeLedger | None:
    return model.__dict__.get(_FREEZE)


def freeze(txn: Transaction, model: nn.Module, owner: Any, base: list[torch.Tensor], selected: list[torch.Tensor]) -> None:
    """Freeze the base parameters for ``owner`` and let it train ``selected`` host tensors in place."""
    led = model.__dict__.get(_FREEZE)
    if led is None:
        led = FreezeLedger({id(p): (p, p.requires_grad) for p in base})
        model.__dict__[_FREEZE] = led
        txn.on_undo(lambda: model.__dict__.pop(_FREEZE, None))
    else:
        for p in base:  # parameters the model gained since the first adapter
            if id(p) not in led.flags:
                led.flags[id(p)] = (p, p.requires_grad)
                txn.on_undo(lambda p=p: led.flags.pop(id(p), None))  # type: ignore[misc]
    txn.on_undo(led.snapshot())
    led.owners.append(owner)
    for p in base:
        txn.set_requires_grad(p, bool(led.selected.get(id(p))))
    for p in selected:
        led.selected.setdefault(id(p), []).append(owner)
        txn.set_requires_grad(p, True)


def release(txn: Transaction, model: nn.Module, owner: Any) -> None:
    """Undo :func:`freeze` for ``owner``: the last adapter gives back every original flag."""
    led: FreezeLedger | None = model.__dict__.get(_FREEZE)
    if led is None or owner not in led.owners:
        return
    undo = led.snapshot()

    def restore() -> None:
        undo()
        model.__dict__[_FREEZE] = led

    txn.on_undo(restore)
    led.owners.remove(owner)
    for k in list(led.selected):
        led.selected[k] = [o for o in led.selected[k] if o is not owner]
        if not led.selected[k]:
            del led.selected[k]
            p = led.flags.get(k, (None, False))[0]
            if p is not None and led.owners:
                txn.set_requires_grad(p, False)
    if not led.owners:
        for p, flag in led.flags.values():
            txn.set_requires_grad(p, flag)
        del model.__dict__[_FREEZE]


def check_not_selected(model: nn.Module, tensors: list[torch.Tensor], what: str) -> None:
    """Refuse to fold into host tensors that an adapter trains in place."""
    led = freeze_ledger(model)
    if led is None:
        return
    for t in tensors:
        who = led.selectors(t)
        if who:
            names = ", ".join(repr(getattr(o, "name", o)) for o in who)
            raise PefrefError(f"{what}: the host tensor of shape {tuple(t.shape)} is trained in place by adapter {names}; remove it first")
