"""Jinja filters of the site: number formats, safe embedded JSON, docstring markup.

Every filter that returns markup escapes its input first; the only text
marked safe without escaping is what these functions build themselves.
"""

from __future__ import annotations

import json
import re
from typing import Any

from markupsafe import Markup, escape

from pefref.language.printable import neutral_text

__all__ = ["FILTERS", "script_json", "count", "percent", "compact", "doc_html", "yes_no"]

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def neutral(value: Any) -> Any:
    """A value a template shows, with the control characters of its text written out (``\\x1b``); markup
    stays markup (the escapes add no HTML)."""
    if isinstance(value, Markup):
        return Markup(neutral_text(str(value)))
    if isinstance(value, str):
        return neutral_text(value)
    return value


def script_json(value: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` element.

    ``<``, ``>`` and ``&`` (and the two Unicode line separators) are written as
    ``\\uXXXX`` escapes, so no text inside can close the element (``</script>``)
    or open a comment; ``JSON.parse`` gives the original strings back.
    """
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return Markup(re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group(0)], text))


def count(n: int | None) -> str:
    """An integer with thousands separators: 4,194,304."""
    return "" if n is None else f"{int(n):,}"


def percent(p: float | None) -> str:
    """A share in percent with three significant digits (``<0.001`` below that)."""
    if p is None:
        return ""
    if p == 0:
        return "0"
    if p < 0.001:
        return "<0.001"
    text = f"{p:.3g}"
    return f"{float(text):.10f}".rstrip("0").rstrip(".") if "e" in text else text


def compact(n: int | None) -> str:
    """A large count in words: 1.2 K, 4.19 M, 6.74 B."""
    if n is None:
        return ""
    for div, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return str(n)


def yes_no(v: bool) -> str:
    return "yes" if v else "no"


_CODE = re.compile(r"``(.+?)``|:math:`(.+?)`|:(?:func|class|meth|attr|mod|data|obj):`~?([^`]+?)`|`([^`]+?)`", re.S)


def doc_html(text: str) -> Markup:
    """A docstring as HTML: paragraphs; ````code```` and reST cross-references (``:func:`x```) as code;
    ``:math:`...``` as MathML (:mod:`pefref.render.texmath`, converted at build time); everything else escaped."""
    from pefref.render.texmath import tex_to_mathml

    paras = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out = []
    for p in paras:
        parts: list[str] = []
        pos = 0
        for m in _CODE.finditer(p):
            parts.append(str(escape(p[pos:m.start()])))
            if m.group(2) is not None:
                parts.append(f'<span class="math">{tex_to_mathml(m.group(2))}</span>')
            else:
                code = m.group(1) or m.group(4) or m.group(3).rsplit(".", 1)[-1]
                parts.append(f"<code>{escape(code)}</code>")
            pos = m.end()
        parts.append(str(escape(p[pos:])))
        out.append("<p>" + "".join(parts) + "</p>")
    return Markup("\n".join(out))


FILTERS = {
    "script_json": script_json,
    "count": count,
    "percent": percent,
    "compact": compact,
    "doc_html": doc_html,
    "yes_no": yes_no,
}
