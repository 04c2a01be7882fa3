"""The adapter handle's operations as transactions: merge, unmerge, disable, remove, load.

Each checks what it can first (the handle's state, what a merge may write),
then changes the model inside one :class:`~pefref.runtime.transaction.Transaction`,
so it completes or leaves the model exactly as it was. Host weights are
changed only through their :class:`~pefref.runtime.ledger.WeightLedger`, which
lets several adapters on one host be merged, unmerged, disabled and removed in
any order and gives back the original weights bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.runtime.ledger import Layer, Value, all_ledgers, check_not_selected, ledger_of, release
from pefref.runtime.patches import Entry, HostPatch
from pefref.runtime.precision import LOW_PRECISION, in_fp32, loads_exactly
from pefref.runtime.transaction import OperationError, Transaction, located

__all__ = ["merge", "unmerge", "disabled", "remove", "load_state", "check_state", "merged_value", "check_hosts_free", "push_merge_layers"]


def _usable(ad: Any, what: str) -> None:
    if ad._removed:
        raise PefrefError(f"adapter {ad.name!r} was removed; it cannot {what}")
    _not_merged_by(ad, what)


def _not_merged_by(ad: Any, what: str) -> None:
    """Refuse operations on an adapter that a composition's merge folded (the composition owns that merge)."""
    by = getattr(ad, "merged_by", None)
    if by is not None:
        raise PefrefError(f"adapter {ad.name!r} is merged as part of composition {by.name!r}; it cannot {what} "
                          "until the composition's unmerge()")


def _paths(model: nn.Module) -> dict[int, str]:
    return {id(m): n or "<model>" for n, m in model.named_modules()}


def merged_value(patch: HostPatch, entries: list[Entry]) -> Value:
    """The host's weight and bias with ``entries`` folded in, read off by running it on the identity.

    The adapted host is an affine map of its input when its modules are
    mergeable: ``W' = (f(I) - f(0))^T`` and ``b' = f(0)``.
    """
    host, kind = patch.host, patch.kind
    W = kind.get_weight(host)  # type: ignore[misc]
    d_in, w_dtype = W.shape[1], W.dtype
    with in_fp32(host, *(e.unit for e in entries)):  # bf16/fp16 hosts: computed in fp32, rounded once below
        dt = torch.float32 if w_dtype in LOW_PRECISION else w_dtype
        probe = torch.cat([torch.zeros(1, d_in, dtype=dt, device=W.device), torch.eye(d_in, dtype=dt, device=W.device)])
        was = host.training
        host.eval()
        try:
            with torch.no_grad():
                out = patch.run(entries, (probe,), {})
        finally:
            host.train(was)
    b_new = out[0]
    W_new = (out[1:] - b_new).t().to(w_dtype)
    bias = getattr(host, "bias", None)
    if bias is None:
        if bool(b_new.abs().max() > 0):
            raise PefrefError(f"cannot merge into {type(host).__name__} without a bias: the adapted map has an offset")
        return W_new.contiguous(), None
    return W_new.contiguous(), b_new.to(bias.dtype)


def check_hosts_free(model: nn.Module, hosts: Mapping[int, tuple[HostPatch, list[Entry]]], paths: Mapping[int, str], label: str) -> None:
    """Refuse, before anything changes, to fold into a host weight that a per-example selection reads."""
    for patch, _es in hosts.values():
        check_not_selected(model, [cast(torch.Tensor, patch.host.weight)], f"{label} into {paths.get(id(patch.host))}")


def push_merge_layers(txn: Transaction, owner: Any, label: str, model: nn.Module, hosts: Mapping[int, tuple[HostPatch, list[Entry]]], paths: Mapping[int, str]) -> None:
    """Fold each host's entries into its weight (and bias) as one ``merge`` layer of ``owner`` in the host's ledger."""
    for patch, es in hosts.values():
        where = paths.get(id(patch.host), type(patch.host).__name__)
        with located(f"{label} into {where}"):
            after = merged_value(patch, es)
            bias = getattr(patch.host, "bias", None)
            touches_bias = bias is not None and after[1] is not None and not torch.equal(after[1], bias)
            if touches_bias:
                check_not_selected(model, [cast(torch.Tensor, bias)], f"{label} into {where}")
            layer = Layer(owner, "merge", lambda patch=patch, es=es: merged_value(patch, es), touches_bias)  # type: ignore[misc]
            ledger_of(txn, patch.host, patch.kind).push(txn, layer, after)  # type: ignore[union-attr]


