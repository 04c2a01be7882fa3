"""The site's pictures: every technique's and composition's architecture diagram and the typology graphs.

The drawings are :mod:`pefref.render.diagram`'s and :mod:`pefref.render.graphs`'s
(DOT built from networkx graphs); this module only schedules them. Their DOT
text is made up front and handed to ``dot`` processes in background threads,
so the drawing runs while the build gathers counts and costs; each picture
is rendered once per build, however many pages show it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from markupsafe import escape

from pefref.language.catalog import Catalog
from pefref.language.composition import ResolvedComposition

__all__ = ["Pictures", "GRAPH_TITLES", "labelled"]

GRAPH_TITLES = {
    "similarity": "Similarity: techniques linked by the values and features they share",
    "lineage": "Lineage: which techniques build on which",
}
"""The heading of each graph on the typology page, in page order (the typology itself is the page's matrix;
``pefref graph typology`` still draws it as a bipartite graph)."""


def labelled(svg: str, label: str) -> str:
    """``svg`` (an inline ``<svg>`` element) announced to assistive technology as an image named ``label``."""
    start = svg.find("<svg")
    if start < 0:
        return svg
    return f'{svg[:start]}<svg role="img" aria-label="{escape(label)}"{svg[start + 4:]}'


class Pictures:
    """Diagrams and graphs of one build, rendered by ``dot`` in the background.

    Args:
        catalog: the catalog (with included techniques) whose techniques are drawn.
        compositions: compositions to draw, each with its adapters and its blocks on one model.
        workers: ``dot`` processes at a time (default: one per CPU).
    """

    def __init__(self, catalog: Catalog, compositions: list[ResolvedComposition] | None = None, workers: int | None = None) -> None:
        import os

        from pefref.render.diagram import technique_graph
        from pefref.render.dot import render_dot, render_graph
        from pefref.render.graphs import graph_dot

        self._pool = ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1))
        self._diagrams: dict[str, Future[bytes]] = {}
        self._graphs: dict[str, Future[bytes]] = {}
        self._compositions: dict[str, Future[bytes]] = {}
        for tid in sorted(catalog.techniques):
            self._diagrams[tid] = self._pool.submit(render_graph, technique_graph(catalog, [catalog.techniques[tid]]), "svg")
        for res in compositions or []:
            self._compositions[res.composition.id] = self._pool.submit(
                render_graph, technique_graph(catalog, res.drawable(), compositions=[res]), "svg")
        for kind in GRAPH_TITLES:
            self._graphs[kind] = self._pool.submit(render_dot, graph_dot(kind, catalog, link="techniques/{id}.html", titled=False), "svg")
        self._pool.shutdown(wait=False)

    @staticmethod
    def _svg(f: Future[bytes]) -> str:
        from pefref.render.dot import inline_svg

        return inline_svg(f.result())

    def diagram(self, tid: str) -> str:
        """The technique's diagram, an inline ``<svg>`` element."""
        return self._svg(self._diagrams[tid])

    def diagram_file(self, tid: str) -> bytes:
        """The technique's diagram as a standalone ``.svg`` file (an XML prolog, no DOCTYPE)."""
        return self._file(self.diagram(tid))

    def composition(self, cid: str) -> str:
        """The composition's diagram (its adapters and blocks), an inline ``<svg>`` element."""
        return self._svg(self._compositions[cid])

    def composition_file(self, cid: str) -> bytes:
        """The composition's diagram as a standalone ``.svg`` file."""
        return self._file(self.composition(cid))

    @staticmethod
    def _file(svg: str) -> bytes:
        return ('<?xml version="1.0" encoding="UTF-8"?>\n' + svg).encode("utf-8")

    def graphs(self) -> list[tuple[str, str, str]]:
        """``(kind, title, inline svg)`` of each typology graph."""
        return [(kind, title, labelled(self._svg(self._graphs[kind]), title)) for kind, title in GRAPH_TITLES.items()]

    def close(self) -> None:
        """Wait for every ``dot`` process (errors are raised by the accessors, not here)."""
        for f in [*self._diagrams.values(), *self._graphs.values(), *self._compositions.values()]:
            f.exception()

    def __enter__(self) -> Pictures:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
