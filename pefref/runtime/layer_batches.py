"""Prefixes of every layer evaluated at once: the root's key/value entries linked to layer-batched programs.

The key/value prefixes of all layers fill the attention cache together, in the
model-level forward (:class:`pefref.runtime.patches.RootPatch`). Where the units
of one module at every layer hold the same tensors, shared across layers or
``stacked: layers`` (:mod:`pefref.compiler.batched`), one generated program
computes all their keys and values at once: shared subexpressions once, stacked
heads as one batched product. Each such entry carries the program (``Entry.batch``,
the same object for the whole group) and the slice its unit reads (``Entry.pick``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pefref.compiler.batched import batchable, layer_batch
from pefref.compiler.units import Unit
from pefref.language.forms import Integration
from pefref.runtime.patches import Entry

__all__ = ["LayerBatch", "link_layer_batches"]


@dataclass(eq=False)
class LayerBatch:
    """A layer-batched program with the unit whose tensors its code reads; ``size``: the number of layers (slices)."""

    fn: Callable[[Unit, Any], Any]
    unit: Unit
    size: int

    def __call__(self, training: Any) -> Any:
        """The output fields (keys, values) of every slice, each with a leading dimension of ``size``."""
        return self.fn(self.unit, training)


def link_layer_batches(entries: Sequence[Entry]) -> int:
    """Link the key/value entries among ``entries`` (one adapter's) whose units run as one layer-batched program;
    returns the number of programs made."""
    groups: dict[tuple[int, ...], list[Entry]] = {}
    for e in entries:
        u = e.unit
        if e.form.integration is not Integration.POSITIONS or e.layer is None or not isinstance(u, Unit) or not u.picks:
            continue
        key = tuple(id(t) for _, t in [*u.named_parameters(recurse=False), *u.named_buffers(recurse=False)])
        groups.setdefault(key, []).append(e)
    made = 0
    for group in groups.values():
        units = [e.unit for e in group]
        if not batchable(units):  # type: ignore[arg-type]
            continue
        batch = LayerBatch(layer_batch(units), units[0], len(units))  # type: ignore[arg-type]
        for e in group:
            e.batch, e.pick = batch, next(iter(e.unit.picks.values()))  # type: ignore[operator]
        made += 1
    return made
