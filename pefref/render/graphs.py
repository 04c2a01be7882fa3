"""The field as graphs: typology (bipartite), similarity (weighted, clustered) and lineage.

Each graph is built from the catalog and the derived typology with plain
scalar attributes (so that networkx's node-link JSON and GraphML hold it and
load it back); :func:`graph_dot` adds the drawing attributes to a copy and
writes DOT, :func:`graph_svg` renders it for HTML.

* typology: technique nodes linked to the values of the nine PEFT-Ref
  properties they take (a value ``a + b`` links to ``a`` and ``b``);
* similarity: techniques linked by the typology values and structural features
  (forms, sites, ops) they share; ``weight`` counts them, ``jaccard`` divides by
  their union; each technique keeps its strongest links, and greedy modularity
  communities give ``cluster``;
* lineage: an edge from a technique to each technique that builds on it, from
  the ``extends`` field (``relation='extends'``) and from ``use:`` reuse
  (``relation='uses'``, with the modules reused).
"""

from __future__ import annotations

import json
from typing import Any

import networkx as nx

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.errors import PefrefError
from pefref.language.schema import TYPOLOGY_PROPERTIES, ModuleUse
from pefref.render.dot import inline_svg, render_dot, to_dot
from pefref.render.style import INSERTION_FILLS, USES_COLOUR, html_lines

__all__ = ["GRAPH_KINDS", "build_graph", "export_graph", "graph_dot", "graph_svg", "lineage_graph", "similarity_graph",
           "similarity_legend", "typology_graph"]

GRAPH_KINDS = ("typology", "similarity", "lineage")

_INSERTION_FILL = INSERTION_FILLS

_PALETTE = ("#1f6fb4", "#2e8b2e", "#d9700b", "#8a4fbf", "#12939f", "#c62828", "#8c6d31", "#d6616b", "#637939", "#7b4173", "#3182bd", "#636363")


def _typology_rows(catalog: Catalog) -> dict[str, Any]:
    from pefref.view.typology import derive_typology

    return {tid: derive_typology(catalog.techniques[tid], catalog.reference, catalog.techniques) for tid in sorted(catalog.techniques)}


def _parts(value: str) -> list[str]:
    return [p.strip() for p in value.split(" + ") if p.strip()]


def typology_graph(catalog: Catalog) -> nx.Graph:
    """Bipartite graph: techniques (``bipartite=0``) linked to the typology values they take (``bipartite=1``)."""
    g = nx.Graph(name="typology")
    rows = _typology_rows(catalog)
    for tid in rows:
        t = catalog.techniques[tid]
        g.add_node(tid, kind="technique", label=t.name, year=t.paper.year, bipartite=0)
    for prop in TYPOLOGY_PROPERTIES:
        if prop == "insertions":
            continue  # a count per technique, not a category shared between techniques
        for tid, row in rows.items():
            for part in _parts(row.values[prop]):
                vid = f"{prop}={part}"
                if vid not in g:
                    g.add_node(vid, kind="value", label=part, property=prop, bipartite=1)
                g.add_edge(tid, vid, property=prop, declared=prop in row.declared)
    return g


def _features(catalog: Catalog, tid: str, row: Any) -> set[str]:
    from pefref.view.analysis import ops_used

    t = catalog.techniques[tid]
    modules, _ = expand_modules(t, catalog.techniques)
    out = {f"{p}={part}" for p in TYPOLOGY_PROPERTIES if p != "insertions" for part in _parts(row.values[p])}
    for m in modules:
        out.add(f"form={m.form}")
        out.update(f"site={s}" for s in m.sites)
        out.update(f"op={o}" for o in ops_used(m))
    return out


def similarity_graph(catalog: Catalog, keep: int = 3) -> nx.Graph:
    """Techniques linked by shared typology values and structural features (weighted; clustered)."""
    rows = _typology_rows(catalog)
    feats = {tid: _features(catalog, tid, row) for tid, row in rows.items()}
    ids = sorted(feats)
    g = nx.Graph(name="similarity")
    for tid in ids:
        g.add_node(tid, kind="technique", label=catalog.techniques[tid].name, year=catalog.techniques[tid].paper.year)
    scores: dict[tuple[str, str], tuple[int, float]] = {}
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            shared = feats[a] & feats[b]
            scores[(a, b)] = (len(shared), len(shared) / len(feats[a] | feats[b]))
    for a in ids:
        ranked = sorted(((scores[tuple(sorted((a, b)))], b) for b in ids if b != a), key=lambda x: (-x[0][1], x[1]))  # type: ignore[index]
        for (w, j), b in ranked[:keep]:
            g.add_edge(a, b, weight=w, jaccard=round(j, 4), shared="; ".join(sorted(feats[a] & feats[b])))
    comms = nx.community.greedy_modularity_communities(g, weight="weight")
    comms = sorted((sorted(c) for c in comms), key=lambda c: (-len(c), c))
    for k, members in enumerate(comms):
        for tid in members:
            g.nodes[tid]["cluster"] = k
    return g


