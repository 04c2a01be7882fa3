"""The documentation builds with ``mkdocs build --strict`` (a warning fails it), offline, with its generated pages.

The build runs once for the module, into a temporary folder, the way the README says
(``mkdocs build --strict`` from the repository root): broken links and anchors, pages
missing from the navigation and docstrings griffe cannot read all fail it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from pefref.cli.app import app
from pefref.view.primitives import primitive_docs

from .docs_blocks import ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed (install the docs extra: pip install -e '.[docs]'):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    return out


def _page(built: Path, rel: str) -> str:
    return (built / rel).read_text(encoding="utf-8")


def test_every_page_of_the_navigation_is_built(built: Path) -> None:
    for rel in ("index.html", "tutorials/first-technique.html", "how-to/distributed.html", "reference/language.html",
                "reference/schema.html", "reference/primitives.html", "reference/cli.html", "reference/api.html",
                "explanation/performance.html", "typology.html", "reliability.html"):
        assert (built / rel).is_file(), rel


def test_the_op_reference_lists_every_primitive_with_its_math_as_mathml(built: Path) -> None:
    html = _page(built, "reference/primitives.html")
    for d in primitive_docs():
        assert f'id="{"op" if d.kind == "op" else "init"}-{d.name}"' in html, d.name
    assert html.count("<math") >= sum(":math:" in d.doc for d in primitive_docs())
    assert 'class="arithmatex"' not in html  # every formula became MathML; none is left for a script to render
    assert not re.search(r"<m[io]>\\[a-zA-Z]+</m[io]>", html), "a LaTeX command the converter did not know"


def test_the_cli_reference_lists_every_command(built: Path) -> None:
    html = _page(built, "reference/cli.html")
    for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        assert f'id="{name}"' in html, name


def test_the_schema_reference_lists_every_file_format(built: Path) -> None:
    from pefref.language.schema import SCHEMAS

    html = _page(built, "reference/schema.html")
    for key in SCHEMAS:
        assert f'id="{key}"' in html, key


def test_the_api_reference_is_rendered_from_docstrings(built: Path) -> None:
    html = _page(built, "reference/api.html")
    for ident in ("pefref.runtime.api.apply", "pefref.runtime.adapter.Adapter", "pefref.runtime.adapter.Adapter.merge",
                  "pefref.runtime.compose.Composition", "pefref.interop.peft_format.from_pretrained",
                  "pefref.experiments.results.load_results"):
        assert f'id="{ident}"' in html, ident


def test_the_docs_and_the_comparison_site_link_to_each_other(built: Path) -> None:
    assert 'href="site/index.html"' in _page(built, "index.html")
    site = _page(built, "site/index.html")
    assert 'href="../index.html">Docs</a>' in site
    assert 'href="../../index.html">Docs</a>' in _page(built, "site/techniques/lora.html")


def test_nothing_is_loaded_from_the_network(built: Path) -> None:
    """No web font, CDN script or stylesheet: the built docs work from file:// offline."""
    pattern = re.compile(r"<(?:script|link|img)[^>]+(?:src|href)=\"(?:https?:)?//", re.I)
    for page in built.rglob("*.html"):
        found = pattern.search(page.read_text(encoding="utf-8"))
        assert not found, f"{page.relative_to(built)}: {found.group(0)}"
    for css in built.rglob("*.css"):
        assert "fonts.googleapis" not in css.read_text(encoding="utf-8"), css
