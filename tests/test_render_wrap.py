"""Wrapping long expressions for diagram boxes always ends, and loses nothing."""

from __future__ import annotations

from pefref.render.style import wrap


def test_wrap_ends_and_keeps_the_text() -> None:
    for text in ("x" * 80, "ab, " + "y" * 60, "f(a, b) + " + "z" * 50 + " + g(c)", "short"):
        lines = wrap(text, 34)
        assert all(len(line) <= 34 for line in lines)
        assert "".join(line.strip() for line in lines).replace(" ", "") == text.replace(" ", "")
