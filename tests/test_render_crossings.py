"""Edges never run through a label: every catalog technique's and composition's diagram, rendered to SVG as the
site renders it (:func:`pefref.render.dot.render_graph`), checked point by point.

Edge paths are sampled (cubic Béziers, 24 points each) and text boxes approximated from their font size
(:mod:`tests.svg_geometry`). Captions of the group boxes (layer, sublayer, "q, k, v", side network) are drawn as
nodes on a rank of their own, so ``dot`` routes around them; a label several edges from one tail share is drawn once,
as a node; a label another edge still runs through becomes a node on its edge and the drawing is laid out again.
The site's browser test checks the same with the browser's real text boxes.
"""

from __future__ import annotations

import pytest

from pefref.language.catalog import catalog_root, default_catalog
from pefref.language.composition import load_composition
from pefref.render.diagram import technique_graph
from pefref.render.dot import render_graph
from pefref.render.geometry import crossed_labels
from tests.svg_geometry import crossings, read


@pytest.fixture(scope="module")
def svgs() -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    cat = default_catalog()
    graphs = {t: technique_graph(cat, [cat.technique(t)]) for t in sorted(cat.techniques)}
    for f in sorted((catalog_root() / "compositions").glob("*.yaml")):
        res = load_composition(f, cat)
        graphs[f"composition {res.composition.id}"] = technique_graph(cat, res.drawable(), compositions=[res])
    with ThreadPoolExecutor(max_workers=2) as pool:
        out = list(pool.map(render_graph, graphs.values()))
    return {k: s.decode("utf-8") for k, s in zip(graphs, out)}


def _captions(found: list[str]) -> list[str]:
    return [c for c in found if " cluster text " in c or "(caption__" in c]


def test_no_edge_runs_through_a_caption(svgs: dict[str, str]) -> None:
    assert len(svgs) >= 70
    bad = {t: _captions(crossings(s)) for t, s in svgs.items()}
    bad = {t: c for t, c in bad.items() if c}
    assert not bad, "\n".join(f"{t}: {c}" for t, cs in bad.items() for c in cs)


def test_no_edge_runs_through_any_text(svgs: dict[str, str]) -> None:
    assert sum(k.startswith("composition ") for k in svgs) >= 5
    texts, _edges = read(svgs["lora"])
    assert any(t.text.startswith("q, k, v") for t in texts)  # the caption is still there, as a node
    bad = {k: c for k, s in svgs.items() if (c := crossings(s))}
    assert not bad, "\n".join(f"{k}: {c}" for k, cs in bad.items() for c in cs)


def test_a_crossed_label_becomes_a_node_and_the_drawing_is_laid_out_again() -> None:
    """lora_loha_parallel's first layout runs an edge through a block's δ label; render_graph lays it out again."""
    from pefref.render.dot import render_dot, to_dot

    cat = default_catalog()
    res = load_composition(catalog_root() / "compositions" / "lora_loha_parallel.yaml", cat)
    g = technique_graph(cat, res.drawable(), compositions=[res])
    first = crossed_labels(render_dot(to_dot(g), "svg"))
    assert first  # the case this guards: if dot stops crossing it, pick another drawing that does
    again = render_graph(g).decode("utf-8")
    assert not crossed_labels(again) and not crossings(again)
    labels = {g.edges[e]["label"] for e in first}
    texts, _edges = read(again)
    assert labels <= {t.text for t in texts if t.kind == "node" and t.owner.startswith("label__")}  # now nodes


def test_the_checker_sees_a_crossing() -> None:
    svg = ('<svg xmlns="http://www.w3.org/2000/svg"><g class="cluster"><title>cluster_a</title>'
           '<text x="0" y="10" font-size="10">caption</text></g>'
           '<g class="edge"><title>u-&gt;v</title><path d="M5,-10C5,0 5,10 5,30"/></g></svg>')
    assert _captions(crossings(svg)) == ["edge u->v crosses cluster text 'caption' (cluster_a)"]
