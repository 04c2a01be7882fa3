"""Bounds on the work a description can ask for: expression size, numbers, dimensions, allocations.

Nothing a YAML file says may make pefref run for more than seconds before
doing real work, or allocate more than the machine holds. The bounds live in
one :class:`Limits` value; :func:`current` reads it and :func:`limits`
changes it for a block (``with limits(max_alloc_bytes=2**30): ...``). The
allocation budget defaults to the machine's available memory (``MemAvailable``
of ``/proc/meminfo``, else the physical memory), or ``$PEFREF_MAX_ALLOC_BYTES``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Limits", "current", "limits", "available_memory", "format_bytes"]


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``), else physical memory, else 8 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def _default_budget() -> int:
    env = os.environ.get("PEFREF_MAX_ALLOC_BYTES")
    if env:
        try:
            return max(int(env), 0)
        except ValueError:
            pass
    return available_memory()


@dataclass(frozen=True)
class Limits:
    """Every bound pefref applies to what descriptions ask for."""

    max_expr_chars: int = 4000
    """Longest expression text accepted."""
    max_expr_nodes: int = 500
    """Most syntax-tree nodes in one expression."""
    max_expr_depth: int = 50
    """Deepest nesting of one expression."""
    max_int_digits: int = 30
    """Most decimal digits of an integer literal, or of an integer computed while evaluating sizes."""
    max_exponent: int = 64
    """Largest exponent of ``**`` on integers (also bounds the size of the result)."""
    max_dim: int = 1 << 31
    """Largest value of one resolved dimension (a shape entry, a width, a length)."""
    max_elements: int = 1 << 32
    """Most elements of one tensor an expression's op may give (checked by shape inference at validate time,
    on the reference sizes, and at apply time on the model's sizes, where the allocation budget applies too)."""
    max_yaml_depth: int = 64
    """Deepest nesting of YAML mappings and lists."""
    max_runs: int = 10_000
    """Most runs one experiment's grid may expand to (entries × hyperparameter axes × learning rates × seeds)."""
    max_layers: int = 4096
    """Most layers a command's ``--layers`` may ask to draw or count."""
    max_alloc_bytes: int = -1
    """Largest total allocation one operation may make (-1: the machine's available memory, read when used)."""

    def alloc_budget(self) -> int:
        """The allocation budget in bytes (:attr:`max_alloc_bytes`, or the default from the machine)."""
        return self.max_alloc_bytes if self.max_alloc_bytes >= 0 else _default_budget()


_CURRENT = [Limits()]


def current() -> Limits:
    """The limits in force."""
    return _CURRENT[-1]


@contextlib.contextmanager
def limits(**changes: int) -> Iterator[Limits]:
    """Change some limits within a block (names of :class:`Limits` fields)."""
    new = dataclasses.replace(current(), **changes)
    _CURRENT.append(new)
    try:
        yield new
    finally:
        _CURRENT.remove(new)


def format_bytes(n: float) -> str:
    """``n`` bytes for people (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
