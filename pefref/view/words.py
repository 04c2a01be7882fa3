"""Derived facts in words, from plain data only (what the CLI prints from a kept summary imports nothing else)."""

from __future__ import annotations

from typing import Any

__all__ = ["layers_words"]


def layers_words(layers: Any) -> str:
    """A layer selection as plain data (``"all"``, a list of indices, a dict of ``first``/``last``/``every``) in
    words: ``all``, ``[0, 2]``, ``first 2``, ``last 4, every 2``."""
    if isinstance(layers, dict):
        return ", ".join(f"{k} {v}" for k, v in layers.items()) or "all"
    if isinstance(layers, list):
        return "[" + ", ".join(map(str, layers)) + "]"
    return str(layers)
