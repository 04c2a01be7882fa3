"""networkx graph → DOT text (deterministic, every label escaped) → svg/png/pdf through Debian's ``dot``.

The graphs pefref draws carry their drawing as data: ``graph.graph`` holds
``attrs`` (graph-level DOT attributes), ``title`` (an HTML-like label body)
and ``clusters`` (id → ``html``, ``parent``); each node an ``html`` label body
(or a plain ``label``, escaped here), a ``cluster`` and a ``dot`` dict of
attributes; each edge a ``label`` and a ``dot`` dict. With ``caption_nodes``
set on the graph, each cluster's caption is a node on its own rank at the top
of the cluster (invisible edges hold it above the cluster's contents), so that
``dot`` routes edges around captions instead of through them. DOT source is written
with the ``graphviz`` package; labels are always HTML-like labels built from
escaped text, so user text cannot break out of them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import graphviz
import networkx as nx

from pefref.language.errors import PefrefError
from pefref.language.printable import neutral_text
from pefref.render.style import FONT, esc

__all__ = ["FORMATS", "dot_available", "inline_svg", "render_dot", "render_graph", "render_many", "to_dot"]

FORMATS = ("svg", "png", "pdf")
"""Formats ``dot`` renders here (``dot`` text itself needs no program)."""

_INSTALL = "graphviz's `dot` program is not installed; install it (Debian/Ubuntu: `apt-get install graphviz`, macOS: `brew install graphviz`) or use --format dot"


def _html(body: str) -> str:
    return f"<{neutral_text(body)}>"  # every label passes here: control characters written out visibly


def _node_label(attrs: dict[str, Any]) -> str:
    if "html" in attrs:
        return _html(attrs["html"])
    return _html(esc(attrs.get("label", "")))


def _attrs(d: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(d.items())}


def to_dot(graph: nx.Graph, name: str = "pefref") -> str:
    """DOT source of ``graph``: same graph, same text."""
    directed = graph.is_directed()
    cls = graphviz.Digraph if directed else graphviz.Graph
    g = cls(name=name)
    ga = {"fontname": FONT, "fontsize": "11", **graph.graph.get("attrs", {})}
    if graph.graph.get("title"):
        ga.update(label=_html(graph.graph["title"]), labelloc="t", labeljust="l")
    g.attr("graph", **_attrs(ga))
    g.attr("node", fontname=FONT, fontsize="10")
    g.attr("edge", fontname=FONT, fontsize="8")
    clusters: dict[str, dict[str, Any]] = graph.graph.get("clusters", {})
    members: dict[str | None, list[str]] = {}
    for n, a in graph.nodes(data=True):
        c = a.get("cluster")
        members.setdefault(c if c in clusters else None, []).append(n)
    children: dict[str | None, list[str]] = {}
    for cid, spec in clusters.items():
        children.setdefault(spec.get("parent"), []).append(cid)

    as_nodes = bool(graph.graph.get("caption_nodes"))
    fans = _fan_labels(graph)

    def emit(target: Any, cluster: str | None) -> None:
        for cid in children.get(cluster, []):
            spec = clusters[cid]
            caption = _html(spec.get("html", esc(spec.get("label", ""))))
            with target.subgraph(name=f"cluster_{cid}") as sub:
                style = spec.get("dot", {"style": "rounded", "color": "#b0b0b0", "labeljust": "l"})
                if as_nodes:
                    sub.attr(label="", **_attrs({k: v for k, v in style.items() if k != "labeljust"}))
                    sub.node(_caption(cid), label=caption, shape="plaintext", margin="0")
                else:
                    sub.attr(label=caption, **_attrs(style))
                emit(sub, cid)
        for n in members.get(cluster, []):
            a = graph.nodes[n]
            target.node(neutral_text(str(n)), label=_node_label(a), **_attrs(a.get("dot", {})))
        for fan in sorted({f for f in fans.values() if f.cluster == cluster}, key=lambda f: f.name):
            target.node(fan.name, label=_html(fan.html), shape="plaintext", margin="0.02", width="0", height="0")

    emit(g, None)
    loose = _above_edges(g, graph, members, children, as_nodes)
    if as_nodes:
        _caption_edges(g, graph, members, children, loose)
    led: set[str] = set()
    for u, v, a in graph.edges(data=True):
        extra = dict(a.get("dot", {}))
        if (u, v) in loose:
            extra["constraint"] = "false"
        fan = fans.get((u, v))
        if fan is not None:
            first = {k: val for k, val in extra.items() if k not in ("arrowhead", "lhead", "label")}
            if fan.name not in led:  # the tail's one edge into the label, then one edge from it to each head
                led.add(fan.name)
                g.edge(neutral_text(str(u)), fan.name, **_attrs({**first, "arrowhead": "none"}))
            g.edge(fan.name, neutral_text(str(v)), **_attrs({k: val for k, val in extra.items() if k != "ltail"}))
            continue
        if a.get("label"):
            extra["label"] = _html(esc(a["label"]))
        g.edge(neutral_text(str(u)), neutral_text(str(v)), **_attrs(extra))
    return g.source


@dataclass(frozen=True)
class _Fan:
    """One label shared by several edges from one tail (the same tensor read by several modules), drawn once as a
    node on the way: the tail → the label → each head. ``cluster``: the innermost cluster holding the tail and every head."""

    name: str
    html: str
    cluster: str | None


def _fan_labels(graph: nx.Graph) -> dict[tuple[Any, Any], _Fan]:
    """The shared label of each edge whose tail sends the same label, in the same style, to more than one head.

    Drawn on each edge, such labels sit side by side where the edges leave their tail and each edge runs through its
    neighbours' labels; one label node is routed around like any node."""
    clusters: dict[str, dict[str, Any]] = graph.graph.get("clusters", {})

    def chain(c: str | None) -> list[str | None]:
        out: list[str | None] = []
        while c in clusters:
            out.append(c)
            c = clusters[c].get("parent")
        return [*out, None]

    alone = graph.graph.get("label_nodes", set())
    groups: dict[tuple[str, str, str], list[tuple[Any, Any]]] = {}
    for u, v, a in graph.edges(data=True):
        cv = graph.nodes[v].get("cluster")
        free = str(a.get("dot", {}).get("constraint", "true")) == "false" or (
            clusters.get(cv, {}).get("above") in clusters and graph.nodes[u].get("cluster") != cv)  # see _above_edges
        crossed = (neutral_text(str(u)), neutral_text(str(v))) in alone
        if a.get("label") and (not free or crossed):  # a free edge's label becomes a node only where an edge crossed it
            own = f"{v}" if crossed else ""  # a label of its own
            groups.setdefault((str(u), a["label"], repr(_attrs(a.get("dot", {}))) + own), []).append((u, v))
    fans: dict[tuple[Any, Any], _Fan] = {}
    for i, ((_u, label, _style), edges) in enumerate(sorted(groups.items())):
        if len(edges) < 2 and (neutral_text(str(edges[0][0])), neutral_text(str(edges[0][1]))) not in alone:
            continue
        u = edges[0][0]
        common = chain(graph.nodes[u].get("cluster"))
        for _, v in edges:
            common = [c for c in common if c in chain(graph.nodes[v].get("cluster"))]
        dot = graph.edges[edges[0]].get("dot", {})
        colour = dot.get("fontcolor", dot.get("color", "#000000"))
        fan = _Fan(f"label__{i}", f'<FONT POINT-SIZE="8" COLOR="{colour}">{esc(label)}</FONT>', common[0])
        fans.update({e: fan for e in edges})
    return fans


