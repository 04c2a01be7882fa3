"""The fenced code blocks of a documentation page, for the tests that run them or check what they name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S)
_TITLE = re.compile(r'title="([^"]+)"')


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, its ``title=`` (a file name) if any, its text and its line in the page."""

    lang: str
    title: str | None
    text: str
    line: int


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        info = m.group("info").strip()
        lang = info.split()[0].strip("{}.") if info else ""
        title = _TITLE.search(info)
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines())
        out.append(Block(lang, title.group(1) if title else None, body + "\n", text.count("\n", 0, m.start()) + 1))
    return out


def prose(path: Path) -> str:
    """The page's text outside fenced blocks."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))
