"""Build the static site: gather view models, render every page, write the files.

The build is a pure function from the catalog (plus included technique
folders and experiment results given as their view model) to a mapping ``path -> bytes``
(:func:`site_files`); :func:`build_site` writes that mapping atomically and
:func:`check_site` compares it with a folder. Pages come from *sections*
(:data:`pefref.render.site.pages.SECTIONS`): each names its entry in the
navigation and a function that renders its pages, so a new kind of page (the
experiments' results, for instance) is one more section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.errors import PefrefError
from pefref.render.site.gather import SiteData, gather
from pefref.render.site.pictures import Pictures, labelled
from pefref.render.site.resultsview import ResultsView

__all__ = [
    "Page", "NavItem", "Section", "SiteContext", "DEFAULT_MODELS", "MANIFEST",
    "site_root", "site_files", "build_site", "check_site", "with_included", "write_atomic",
]

DEFAULT_MODELS = ("llama-2-7b",)
"""Model shapes the index, costs and comparisons use when none is named (the first one that exists)."""

MANIFEST = ".pefref-site"
"""The list of files the last build wrote (so that a rebuild removes pages that no longer exist)."""


def site_root() -> Path:
    """Where ``pefref site`` writes by default: the repository's ``site/`` in a checkout, ``./site`` when installed."""
    from pefref.language.bundled import bundled_data

    checkout = bundled_data().checkout
    return checkout / "site" if checkout is not None else Path("site")


@dataclass(frozen=True)
class Page:
    """One output file: its path under the site root (POSIX, relative) and its content."""

    path: str
    content: bytes


@dataclass(frozen=True)
class NavItem:
    href: str
    title: str
    key: str


@dataclass(frozen=True)
class Section:
    """A part of the site: its navigation entry (``title`` None: none) and the pages it renders.

    ``enabled`` decides from the context whether the section takes part in a
    build (a results section, for instance, only when results were given).
    """

    key: str
    title: str | None
    href: str
    pages: Callable[[SiteContext], Iterable[Page]]
    enabled: Callable[[SiteContext], bool] = lambda ctx: True


@dataclass
class SiteContext:
    """What page builders receive: the view models, the catalog, the templates and the navigation."""

    data: SiteData
    catalog: Catalog
    env: Any
    nav: list[NavItem] = field(default_factory=list)
    pictures: Pictures | None = None

    def render(self, template: str, path: str, *, title: str, section: str, **values: Any) -> Page:
        """Render ``template`` to the page at ``path``; links are relative to it (``root``)."""
        depth = path.count("/")
        html = self.env.get_template(template).render(
            root="../" * depth, path=path, title=title, section=section, nav=self.nav, data=self.data, **values
        )
        return Page(path, html.encode("utf-8"))


def _environment() -> Any:
    import jinja2

    from pefref.render.site import filters

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pefref.render.site", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(filters.FILTERS)
    env.finalize = filters.neutral  # every value a template shows: control characters written out visibly
    return env


