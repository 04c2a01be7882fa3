"""A small LaTeX-to-MathML converter for the subset the primitives' docstrings use (offline, no script, no CDN).

Handled: letters (italic identifiers), numbers, operators, groups ``{...}``,
sub- and superscripts, ``\\frac``, ``\\sqrt``, accents (``\\hat``, ``\\overline``, ``\\bar``, ``\\tilde``), ``\\operatorname`` /
``\\mathrm`` / ``\\text`` (upright), ``\\mathcal`` and ``\\mathbb`` (their
letters), thin spaces ``\\,`` and the symbols in :data:`SYMBOLS`. An unknown
command is written as its name in upright text, never as a backslash command,
so a page shows no raw TeX; :func:`unknown_commands` lists them for a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape

__all__ = ["SYMBOLS", "tex_to_mathml", "unknown_commands"]

SYMBOLS: dict[str, tuple[str, str]] = {
    # command: (MathML element, text)
    "odot": ("mo", "⊙"), "otimes": ("mo", "⊗"), "top": ("mi", "⊤"), "in": ("mo", "∈"), "times": ("mo", "×"),
    "lor": ("mo", "∨"), "approx": ("mo", "≈"), "ge": ("mo", "≥"), "le": ("mo", "≤"), "cdot": ("mo", "·"),
    "ldots": ("mi", "…"), "dots": ("mi", "…"), "pi": ("mi", "π"), "mu": ("mi", "μ"), "sigma": ("mi", "σ"),
    "lVert": ("mo", "‖"), "rVert": ("mo", "‖"), "Re": ("mi", "ℜ"), "sum": ("mo", "∑"), "prod": ("mo", "∏"),
    "tanh": ("fn", "tanh"), "max": ("fn", "max"), "arg": ("fn", "arg"), "bmod": ("mo", "mod"), "exp": ("fn", "exp"),
    "log": ("fn", "log"), "alpha": ("mi", "α"), "beta": ("mi", "β"), "gamma": ("mi", "γ"), "lambda": ("mi", "λ"),
    "infty": ("mi", "∞"), "to": ("mo", "→"), "neq": ("mo", "≠"), "ne": ("mo", "≠"), "leftarrow": ("mo", "←"), "pm": ("mo", "±"),
    "sin": ("fn", "sin"), "cos": ("fn", "cos"), "min": ("fn", "min"), "ell": ("mi", "ℓ"), "epsilon": ("mi", "ε"),
    "tau": ("mi", "τ"), "theta": ("mi", "θ"), "omega": ("mi", "ω"), "star": ("mo", "⋆"), "sim": ("mo", "∼"), "uparrow": ("mo", "↑"),
    "partial": ("mo", "∂"), "nabla": ("mo", "∇"), "lceil": ("mo", "⌈"), "rceil": ("mo", "⌉"), "lfloor": ("mo", "⌊"), "rfloor": ("mo", "⌋"),
}
_SIZING = ("textstyle", "displaystyle", "big", "Big", "bigl", "bigr", "left", "right")
"""Commands that only size or style what follows: dropped (MathML sizes its own delimiters)."""
_UPRIGHT = ("operatorname", "mathrm", "text")
_ACCENTS = {"hat": "^", "overline": "¯", "bar": "¯", "tilde": "~"}
"""Accents over their argument."""
_CAL = {"N": "𝒩", "U": "𝒰", "F": "ℱ", "L": "ℒ", "O": "𝒪"}
_BB = {"R": "ℝ", "N": "ℕ", "Z": "ℤ", "C": "ℂ"}
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[A-Za-z]|\d+(?:\.\d+)?|\s+|.", re.S)


@dataclass
class _Reader:
    tokens: list[str]
    pos: int = 0

    def peek(self) -> str | None:
        while self.pos < len(self.tokens) and self.tokens[self.pos].isspace():
            self.pos += 1
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        assert tok is not None
        self.pos += 1
        return tok

    def raw_group(self) -> str:
        """The text of the next ``{...}`` (or the next token) without converting it."""
        if self.peek() != "{":
            return self.take()
        self.take()
        depth, out = 1, []
        while self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            self.pos += 1
            depth += tok == "{"
            depth -= tok == "}"
            if depth == 0:
                break
            out.append(tok)
        return "".join(out)


def _el(tag: str, body: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f"<{tag}{extra}>{body}</{tag}>"


def _row(items: list[str]) -> str:
    return items[0] if len(items) == 1 else _el("mrow", "".join(items))


def _atom(r: _Reader, unknown: list[str]) -> str:
    tok = r.take()
    if tok == "{":
        items = _sequence(r, unknown, "}")
        return _row(items) if items else _el("mrow", "")
    if tok.startswith("\\"):
        return _command(tok[1:], r, unknown)
    if tok.isalpha():
        return _el("mi", escape(tok))
    if tok[0].isdigit():
        return _el("mn", tok)
    if tok == "'":
        return _el("mo", "′")
    if tok == "-":
        return _el("mo", "−")
    if tok == "&":  # a column break in an environment's row
        return _el("mo", ",")
    return _el("mo", escape(tok))


def _command(name: str, r: _Reader, unknown: list[str]) -> str:
    if name == ",":
        return '<mspace width="0.17em"></mspace>'
    if name in (";", ":", " ", "!"):
        return '<mspace width="0.28em"></mspace>'
    if name in ("{", "}", "|", "%", "_", "&", "#"):
        return _el("mo", escape(name))
    if name in _UPRIGHT:
        text = r.raw_group()
        return _el("mtext", escape(text)) if name == "text" else _el("mi", escape(text), mathvariant="normal")
    if name in ("mathcal", "mathbb"):
        text = r.raw_group()
        table = _CAL if name == "mathcal" else _BB
        return _el("mi", escape("".join(table.get(c, c) for c in text)), mathvariant="normal")
    if name == "frac":
        return _el("mfrac", _argument(r, unknown) + _argument(r, unknown))
    if name == "sqrt":
        return _el("msqrt", _argument(r, unknown))
    if name in _ACCENTS:
        return _el("mover", _argument(r, unknown) + _el("mo", _ACCENTS[name]), accent="true")
    if name in _SIZING:
        return ""
    if name in ("begin", "end"):  # an environment (a matrix): its name is dropped, its rows read inline
        r.raw_group()
        return ""
    if name == "\\":
        return _el("mo", ";")
    if name in SYMBOLS:
        tag, text = SYMBOLS[name]
        return _el("mi", text, mathvariant="normal") if tag == "fn" else _el(tag, text)
    unknown.append(name)
    return _el("mi", escape(name), mathvariant="normal")


def _argument(r: _Reader, unknown: list[str]) -> str:
    if r.peek() is None:
        return _el("mrow", "")
    if r.peek() == "{":
        r.take()
        return _row(_sequence(r, unknown, "}") or [_el("mrow", "")])
    return _atom(r, unknown)


def _sequence(r: _Reader, unknown: list[str], end: str | None = None) -> list[str]:
    out: list[str] = []
    while (tok := r.peek()) is not None:
        if tok == end:
            r.take()
            break
        if tok == "}":  # an unbalanced brace: shown, not dropped
            r.take()
            out.append(_el("mo", "}"))
            continue
        base = _atom(r, unknown)
        sub = sup = None
        while r.peek() in ("_", "^"):
            mark = r.take()
            arg = _argument(r, unknown)
            if mark == "_":
                sub = arg
            else:
                sup = arg
        if sub is not None and sup is not None:
            base = _el("msubsup", base + sub + sup)
        elif sub is not None:
            base = _el("msub", base + sub)
        elif sup is not None:
            base = _el("msup", base + sup)
        out.append(base)
    return out


def _convert(tex: str, display: bool = False) -> tuple[str, list[str]]:
    unknown: list[str] = []
    items = _sequence(_Reader(_TOKEN.findall(tex)), unknown)
    attrs = {"display": "block"} if display else {}
    return _el("math", _row(items or [_el("mrow", "")]), **attrs), unknown


def tex_to_mathml(tex: str, display: bool = False) -> str:
    """``tex`` (the subset above) as a ``<math>`` element: inline, or a displayed block with ``display``."""
    return _convert(tex, display)[0]


def unknown_commands(tex: str) -> list[str]:
    """The commands of ``tex`` this converter does not know (written as upright names)."""
    return _convert(tex)[1]
