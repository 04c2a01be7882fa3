"""Validation of technique files, folders of them and whole catalogs, collecting every problem of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pefref.language.catalog import Catalog, default_catalog, load_catalog, load_techniques
from pefref.language.errors import CatalogError, Location, Problem
from pefref.language.sources import CatalogSource, catalog_sources

__all__ = ["validate_paths"]


def _compositions(files: list[Path], cat: Catalog, problems: list[Problem], report: dict[str, Any], root: Path | None = None) -> None:
    """Check composition files against ``cat`` and the interaction rules, adding to ``problems`` and ``report``."""
    from pefref.language.composition import load_composition, load_rules

    try:
        rules = load_rules(root)
    except CatalogError as e:
        problems += e.problems
        return
    for f in files:
        try:
            res = load_composition(f, cat, rules)
        except CatalogError as e:
            problems += e.problems
            continue
        report["compositions"].append(res.composition.id)
    report["files"] += len(files)


def _is_user_catalog(p: Path) -> bool:
    """Whether folder ``p`` is laid out like a user's catalog (techniques/, families/, compositions/ or models.yaml)."""
    return any((p / d).is_dir() for d in ("techniques", "families", "compositions")) or (p / "models.yaml").is_file()


def _whole(cat_or_error: Catalog | CatalogError, problems: list[Problem], report: dict[str, Any], root: Path | None = None) -> None:
    """Report a loaded catalog (its techniques, maps, shapes and files) and check its compositions."""
    if isinstance(cat_or_error, CatalogError):
        problems += cat_or_error.problems
        return
    cat = cat_or_error
    report["techniques"] += sorted(cat.techniques)
    shape_files = sum((s.root / "models.yaml").is_file() for s in cat.catalogs)
    report["files"] += 2 + shape_files + len(cat.families) + len(cat.techniques)  # with the reference and the interaction rules
    report.setdefault("families", []).extend(sorted(cat.families))
    report.setdefault("models", []).extend(cat.shapes)
    _compositions(list(cat.compositions.values()), cat, problems, report, root)


def _load(root: Path | None = None, extra: tuple[CatalogSource, ...] = ()) -> Catalog | CatalogError:
    try:
        return load_catalog(root, extra=extra) if root is not None or extra else default_catalog()
    except CatalogError as e:
        return e


def validate_paths(paths: list[Path]) -> tuple[list[Problem], dict[str, Any]]:
    """Validate the catalogs (no paths: the bundled one and the user's), or files, folders of them and catalog folders.

    A folder holding ``reference/transformer.yaml`` is loaded as a whole catalog
    (its compositions and interaction rules included); a folder laid out like a
    user's catalog (``techniques/``, ``families/``, ``compositions/``,
    ``models.yaml``) is loaded with the bundled catalog it adds to; other folders contribute
    their ``*.yaml`` files, which are checked as techniques, or as compositions
    when they hold a ``techniques`` list, against the bundled reference
    architecture, techniques and interaction rules. Returns every problem found
    and a report (technique and composition ids, number of files; architecture
    maps and model shapes of catalogs).
    """
    problems: list[Problem] = []
    report: dict[str, Any] = {"techniques": [], "compositions": [], "files": 0}
    if not paths:
        _whole(_load(), problems, report)
        return problems, report
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            problems.append(Problem(Location(str(p)), "", "no such file or folder"))
        elif p.is_dir() and (p / "reference" / "transformer.yaml").is_file():
            _whole(_load(p), problems, report, p)
        elif p.is_dir() and _is_user_catalog(p):
            known, more = catalog_sources()
            problems += more
            mine = () if p.resolve() in {s.root for s in known} else (CatalogSource(p.resolve().name, p.resolve(), "argument"),)
            _whole(_load(known[0].root, (*known[1:], *mine)), problems, report)
        elif p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                problems.append(Problem(Location(str(p)), "", "no .yaml files in this folder"))
            files += found
        else:
            files.append(p)
    unique = list(dict.fromkeys(f.resolve() for f in files))
    if unique:
        from pefref.language.composition import is_composition_file

        try:
            base = default_catalog()
        except CatalogError as e:
            return problems + e.problems, report
        comps = [f for f in unique if is_composition_file(f)]
        unique = [f for f in unique if f not in comps]
        _compositions(comps, base, problems, report)
    if unique:  # architecture maps, model shapes, the reference and the interop table by their own schemas
        from pefref.language.file_kinds import check_other_file, file_kind

        rest: list[Path] = []
        for f in unique:
            kind = file_kind(f)
            if kind is None:
                rest.append(f)
                continue
            other, what = check_other_file(f, kind, base)
            problems += other
            report.setdefault("families", [])
            report.setdefault("models", [])
            for key, names in what.items():
                report.setdefault(key, []).extend(names)
            report["files"] += 1
        unique = rest
    if unique:
        loaded, _src, _pos, tproblems = load_techniques(unique, base.reference, base.techniques)
        problems += tproblems
        report["techniques"] += sorted(loaded)
        report["files"] += len(unique)
    return problems, report
