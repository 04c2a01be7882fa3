"""The CLI's console: whatever it prints has its control characters neutralised (see
:func:`pefref.language.printable.neutral_text`); the styles rich itself emits are kept."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import typer
from rich.console import Console
from rich.segment import Segment

from pefref.language.printable import neutral_text

__all__ = ["SafeConsole", "safe_echo"]


class SafeConsole(Console):
    """A rich console whose text segments are neutralised before they are rendered (control segments, which
    rich makes for cursor movements, pass unchanged)."""

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(s if s.control else Segment(neutral_text(s.text), s.style) for s in buffer)


def safe_echo(message: str, **kwargs: Any) -> None:
    """``typer.echo`` of text from files: control characters neutralised."""
    typer.echo(neutral_text(message), **kwargs)
