"""Build hook: the wheel carries the repository's ``catalog/`` and ``schemas/`` inside the package.

The repository keeps one copy of each at its root, where contributors add files;
a built wheel holds them as ``pefref/catalog/`` and ``pefref/schemas/``, where
:func:`pefref.language.bundled.bundled_data` finds them through
importlib.resources. An editable install copies nothing: it reads the
repository's copy through the same function. Everything else about the package
is declared in ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("catalog", "schemas")
"""Folders at the repository's root that become folders of the ``pefref`` package in a wheel."""


def bundled_files(root: Path) -> list[Path]:
    """Every file of the bundled folders under ``root``, relative to it (caches and byte code left out)."""
    out: list[Path] = []
    for name in BUNDLED:
        for p in sorted((root / name).rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and "__pycache__" not in rel.parts and p.suffix not in (".pyc", ".pyo"):
                out.append(rel)
    return out


class BuildWithData(build_py):
    """``build_py`` that also copies the bundled folders into ``pefref/`` of the build (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for rel in bundled_files(Path.cwd()):
            dest = Path(self.build_lib) / "pefref" / rel
            self.mkpath(str(dest.parent))
            self.copy_file(str(rel), str(dest))


setup(cmdclass={"build_py": BuildWithData})
