"""The house style of pefref's pictures: one colour per form, escaped HTML-like labels, pretty expressions.

Every label that reaches DOT is an HTML-like label built here from escaped
text, so quotes, ``<``, ``&``, backslashes and unicode from a user's YAML can
break neither the DOT source nor the SVG that ``dot`` writes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

from pefref.language.forms import FORMS

__all__ = [
    "INSERTION_FILLS",
    "USES_COLOUR",
    "FONT",
    "FORM_COLOURS",
    "FORM_FILLS",
    "FORM_MEANING",
    "FROZEN",
    "HOST_FILL",
    "HOST_LINE",
    "dims_text",
    "esc",
    "html_lines",
    "pretty",
    "wrap",
]

FONT = "Helvetica"

FORM_COLOURS: dict[str, str] = {f.name: f.colour for f in FORMS.values()}
"""The line colour of each form (modules, their combine nodes and their edges; the forms' registry)."""

FORM_FILLS: dict[str, str] = {f.name: f.fill for f in FORMS.values()}
"""The fill colour of each form."""

FORM_MEANING: dict[str, str] = {f.name: f.legend for f in FORMS.values()}
"""One line per form for the legend."""

INSERTION_FILLS: dict[str, str] = {}
"""The fill of each typology insertion form: that of the first form with it."""
for _f in FORMS.values():
    INSERTION_FILLS.setdefault(_f.insertion, _f.fill)

USES_COLOUR = next(iter(FORMS.values())).colour
"""The colour of a lineage edge for reused modules."""

HOST_FILL = "#f4f4f4"
HOST_LINE = "#8c8c8c"
FROZEN = "#7a7a7a"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def esc(text: object) -> str:
    """Text made safe for an HTML-like DOT label (and hence for the SVG): entities, no control characters."""
    s = _CONTROL.sub("", str(text))
    return html.escape(s, quote=True).replace("&#x27;", "&#39;")


_GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "eta": "η", "theta": "θ",
    "lambda_": "λ", "mu": "μ", "sigma": "σ", "tau": "τ", "phi": "φ", "omega": "ω",
}
_GREEK_RE = re.compile(r"\b(" + "|".join(_GREEK) + r")\b(?!\s*\()")


def pretty(expr: object) -> str:
    """An expression as a reader writes it: Greek names as letters, ``·`` for products, ``^`` for powers."""
    s = " ".join(str(expr).split())
    s = _GREEK_RE.sub(lambda m: _GREEK[m.group(1)], s)
    s = s.replace("**", "^")
    s = re.sub(r"\s*\*\s*", "·", s)
    return s


def wrap(text: str, width: int = 34) -> list[str]:
    """Break a long expression after commas or spaces so that boxes stay narrow (continuation lines indented)."""
    out: list[str] = []
    indent = ""
    while len(text) > width:
        body = len(indent)
        cut = max(text.rfind(", ", body, width), text.rfind(" ", body, width))
        cut = width if cut <= body else cut + 1
        out.append(text[:cut].rstrip())
        indent = "  "
        text = indent + text[cut:].lstrip()
        if len(text) <= len(indent):
            text = ""
            break
    if text or not out:
        out.append(text)
    return out


def html_lines(lines: Iterable[tuple[str, str]]) -> str:
    """An HTML-like label from (style, text) lines; style is '', 'b' (bold), 'small', 'mono', 'i', 'frozen'
    or 'markup' (text already an HTML-like label fragment, escaped by its maker: rendered math)."""
    parts = []
    for style, text in lines:
        t = text if style == "markup" else esc(text)
        if style == "b":
            t = f"<B>{t}</B>"
        elif style == "small":
            t = f'<FONT POINT-SIZE="8" COLOR="#555555">{t}</FONT>'
        elif style == "mono":
            t = f'<FONT POINT-SIZE="8" FACE="Courier" COLOR="#333333">{t}</FONT>'
        elif style == "i":
            t = f"<I>{t}</I>"
        elif style == "frozen":
            t = f'<FONT COLOR="{FROZEN}"><I>{t}</I></FONT>'
        parts.append(t)
    return "<BR/>".join(parts)


def dims_text(dims: Iterable[object]) -> str:
    """A shape as ``r × d_in`` (expressions pretty-printed)."""
    return " × ".join(pretty(d) for d in dims)
