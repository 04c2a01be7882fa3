"""What the README and the docs name exists: every ``pefref <command>`` and every repository path.

Commands come from the typer application; paths are taken relative to the repository root
(code spans and code blocks that start with one of the repository's top-level folders, or
name one of its top-level files). A path with a placeholder (``<id>``, ``{i}``) is not
checked; a glob (``tests/test_parity_*.py``) must match at least one file.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import typer.main

from pefref.cli.app import app

from .docs_blocks import DOCS, ROOT, blocks, prose

PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
_TOP = ("pefref", "catalog", "tests", "benchmarks", "docs", "schemas", "site", ".ci")
_FILES = ("run.sh", "pyproject.toml", "mkdocs.yml", "README.md")
_TOP_ALT = "|".join(re.escape(t) for t in _TOP)
_FILES_ALT = "|".join(re.escape(f) for f in _FILES)
_PATH = re.compile(rf"(?<![\w./-])((?:{_TOP_ALT})/[\w.*/-]*[\w*]|{_FILES_ALT})(?![\w/])")
_COMMAND = re.compile(r"(?<![\w.-])pefref ([a-z][a-z_-]*)\b")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
_READER_FOLDERS = ("my_techniques", "my_compositions", "results", "build")
"""Folders the pages tell the reader to create (or that builds write): not in the repository."""


def _generated() -> set[Path]:
    """The pages docs/hooks.py generates at build time (they are not files in docs/)."""
    spec = importlib.util.spec_from_file_location("pefref_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return {(DOCS / rel).resolve() for rel in hooks.GENERATED}


def _code(page: Path) -> list[str]:
    """The page's code: its code spans and the text of its fenced blocks."""
    return _CODE_SPAN.findall(prose(page)) + [b.text for b in blocks(page)]


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_pefref_command_named_exists(page: Path) -> None:
    known = _commands()
    named = {m for text in _code(page) for m in _COMMAND.findall(text)}
    assert not named - known, f"{_rel(page)} names commands pefref does not have: {sorted(named - known)} (it has: {sorted(known)})"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_named_exists(page: Path) -> None:
    missing = []
    for text in _code(page):
        for path in _PATH.findall(text):
            if any(c in path for c in "<>{}") or path.split("/")[0] in _READER_FOLDERS:
                continue
            found = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
            if not found:
                missing.append(path)
    assert not missing, f"{_rel(page)} names paths that do not exist in the repository: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    """Markdown links to files, relative to the page (the README's are read on GitHub, not built by mkdocs)."""
    targets = [t for t in _LINK.findall(prose(page)) if not re.match(r"[a-z]+:", t)]
    generated = _generated()
    missing = [t for t in targets if not (page.parent / t).exists() and (page.parent / t).resolve() not in generated
               and not (page.parent == DOCS and t.startswith("site/"))]  # the comparison site, added to the build by the hooks
    assert not missing, f"{_rel(page)} links to files that do not exist: {missing}"


def test_the_checks_find_what_they_look_for() -> None:
    """The patterns catch commands and paths as the pages write them (so that an empty match is not a pass)."""
    text = "$ pefref validate catalog/techniques/lora.yaml; see `tests/test_parity_*.py`, pyproject.toml and site/index.html"
    assert _COMMAND.findall(text) == ["validate"]
    assert _PATH.findall(text) == ["catalog/techniques/lora.yaml", "tests/test_parity_*.py", "pyproject.toml", "site/index.html"]
    assert not _PATH.findall("import pefref.models; my_techniques/ffn_lora.yaml; ../img/lora.svg")
    readme = ROOT / "README.md"
    assert {m for t in _code(readme) for m in _COMMAND.findall(t)} >= {"validate", "show", "diagram", "list"}
    assert sum(len(_PATH.findall(t)) for t in _code(readme)) >= 3
    assert len(_LINK.findall(prose(readme))) >= 10
