"""The docstrings' LaTeX subset becomes MathML at build time; the primitives page shows no raw TeX or reST role."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from pefref.render.site.filters import doc_html
from pefref.render.texmath import tex_to_mathml, unknown_commands
from pefref.view.primitives import primitive_docs


def test_converter_builds_the_structures() -> None:
    assert tex_to_mathml(r"W = U \operatorname{diag}(S) V^\top") == (
        '<math><mrow><mi>W</mi><mo>=</mo><mi>U</mi><mi mathvariant="normal">diag</mi><mo>(</mo><mi>S</mi><mo>)</mo>'
        "<msup><mi>V</mi><mi>⊤</mi></msup></mrow></math>")
    frac = tex_to_mathml(r"\frac{1}{n}\sum_{j=1}^{n} a_j")
    assert "<mfrac><mn>1</mn><mi>n</mi></mfrac>" in frac and "<msubsup><mo>∑</mo>" in frac
    assert "<msqrt>" in tex_to_mathml(r"\sqrt{d_h}") and "ℝ" in tex_to_mathml(r"\mathbb{R}")
    assert unknown_commands(r"\foo x") == ["foo"] and "\\" not in tex_to_mathml(r"\foo x")


def test_every_docstring_formula_is_known() -> None:
    formulas = [m for d in primitive_docs() for m in re.findall(r":math:`([^`]+)`", d.doc)]
    assert len(formulas) > 40
    assert {c for f in formulas for c in unknown_commands(f)} == set()


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_primitives_docs_render_without_raw_tex_or_roles() -> None:
    html = "\n".join(str(doc_html(d.doc)) for d in primitive_docs())
    assert html.count("<math>") > 40
    parser = _Text()
    parser.feed(html)
    text = "".join(parser.text)
    assert not re.search(r"\\[A-Za-z]+", text), re.search(r".{20}\\[A-Za-z]+.{20}", text)
    assert not re.search(r":(math|func|class|meth):`", text)


def _docs_formulas() -> list[str]:
    """The ``$...$`` / ``$$...$$`` formulas of the documentation's pages, outside code blocks and code spans."""
    root = Path(__file__).resolve().parents[1] / "docs"
    out: list[str] = []
    for page in sorted(root.rglob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)
        out += [m.group(1) or m.group(2) for m in re.finditer(r"\$\$(.+?)\$\$|\$([^$\n]+)\$", text, re.S)]
    return out


def test_every_docs_formula_is_known_and_display_math_is_a_block() -> None:
    """The docs and the comparison site share this converter: the docs' formulas use only what it knows."""
    formulas = _docs_formulas()
    assert len(formulas) > 5
    assert {c for f in formulas for c in unknown_commands(f)} == set()
    assert tex_to_mathml("x", display=True).startswith('<math display="block">')
