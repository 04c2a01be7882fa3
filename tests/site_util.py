"""Helpers for the site tests: a small catalog, and an HTML scan of links, ids and elements."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from pefref.language.catalog import Catalog, catalog_root

FIXTURES = Path(__file__).parent / "fixtures"
PROBE_DIR = FIXTURES / "site_include"


def small_catalog_dir(dest: Path, techniques: list[str]) -> Path:
    """A copy of the bundled catalog holding only ``techniques`` (for cheap site builds)."""
    src = catalog_root()
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("techniques"))
    (dest / "techniques").mkdir()
    for tid in techniques:
        shutil.copy(src / "techniques" / f"{tid}.yaml", dest / "techniques" / f"{tid}.yaml")
    return dest


def pick(catalog: Catalog, n: int) -> list[str]:
    """``n`` catalog ids that neither reuse nor extend another technique (they stand alone in a small catalog), sorted."""
    from pefref.language.schema import ModuleUse

    alone = [k for k, t in sorted(catalog.techniques.items())
             if not getattr(t, "extends", None) and not any(isinstance(m, ModuleUse) for m in t.modules)]
    return alone[:n]


@dataclass
class Scan:
    """What one HTML page holds: its links, ids, images, tables and headers."""

    lang: str | None = None
    title: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)  # (tag, url)
    ids: set[str] = field(default_factory=set)
    imgs: list[dict[str, str | None]] = field(default_factory=list)
    th_without_scope: int = 0
    tables: int = 0
    captions: int = 0
    scripts: list[str] = field(default_factory=list)  # text of inline scripts


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.scan = Scan()
        self._in_title = False
        self._script: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.scan.lang = a.get("lang")
        if tag == "title":
            self._in_title = True
        if a.get("id"):
            self.scan.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.scan.links.append((tag, a[key] or ""))
        if tag == "img":
            self.scan.imgs.append(a)
        if tag == "th" and not a.get("scope"):
            self.scan.th_without_scope += 1
        if tag == "table":
            self.scan.tables += 1
        if tag == "caption":
            self.scan.captions += 1
        if tag == "script" and "src" not in a:
            self._script = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "script" and self._script is not None:
            self.scan.scripts.append("".join(self._script))
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.scan.title += data
        if self._script is not None:
            self._script.append(data)


def scan(html: str) -> Scan:
    p = _Parser()
    p.feed(html)
    p.close()
    return p.scan