def merge(ad: Any) -> list[str]:
    """Fold every mergeable unit of ``ad`` into its host; returns the class names of the hosts merged."""
    _usable(ad, "be merged")
    if not ad.enabled:
        raise PefrefError(f"adapter {ad.name!r} is disabled (inside disable()); merge it after the block")
    if ad.merged:
        return []
    unmergeable = [k for k in ad.units if k not in ad.mergeable_units]
    if unmergeable:
        raise PefrefError(f"{ad.technique.id}: modules that cannot be merged: {', '.join(unmergeable[:4])}")
    hosts: dict[int, tuple[HostPatch, list[Entry]]] = {}
    for patch, e in ad.entries:
        if isinstance(patch, HostPatch) and e.unit_key in ad.mergeable_units:
            hosts.setdefault(id(patch), (patch, []))[1].append(e)
    paths = _paths(ad.model)
    label = f"merge adapter {ad.name!r}"
    check_hosts_free(ad.model, hosts, paths, label)
    with Transaction(label) as txn:
        push_merge_layers(txn, ad, label, ad.model, hosts, paths)
        merged = [type(patch.host).__name__ for patch, _es in hosts.values()]
        settle = [p for p, _es in hosts.values()]
        txn.on_undo(lambda: [p.settle() for p in settle])  # type: ignore[func-returns-value]  # runs after 'merged' is restored
        txn.set_attr(ad, "merged", True)
        for p in settle:  # merged means gone: a host whose entries are all merged runs its own forward
            p.settle()
    return merged


def unmerge(ad: Any) -> None:
    """Take ``ad``'s merged layers out of its hosts (others merged above are re-applied)."""
    if not ad.merged:
        return
    _not_merged_by(ad, "be unmerged on its own")
    with Transaction(f"unmerge adapter {ad.name!r}") as txn:
        for led in all_ledgers(ad.model):
            led.remove(txn, ad, ("merge",))
        patches = [p for p, _e in ad.entries if isinstance(p, HostPatch)]
        txn.on_undo(lambda: [p.settle() for p in patches])  # type: ignore[func-returns-value]
        txn.set_attr(ad, "merged", False)
        for p in patches:
            p.settle()


@contextlib.contextmanager
def disabled(ad: Any) -> Iterator[None]:
    """Within the block the model computes without ``ad`` (its merges and host updates suspended)."""
    _usable(ad, "be disabled")
    if not ad.enabled:  # nested: already disabled
        yield
        return
    saved: dict[str, torch.Tensor] = {}
    off = Transaction(f"disable adapter {ad.name!r}", keep=True)  # its undo log stays: the way back if re-enabling fails
    with off as txn:
        for led in all_ledgers(ad.model):
            led.set_active(txn, ad, False)
        for name, base in ad._host_backup.items():
            p = ad.model.get_parameter(name)
            saved[name] = p.detach().clone()
            txn.write(p, base)
        txn.set_attr(ad, "enabled", False)
    mark = _fingerprint(ad, saved)
    try:
        yield
    finally:
        if not ad._removed:
            untouched = _fingerprint(ad, saved) == mark  # the block left alone what the disable changed
            try:
                with Transaction(f"re-enable adapter {ad.name!r}") as txn:
                    for led in all_ledgers(ad.model):
                        led.set_active(txn, ad, True)
                    for name, value in saved.items():
                        txn.write(ad.model.get_parameter(name), value)
                    txn.set_attr(ad, "enabled", True)
            except PefrefError as e:  # undone: the model is as the block left it, the adapter disabled
                if not untouched or off.rollback():
                    raise OperationError(f"{e}; adapter {ad.name!r} stays disabled (the block changed what re-enabling "
                                         "restores, so it cannot be undone instead)") from e
                # undoing the disable gave back the model exactly as it was before the block: re-enabled
            finally:
                off._undo.clear()  # the kept log is not needed any more


