"""A composition's diagram draws its blocks: one node per host where the adapters meet, an edge from each member."""

from __future__ import annotations

from pathlib import Path

import pytest

from pefref.language.catalog import default_catalog
from pefref.language.composition import load_composition
from pefref.render.blocks import block_nodes
from pefref.render.diagram import technique_graph, to_dot
from pefref.view.composition import block_hosts

CAT = default_catalog()
ROOT = Path(__file__).resolve().parents[1] / "catalog" / "compositions"
COMPOSITIONS = sorted(ROOT.glob("*.yaml"))


@pytest.mark.parametrize("path", COMPOSITIONS, ids=lambda p: p.stem)
def test_blocks_are_nodes_fed_by_each_member(path: Path) -> None:
    res = load_composition(path, CAT)
    g = technique_graph(CAT, res.drawable(), model="tiny-gpt2", layers="all", compositions=[res])
    nodes = block_nodes(g)
    expected = sorted((b, site, i) for b in range(len(res.composition.blocks)) for site, i in block_hosts(res, b, CAT.shape("tiny-gpt2"), CAT))
    assert sorted((a["block"], a["site"], a["layer"]) for _n, a in nodes) == expected
    assert expected  # every catalog composition combines something
    for n, a in nodes:
        blk = res.composition.blocks[a["block"]]
        assert a["kind"] == blk.kind
        ins = sorted(((d["order"], d["adapter"], g.nodes[u]) for u, _v, d in g.in_edges(n, data=True) if d["role"] == "block_input"), key=lambda x: x[0])
        assert [x[1] for x in ins] == [x for x in blk.adapters if x in a["adapters"]] == a["adapters"]  # declared order
        for _k, adapter, src in ins:  # each edge comes from that adapter's module at this host
            assert (src["role"], src["technique"], src["site"], src["layer"]) == ("module", res.drawn_id(adapter), a["site"], a["layer"])
        outs = [v for _u, v, d in g.out_edges(n, data=True) if d["role"] == "block_output"]
        assert len(outs) == 1
        if blk.kind == "stack":
            labels = [d["label"] for _u, _v, d in sorted(g.in_edges(n, data=True), key=lambda e: e[2]["order"])]
            assert labels == [f"{k + 1}. {x}" for k, x in enumerate(a["adapters"])]
    dot = to_dot(g)
    assert all(f'"{n}"' in dot or f"{n} " in dot for n, _a in nodes)


def test_fusion_block_names_its_attention_on_a_model() -> None:
    res = load_composition(ROOT / "adapter_fusion.yaml", CAT)
    g = technique_graph(CAT, res.drawable(), model="tiny-bert", compositions=[res])
    ((_n, a),) = block_nodes(g)
    assert a["kind"] == "fusion" and a["adapters"] == ["task_a", "task_b", "task_c"] and a["layer"] is None
    assert "Q, K, V: 32 × 32" in a["html"]
    assert "fusion block" in g.graph["title"] or "fusion" in g.graph["title"]
    assert "fusion block" in g.graph["title"] or any("fusion" in c for c in g.graph["legend"]) or "fusion block" in to_dot(g)


def test_no_blocks_without_the_composition() -> None:
    res = load_composition(ROOT / "lora_loha_parallel.yaml", CAT)
    assert block_nodes(technique_graph(CAT, res.drawable())) == []
    g = technique_graph(CAT, res.drawable(), compositions=[res])
    assert {a["kind"] for _n, a in block_nodes(g)} == {"parallel"}
