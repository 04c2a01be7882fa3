"""Validation of technique files, folders of them and whole catalogs, collecting every problem of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pefref.language.catalog import catalog_root, default_catalog, load_catalog, load_techniques
from pefref.language.errors import CatalogError, Location, Problem

__all__ = ["validate_paths"]


def validate_paths(paths: list[Path]) -> tuple[list[Problem], dict[str, Any]]:
    """Validate the bundled catalog (no paths), or technique files, folders of them and catalog folders.

    A folder holding ``reference/transformer.yaml`` is loaded as a whole catalog; other
    folders contribute their ``*.yaml`` files, which are checked as techniques against
    the bundled reference architecture and techniques. Returns every problem found and
    a report (technique ids, number of files; architecture maps and model shapes of
    catalogs).
    """
    problems: list[Problem] = []
    report: dict[str, Any] = {"techniques": [], "files": 0}
    if not paths:
        paths = [catalog_root()]
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            problems.append(Problem(Location(str(p)), "", "no such file or folder"))
        elif p.is_dir() and (p / "reference" / "transformer.yaml").is_file():
            try:
                cat = load_catalog(p)
            except CatalogError as e:
                problems += e.problems
                continue
            report["techniques"] += sorted(cat.techniques)
            report["files"] += 2 + len(cat.families) + len(cat.techniques)
            report.setdefault("families", []).extend(sorted(cat.families))
            report.setdefault("models", []).extend(cat.shapes)
        elif p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                problems.append(Problem(Location(str(p)), "", "no .yaml files in this folder"))
            files += found
        else:
            files.append(p)
    unique = list(dict.fromkeys(f.resolve() for f in files))
    if unique:
        try:
            base = default_catalog()
        except CatalogError as e:
            return problems + e.problems, report
        loaded, _src, _pos, tproblems = load_techniques(unique, base.reference, base.techniques)
        problems += tproblems
        report["techniques"] += sorted(loaded)
        report["files"] += len(unique)
    return problems, report
