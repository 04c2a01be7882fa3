"""The catalog: the reference architecture, architecture maps, model shapes and techniques.

Techniques are found by globbing ``catalog/techniques/*.yaml``; nothing keeps a
second list of them. :func:`load_catalog` validates every file and checks the
cross-references between them, reporting every problem of the run at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pefref.language.check import check_family, check_technique
from pefref.language.errors import CatalogError, Problem
from pefref.language.loader import load_file, suggest
from pefref.language.schema import ArchitectureMap, ModelShape, ModelShapes, ModuleUse, ReferenceArchitecture, Technique
from pefref.language.slices import slice_problems
from pefref.language.yamlsrc import Positions

__all__ = ["Catalog", "catalog_root", "load_catalog", "default_catalog", "catalog_for", "load_techniques"]


def catalog_root() -> Path:
    """The bundled catalog folder (``$PEFREF_CATALOG`` overrides it)."""
    env = os.environ.get("PEFREF_CATALOG")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "catalog"


@dataclass
class Catalog:
    """Everything the catalog holds, validated and cross-checked."""

    reference: ReferenceArchitecture
    families: dict[str, ArchitectureMap]
    shapes: dict[str, ModelShape]
    techniques: dict[str, Technique]
    sources: dict[str, Path] = field(default_factory=dict)
    positions: dict[str, Positions] = field(default_factory=dict)
    family_positions: dict[str, Positions] = field(default_factory=dict)

    def technique(self, tid: str) -> Technique:
        try:
            return self.techniques[tid]
        except KeyError:
            raise KeyError(f"no technique {tid!r}{suggest(tid, self.techniques)} (known: {', '.join(sorted(self.techniques))})") from None

    def shape(self, name: str) -> ModelShape:
        try:
            return self.shapes[name]
        except KeyError:
            raise KeyError(f"no model shape {name!r}{suggest(name, self.shapes)} (known: {', '.join(sorted(self.shapes))})") from None

    def family(self, name: str) -> ArchitectureMap:
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(f"no architecture map {name!r}{suggest(name, self.families)} (known: {', '.join(sorted(self.families))})") from None


def _collect(problems: list[Problem], fn, *args):
    try:
        return fn(*args)
    except CatalogError as e:
        problems.extend(e.problems)
        return None


def load_techniques(paths: list[Path], reference: ReferenceArchitecture, known: dict[str, Technique] | None = None) -> tuple[dict[str, Technique], dict[str, Path], dict[str, Positions], list[Problem]]:
    """Load and check technique files; returns what loaded and every problem found."""
    problems: list[Problem] = []
    loaded: dict[str, tuple[Technique, Positions, Path]] = {}
    for p in paths:
        res = _collect(problems, load_file, Technique, p)
        if res is None:
            continue
        t, pos = res
        if t.id in loaded:
            problems.append(Problem(pos.at(("id",)), "id", f"technique id {t.id!r} is also defined in {loaded[t.id][2]}"))
            continue
        if p.suffix in (".yaml", ".yml") and p.stem != t.id:
            problems.append(Problem(pos.at(("id",)), "id", f"file name {p.name!r} does not match id {t.id!r}; expected {t.id}.yaml"))
        loaded[t.id] = (t, pos, p)
    pool = dict(known or {})
    pool.update({k: v[0] for k, v in loaded.items()})
    for _tid, (t, pos, _p) in loaded.items():
        problems.extend(check_technique(t, pos, reference, pool))
    bad = {pr.location.file for pr in problems}
    good = {k: v for k, v in loaded.items() if str(v[2]) not in bad}
    return ({k: v[0] for k, v in good.items()}, {k: v[2] for k, v in good.items()}, {k: v[1] for k, v in good.items()}, problems)


def load_catalog(root: Path | None = None, only: set[str] | None = None) -> Catalog:
    """Load and cross-check the whole catalog under ``root``; raise CatalogError listing every problem.

    ``only``: load just these techniques and those they ``use`` (the reference
    architecture, families and shapes are always loaded).
    """
    root = root or catalog_root()
    problems: list[Problem] = []
    res = _collect(problems, load_file, ReferenceArchitecture, root / "reference" / "transformer.yaml")
    if res is None:
        raise CatalogError(problems)
    reference = res[0]
    families: dict[str, ArchitectureMap] = {}
    family_pos: dict[str, Positions] = {}
    for p in sorted((root / "families").glob("*.yaml")):
        r = _collect(problems, load_file, ArchitectureMap, p)
        if r is not None:
            problems.extend(check_family(r[0], r[1], reference))
            families[r[0].family], family_pos[r[0].family] = r
    shapes: dict[str, ModelShape] = {}
    r = _collect(problems, load_file, ModelShapes, root / "models.yaml")
    if r is not None:
        for i, s in enumerate(r[0].shapes):
            loc = r[1].at(("shapes", i, "family"))
            if s.family not in families:
                problems.append(Problem(loc, f"shapes[{i}].family", f"unknown family {s.family!r}{suggest(s.family, families)}"))
            elif s.name in shapes:
                problems.append(Problem(r[1].at(("shapes", i, "name")), f"shapes[{i}].name", f"shape {s.name!r} is defined twice"))
            shapes[s.name] = s
    if not problems:  # slices of fused projections on the sizes of the family's named shapes
        for name, fam in families.items():
            configs = {s.name: s.config for s in shapes.values() if s.family == name}
            problems.extend(slice_problems(fam, family_pos[name], reference, configs))
    paths = sorted((root / "techniques").glob("*.yaml")) if only is None else _used_closure(root / "techniques", only, problems)
    techniques, sources, positions, tproblems = load_techniques(paths, reference)
    problems.extend(tproblems)
    if problems:
        raise CatalogError(problems)
    return Catalog(reference, families, shapes, techniques, sources, positions, family_pos)


def _used_closure(folder: Path, ids: set[str], problems: list[Problem]) -> list[Path]:
    """The files of techniques ``ids`` and of every technique their modules ``use`` (transitively)."""
    todo, seen = sorted(ids), set()
    while todo:
        tid = todo.pop()
        if tid in seen:
            continue
        seen.add(tid)
        p = folder / f"{tid}.yaml"
        if not p.is_file():
            continue  # the caller reports the unknown id
        res = _collect(problems, load_file, Technique, p)
        if res is not None:
            todo += [m.use.split(".")[0] for m in res[0].modules if isinstance(m, ModuleUse)]
            todo += list(getattr(res[0], "extends", None) or [])
    return sorted(folder / f"{t}.yaml" for t in seen if (folder / f"{t}.yaml").is_file())


@lru_cache(maxsize=4)
def _cached(root: str) -> Catalog:
    return load_catalog(Path(root))


@lru_cache(maxsize=64)
def _cached_for(root: str, tid: str) -> Catalog:
    return load_catalog(Path(root), only={tid})


def default_catalog() -> Catalog:
    """The bundled catalog, loaded once per process."""
    return _cached(str(catalog_root()))


def catalog_for(tid: str) -> Catalog:
    """What applying technique ``tid`` needs: the default catalog when it is loaded already, else only
    the reference, families, shapes, ``tid`` and the techniques it uses (a first ``apply`` in a process
    reads three or four files, not the whole catalog)."""
    if _cached.cache_info().currsize:
        return default_catalog()
    try:
        cat = _cached_for(str(catalog_root()), tid)
    except CatalogError:  # a reference the closure does not follow: the whole catalog reports or resolves it
        return default_catalog()
    return cat if tid in cat.techniques else default_catalog()  # unknown ids: the full catalog's suggestions


