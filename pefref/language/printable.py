"""Text from files made safe to show: control characters written out visibly.

A technique's name, a path or an error message may carry bytes a terminal or a
browser acts on (ESC sequences, carriage returns, bidirectional overrides).
:func:`neutral_text` writes each such character as its escape (``\\x1b``,
``\\u202e``); the CLI's consoles and the site's templates pass everything they
show through it.
"""

from __future__ import annotations

import re

__all__ = ["neutral_text"]

# C0 controls but tab and newline, DEL, C1 controls, and the Unicode bidirectional and line/paragraph controls
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def neutral_text(s: str) -> str:
    """``s`` with every control character written as its escape (tab and newline kept)."""
    return _CONTROL.sub(_escape, s)
