"""Typology, similarity and lineage graphs: their structure, and exports that load back with networkx."""

from __future__ import annotations

import dataclasses
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import default_catalog
from pefref.language.schema import TYPOLOGY_PROPERTIES, ModuleUse
from pefref.render.graphs import (
    GRAPH_KINDS,
    build_graph,
    export_graph,
    graph_dot,
    graph_svg,
    lineage_graph,
    similarity_graph,
    typology_graph,
)
from pefref.view.typology import derive_typology


def test_typology_graph_links_each_technique_to_its_values() -> None:
    cat = default_catalog()
    g = typology_graph(cat)
    assert nx.is_bipartite(g)
    for tid, t in cat.techniques.items():
        row = derive_typology(t, cat.reference, cat.techniques)
        want = {f"{p}={part.strip()}" for p in TYPOLOGY_PROPERTIES if p != "insertions" for part in row.values[p].split(" + ")}
        assert set(g.neighbors(tid)) == want, tid
    same = set(g.neighbors("insertion_form=in-place"))
    assert {"dora", "bitfit"} <= same and "lora" not in same


def test_similarity_graph_weights_and_clusters() -> None:
    cat = default_catalog()
    g = similarity_graph(cat)
    assert set(g) == set(cat.techniques)
    assert all(a["weight"] > 0 and 0 < a["jaccard"] <= 1 for _u, _v, a in g.edges(data=True))
    assert all("cluster" in a for _n, a in g.nodes(data=True))
    # the nearest neighbour of rsLoRA is in its own cluster, and LoRA's variants sit with LoRA
    assert g.nodes["rslora"]["cluster"] == g.nodes["lora"]["cluster"] != g.nodes["prefix_tuning"]["cluster"]


def test_lineage_from_extends_and_use() -> None:
    cat = default_catalog()
    g = lineage_graph(cat)
    assert nx.is_directed_acyclic_graph(g)
    for tid, t in cat.techniques.items():
        for base in t.extends:
            assert "extends" in g.edges[base, tid]["relation"]
        for m in t.modules:
            if isinstance(m, ModuleUse):
                assert "uses" in g.edges[m.use.split(".")[0], tid]["relation"]
    assert {"dora", "rslora", "pissa", "vera"} <= set(g.successors("lora"))
    assert g.edges["compacter", "compacter_pp"]["relation"].startswith("extends")
    assert set(g.predecessors("unipelt")) == {"lora", "prefix_tuning", "pfeiffer_adapter"}


def test_lineage_of_unvalidated_catalog_skips_unknown_bases() -> None:
    """A graph of a catalog that was not validated (an ``extends`` naming no technique) is drawn without that edge."""
    cat = default_catalog()
    t = cat.techniques["rslora"].model_copy(update={"extends": ["no_such_technique", "lora"]})
    techniques = {**cat.techniques, "rslora": t}
    g = lineage_graph(dataclasses.replace(cat, techniques=techniques))
    assert "no_such_technique" not in g
    assert g.has_edge("lora", "rslora")


@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_exports_load_back(kind: str) -> None:
    cat = default_catalog()
    g = build_graph(kind, cat)
    back = nx.node_link_graph(json.loads(export_graph(g, "json")), edges="edges")
    assert set(back.nodes) == set(g.nodes) and set(back.edges) == set(g.edges)
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    gml = nx.read_graphml(io.BytesIO(export_graph(g, "graphml").encode("utf-8")))
    assert set(gml.nodes) == set(g.nodes) and gml.number_of_edges() == g.number_of_edges()
    for u, v, a in g.edges(data=True):
        assert gml.edges[u, v] == a
    assert graph_dot(kind, cat) == graph_dot(kind, cat)
    svg = graph_svg(kind, cat)
    assert svg.startswith("<svg") and ET.fromstring(svg).tag.endswith("svg")


def test_cli_graph_formats(tmp_path: Path) -> None:
    runner = CliRunner()
    for fmt in ("svg", "png", "dot", "json", "graphml"):
        out = tmp_path / f"lineage.{fmt}"
        r = runner.invoke(app, ["graph", "lineage", "--format", fmt, "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert out.stat().st_size > 100
    assert nx.node_link_graph(json.loads((tmp_path / "lineage.json").read_text()), edges="edges").has_edge("lora", "dora")
    r = runner.invoke(app, ["graph", "typologie"])
    assert r.exit_code == 1 and "unknown graph" in r.output
