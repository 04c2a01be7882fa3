"""Layers are enforced: no module of ``pefref/`` imports one of a higher layer.

The order comes from the documentation's "The package's layers" section
(docs/explanation/compilation.md; the README's layout row repeats it): its table names the layer of
every package and its text says that data flows one way and a lower layer never
imports a higher one, with the CLI on top. Lowest first (packages on one level
may import each other):

    ops → language → compiler → view → models/runtime → interop/render → experiments → cli

Every ``import`` is checked, at module level and inside functions or
``TYPE_CHECKING`` blocks, ``import x`` and ``from x import y`` alike, relative
imports resolved against the importing module. The package root's modules
(``pefref/__init__.py``, ``pefref/__main__.py``) are the public facade and may
import anything; a layer's module importing that facade counts as importing
the top. :func:`test_the_checker_finds_upward_imports` shows that the check can
fail; :func:`test_the_order_matches_the_documented_layers` that the order below and
the documented table name the same packages.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pefref"

ORDER: list[tuple[str, ...]] = [
    ("ops",), ("language",), ("compiler",), ("view",), ("models", "runtime"), ("interop", "render"), ("experiments",), ("cli",),
]
"""The layers, lowest first (from the documented layer table; one tuple: one level)."""

LEVEL = {pkg: i for i, level in enumerate(ORDER) for pkg in level}
FACADE = len(ORDER)
"""The level of the package root (``import pefref``, ``from pefref import apply``): above every layer."""


@dataclass(frozen=True)
class Upward:
    """An import that goes up the layer order."""

    file: str
    line: int
    importer: str  # the importing module, dotted
    imported: str  # the module it names, dotted

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} ({_layer(self.importer)}) imports {self.imported} ({_layer(self.imported)})"


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVEL else "the facade"


def _level(module: str) -> int | None:
    """The level of a ``pefref`` module; None for a module outside the package."""
    parts = module.split(".")
    if parts[0] != "pefref":
        return None
    return LEVEL[parts[1]] if len(parts) > 1 and parts[1] in LEVEL else FACADE


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names, relative ones resolved against ``module``.

    ``from pefref import x`` names the layer package ``x`` when there is one, and the facade otherwise.
    """
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        source = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source != "pefref":
        return [source]
    return list(dict.fromkeys(f"pefref.{a.name}" if a.name in LEVEL else "pefref" for a in node.names))


def upward_imports(source: str, module: str, *, is_package: bool = False, file: str = "<string>") -> list[Upward]:
    """Every import in ``source`` (the text of ``module``) that names a module of a higher layer."""
    mine = _level(module)
    if mine is None or mine == FACADE:
        return []  # outside the package, or the facade itself
    out: list[Upward] = []
    for node in ast.walk(ast.parse(source, filename=file)):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for name in _imported(node, module, is_package):
            level = _level(name)
            if level is not None and level > mine:
                out.append(Upward(file, node.lineno, module, name))
    return out


def _modules() -> list[tuple[Path, str, bool]]:
    """(file, dotted module name, whether it is a package's ``__init__``) for every module of ``pefref/``."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out.append((path, ".".join(parts[:-1] if is_package else parts), is_package))
    return out


def test_no_module_imports_a_higher_layer() -> None:
    found = [v for path, module, is_package in _modules()
             for v in upward_imports(path.read_text(encoding="utf-8"), module, is_package=is_package, file=str(path.relative_to(ROOT)))]
    assert not found, "imports up the layer order:\n" + "\n".join(map(str, found))


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}  # models/ has no __init__.py
    assert packages == set(LEVEL), f"packages without a layer: {sorted(packages - set(LEVEL))}; layers without a package: {sorted(set(LEVEL) - packages)}"


def test_the_order_matches_the_documented_layers() -> None:
    """The docs' layer table lists the same packages, and packages it puts in one layer share a level here."""
    text = (ROOT / "docs" / "explanation" / "compilation.md").read_text(encoding="utf-8")
    layout = text.split("## The package's layers", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `pefref/(\w+)/` \| ([^|]+?) \|", layout, flags=re.M))
    assert set(rows) == set(LEVEL), f"README table: {sorted(rows)}; ORDER: {sorted(LEVEL)}"
    for a in rows:
        for b in rows:
            if rows[a] == rows[b]:
                assert LEVEL[a] == LEVEL[b], f"the README puts {a} and {b} in one layer ({rows[a]}); ORDER does not"


def test_the_runtime_reaches_interop_through_the_registered_writer() -> None:
    """``Adapter.save_pretrained`` finds peft's writer in the runtime's hook, where the facade put it; an unknown
    format is a clear error that lists the registered ones."""
    import pefref
    from pefref.interop.peft_format import save_pretrained
    from pefref.language.errors import PefrefError
    from pefref.runtime.formats import PRETRAINED, adapter_format

    fmt = adapter_format(PRETRAINED)
    assert fmt.name == "peft" and fmt.write is pefref._write_peft
    assert pefref.save_pretrained is save_pretrained
    with pytest.raises(PefrefError, match=r"no adapter format 'onnx' is registered \(registered: peft\)"):
        adapter_format("onnx")


SNIPPET = '''
from __future__ import annotations

import torch
from pefref.language.errors import PefrefError
from pefref.runtime import inject
from . import sibling
from ..compiler.units import Unit

import pefref.cli.app

def save(a):
    from pefref.interop.peft_format import save_pretrained
    from ..experiments import plots
    from pefref import render, apply
    return save_pretrained(a)
'''


def test_the_checker_finds_upward_imports() -> None:
    """A synthetic runtime module: every upward import is found, at module level and in a function, relative or not."""
    found = upward_imports(SNIPPET, "pefref.runtime.fake")
    assert sorted((v.line, v.imported) for v in found) == [
        (10, "pefref.cli.app"),
        (13, "pefref.interop.peft_format"),
        (14, "pefref.experiments"),
        (15, "pefref"),  # ``apply`` comes from the facade
        (15, "pefref.render"),
    ]
    assert "pefref.runtime.fake (runtime) imports pefref.cli.app (cli)" in str(next(v for v in found if v.line == 10))
    # ``..`` from a module of view, and from view's __init__, is the package root: ``pefref.cli``
    assert [v.imported for v in upward_imports("from .. import cli\n", "pefref.view.typology")] == ["pefref.cli"]
    assert [v.imported for v in upward_imports("from .. import cli\n", "pefref.view", is_package=True)] == ["pefref.cli"]
    assert upward_imports("from . import typology\nfrom .typology import x\n", "pefref.view", is_package=True) == []
    # the facade may import anything; a layer importing the facade goes up
    assert upward_imports("from pefref.cli.app import app\n", "pefref", is_package=True) == []
    assert [v.imported for v in upward_imports("import pefref\n", "pefref.ops.core")] == ["pefref"]
    # the same level, and lower ones, are allowed
    assert upward_imports("from pefref.render.dot import to_dot\nimport pefref.ops\n", "pefref.interop.peft_format") == []
    assert upward_imports("from pefref.runtime.api import apply\n", "pefref.models.build") == []
