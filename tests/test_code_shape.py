"""Functions stay short: none in ``pefref/`` is longer than 80 lines.

A function's length is counted from its ``def`` line to its last line
(``end_lineno - lineno + 1``, decorators not included), docstring and comments
included; nested functions and methods are counted on their own as well as
inside the function that holds them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80


@dataclass(frozen=True)
class Long:
    """A function over the limit."""

    file: str
    line: int
    name: str
    lines: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.name} has {self.lines} lines (at most {MAX_LINES})"


def long_functions(source: str, file: str = "<string>", limit: int = MAX_LINES) -> list[Long]:
    """Every function (sync or async, nested or a method) in ``source`` longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source, filename=file)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > limit:
                out.append(Long(file, node.lineno, node.name, n))
    return sorted(out, key=lambda x: x.line)


def test_no_function_is_longer_than_80_lines() -> None:
    found = [f for path in sorted((ROOT / "pefref").rglob("*.py"))
             for f in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "functions over the limit (split them):\n" + "\n".join(map(str, found))


def test_the_count_can_fail() -> None:
    """A synthetic module: a function of exactly the limit passes; one line more, nested or async, does not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES - 1))
    ok = f"def ok():\n{body}"
    too_long = f"def too_long():\n{body}    return 0\n"
    nested = "class C:\n    def outer(self):\n        async def inner():\n" + "".join(f"            y{i} = {i}\n" for i in range(MAX_LINES))
    assert long_functions(ok) == []
    assert [(f.name, f.lines) for f in long_functions(too_long)] == [("too_long", MAX_LINES + 1)]
    assert [(f.name, f.lines) for f in long_functions(nested)] == [("outer", MAX_LINES + 2), ("inner", MAX_LINES + 1)]