def _fingerprint(ad: Any, saved: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    """What the disable's undo log would overwrite: each ledger's layers (and their states) and the version
    counters of the host weights and the parameters it wrote; equal means nothing touched them since."""
    leds = tuple((id(led), tuple((id(ly), ly.active) for ly in led.layers), cast(torch.Tensor, led.host.weight)._version,
                  getattr(getattr(led.host, "bias", None), "_version", None)) for led in all_ledgers(ad.model))
    return leds, tuple(ad.model.get_parameter(n)._version for n in saved)


def remove(ad: Any, container_attr: str) -> nn.Module:
    """Detach ``ad`` and give back the host weights, forwards and flags it changed."""
    if ad._removed:
        return ad.model
    _not_merged_by(ad, "be removed")
    model = ad.model
    with Transaction(f"remove adapter {ad.name!r}") as txn:
        for led in all_ledgers(model):  # tensor writes first: the steps that could fail
            led.remove(txn, ad)
        for name, base in ad._host_backup.items():
            txn.write(model.get_parameter(name), base)
        release(txn, model, ad)
        container = getattr(model, container_attr, None)
        if container is not None and ad.name in container:
            units = container[ad.name]
            del container[ad.name]
            txn.on_undo(lambda: container.add_module(ad.name, units))
            if len(container) == 0:
                delattr(model, container_attr)
                txn.on_undo(lambda: model.add_module(container_attr, container))
        # structural steps last (they cannot fail half-way)
        for patch, e in ad.entries:
            if e in patch.entries:
                patch.entries.remove(e)
            if not patch.entries and getattr(patch, "restore", None) is not None and _is_live(patch):
                patch.restore()
            elif patch.entries and isinstance(patch, HostPatch):
                patch.settle()
        for hk in ad._hooks:
            hk.remove()
        ad._hooks.clear()
        ad.merged = False
        ad._removed = True
    return model


def _is_live(patch: Any) -> bool:
    obj = getattr(patch, "host", None)
    obj = getattr(patch, "model", None) if obj is None else obj
    return obj is not None and any(v is patch for v in obj.__dict__.values())


def check_state(where: str, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """Names, shapes, dtypes and finiteness of ``state`` against the adapter's own tensors ``own``."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise PefrefError(f"{where}: adapter state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in own.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise PefrefError(f"{where}: {k} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(t.shape):
            raise PefrefError(f"{where}: {k}: shape {tuple(v.shape)} != {tuple(t.shape)}")
        if not loads_exactly(v.dtype, t.dtype):
            raise PefrefError(f"{where}: {k}: dtype {v.dtype} != {t.dtype} (convert it explicitly)")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise PefrefError(f"{where}: {k} holds NaN or infinite values")


def load_state(ad: Any, state: Mapping[str, torch.Tensor], where: str, verified: bool = False) -> None:
    """Copy a verified state into ``ad``'s tensors, all or nothing."""
    _usable(ad, "load a state")
    if ad.merged:
        raise PefrefError(f"adapter {ad.name!r} is merged; unmerge it before loading a state")
    if not ad.enabled:
        raise PefrefError(f"adapter {ad.name!r} is disabled (inside disable()); load it after the block")
    own = ad.state_dict()
    if not verified:
        check_state(where, state, own)
    with Transaction(f"load {where} into adapter {ad.name!r}") as txn:
        for k, t in own.items():
            txn.write(t, state[k].to(t.device))


def load_file(ad: Any, path: str | Path) -> None:
    """Read, verify and load an adapter file written by ``save``."""
    from pefref.runtime.adapterfile import read_verified

    _usable(ad, "load a file")
    own = ad.state_dict()
    tensors = read_verified(path, ad, own)
    load_state(ad, tensors, str(path), verified=True)