def _caption(cid: str) -> str:
    return f"caption__{cid}"


def _within(cid: str, members: dict[str | None, list[str]], children: dict[str | None, list[str]]) -> list[str]:
    """The node ids drawn in cluster ``cid``: its own nodes, and its sub-clusters' captions."""
    return [str(n) for n in members.get(cid, [])] + [_caption(c) for c in children.get(cid, [])]


def _above_edges(g: Any, graph: nx.Graph, members: dict[str | None, list[str]], children: dict[str | None, list[str]],
                 as_nodes: bool) -> set[tuple[Any, Any]]:
    """A cluster whose spec names another in ``above`` is drawn above that one: invisible edges from its nodes to the
    other's top (its caption, or its nodes), and the edges entering it from outside leave the ranks alone. Returns those edges."""
    clusters: dict[str, dict[str, Any]] = graph.graph.get("clusters", {})
    loose: set[tuple[Any, Any]] = set()
    for cid, spec in clusters.items():
        below = spec.get("above")
        if below not in clusters:
            continue
        inside = set(members.get(cid, []))
        targets = [_caption(below)] if as_nodes else [str(n) for n in members.get(below, [])]
        for n in sorted(inside, key=str):
            for t in targets:
                g.edge(str(n), t, style="invis")
        loose |= {(u, v) for u, v in graph.edges() if v in inside and u not in inside}
    return loose


