"""Two-pass routing: a first forward pass of the model, run once per call before the real one.

A connection with ``pass: first`` reads a site's hidden state as a first pass of the
adapted model left it (e.g. a router reading the last hidden state to weigh the
modules of the real pass). The model's input cell (:func:`pefref.runtime.patches.input_cell`)
holds one :class:`FirstPass` for every adapter declaring such reads: its pre-hook runs the
model's forward once more before the real pass, with those adapters' modules off (``during:
off``) and only the taps the first-pass reads need on, under ``torch.no_grad()`` where
declared, and keeps what the taps published; a reader takes its value from there
(:func:`first_value`). Other adapters run in both passes. The first pass runs whenever an
adapter reading it is active, and not under its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pefref.language.errors import PefrefError

if TYPE_CHECKING:
    from pefref.runtime.patches import Entry, InputCell

__all__ = ["FirstPass", "FirstPassHandle", "run_first_pass", "first_value", "set_pass", "join_first_pass"]


@dataclass(eq=False)
class FirstPass:
    """The first pass of a model's calls: ``entries`` are those that run in one pass only (``Entry.passes``:
    ``first`` for taps only first-pass reads need, ``real`` for every other entry of an adapter reading a first
    pass), ``values`` what the taps published in the last first pass, by published key; ``running`` while it runs."""

    entries: list[Entry] = field(default_factory=list)
    values: dict[Any, torch.Tensor] = field(default_factory=dict)
    running: bool = False
    hook: Any = field(default=None, repr=False)  # the model's forward hook that forgets the values after each call


def set_pass(fp: FirstPass, first: bool) -> None:
    """Switch the entries of ``fp`` to the first pass (taps on, the rest of their adapters off) or to the real one."""
    for e in fp.entries:
        e.off = e.passes == ("real" if first else "first")


def run_first_pass(model: nn.Module, cell: InputCell, args: tuple[Any, ...], kwargs: dict[str, Any], caches: list[Any],
                   has_use_cache: bool) -> None:
    """Run the model's forward once as the first pass of this call (from its pre-hook ``model``'s input cell ``cell``),
    when an adapter reading it is active; ``caches``: the call's key/value cache arguments (refused unless None),
    ``has_use_cache``: the forward takes ``use_cache`` (set False for the first pass)."""
    fp = cell.first
    readers = [e for e in (fp.entries if fp is not None else []) if e.passes == "real" and e.owner.active]
    if fp is None or fp.running or not readers:
        return
    fp.values = {}
    if any(c is not None for c in caches):
        raise PefrefError("an adapter reading a first forward pass (pass: first) runs every call on the whole sequence: call the "
                          "model without a key/value cache (use_cache=False, e.g. generate(..., use_cache=False))")
    if has_use_cache:
        kwargs = {**kwargs, "use_cache": False}
    no_grad = all(e.first_no_grad for e in readers)
    fp.running = True
    set_pass(fp, first=True)
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
            model.forward(*args, **kwargs)
        fp.values = dict(cell.values)
    finally:
        fp.running = False
        set_pass(fp, first=False)
        cell.values.clear()


def first_value(fp: FirstPass | None, unit: str, name: str, key: tuple[Any, ...]) -> torch.Tensor:
    """The value a first-pass read ``key`` (``("first", *published key)``) of ``unit``'s input ``name`` takes."""
    got = fp.values.get(key[1:]) if fp is not None else None
    if got is None:
        raise PefrefError(f"{unit}: input {name!r} reads {key[1:]} from a first forward pass, which did not give it in this call")
    return got


class FirstPassHandle:
    """A removable handle (like a hook's) that takes one entry out of its model's first pass."""

    def __init__(self, cell: InputCell, entry: Entry) -> None:
        self.cell, self.entry = cell, entry

    def remove(self) -> None:
        fp = self.cell.first
        if fp is not None and self.entry in fp.entries:
            fp.entries.remove(self.entry)
            if not fp.entries:
                fp.hook.remove()
                self.cell.first = None
        self.entry.off = False


def join_first_pass(model: nn.Module, cell: InputCell, entry: Entry) -> FirstPassHandle:
    """Make ``entry`` (its ``passes`` set) take part in the first pass of ``model`` (``cell``: its input cell); the
    handle undoes it. The values of a call's first pass are forgotten when the call returns, so a forward that does not
    go through ``model`` (its backbone called alone) is refused rather than given another call's values."""
    if cell.first is None:
        fp = cell.first = FirstPass()
        fp.hook = model.register_forward_hook(lambda *_: fp.values.clear(), always_call=True)
    cell.first.entries.append(entry)
    entry.off = entry.passes == "first"
    return FirstPassHandle(cell, entry)
