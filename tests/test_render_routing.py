"""Routing drawn from structure: a softmax-weighted einsum over an expert index is a router, a stack of experts and their sum."""

from __future__ import annotations

from types import SimpleNamespace

import networkx as nx

from pefref.language.catalog import default_catalog
from pefref.language.schema import Technique
from pefref.render.diagram import technique_graph
from pefref.render.routing import find_routing


def _g(t: Technique) -> nx.DiGraph:
    return technique_graph(default_catalog(), [t])


def test_routing_is_found_from_the_expression_alone() -> None:
    class P:
        shape = ["n", "d_out"]

    soft = find_routing("einsum('...e,eo->...o', softmax(linear(x, G), dim=-1), V)", {"V": P(), "G": P()})
    assert soft is not None and soft.letter == "e" and soft.sparse is None and soft.count == "n"
    assert soft.router_params == {"G"} and "softmax" in soft.gates.plain()
    top = find_routing("einsum('...e,eo->...o', scatter(zeros_like(linear(x, G)), -1, topk_indices(linear(x, G), 3), "
                       "softmax(topk(linear(x, G), 3), dim=-1)), V)", {"V": P(), "G": P()})
    assert top is not None and top.sparse == "3"
    # not routing: the index stays in the output, no softmax, or the einsum is only part of the output
    assert find_routing("einsum('...e,eo->...eo', softmax(linear(x, G), dim=-1), V)", {}) is None
    assert find_routing("einsum('...e,eo->...o', linear(x, G), V)", {}) is None
    assert find_routing("linear(x, A) + einsum('...e,eo->...o', softmax(linear(x, G), dim=-1), V)", {}) is None


def _routed(g: nx.DiGraph) -> list[str]:
    return [n for n, a in g.nodes(data=True) if a.get("role") == "router"]


def test_every_softmax_mixture_in_the_catalog_draws_router_experts_and_sum() -> None:
    cat = default_catalog()
    found = 0
    for t in cat.techniques.values():
        routed = [m for m in t.modules if getattr(m, "compute", None) and find_routing(m.compute, m.params) is not None]
        g = _g(t)
        routers = _routed(g)
        if not routed:
            assert not routers, t.id
            continue
        found += 1
        assert routers, t.id
        for r in routers:
            (mix,) = [v for _u, v, role in g.out_edges(r, data="role") if role == "gate"]
            assert g.nodes[mix]["role"] == "mix"
            experts = [u for u, _v, role in g.in_edges(mix, data="role") if role == "delta"]
            assert experts and all(g.nodes[e]["role"] == "module" and "expert 1" in g.nodes[e]["html"] for e in experts)
            routing = find_routing(routed[0].compute, routed[0].params)
            assert routing is not None
            # the router reads the input where its gates do (X-LoRA's reads a first pass's state instead)
            assert any(g.edges[u, r].get("role") == "x" for u, _ in g.in_edges(r)) == ("x" in routing.gate_reads)
            assert all(any(g.edges[u, r].get("connection") == n for u, _ in g.in_edges(r)) for n in routing.router_reads
                       if n in (getattr(routed[0], "inputs", None) or {}))  # a connection only the gates read goes into the router
            assert [g.nodes[v].get("role") for _u, v, role in g.out_edges(mix, data="role") if role == "delta"] == ["combine"]
            # the router's tensor is in the router's box (a shared one with the shared tensors), not the experts'
            router_params = find_routing(routed[0].compute, routed[0].params).router_params  # type: ignore[union-attr]
            for p in router_params:
                own = routed[0].params[p].shared == "none"
                assert (f"{p}:" in g.nodes[r]["html"]) == own and all(f"{p}:" not in g.nodes[e]["html"] for e in experts)
    assert found >= 1


def test_a_plain_low_rank_branch_has_no_router() -> None:
    g = _g(default_catalog().technique("lora"))
    assert not _routed(g) and not [n for n, a in g.nodes(data=True) if a.get("role") == "mix"]


def test_weights_over_a_stack_are_found_in_an_einsum() -> None:
    from pefref.render.routing import mixes_by

    params = {"A": object()}
    assert mixes_by("einsum('bqs,qsdr->bqdr', z / sum(z, -1), A)", "z", params)
    assert not mixes_by("einsum('bqs,qsdr->bqsdr', z, A)", "z", params)  # s kept: no mixture over it
    assert not mixes_by("einsum('bd,dr->br', x, A)", "z", params)  # z not read
    assert not mixes_by("einsum('bqs,qsdr->bqdr', z, W)", "z", params)  # the other operand is no tensor of the module


def test_a_mixed_stack_is_counted_and_drawn_as_numbered_experts() -> None:
    """A module that mixes a stack of its tensors by another module's weights (Poly's skills, by its router) draws a
    row of numbered experts, counted from the stacked tensor's declared shape; its router is drawn as a router."""
    from pefref.render.routing import mixed_stack

    params = {"A": SimpleNamespace(shape=["n_splits", "n_skills", "d_in", "r"])}
    assert mixed_stack("einsum('bqs,qsdr->bqdr', z / sum(z, -1), A)", "z", params) == "n_skills"
    assert mixed_stack("einsum('bqs,qsdr->bqdr', z, A)", "z", {"A": object()}) == "E"
    assert mixed_stack("einsum('bd,dr->br', x, A)", "z", params) is None
    g = technique_graph(default_catalog(), [default_catalog().techniques["poly"]])
    skills = [n for n, d in g.nodes(data=True) if d.get("role") == "module" and d.get("module") == "skills"]
    routers = [n for n, d in g.nodes(data=True) if d.get("router") == "skills"]
    assert skills and len(routers) == len(skills)
    for n in skills:
        html = g.nodes[n]["html"]
        assert "expert 1" in html and "expert 2" in html and "expert n_skills" in html