def _caption_edges(g: Any, graph: nx.Graph, members: dict[str | None, list[str]], children: dict[str | None, list[str]],
                   loose: set[tuple[Any, Any]] | None = None) -> None:
    """Invisible edges that put each caption on a rank of its own at the top of its cluster: below whatever enters
    the cluster, above everything inside it (``dot`` then routes edges around it, never through it)."""
    clusters: dict[str, dict[str, Any]] = graph.graph.get("clusters", {})
    home = {str(n): c for c, ns in members.items() for n in ns}

    def chain(n: str) -> list[str]:
        out, c = [], home.get(n)
        while c is not None:
            out.append(c)
            c = clusters[c].get("parent")
        return out

    added: set[tuple[str, str]] = set()
    for u, v, a in graph.edges(data=True):
        if str(a.get("dot", {}).get("constraint", "true")) == "false" or (u, v) in (loose or set()):
            continue
        outside = set(chain(str(u)))
        for c in chain(str(v)):
            if c not in outside and (str(u), c) not in added:
                added.add((str(u), c))
                g.edge(str(u), _caption(c), style="invis", weight="0")
    for cid in clusters:
        for n in _within(cid, members, children):
            g.edge(_caption(cid), n, style="invis", weight="0")


def render_graph(graph: nx.Graph, fmt: str = "svg") -> bytes:
    """Render a graph of :func:`to_dot`'s kind; where an edge runs through another edge's label
    (:func:`pefref.render.geometry.crossed_labels`), those labels become nodes on their edges and the drawing is
    laid out again (``dot`` routes edges around nodes). Edge labels stay on their edges where nothing crosses them."""
    from pefref.render.geometry import crossed_labels

    text = to_dot(graph)
    svg = render_dot(text, "svg")
    inline: set[tuple[str, str]] = set()
    for _ in range(3):  # each layout may route an edge through another label; a few rounds settle it
        crossed = crossed_labels(svg) - inline
        if not crossed:
            break
        inline |= crossed
        again = graph.copy()
        again.graph["label_nodes"] = inline
        text = to_dot(again)
        svg = render_dot(text, "svg")
    return svg if fmt == "svg" else render_dot(text, fmt)


def dot_available() -> bool:
    """Whether graphviz's ``dot`` program can be run."""
    return shutil.which("dot") is not None


def render_dot(dot_text: str, fmt: str) -> bytes:
    """Render DOT text to ``svg``, ``png`` or ``pdf`` with ``dot``; a PefrefError says how to install it when missing."""
    if fmt not in FORMATS:
        raise PefrefError(f"unknown format {fmt!r}; dot renders: {', '.join(FORMATS)}")
    exe = shutil.which("dot")
    if exe is None:
        raise PefrefError(_INSTALL)
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode("utf-8"), capture_output=True, check=False, timeout=120)
    if proc.returncode != 0:
        first = proc.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
        raise PefrefError(f"dot failed ({first[0] if first else 'exit ' + str(proc.returncode)})")
    return proc.stdout


def render_many(dot_texts: list[str], fmt: str, workers: int | None = None) -> list[bytes]:
    """Render several DOT texts, ``workers`` ``dot`` processes at a time (default: one per CPU); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    n = max(1, min(workers or os.cpu_count() or 1, len(dot_texts) or 1))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda t: render_dot(t, fmt), dot_texts))


def inline_svg(svg: bytes | str, id_prefix: str | None = None) -> str:
    """An SVG document as an element to inline in HTML: no XML prolog, DOCTYPE or leading comments.

    ``id_prefix`` prefixes every ``id`` attribute (``dot`` numbers them ``graph0``, ``node1``, ...),
    so that several diagrams on one page keep unique ids."""
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    start = text.find("<svg")
    if start < 0:
        raise PefrefError("dot produced no <svg> element")
    text = text[start:].strip() + "\n"
    if id_prefix:
        slug = re.sub(r"[^A-Za-z0-9_-]", "-", id_prefix)
        text = re.sub(r'(<[^>]*?\sid=")', lambda m: m.group(1) + slug + "-", text)
    return text