def _assets() -> list[Page]:
    """The stylesheet and the script, copied from the package's ``static/`` folder."""
    folder = resources.files("pefref.render.site") / "static"
    return [Page(f"assets/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.is_file()]


def with_included(catalog: Catalog, folders: Sequence[Path]) -> tuple[Catalog, frozenset[str]]:
    """The catalog with the techniques of ``folders`` added (checked against it), and their ids.

    Raises:
        CatalogError: an included file has problems (every problem, located).
        PefrefError: a folder is missing, or an included id is already a catalog technique.
    """
    from pefref.language.catalog import load_techniques
    from pefref.language.errors import CatalogError

    paths: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise PefrefError(f"--include {folder}: not a folder")
        paths += sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
    if not paths:
        return catalog, frozenset()
    loaded, sources, positions, problems = load_techniques(paths, catalog.reference, catalog.techniques)
    if problems:
        raise CatalogError(problems)
    clash = sorted(set(loaded) & set(catalog.techniques))
    if clash:
        raise PefrefError(f"included technique id(s) {', '.join(clash)} are already in the catalog; rename them")
    merged = replace(catalog, techniques={**catalog.techniques, **loaded}, sources={**catalog.sources, **sources},
                     positions={**catalog.positions, **positions})
    return merged, frozenset(loaded)


def _models(catalog: Catalog, models: Sequence[str] | None) -> list[str]:
    if models:
        return list(dict.fromkeys(models))
    present = [m for m in DEFAULT_MODELS if m in catalog.shapes]
    return present[:1] or list(catalog.shapes)[:1]


def site_files(
    catalog: Catalog | None = None,
    *,
    models: Sequence[str] | None = None,
    include: Sequence[Path] = (),
    results: ResultsView | None = None,
    sections: Sequence[Section] | None = None,
    compositions: Sequence[Path] | None = None,
) -> dict[str, bytes]:
    """Every file of the site, path → bytes (sorted by path); nothing is written.

    Args:
        catalog: the catalog (default: the bundled one).
        models: model shapes for the index's counts, the costs and the comparison (default: :data:`DEFAULT_MODELS`).
        include: folders of the user's own technique files; their pages are marked as not from the catalog.
        results: experiment results to show (:func:`pefref.experiments.site_view.results_view` builds them
            from a results folder), for sections that show them.
        sections: the sections to build (default: :data:`pefref.render.site.pages.SECTIONS`).
        compositions: composition files to show (default: those of the catalog's folders); those
            naming a technique the catalog lacks are left out.
    """
    from pefref.language.catalog import default_catalog
    from pefref.render.site.compositions import catalog_compositions
    from pefref.render.site.pages import SECTIONS

    catalog = catalog or default_catalog()
    catalog, included = with_included(catalog, include)
    if compositions is None:
        compositions = list(catalog.compositions.values())
    resolved = catalog_compositions(catalog, list(compositions))
    with Pictures(catalog, resolved) as pictures:  # dot draws in the background while the view gathers
        data = gather(catalog, _models(catalog, models), included, results, resolved)
        for t in data.techniques:
            t.diagram = labelled(pictures.diagram(t.id), f"Architecture diagram of {t.name}")
        for c in data.compositions:
            c.diagram = labelled(pictures.composition(c.id), f"Architecture diagram of {c.name}")
        data.extra["graphs"] = pictures.graphs()
        ctx = SiteContext(data, catalog, _environment(), pictures=pictures)
    active = [s for s in (SECTIONS if sections is None else sections) if s.enabled(ctx)]
    ctx.nav = [NavItem(s.href, s.title, s.key) for s in active if s.title]
    files: dict[str, bytes] = {p.path: p.content for p in _assets()}
    for s in active:
        for page in s.pages(ctx):
            if page.path in files:
                raise PefrefError(f"two pages of the site are written to {page.path}")
            files[page.path] = page.content
    return dict(sorted(files.items()))


def write_atomic(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file in the same folder and a rename."""
    from pefref.language.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, content)


def _manifest(files: dict[str, bytes]) -> bytes:
    return ("".join(f"{p}\n" for p in files)).encode("utf-8")


def build_site(out: Path | None = None, **kwargs: Any) -> tuple[list[Path], list[Path]]:
    """Build the site into ``out`` (default :func:`site_root`); returns (files written, files removed).

    Unchanged files are left alone; files listed by the previous build's
    manifest that this build does not produce are removed (nothing else is).
    Keyword arguments are those of :func:`site_files`.
    """
    out = Path(out) if out is not None else site_root()
    files = site_files(**kwargs)
    old = out / MANIFEST
    previous = old.read_text(encoding="utf-8").splitlines() if old.is_file() else []
    files[MANIFEST] = _manifest(files)
    written: list[Path] = []
    for rel, content in files.items():
        p = out / rel
        if not _inside(out, rel):
            raise PefrefError(f"{p}: refusing to write through a link out of the site folder {out}")
        if p.is_file() and p.read_bytes() == content:
            continue
        write_atomic(p, content)
        written.append(p)
    removed: list[Path] = []
    for rel in previous:  # the manifest is only a hint: a name outside the folder, or reached through a link, is skipped
        if rel and rel not in files and _inside(out, rel) and (out / rel).is_file():
            (out / rel).unlink()
            removed.append(out / rel)
    return written, removed


def _inside(out: Path, rel: str) -> bool:
    """Whether ``rel`` names a file of the folder ``out`` itself: relative, without ``..``, no link on the way,
    and resolving inside ``out`` (the site builder deletes nothing else)."""
    r = Path(rel)
    if r.is_absolute() or r.drive or ".." in r.parts or any(c in rel for c in "\x00\\"):
        return False
    p = out
    for part in r.parts:
        p = p / part
        if p.is_symlink():
            return False
    try:
        return p.resolve().is_relative_to(out.resolve())
    except (OSError, RuntimeError):
        return False


def check_site(out: Path | None = None, **kwargs: Any) -> list[str]:
    """Paths (relative to ``out``) where the folder differs from a fresh build: changed, missing or extra."""
    out = Path(out) if out is not None else site_root()
    files = site_files(**kwargs)
    files[MANIFEST] = _manifest(files)
    differ = [rel for rel, content in files.items() if not (out / rel).is_file() or (out / rel).read_bytes() != content]
    if out.is_dir():
        present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        differ += [rel for rel in present if rel not in files]
    return sorted(differ)
