"""A composition's blocks drawn on its diagram: where adapters meet, what combines them.

For each block and each host (a site at one drawn layer) where two or more of
its adapters have modules, one node (``role='block'``, with ``kind``,
``adapters`` in the declared order, ``site`` and ``layer``) takes an edge from
each member's module (``role='block_input'``, labelled with the member's place
in a stack, ``δ_i`` of a sum, its weight in an average, or its key in a
fusion) and sends one edge (``role='block_output'``) to where the last
member's output goes (its combine node, or the host for weight-space forms).
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from pefref.language.composition import ResolvedComposition, block_sites
from pefref.language.forms import BLOCKS, Combine, block_of
from pefref.render.style import html_lines

__all__ = ["BLOCK_COLOUR", "BLOCK_MEANING", "draw_blocks", "block_nodes"]

BLOCK_COLOUR = "#6a3d9a"
BLOCK_MEANING = {b.name: b.meaning for b in BLOCKS.values()}
_OUTPUT_ROLES = ("delta", "weight", "flow", "tokens", "prefix", "unfreeze")


def _modules(g: nx.DiGraph, technique: str, site: str) -> dict[int | None, list[str]]:
    """Module nodes of one drawn technique at ``site``, by layer."""
    out: dict[int | None, list[str]] = {}
    for n, a in g.nodes(data=True):
        if a.get("role") == "module" and a.get("technique") == technique and a.get("site") == site:
            out.setdefault(a.get("layer"), []).append(n)
    return out


def _label(blk: Any, d: int | None) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = [("b", f"{blk.kind} block"), ("small", BLOCK_MEANING[blk.kind])]
    how = block_of(blk).combine
    if how is Combine.ORDER:
        lines.append(("", " → ".join(blk.adapters)))
    elif how is Combine.MEAN:
        w = blk.weights or [1.0 / len(blk.adapters)] * len(blk.adapters)
        lines.append(("", ", ".join(f"{a}: {x:g}" for a, x in zip(blk.adapters, w))))
    elif how is Combine.ATTENTION:
        dim = str(d) if d is not None else "d"
        lines.append(("", f"Q, K, V: {dim} × {dim}; T = {blk.temperature:g}"))
        if not blk.train_adapters:
            lines.append(("small", "the fused adapters are frozen"))
    return lines


def _edge_label(blk: Any, k: int, name: str) -> str:
    how = block_of(blk).combine
    if how is Combine.ORDER:
        return f"{k + 1}. {name}"
    if how is Combine.MEAN:
        w = blk.weights or [1.0 / len(blk.adapters)] * len(blk.adapters)
        return f"{w[blk.adapters.index(name)]:g} · δ({name})"
    return f"δ({name})"


def draw_blocks(g: nx.DiGraph, res: ResolvedComposition, widths: dict[str, int] | None = None) -> None:
    """Add the block nodes and edges of composition ``res`` to its diagram ``g`` (drawn from ``res.drawable()``).

    ``widths``: the output width of each site on the drawn model (for the fusion's matrices).
    """
    for b, blk in enumerate(res.composition.blocks):
        for site in block_sites(res, list(blk.adapters), blk.sites):
            by_member = {a: _modules(g, res.drawn_id(a), site) for a in blk.adapters}
            layers = sorted({i for v in by_member.values() for i in v}, key=lambda i: -1 if i is None else i)
            for i in layers:
                present = [a for a in blk.adapters if i in by_member[a]]
                if len(present) < 2:
                    continue  # only one of the adapters here: it runs alone
                nid = f"blk_{b}_{site.replace('.', '_')}" + ("" if i is None else f"_L{i}")
                first = by_member[present[0]][i][0]
                g.add_node(nid, role="block", kind=blk.kind, block=b, adapters=present, site=site, layer=i,
                           label=f"{blk.kind} block", html=html_lines(_label(blk, (widths or {}).get(site))),
                           cluster=g.nodes[first].get("cluster"),
                           dot={"shape": "box", "style": "rounded,bold", "color": BLOCK_COLOUR, "fontcolor": BLOCK_COLOUR})
                for k, a in enumerate(present):
                    for m in by_member[a][i]:
                        g.add_edge(m, nid, role="block_input", adapter=a, order=k, label=_edge_label(blk, k, a),
                                   dot={"color": BLOCK_COLOUR, "fontcolor": BLOCK_COLOUR, "style": "bold"})
                last = by_member[present[-1]][i][-1]
                targets = [v for _u, v, r in g.out_edges(last, data="role") if r in _OUTPUT_ROLES]
                for t in targets[:1]:
                    g.add_edge(nid, t, role="block_output", label="W'" if g.edges[last, t].get("role") == "weight" else "h'",
                               dot={"color": BLOCK_COLOUR, "fontcolor": BLOCK_COLOUR, "style": "bold"})


def block_nodes(g: nx.DiGraph) -> list[tuple[str, dict[str, Any]]]:
    """The block nodes of a diagram, sorted by id."""
    return sorted((n, a) for n, a in g.nodes(data=True) if a.get("role") == "block")