def lineage_graph(catalog: Catalog) -> nx.DiGraph:
    """An edge from each technique to the techniques that build on it (``extends`` and ``use:``)."""
    g = nx.DiGraph(name="lineage")
    for tid in sorted(catalog.techniques):
        t = catalog.techniques[tid]
        g.add_node(tid, kind="technique", label=t.name, year=t.paper.year, original=t.original)
    for tid in sorted(catalog.techniques):
        t = catalog.techniques[tid]
        for base in t.extends:
            if base in catalog.techniques:  # validation reports unknown targets; a graph of unvalidated input skips them
                g.add_edge(base, tid, relation="extends", modules="")
        used: dict[str, list[str]] = {}
        for m in t.modules:
            if isinstance(m, ModuleUse):
                src, mod = m.use.split(".")
                used.setdefault(src, []).append(mod)
        for src, mods in sorted(used.items()):
            if src not in catalog.techniques:
                continue
            if g.has_edge(src, tid):
                g.edges[src, tid]["relation"] = "extends+uses"
                g.edges[src, tid]["modules"] = ", ".join(mods)
            else:
                g.add_edge(src, tid, relation="uses", modules=", ".join(mods))
    return g


def build_graph(kind: str, catalog: Catalog) -> nx.Graph:
    """The graph of ``kind`` (typology, similarity or lineage)."""
    builders = {"typology": typology_graph, "similarity": similarity_graph, "lineage": lineage_graph}
    if kind not in builders:
        raise PefrefError(f"unknown graph {kind!r}; expected one of: {', '.join(GRAPH_KINDS)}")
    return builders[kind](catalog)


# --- drawing ---------------------------------------------------------------------


def _tech_html(a: dict[str, Any]) -> str:
    return html_lines([("b", a["label"]), ("small", str(a.get("year", "")))])


def _drawable(kind: str, g: nx.Graph) -> nx.Graph:
    d = g.copy()
    props = [p for p in TYPOLOGY_PROPERTIES if p != "insertions"]
    if kind == "typology":
        d.graph.update(attrs={"rankdir": "LR", "ranksep": "2.2", "nodesep": "0.06", "splines": "true"}, clusters={},
                       title="<B>PEFT-Ref typology</B>: techniques and the values they take<BR/><FONT POINT-SIZE=\"9\">fill: insertion form (blue parallel, green sequential, orange in-place, grey mixed)</FONT>")
        for p in props:
            d.graph["clusters"][p] = {"html": html_lines([("b", p.replace("_", " "))]), "parent": None}
        for n, a in d.nodes(data=True):
            if a["kind"] == "technique":
                forms = sorted(g.nodes[v]["label"] for v in g.neighbors(n) if g.nodes[v].get("property") == "insertion_form")
                fill = _INSERTION_FILL.get(forms[0], "#f4f4f4") if len(forms) == 1 else "#f4f4f4"
                a.update(html=_tech_html(a), dot={"shape": "box", "style": "rounded,filled", "fillcolor": fill})
            else:
                colour = _PALETTE[props.index(a["property"]) % len(_PALETTE)]
                a.update(html=html_lines([("", a["label"])]), cluster=a["property"], dot={"shape": "box", "style": "filled", "fillcolor": "#ffffff", "color": colour})
        for _u, _v, a in d.edges(data=True):
            colour = _PALETTE[props.index(a["property"]) % len(_PALETTE)]
            a["dot"] = {"color": colour + "99", "style": "dashed" if a["declared"] else "solid", "arrowhead": "none"}
        # techniques first (left), grouped by insertion and integration form; values after
        def key(n: str) -> tuple[str, ...]:
            vals = {g.nodes[v]["property"]: g.nodes[v]["label"] for v in g.neighbors(n)}
            return (vals.get("insertion_form", ""), vals.get("integration_form", ""), n)

        techs = sorted((n for n in d if d.nodes[n]["kind"] == "technique"), key=key)
        order = techs + [n for n in d if d.nodes[n]["kind"] != "technique"]
        ordered = nx.Graph()
        ordered.graph.update(d.graph)
        ordered.add_nodes_from((n, d.nodes[n]) for n in order)
        ordered.add_edges_from((u, v, a) for u in techs for v, a in sorted(d[u].items()))
        return _oriented(ordered, lambda n: ordered.nodes[n]["kind"] == "technique")
    if kind == "similarity":
        d.graph.update(attrs={"layout": "neato", "overlap": "false", "splines": "true", "sep": "+6", "start": "1"},
                       title="<B>Similarity</B>: shared typology values and structural features<BR/>(thicker = more; colour = cluster)")
        for _n, a in d.nodes(data=True):
            colour = _PALETTE[a.get("cluster", 0) % len(_PALETTE)]
            a.update(html=_tech_html(a), dot={"shape": "box", "style": "rounded,filled", "fillcolor": colour + "33", "color": colour})
        for _u, _v, a in d.edges(data=True):
            a["dot"] = {"penwidth": f"{0.5 + 3 * a['jaccard']:.2f}", "color": "#55555588", "len": f"{2.5 - 1.5 * a['jaccard']:.2f}"}
        return d
    # a time axis: one column per publication year, oldest on the left
    d.graph.update(attrs={"rankdir": "LR", "ranksep": "0.6", "nodesep": "0.12", "newrank": "true"},
                   title="<B>Lineage</B>: which technique builds on which, by year<BR/>(grey: extends; dashed blue: reuses modules; solid blue: both; dashed box: designed in pefref)",
                   clusters={f"y{y}": {"html": html_lines([("b", str(y))]), "parent": None,
                                       "dot": {"rank": "same", "style": "rounded", "color": "#d0d0d0", "labeljust": "c"}}
                             for y in sorted({a["year"] for _n, a in d.nodes(data=True)})})
    for _n, a in d.nodes(data=True):
        a.update(html=_tech_html(a), cluster=f"y{a['year']}",
                 dot={"shape": "box", "style": "rounded,filled" + (",dashed" if a.get("original") else ""), "fillcolor": "#f4f4f4"})
    for _u, _v, a in d.edges(data=True):
        a["dot"] = {"style": "dashed" if a["relation"] == "uses" else "solid", "color": USES_COLOUR if "uses" in a["relation"] else "#444444"}
        if a["modules"]:
            a["label"] = a["modules"]
    return d


