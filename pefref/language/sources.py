"""The catalogs pefref reads: the bundled one, and the user's catalogs added to it.

A user's catalog is a folder laid out like the bundled one, holding any of
``techniques/*.yaml``, ``families/*.yaml``, ``models.yaml`` (model shapes) and
``compositions/*.yaml``; its entries join the bundled ones (ids must not
clash). Catalogs are added, in this order, by

* ``$PEFREF_CATALOG``: folders separated by :data:`os.pathsep`;
* ``--catalog DIR`` on the command line (repeatable; :func:`use_cli_catalogs`);
* installed packages, through the entry point group ``pefref.catalogs``
  (:data:`ENTRY_POINT_GROUP`). An entry point's value names a package and,
  after a colon, a folder inside it: ``mine = mypkg:catalog``. Nothing of the
  package runs: the entry point is read from its metadata (never loaded), and
  the package's folder is located by the import system's finders
  (:func:`importlib.util.find_spec` on the top-level name, then path finders on
  its folders), which do not execute modules.

Every file of every catalog is read as data by the same safe loader as the
bundled catalog (no YAML tag constructs objects; expressions go through a
closed grammar), so adding a catalog adds no way to execute code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from importlib.machinery import PathFinder
from pathlib import Path, PurePosixPath

from pefref.language.bundled import bundled_data
from pefref.language.errors import Location, Problem

__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "CatalogSource", "CatalogFiles", "catalog_files", "catalog_sources", "use_cli_catalogs", "BUNDLED_NAME"]

ENTRY_POINT_GROUP = "pefref.catalogs"
"""The entry point group through which an installed package contributes a catalog folder."""

ENV_VAR = "PEFREF_CATALOG"
"""The environment variable listing the user's catalog folders (separated by ``os.pathsep``)."""

BUNDLED_NAME = "pefref"
"""The name of the bundled catalog (entries from it carry no "from" mark on the site)."""

_CLI: ContextVar[tuple[Path, ...]] = ContextVar("pefref_cli_catalogs", default=())


@dataclass(frozen=True)
class CatalogSource:
    """One catalog folder and how pefref found it.

    Attributes:
        name: how the site and messages call it (``pefref`` for the bundled one, the folder's name for
            a folder, the entry point's name for a package's catalog).
        root: the folder.
        found: where it was named (``bundled``, ``$PEFREF_CATALOG``, ``--catalog``, or the entry point).
    """

    name: str
    root: Path
    found: str

    @property
    def bundled(self) -> bool:
        return self.found == "bundled"


def use_cli_catalogs(folders: Sequence[Path]) -> None:
    """The folders given with ``--catalog`` for the command being run (empty: none)."""
    _CLI.set(tuple(Path(f) for f in folders))


def _folder(root: Path, found: str, name: str | None = None) -> tuple[CatalogSource | None, list[Problem]]:
    if not root.is_dir():
        return None, [Problem(Location(str(root)), found, "a catalog folder is not a folder (or does not exist)")]
    if (root / "reference").exists():
        return None, [Problem(Location(str(root / "reference")), found, "a user's catalog adds techniques, families, shapes and compositions to the "
                              "bundled one; the reference architecture is pefref's own (remove this folder, or check a whole catalog with `pefref validate DIR`)")]
    return CatalogSource(name or root.resolve().name, root.resolve(), found), []


def _package_folder(module: str) -> Path | None:
    """The folder of package ``module``, found without importing it (no code of it runs)."""
    parts = module.split(".")
    spec = importlib.util.find_spec(parts[0])  # a top-level name: finders only, nothing is executed
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=8)
def _entry_point_sources(path: tuple[str, ...]) -> tuple[list[CatalogSource], list[Problem]]:
    """The catalogs installed packages contribute, for the import path ``path`` (looked up once per path)."""
    out: list[CatalogSource] = []
    problems: list[Problem] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        where = f"entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP}{f', {dist.name}' if dist else ''})"
        module, _, sub = (s.strip() for s in ep.value.partition(":"))
        rel = PurePosixPath(sub)
        if not all(p.isidentifier() for p in module.split(".")) or rel.is_absolute() or ".." in rel.parts:
            problems.append(Problem(Location(where), ENTRY_POINT_GROUP, "expected 'package' or 'package:folder/inside/it'"))
            continue
        try:
            base = _package_folder(module)
        except (ImportError, ValueError):  # a parent package that cannot be found
            base = None
        if base is None:
            problems.append(Problem(Location(where), ENTRY_POINT_GROUP, f"package {module!r} is not installed"))
            continue
        src, more = _folder(base.joinpath(*rel.parts), where, ep.name)
        problems += more
        if src is not None:
            out.append(src)
    return out, problems


def catalog_sources() -> tuple[tuple[CatalogSource, ...], list[Problem]]:
    """The bundled catalog first, then the user's (environment, ``--catalog``, entry points), with problems finding them.

    A folder named twice is read once.
    """
    out = [CatalogSource(BUNDLED_NAME, bundled_data().catalog, "bundled")]
    problems: list[Problem] = []
    named = [(Path(p), f"${ENV_VAR}") for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    named += [(p, "--catalog") for p in _CLI.get()]
    for root, found in named:
        src, more = _folder(root, found)
        problems += more
        if src is not None:
            out.append(src)
    eps, more = _entry_point_sources(tuple(sys.path))
    out += eps
    problems += more
    seen: dict[Path, CatalogSource] = {}
    for s in out:
        seen.setdefault(s.root, s)
    return tuple(seen.values()), problems


@dataclass(frozen=True)
class CatalogFiles:
    """The files a catalog made of some catalog folders is loaded from, in load order (found by globbing;
    nothing is read)."""

    reference: Path
    """The reference architecture (of the first folder, the bundled catalog's)."""
    families: list[Path]
    models: list[Path]
    techniques: list[Path]
    roots: tuple[Path, ...]

    def key(self, only: set[str] | None = None, techniques: Sequence[Path] | None = None) -> str | None:
        """The checked-catalog key of these files (``techniques``: the technique files actually read, when
        ``only`` narrowed them), :func:`pefref.language.catalog_cache.checked_key`."""
        from pefref.language.catalog_cache import checked_key

        read = list(self.techniques if techniques is None else techniques)
        return checked_key([self.reference, *self.families, *self.models, *read],
                           {"only": sorted(only) if only is not None else None, "roots": [str(r) for r in self.roots]})


def catalog_files(sources: Sequence[CatalogSource]) -> CatalogFiles:
    """The files of the catalog made of ``sources`` (the first one holds the reference architecture and
    the base model shapes)."""
    roots = tuple(s.root for s in sources)
    root = roots[0]
    return CatalogFiles(
        reference=root / "reference" / "transformer.yaml",
        families=[p for r in roots for p in sorted((r / "families").glob("*.yaml"))],
        models=[root / "models.yaml", *[r / "models.yaml" for r in roots[1:] if (r / "models.yaml").is_file()]],
        techniques=[p for r in roots for p in sorted((r / "techniques").glob("*.yaml"))],
        roots=roots,
    )
