"""Edges never run through a box's caption: every catalog technique's diagram, rendered to SVG, checked point by point.

Edge paths are sampled (cubic Béziers, 24 points each) and text boxes approximated from their font size
(:mod:`tests.svg_geometry`). Captions of the group boxes (layer, sublayer, "q, k, v", side network) are drawn as
nodes on a rank of their own, so ``dot`` routes around them: no crossing is allowed. Other texts (a module's
tensor lines, edge labels) are still crossed now and then where ``dot`` squeezes an edge past a wide box; those
stay rare.
"""

from __future__ import annotations

import pytest

from pefref.language.catalog import default_catalog
from pefref.render.diagram import technique_graph, to_dot
from pefref.render.dot import render_many
from tests.svg_geometry import crossings, read


@pytest.fixture(scope="module")
def svgs() -> dict[str, str]:
    cat = default_catalog()
    ids = sorted(cat.techniques)
    out = render_many([to_dot(technique_graph(cat, [cat.technique(t)])) for t in ids], "svg", workers=2)
    return {t: s.decode("utf-8") for t, s in zip(ids, out)}


def _captions(found: list[str]) -> list[str]:
    return [c for c in found if " cluster text " in c or "(caption__" in c]


def test_no_edge_runs_through_a_caption(svgs: dict[str, str]) -> None:
    assert len(svgs) >= 70
    bad = {t: _captions(crossings(s)) for t, s in svgs.items()}
    bad = {t: c for t, c in bad.items() if c}
    assert not bad, "\n".join(f"{t}: {c}" for t, cs in bad.items() for c in cs)


def test_captions_are_drawn_and_other_crossings_stay_rare(svgs: dict[str, str]) -> None:
    texts, _edges = read(svgs["lora"])
    assert any(t.text.startswith("q, k, v") for t in texts)  # the caption is still there, as a node
    crossed = [t for t, s in svgs.items() if crossings(s)]
    assert len(crossed) <= len(svgs) // 10, crossed


def test_the_checker_sees_a_crossing() -> None:
    svg = ('<svg xmlns="http://www.w3.org/2000/svg"><g class="cluster"><title>cluster_a</title>'
           '<text x="0" y="10" font-size="10">caption</text></g>'
           '<g class="edge"><title>u-&gt;v</title><path d="M5,-10C5,0 5,10 5,30"/></g></svg>')
    assert _captions(crossings(svg)) == ["edge u->v crosses cluster text 'caption' (cluster_a)"]
