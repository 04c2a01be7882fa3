"""Connections at run time: which units publish their output and which published values a unit reads.

A connection is one more input of a unit (see :mod:`pefref.compiler.units`): the
reader's patch takes the value from the model's input cell (where the source's
patch put it earlier in the same forward pass, see :mod:`pefref.runtime.patches`)
and passes it to the unit by name. Reading a site's hidden state is reading the
output of a *tap*: a generated module ``compute: x`` (or ``h``, or the host's own ``W`` or ``b``), ``integrate: h`` at
that site, compiled and attached like any other module, which leaves the host
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pefref.language.connections import source_site, tap_name
from pefref.language.schema import ParallelModule, SequentialModule

__all__ = ["with_taps", "hook_only_taps", "Wiring", "call_key"]


def call_key(name: str, default: int | None = None) -> tuple[Any, ...]:
    """Key of an input of the model's call (``task_ids``, ``input_ids``) in the input cell; ``default``: the task id
    of a call given none (None: such a call is refused)."""
    return ("call", name, default)


def with_taps(modules: list[Any], readers: Sequence[Any] = ()) -> list[Any]:
    """``modules`` preceded by one tap for every site hidden state a connection reads (theirs, and those of
    ``readers``: training hooks that read the last forward pass through ``inputs``)."""
    taps: dict[str, Any] = {}
    for m in [*modules, *readers]:
        for conn in (getattr(m, "inputs", None) or {}).values():
            if conn.module is None and conn.site is not None:
                name = tap_name(conn.site, conn.tensor)
                if name not in taps:
                    cls: Any = ParallelModule if conn.tensor == "x" else SequentialModule  # W, b: read where the host runs
                    taps[name] = cls(name=name, sites=[conn.site], form=cls.model_fields["form"].annotation.__args__[0],
                                     compute=conn.tensor, integrate="h", description=f"publishes {conn.tensor} at {conn.site}")
    return [*taps.values(), *modules]


def hook_only_taps(modules: Sequence[Any], readers: Sequence[Any]) -> set[str]:
    """The taps only ``readers`` (training hooks) read: where one cannot be placed on a model (its site is unbound, or
    bound to a module of other widths), the hook's terms there have no input and add nothing."""
    def taps(ms: Sequence[Any]) -> set[str]:
        return {tap_name(c.site, c.tensor) for m in ms for c in (getattr(m, "inputs", None) or {}).values()
                if c.module is None and c.site is not None and c.call is None}

    return taps(readers) - taps(modules)


class Wiring:
    """Keys of published values: which (module, site, layer) outputs are read, and what each placement reads."""

    def __init__(self, modules: Sequence[Any], places: Sequence[Any], adapter: str, readers: Sequence[Any] = ()) -> None:
        self.adapter = adapter
        self.by_name = {m.name: m for m in modules}
        self.layers: dict[tuple[str, str], list[int | None]] = {}
        for pl in places:
            self.layers.setdefault((pl.module.name, pl.site), []).append(pl.layer)
        self.read: set[str] = set()
        self.read_first: set[str] = set()  # taps read from a first forward pass (pass: first)
        self.read_same: set[str] = set()  # sources read in the pass they run in
        self.first_no_grad = False
        for m in [*modules, *readers]:  # readers: training hooks reading the last forward pass (their sources publish too)
            for conn in (getattr(m, "inputs", None) or {}).values():
                if conn.call is not None:
                    continue
                src = conn.module if conn.module is not None else tap_name(conn.site, conn.tensor)
                self.read.add(src)
                (self.read_first if conn.first_pass else self.read_same).add(src)
                self.first_no_grad = self.first_no_grad or conn.no_grad
                if conn.fallback is not None:
                    self.read.add(conn.fallback)
                    self.read_same.add(conn.fallback)

    def passes(self, module: Any) -> str:
        """Which forward passes of a call ``module`` runs in: ``both`` (no first pass is read), ``first`` (a tap only
        first-pass reads need), ``real`` (every other module of a technique reading a first pass: off during it, during: base)."""
        if not self.read_first:
            return "both"
        if module.name in self.read_first:
            return "both" if module.name in self.read_same else "first"
        return "real"

    def publishes(self, module: Any) -> bool:
        """Whether other units read this module's output."""
        return module.name in self.read

    def key(self, module: str, site: str, layer: int | None) -> tuple[Any, ...]:
        return (self.adapter, module, site, layer)

    def _source(self, name: str, site: str | None, layer: int | None, which: str) -> tuple[Any, ...]:
        src = self.by_name[name]
        s = site if site is not None else src.sites[0]
        placed = [li for li in self.layers.get((name, s), []) if li is not None]
        if not placed:
            return self.key(name, s, None)
        if which == "last":
            return self.key(name, s, max(placed))
        if which == "previous":
            return self.key(name, s, None if layer is None else layer - 1)
        return self.key(name, s, layer)

    def reads(self, module: Any, layer: int | None, site: str | None = None) -> dict[str, list[tuple[Any, ...]]]:
        """For each connection of ``module`` placed at ``site`` and ``layer``: the keys it reads, the first present wins."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for name, conn in (getattr(module, "inputs", None) or {}).items():
            if conn.call is not None:
                keys = [call_key(conn.call, conn.default)]
            elif conn.module is None:
                keys = [self._source(tap_name(conn.site, conn.tensor), conn.site, layer, conn.layer)]
                if conn.first_pass:  # the value the tap published in the call's first pass
                    keys = [("first", *keys[0])]
            else:
                keys = [self._source(conn.module, source_site(self.by_name[conn.module], conn, site), layer, conn.layer)]
            if conn.fallback is not None:
                keys.append(self._source(conn.fallback, None, layer, "same"))
            out[name] = keys
        return out
