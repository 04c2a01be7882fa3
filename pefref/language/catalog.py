"""The catalog: the reference architecture, architecture maps, model shapes and techniques.

Techniques are found by globbing ``catalog/techniques/*.yaml``; nothing keeps a
second list of them. :func:`load_catalog` validates every file and checks the
cross-references between them, reporting every problem of the run at once.
The user's catalogs (:mod:`pefref.language.sources`) add their techniques,
families, shapes and compositions to the bundled ones; an id defined twice is
a located problem naming both places.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pefref.language import catalog_cache
from pefref.language.check import check_family, check_technique
from pefref.language.errors import CatalogError, Problem
from pefref.language.loader import load_file, suggest
from pefref.language.schema import ArchitectureMap, ModelShape, ModelShapes, ModuleUse, ReferenceArchitecture, Technique
from pefref.language.slices import slice_problems
from pefref.language.sources import CatalogSource, catalog_files, catalog_sources
from pefref.language.yamlsrc import Positions, read_yaml

__all__ = ["Catalog", "catalog_root", "load_catalog", "default_catalog", "catalog_for", "load_techniques", "paused_gc"]


def catalog_root() -> Path:
    """The bundled catalog folder (the user's catalogs are added to it: :func:`pefref.language.sources.catalog_sources`)."""
    from pefref.language.bundled import bundled_data

    return bundled_data().catalog


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
    catalogs: tuple[CatalogSource, ...] = ()
    """The catalog folders read, the bundled one first."""
    compositions: dict[str, Path] = field(default_factory=dict)
    """Composition files of every catalog folder, by id (a composition's id is its file's stem)."""

    def catalog_of(self, path: Path | str | None) -> CatalogSource | None:
        """The catalog folder ``path`` lies in (None: none of them, e.g. a file given on the command line)."""
        if path is None:
            return None
        p = Path(path).resolve()
        return next((c for c in self.catalogs if p.is_relative_to(c.root.resolve())), None)

    def origin(self, tid: str) -> str | None:
        """The name of the user's catalog technique ``tid`` comes from (None: the bundled catalog, or no catalog)."""
        src = self.catalog_of(self.sources.get(tid))
        return None if src is None or src.bundled else src.name

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


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused, restored after: loading a catalog or building an adapter makes thousands
    of small objects and no garbage cycles, and each collection they would trigger walks every object of the process
    (a large model's modules included)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _collect(problems: list[Problem], fn, *args):
    try:
        return fn(*args)
    except CatalogError as e:
        problems.extend(e.problems)
        return None


def load_techniques(paths: list[Path], reference: ReferenceArchitecture, known: dict[str, Technique] | None = None,
                    checked: bool = False) -> tuple[dict[str, Technique], dict[str, Path], dict[str, Positions], list[Problem]]:
    """Load and check technique files; returns what loaded and every problem found (``checked``: these
    exact files were checked clean before, by this pefref: only schema validation and id clashes run)."""
    problems: list[Problem] = []
    loaded: dict[str, tuple[Technique, Positions, Path]] = {}
    for p in paths:
        res = _collect(problems, load_file, Technique, p)
        if res is None:
            continue
        t, pos = res
        if t.id in loaded:
            problems.append(Problem(pos.at(("id",)), "id", f"technique id {t.id!r} is also defined at {loaded[t.id][1].at(('id',))}"))
            continue
        if p.suffix in (".yaml", ".yml") and p.stem != t.id:
            problems.append(Problem(pos.at(("id",)), "id", f"file name {p.name!r} does not match id {t.id!r}; expected {t.id}.yaml"))
        loaded[t.id] = (t, pos, p)
    pool = dict(known or {})
    pool.update({k: v[0] for k, v in loaded.items()})
    for _tid, (t, pos, _p) in ([] if checked else loaded.items()):
        problems.extend(check_technique(t, pos, reference, pool))
    bad = {pr.location.file for pr in problems}
    good = {k: v for k, v in loaded.items() if str(v[2]) not in bad}
    return ({k: v[0] for k, v in good.items()}, {k: v[2] for k, v in good.items()}, {k: v[1] for k, v in good.items()}, problems)


def _families(files: list[Path], reference: ReferenceArchitecture, problems: list[Problem], checked: bool) -> tuple[dict[str, ArchitectureMap], dict[str, Positions]]:
    families: dict[str, ArchitectureMap] = {}
    family_pos: dict[str, Positions] = {}
    for p in files:
        r = _collect(problems, load_file, ArchitectureMap, p)
        if r is None:
            continue
        name = r[0].family
        if name in families:
            problems.append(Problem(r[1].at(("family",)), "family", f"architecture map {name!r} is also defined at {family_pos[name].at(('family',))}"))
            continue
        if not checked:
            problems.extend(check_family(r[0], r[1], reference))
        families[name], family_pos[name] = r
    return families, family_pos


def _shapes(files: list[Path], families: dict[str, ArchitectureMap], problems: list[Problem]) -> dict[str, ModelShape]:
    shapes: dict[str, ModelShape] = {}
    where: dict[str, str] = {}
    for f in files:
        r = _collect(problems, load_file, ModelShapes, f)
        if r is None:
            continue
        for i, s in enumerate(r[0].shapes):
            loc = r[1].at(("shapes", i, "family"))
            if s.family not in families:
                problems.append(Problem(loc, f"shapes[{i}].family", f"unknown family {s.family!r}{suggest(s.family, families)}"))
            elif s.name in shapes:
                problems.append(Problem(r[1].at(("shapes", i, "name")), f"shapes[{i}].name", f"shape {s.name!r} is also defined at {where[s.name]}"))
                continue
            shapes[s.name] = s
            where[s.name] = str(r[1].at(("shapes", i, "name")))
    return shapes


def _compositions(roots: list[Path], problems: list[Problem]) -> dict[str, Path]:
    """Composition files by id (the stem); one id in two catalogs is a problem located at both ``id`` fields."""
    out: dict[str, Path] = {}
    for root in roots:
        for f in sorted((root / "compositions").glob("*.yaml")):
            if f.stem not in out:
                out[f.stem] = f
                continue
            try:
                first, second = read_yaml(out[f.stem])[1].at(("id",)), read_yaml(f)[1].at(("id",))
            except CatalogError as e:
                problems.extend(e.problems)
                continue
            problems.append(Problem(second, "id", f"composition id {f.stem!r} is also defined at {first}"))
    return out


def load_catalog(root: Path | None = None, only: set[str] | None = None, extra: Sequence[CatalogSource] = ()) -> Catalog:
    """Load and cross-check the whole catalog under ``root`` and the user's catalogs ``extra``; raise CatalogError listing every problem.

    ``root`` (default: the bundled catalog) holds the reference architecture, the
    interaction rules and the model shapes; ``extra`` folders add techniques,
    families, shapes and compositions (ids must not clash). ``only``: load just
    these techniques and those they ``use`` (the reference architecture,
    families and shapes are always loaded).

    The cross-file checks are skipped when these exact files (paths and bytes) were checked clean before
    by this pefref (:func:`pefref.language.catalog_cache.was_checked`); a clean load leaves that marker.
    """
    with paused_gc():  # a load makes thousands of small objects and no cycles
        return _load_catalog(root, only, extra)


def _load_catalog(root: Path | None, only: set[str] | None, extra: Sequence[CatalogSource]) -> Catalog:
    root = root or catalog_root()
    sources = (CatalogSource("pefref", root, "bundled"), *extra)
    roots = [s.root for s in sources]
    files = catalog_files(sources)
    problems: list[Problem] = []
    res = _collect(problems, load_file, ReferenceArchitecture, files.reference)
    if res is None:
        raise CatalogError(problems)
    reference = res[0]
    paths = files.techniques if only is None else _used_closure([r / "techniques" for r in roots], only, problems)
    key = files.key(only, paths)
    checked = not problems and catalog_cache.was_checked(key)
    families, family_pos = _families(files.families, reference, problems, checked)
    shapes = _shapes(files.models, families, problems)
    if not problems and not checked:  # slices of fused projections on the sizes of the family's named shapes
        for name, fam in families.items():
            configs = {s.name: s.config for s in shapes.values() if s.family == name}
            problems.extend(slice_problems(fam, family_pos[name], reference, configs))
    techniques, tsources, positions, tproblems = load_techniques(paths, reference, checked=checked)
    problems.extend(tproblems)
    compositions = _compositions(roots, problems)
    if problems:
        raise CatalogError(problems)
    if not checked:
        catalog_cache.mark_checked(key)
    return Catalog(reference, families, shapes, techniques, tsources, positions, family_pos, sources, compositions)


def _used_closure(folders: list[Path], ids: set[str], problems: list[Problem]) -> list[Path]:
    """The files of techniques ``ids`` and of every technique their modules ``use`` (transitively), in every folder."""
    todo, seen = sorted(ids), set()
    while todo:
        tid = todo.pop()
        if tid in seen:
            continue
        seen.add(tid)
        for p in (f / f"{tid}.yaml" for f in folders):
            res = _collect(problems, load_file, Technique, p) if p.is_file() else None  # an unknown id: the caller reports it
            if res is not None:
                todo += [m.use.split(".")[0] for m in res[0].modules if isinstance(m, ModuleUse)]
                todo += list(getattr(res[0], "extends", None) or [])
    return [f / f"{t}.yaml" for f in folders for t in sorted(seen) if (f / f"{t}.yaml").is_file()]


@lru_cache(maxsize=4)
def _cached(sources: tuple[CatalogSource, ...]) -> Catalog:
    return load_catalog(sources[0].root, extra=sources[1:])


@lru_cache(maxsize=64)
def _cached_for(sources: tuple[CatalogSource, ...], tid: str) -> Catalog:
    return load_catalog(sources[0].root, only={tid}, extra=sources[1:])


def _sources() -> tuple[CatalogSource, ...]:
    found, problems = catalog_sources()
    if problems:
        raise CatalogError(problems)
    return found


def default_catalog() -> Catalog:
    """The bundled catalog with the user's catalogs added (``$PEFREF_CATALOG``, ``--catalog``, entry points), loaded once per process."""
    return _cached(_sources())


def catalog_for(tid: str) -> Catalog:
    """What applying technique ``tid`` needs: the default catalog when it is loaded already, else only
    the reference, families, shapes, ``tid`` and the techniques it uses (a first ``apply`` in a process
    reads three or four files, not the whole catalog)."""
    if _cached.cache_info().currsize:
        return default_catalog()
    try:
        cat = _cached_for(_sources(), tid)
    except CatalogError:  # a reference the closure does not follow: the whole catalog reports or resolves it
        return default_catalog()
    return cat if tid in cat.techniques else default_catalog()  # unknown ids: the full catalog's suggestions