def _oriented(d: nx.Graph, first: Any) -> nx.DiGraph:
    out = nx.DiGraph()
    out.graph.update(d.graph)
    out.add_nodes_from(d.nodes(data=True))
    for u, v, a in d.edges(data=True):
        if not first(u):
            u, v = v, u
        out.add_edge(u, v, **a)
    return out


def graph_dot(kind: str, catalog: Catalog, link: str | None = None, titled: bool = True) -> str:
    """DOT source of the graph of ``kind``; ``link`` (e.g. ``techniques/{id}.html``) makes each technique a link,
    ``titled=False`` leaves the title out (a page that heads the drawing itself)."""
    d = _drawable(kind, build_graph(kind, catalog))
    if not titled:
        d.graph.pop("title", None)
    if link is not None:
        for n, a in d.nodes(data=True):
            if a.get("kind") == "technique":
                a["dot"] = {**a.get("dot", {}), "URL": link.format(id=n), "target": "_top", "tooltip": f"{a['label']} ({a.get('year', '')})"}
    return to_dot(d, name=kind)


def similarity_legend(catalog: Catalog, top: int = 3) -> list[tuple[str, str, list[str]]]:
    """Each similarity cluster as ``(colour, what its members share most, member ids)``, in cluster order."""
    g = similarity_graph(catalog)
    rows = _typology_rows(catalog)
    out = []
    for k in sorted({a["cluster"] for _n, a in g.nodes(data=True)}):
        members = sorted(n for n, a in g.nodes(data=True) if a["cluster"] == k)
        counts: dict[str, int] = {}
        for tid in members:
            for f in _features(catalog, tid, rows[tid]):
                counts[f] = counts.get(f, 0) + 1
        common = sorted(counts, key=lambda f: (-counts[f], f))[:top]
        out.append((_PALETTE[k % len(_PALETTE)], ", ".join(common), members))
    return out


def graph_svg(kind: str, catalog: Catalog) -> str:
    """The graph of ``kind`` as an SVG element (no XML prolog or DOCTYPE), safe to inline in HTML."""
    return inline_svg(render_dot(graph_dot(kind, catalog), "svg"), id_prefix=f"graph-{kind}")


def export_graph(g: nx.Graph, fmt: str) -> str:
    """networkx node-link JSON (``json``) or GraphML (``graphml``) text; both load back with networkx."""
    if fmt == "json":
        return json.dumps(nx.node_link_data(g, edges="edges"), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if fmt == "graphml":
        return "\n".join(nx.generate_graphml(g, encoding="utf-8", prettyprint=True)) + "\n"
    raise PefrefError(f"unknown export format {fmt!r}; expected json or graphml")


