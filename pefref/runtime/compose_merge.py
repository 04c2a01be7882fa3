"""Merging a whole composition into its hosts' weights, and taking the merge out again.

At every host the composition's adapters share, the adapted host is run on
the identity with *all* their entries at once, in the order and groups its
blocks set (:func:`pefref.runtime.operations.merged_value`), so the fold is
the composed map itself: a stack folds as the composition of its members'
maps (``W → f_n(… f_1(W))`` for reparameterisations, ``h → g_2(g_1(h))`` on
outputs), a parallel block as the sum of their changes, an average as their
weighted mean. One ledger layer per host is owned by the composition, so
:func:`unmerge` (and the composition's ``remove()``) take it out exactly and
give back the weights beneath bit for bit.

Everything is checked before anything is written: every adapter active and
unmerged, every unit mergeable (the derivation of
:func:`pefref.view.analysis.mergeable`), no block that cannot fold (a learned
fusion: a softmax attention over the adapters' outputs is not affine in the
host's input), no host tensor trained in place.
"""

from __future__ import annotations

from typing import Any

from pefref.language.errors import PefrefError
from pefref.runtime.ledger import all_ledgers
from pefref.runtime.operations import check_hosts_free, push_merge_layers
from pefref.runtime.patches import Entry, HostPatch
from pefref.runtime.transaction import Transaction
from pefref.view.composition import block_merge_problem, member_merge_problem

__all__ = ["merge_composition", "unmerge_composition", "merge_problems"]

def merge_problems(comp: Any) -> list[str]:
    """Why ``comp`` cannot be merged (empty: it can), each naming the adapter or block at fault."""
    out: list[str] = []
    if comp._removed:
        return [f"composition {comp.name!r} was removed"]
    seen: set[str] = set()
    for key, grp in comp.combiners.items():  # the blocks as realised at the hosts (keys: b<index>__<site>[__<layer>])
        b = key.split("__")[0][1:]
        if not grp.kind.folds and b not in seen:  # (FOLDING_BLOCKS)
            seen.add(b)
            out.append(block_merge_problem(b, grp.kind.name, list(grp.names)))
    for n, ad in comp.adapters.items():
        if n in comp._off:
            out.append(f"adapter {n!r} is deactivated; activate it (or remove it) before merging the composition")
        elif ad.merged:
            out.append(f"adapter {n!r} is already merged; unmerge it before merging the composition")
        elif not ad.enabled:
            out.append(f"adapter {n!r} is disabled (inside disable()); merge after the block")
        bad = [k for k in ad.units if k not in ad.mergeable_units]
        if bad:
            mods = sorted({ad.unit_modules[k].name for k in bad if k in ad.unit_modules})
            out.append(f"{member_merge_problem(n, ad.technique.id, mods)} (e.g. at {bad[0]})")
    return out


def merge_composition(comp: Any) -> list[str]:
    """Fold every adapter of ``comp`` into its hosts, as its blocks combine them; returns the hosts' paths."""
    problems = merge_problems(comp)
    if problems:
        raise PefrefError(f"composition {comp.name!r} cannot be merged: " + "; ".join(problems))
    hosts: dict[int, tuple[HostPatch, list[Entry]]] = {}
    for ad in comp.adapters.values():
        for patch, _e in ad.entries:
            if isinstance(patch, HostPatch):
                hosts.setdefault(id(patch), (patch, []))
    for patch, es in hosts.values():  # every entry of the composition at the host, in the host's own order
        es += [e for e in patch.entries if any(e.owner is ad for ad in comp.adapters.values())]
    paths = {id(m): n for n, m in comp.model.named_modules()}
    label = f"merge composition {comp.name!r}"
    check_hosts_free(comp.model, hosts, paths, label)
    with Transaction(label) as txn:
        push_merge_layers(txn, comp, label, comp.model, hosts, paths)
        merged = [paths.get(id(patch.host), type(patch.host).__name__) for patch, _es in hosts.values()]
        settle = [p for p, _es in hosts.values()]
        txn.on_undo(lambda: [p.settle() for p in settle])  # type: ignore[func-returns-value]
        _mark_merged(txn, comp, True)
        for p in settle:
            p.settle()
    return merged


def _mark_merged(txn: Transaction, comp: Any, merged: bool) -> None:
    """Record (undoably) that ``comp`` and each of its adapters is merged by ``comp``, or no longer."""
    for ad in comp.adapters.values():
        txn.set_attr(ad, "merged", merged)
        txn.set_attr(ad, "merged_by", comp if merged else None)
    txn.set_attr(comp, "merged", merged)


def unmerge_composition(comp: Any) -> None:
    """Take ``comp``'s merge out of its hosts' weights (the values beneath come back exactly)."""
    if not comp.merged:
        return
    with Transaction(f"unmerge composition {comp.name!r}") as txn:
        for led in all_ledgers(comp.model):
            led.remove(txn, comp, ("merge",))
        patches = [p for ad in comp.adapters.values() for p, _e in ad.entries if isinstance(p, HostPatch)]
        txn.on_undo(lambda: [p.settle() for p in patches])  # type: ignore[func-returns-value]
        _mark_merged(txn, comp, False)
        for p in patches:
            p.settle()
