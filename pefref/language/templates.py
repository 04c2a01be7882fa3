"""Module path templates of architecture maps: ``{i}`` stands for the layer index, and nothing else.

Paths from users never go through :meth:`str.format` (which evaluates
``{i.__class__}`` and fails on ``{x}``): :func:`template_problem` rejects any
brace other than ``{i}``, and :func:`template` substitutes it textually.
"""

from __future__ import annotations

import re

__all__ = ["PLACEHOLDER", "template", "template_problem", "PATH_PATTERN"]

PLACEHOLDER = "{i}"
PATH_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
"""A module path once ``{i}`` is substituted: dot-separated names and indices."""


def template_problem(path: str) -> tuple[str, int] | None:
    """What is wrong with a path template (message, 0-based column), or None."""
    rest = path.replace(PLACEHOLDER, "0")
    for col, ch in enumerate(rest):
        if ch in "{}":
            return f"only '{PLACEHOLDER}' may appear in braces (it stands for the layer index); found {ch!r}", col
    if not PATH_PATTERN.match(rest):
        bad = next((c for c, ch in enumerate(rest) if not (ch.isalnum() or ch in "._")), 0)
        return "a module path is dot-separated names and indices (letters, digits, underscores)", bad
    return None


def template(path: str, i: int | None) -> str:
    """``path`` with every ``{i}`` replaced by the layer index ``i``."""
    if PLACEHOLDER in path and i is None:
        raise ValueError(f"path {path!r} needs a layer index")
    return path.replace(PLACEHOLDER, str(i)) if i is not None else path
