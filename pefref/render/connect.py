"""Connections drawn as edges: a module reading another module's output, or the hidden state at another site.

A module's ``inputs`` (when the schema has them) name where each extra input
comes from: another module of the same technique (this layer, the previous
layer with a fallback for the first one, or the last layer), the host
input ``x`` / output ``h`` at a site, or an input of the model's call (task
ids, token ids, or a site's hidden state in a first forward pass: a node of its own,
``role='call_input'``). Each becomes one dotted edge
(``role='connection'``) into the reading module, labelled with the name its
expressions use. Edges from the previous layer do not constrain the layout
(with one layer drawn as "× L" they point backwards).
"""

from __future__ import annotations

from typing import Any

from pefref.language.connections import source_site
from pefref.render.attach import Placed
from pefref.render.skeleton import Skeleton
from pefref.render.style import html_lines

__all__ = ["CONNECTION_COLOUR", "draw_connections"]

CONNECTION_COLOUR = "#6b3e8e"


def _instances(sk: Skeleton, technique: str, module: str, site: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(n, a) for n, a in sk.graph.nodes(data=True)
            if a.get("role") == "module" and a.get("technique") == technique and a.get("module") == module and (site is None or a.get("site") == site)]


def _source_layer(layer: int | None, which: str, drawn: list[int | None]) -> int | str | None:
    """The layer whose value a reader at ``layer`` gets (``'missing'`` where there is none: the previous layer of the first)."""
    if layer is None or which == "same":
        return layer
    if which == "last":
        return drawn[-1]
    i = drawn.index(layer)
    return drawn[i - 1] if i > 0 else "missing"


def draw_connections(sk: Skeleton, placed: list[Placed]) -> None:
    """Add an edge for every connection of every drawn module instance."""
    for pl in placed:
        inputs = getattr(pl.module, "inputs", None) or {}
        if not inputs:
            continue
        readers = _instances(sk, pl.technique, pl.module.name)
        for name, conn in inputs.items():
            which = getattr(conn, "layer", "same")
            for reader, ra in readers:
                label = name + ("" if which == "same" else f" ({which} layer)")
                dot = {"style": "dotted", "color": CONNECTION_COLOUR, "fontcolor": CONNECTION_COLOUR, "penwidth": "1.5"}
                if which == "previous":
                    dot["constraint"] = "false"
                src_module = getattr(conn, "module", None)
                if getattr(conn, "call", None) is not None:
                    _call_read(sk, pl.technique, reader, conn, label, dot)
                    continue
                if getattr(conn, "first_pass", False):
                    _first_pass_read(sk, pl.technique, reader, conn, label, dot)
                    continue
                if src_module is None:
                    _site_read(sk, reader, ra, conn, label, dot)
                    continue
                want = _source_layer(ra["layer"], which, sk.layers)
                module, fallback = src_module, want == "missing"
                if fallback:
                    if getattr(conn, "fallback", None) is None:
                        continue
                    module = conn.fallback
                sources = _instances(sk, pl.technique, module, None if fallback else _source_site(placed, pl.technique, module, conn, ra["site"]))
                sources = [(n, a) for n, a in sources if fallback or a["layer"] == want or a["layer"] is None]
                for src, _a in sources:
                    sk.graph.add_edge(src, reader, role="connection", connection=name, layer_of_source=which,
                                      label=label + (" (fallback)" if fallback else ""), dot=dot)
                if not fallback and which == "previous" and getattr(conn, "fallback", None) and sk.layers == [None]:
                    for src, _a in _instances(sk, pl.technique, conn.fallback):
                        sk.graph.add_edge(src, reader, role="connection", connection=name, layer_of_source="fallback",
                                          label=f"{name} (first layer)", dot={**dot, "constraint": "true"})


def _source_site(placed: list[Placed], technique: str, module: str, conn: Any, reader_site: str) -> str | None:
    """The site of the source module's instance a reader at ``reader_site`` reads (as the compiler resolves it:
    a source at several sites is read at the reader's own site)."""
    src = next((p.module for p in placed if p.technique == technique and p.module.name == module), None)
    if src is None:
        return getattr(conn, "site", None)
    return source_site(src, conn, reader_site)


_CALL_SHAPES = {"task_ids": "[batch]", "input_ids": "[batch, seq]"}


def _call_read(sk: Skeleton, technique: str, reader: str, conn: Any, label: str, dot: dict[str, str]) -> None:
    """An edge from an input of the model's call (task ids, token ids), drawn once per technique as a node of its own."""
    nid = f"call_{technique}_{conn.call}"
    if nid not in sk.graph:
        text = f"{conn.call}: {_CALL_SHAPES[conn.call]}"
        sk.graph.add_node(nid, role="call_input", technique=technique, call=conn.call, label=text,
                          html=html_lines([("b", text), ("small", "an input of the model's call")]),
                          dot={"shape": "box", "style": "rounded", "color": CONNECTION_COLOUR, "fontcolor": CONNECTION_COLOUR})
    default = getattr(conn, "default", None)
    sk.graph.add_edge(nid, reader, role="connection", connection=label.split(" ")[0], layer_of_source="same",
                      label=f"{label} = {conn.call}" + ("" if default is None else f" (else {default})"), dot=dot)


def _first_pass_read(sk: Skeleton, technique: str, reader: str, conn: Any, label: str, dot: dict[str, str]) -> None:
    """An edge from a site's hidden state in a first forward pass (``pass: first``), drawn once per technique and
    site as an input node of its own, like the call's inputs: it comes from another pass, not from this drawing.
    Where only a routed mixture's router reads it, the edge goes to the router."""
    name = label.split(" ")[0]
    if name in sk.graph.nodes.get(reader, {}).get("router_reads", ()):
        reader = f"{reader}_router"
    tensor = getattr(conn, "tensor", "h")
    nid = f"first_{technique}_{conn.site}_{tensor}"
    if nid not in sk.graph:
        text = f"first pass: {tensor} at {conn.site}"
        how = "technique off" + (", no_grad" if getattr(conn, "no_grad", False) else "")
        sk.graph.add_node(nid, role="call_input", technique=technique, call=f"first pass {conn.site}", label=text,
                          html=html_lines([("b", text), ("small", "once per call, before this one;"), ("small", how)]),
                          dot={"shape": "box", "style": "rounded,dashed", "color": CONNECTION_COLOUR, "fontcolor": CONNECTION_COLOUR})
    sk.graph.add_edge(nid, reader, role="connection", connection=label.split(" ")[0], layer_of_source="same",
                      label=f"{label} (first pass)", dot=dot)


def _site_read(sk: Skeleton, reader: str, ra: dict[str, Any], conn: Any, label: str, dot: dict[str, str]) -> None:
    """An edge from the hidden state at another site: its input x (what enters it) or its output h."""
    site = conn.site
    per_layer = sk.ref.sites[site].per_layer
    layer = ra["layer"] if per_layer else None
    if per_layer and ra["layer"] is None and sk.layers != [None]:
        layer = sk.layers[-1]  # a model-level reader of a per-layer site reads the last layer
    a = sk.anchor(site, layer)
    ends = a.inputs if getattr(conn, "tensor", "h") == "x" else a.outputs
    for comp in ends:
        sk.pending.append((("out", comp), ("node", reader), {"role": "connection", "connection": label.split(" ")[0],
                                                             "label": f"{label} = {getattr(conn, 'tensor', 'h')} at {site}", "dot": dot}))
