"""Modules drawn where they attach, as their form says.

* parallel: a branch from the site's input ``x`` to a combine node at the site's
  output, labelled with the integration;
* sequential: a box on the output path, its ``δ`` combined with ``h``;
* reparameterise: a weight badge ``W' = …`` on the projection;
* rescale: an elementwise ``⊙`` node on the output (or input) path;
* prepend: extra token positions after the embeddings, or extra key/value
  positions entering attention;
* select: the host parameters it unfreezes, highlighted on the component.

Tensors a module owns are listed in its box with their shapes (trainable in
black, frozen in grey); tensors shared across layers or sites are drawn once,
as their own node, with an edge to every user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pefref.language.expr import parse_expr
from pefref.language.forms import Integration, form_of
from pefref.language.hparams import shape_of
from pefref.language.sizes import eval_scalar
from pefref.render.behaviour import HookView, stats_of
from pefref.render.mathtext import Math, math_of
from pefref.render.routing import Routing, find_routing
from pefref.render.skeleton import Anchor, Skeleton
from pefref.render.style import (
    FORM_COLOURS,
    FORM_FILLS,
    FROZEN,
    esc,
    html_lines,
    pretty,
    wrap,
)
from pefref.view.analysis import stochastic_ops

__all__ = ["Placed", "attach_module"]


@dataclass
class Placed:
    """One module of one technique, with what the drawing needs to know about it."""

    technique: str
    module: Any
    source: str | None
    hps: dict[str, Any]
    layers_note: str = ""
    users: dict[str, list[str]] = field(default_factory=dict)
    routes: str | None = None
    """The module this one routes: one that writes nothing to the backbone, read by that module as the weights of a
    stack of its tensors (:func:`pefref.render.routing.mixes_by`); drawn as a router beside it."""
    hooks: tuple[HookView, ...] = ()
    """The technique's training-time hooks that act on this module (an annotation in its box)."""
    stack: str | None = None
    """How many experts this module's tensors stack where a router's weights mix them
    (:func:`pefref.render.routing.mixed_stack`): drawn as a row of numbered experts under its box."""


def _math(prefix: str, expr: object, style: str = "markup") -> list[tuple[str, str]]:
    """Lines of a box: ``prefix`` and the expression as math (``B·A·x``), broken at spaces."""
    lines = [("markup", ln.dot()) for ln in math_of(expr).lines(34, prefix)]
    if style == "small":
        lines = [("markup", f'<FONT POINT-SIZE="8" COLOR="#555555">{t}</FONT>') for _s, t in lines]
    return lines


def _in_box(spec: Any, layer: int | None) -> bool:
    """Whether a tensor is listed in its module's box: its own, or shared across layers when one layer stands for all."""
    return spec.shared == "none" or (spec.shared == "layers" and layer is None)


_SHARED_NOTE = {"none": "one per placement", "layers": "shared across layers", "sites": "shared across sites", "all": "shared by all sites and layers"}


def _names(sk: Skeleton, site: str, pl: Placed) -> dict[str, Any] | None:
    """Numbers for the module's shape expressions at ``site`` (None without a model or a binding)."""
    if sk.sizes is None or sk.family is None or site not in sk.family.sites:
        return None
    from pefref.language.schema import Site

    ref: Site = sk.ref.sites[site]
    b = sk.family.sites[site]
    d_in = ref.in_ if ref.in_ is not None else ref.out
    d_out = b.slice.size if b.slice is not None and b.slice.period is None else ref.out
    names = dict(sk.sizes)
    names["d_in"] = int(eval_scalar(d_in, sk.sizes)) if d_in is not None else 0
    names["d_out"] = int(eval_scalar(d_out, sk.sizes)) if d_out is not None else 0
    names["causal"] = int(sk.family.causal)
    return {**names, **pl.hps}


def _shape_text(spec: Any, names: dict[str, Any] | None) -> str:
    """A tensor's shape: numbers on a named model, else its dimensions as math (``⌊min(d_in, d_out)·frac⌋``)."""
    if names is not None:
        try:
            return " × ".join(str(x) for x in shape_of(spec, names))
        except Exception:
            pass
    return " × ".join(math_of(d).plain() for d in spec.shape)


def _param_lines(m: Any, names: dict[str, Any] | None, layer: int | None, skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    out = []
    for pname, spec in m.params.items():
        if not _in_box(spec, layer) or pname in skip:
            continue
        runs = f"  (one per {spec.every} layers)" if getattr(spec, "every", None) is not None else "  (one for all layers)"
        text = f"{pname}: {_shape_text(spec, names)}" + (runs if spec.shared == "layers" else "")
        style = "" if spec.trainable else "frozen"
        out += [(style, ln) for ln in wrap(text if spec.trainable else text + " (frozen)", _PARAM_WIDTH)]
    return out


_PARAM_WIDTH = 28
"""Characters of a tensor's line in a box before it wraps (a long shape expression keeps the drawing narrow)."""


def _module_node(sk: Skeleton, pl: Placed, a: Anchor, body: list[tuple[str, str]], names: dict[str, Any] | None,
                 skip: frozenset[str] = frozenset(), stack: str | None = None) -> str:
    """The module's box (``skip``: tensors drawn elsewhere; ``stack``: a count of experts drawn as a row of boxes)."""
    m = pl.module
    nid = f"m_{pl.technique}_{m.name}_{a.site.replace('.', '_')}" + ("" if a.layer is None else f"_L{a.layer}")
    head = f"{m.name}  ·  {m.form}"
    lines: list[tuple[str, str]] = [("b", head)]
    if stochastic_ops(m):  # it samples while training (deterministic in eval)
        lines.append(("i", f"stochastic: {', '.join(stochastic_ops(m))}"))
    if pl.source:
        lines.append(("i", f"from {pl.source}"))
    if pl.layers_note:
        lines.append(("small", pl.layers_note))
    lines += body
    lines += _param_lines(m, names, a.layer, skip)
    lines += _hook_lines(pl.hooks)
    unbound = sk.family is not None and a.site not in sk.family.sites
    if unbound:
        lines.append(("small", f"(not placed: {sk.family.family} has no {a.site})"))  # type: ignore[union-attr]
    colour = FORM_COLOURS[m.form]
    sk.graph.add_node(nid, role="module", technique=pl.technique, module=m.name, form=m.form, site=a.site, layer=a.layer,
                      source=pl.source, label=head, hooks=bool(pl.hooks), html=_stacked(html_lines(lines), stack, FORM_COLOURS[m.form]), cluster=a.cluster,
                      dot={"shape": "box", "style": "rounded,filled" + (",dashed" if unbound else ""), "fillcolor": FORM_FILLS[m.form], "color": colour,
                           "tooltip": _tooltip(m)})
    _shared_tensors(sk, pl, nid, a, names)
    _calibration_inputs(sk, pl, a, nid)
    return nid


def _hook_lines(hooks: tuple[HookView, ...]) -> list[tuple[str, str]]:
    """Small lines under a box's tensors: each training-time hook acting on the module, as math."""
    out: list[tuple[str, str]] = []
    for h in hooks:
        out.append(("small", h.label))
        out += [("markup", f'<FONT POINT-SIZE="9" COLOR="#555555">{ln.dot()}</FONT>') for ln in h.short.lines(_PARAM_WIDTH)]
    return out


def _calibration_inputs(sk: Skeleton, pl: Placed, a: Anchor, nid: str) -> None:
    """Each calibration statistic the module is initialised from, as a dashed input into its box."""
    for st in stats_of([pl.module]):
        cid = f"{nid}_calibration_{st.name}"
        sk.graph.add_node(cid, role="calibration", technique=pl.technique, module=pl.module.name, site=a.site, layer=a.layer,
                          label=st.line, html=html_lines([("", st.line), ("small", "initialises the module once, before training")]),
                          cluster=a.cluster, dot={"shape": "box", "style": "rounded,dashed", "color": "#777777", "fontcolor": "#333333"})
        sk.graph.add_edge(cid, nid, role="calibration", label="", dot={"style": "dashed", "color": "#777777"})


def _stacked(text: str, count: str | None, colour: str) -> str:
    """A box's label with, under it, a row of expert boxes (1, 2, …, count) where ``count`` is given."""
    if count is None:
        return text
    names = ["1", "2", "…", count] if count not in ("1", "2", "3") else [str(i + 1) for i in range(int(count))]
    cells = "".join(f'<TD BORDER="1" COLOR="{colour}" BGCOLOR="#ffffff"><FONT POINT-SIZE="9">{esc("expert " + n if n != "…" else n)}</FONT></TD>'
                    for n in names)
    return (f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD>{text}</TD></TR>'
            f'<TR><TD><TABLE BORDER="0" CELLSPACING="3" CELLPADDING="3"><TR>{cells}</TR></TABLE></TD></TR></TABLE>')


def _tooltip(m: Any) -> str:
    """The module's expressions as written in its YAML (the SVG's hover text)."""
    fields = ("compute", "integrate", "weight", "host_update", "scale", "tokens", "keys", "values", "gate")
    parts = [f"{f}: {' '.join(str(getattr(m, f)).split())}" for f in fields if getattr(m, f, None) is not None]
    return f"{m.name} ({m.form})" + "".join("\n" + p for p in parts)


def _shared_tensors(sk: Skeleton, pl: Placed, user: str, a: Anchor, names: dict[str, Any] | None) -> None:
    m = pl.module
    for pname, spec in m.params.items():
        if not spec.group and _in_box(spec, a.layer):
            continue
        scope = {"none": f"{a.site.replace('.', '_')}_L{a.layer}", "layers": a.site.replace(".", "_"), "sites": "" if a.layer is None else f"L{a.layer}",
                 "all": ""}[spec.shared]
        owner, tname = spec.owner(m.name, pname)
        tid = f"t_{pl.technique}_{owner.replace(':', '_')}_{tname}" + (f"_{scope}" if scope else "")
        if tid not in sk.graph:
            text = f"{pname}: {_shape_text(spec, names)}"
            lines = [("b" if spec.trainable else "frozen", text), ("small", f"{'group ' + spec.group if spec.group else m.name} · {_SHARED_NOTE[spec.shared]}" + ("" if spec.trainable else " · frozen"))]
            sk.graph.add_node(tid, role="tensor", technique=pl.technique, module=m.name, param=pname, shared=spec.shared,
                              trainable=spec.trainable, label=text, html=html_lines(lines), cluster=sk.graph.nodes[user].get("cluster"),
                              dot={"shape": "box", "style": "filled" if spec.trainable else "filled,dashed",
                                   "fillcolor": FORM_FILLS[m.form] if spec.trainable else "#ffffff",
                                   "color": FORM_COLOURS[m.form] if spec.trainable else FROZEN})
        sk.graph.add_edge(tid, user, role="param", dot={"style": "dashed", "color": FORM_COLOURS[m.form], "arrowhead": "none"})


def _combine(sk: Skeleton, nid: str, pl: Placed, text: str, a: Anchor, out: str) -> str:
    cid = f"{nid}_at_{out}"
    m = pl.module
    sk.graph.add_node(cid, role="combine", technique=pl.technique, module=m.name, form=m.form, site=a.site, layer=a.layer,
                      label=text, html=html_lines([("markup", math_of(text).dot())] if text == getattr(m, "integrate", None) else [("", text)]), cluster=a.cluster,
                      dot={"shape": "box", "style": "rounded", "color": FORM_COLOURS[m.form], "penwidth": "1.5"})
    return cid


def _edge(sk: Skeleton, a: str, b: str, role: str, form: str, label: str = "", **dot: str) -> None:
    attrs = {"color": FORM_COLOURS[form], "fontcolor": FORM_COLOURS[form], **dot}
    sk.graph.add_edge(a, b, role=role, label=label, dot=attrs)


def attach_module(sk: Skeleton, pl: Placed, a: Anchor) -> None:
    """Draw module ``pl`` at anchor ``a`` (one site, one layer)."""
    m = pl.module
    names = _names(sk, a.site, pl)
    f = m.form
    form = form_of(m)
    how = form.integration
    if how is Integration.HIDDEN:
        nid = _attach_hidden(sk, pl, a, names)
    elif how is Integration.SCALE:
        nid = _module_node(sk, pl, a, _math("⊙ ", m.scale) + ([("small", "(input side)")] if m.side == "input" else []), names)
        sk.graph.nodes[nid]["dot"]["shape"] = "box"
        if m.side == "input":
            for e in a.entries:
                _edge(sk, nid, sk.head[e], "flow", f)
                sk.head[e] = nid
        else:
            for out in a.outputs:
                _edge(sk, sk.tail[out], nid, "flow", f)
                sk.tail[out] = nid
    elif how is Integration.WEIGHT:
        body = _math("W′ = ", m.weight)
        if m.host_update:
            body += _math("at apply: W ← ", m.host_update, "small")
        nid = _module_node(sk, pl, a, body, names)
        for out in a.outputs:
            _edge(sk, nid, out, "weight", f, "W'", style="dashed", arrowhead="diamond")
            sk.graph.nodes[out].setdefault("dot", {}).update(color=FORM_COLOURS[f], penwidth="2")
            sk.graph.nodes[out]["reparameterised"] = True
    elif how is Integration.POSITIONS:
        n = pretty(m.length)
        if m.tokens is not None:
            nid = _module_node(sk, pl, a, _math("tokens = ", m.tokens), names)
            for out in a.outputs:
                c = _combine(sk, nid, pl, f"[prompt; h]  (+{n} positions)", a, out)
                _edge(sk, sk.tail[out], c, "h", f, "h")
                _edge(sk, nid, c, "tokens", f, f"{n} tokens")
                sk.tail[out] = c
        else:
            body = _math("K = ", m.keys) + _math("V = ", m.values)
            if getattr(m, "gate", None) is not None:  # scaled per layer by a gate of the attention's input
                body += [("", "K, V ← g·K, g·V")] + _math("g = ", m.gate)
            nid = _module_node(sk, pl, a, body, names)
            for out in a.outputs:
                _edge(sk, nid, out, "prefix", f, f"+{n} key/value positions")
    elif how is Integration.PARAMETERS:
        what = ", ".join(m.targets)
        nid = _module_node(sk, pl, a, [("", f"trains the host's {what}")], names)
        for out in a.outputs:
            node = sk.graph.nodes[out]
            node["selected"] = sorted(set(node.get("selected", [])) | set(m.targets))
            node.setdefault("dot", {}).update(fillcolor=FORM_FILLS[f], color=FORM_COLOURS[f], penwidth="2")
            _edge(sk, nid, out, "unfreeze", f, "unfreezes " + what, style="dashed", arrowhead="odot")
    pl.users.setdefault(a.site, []).append(nid)


def _attach_hidden(sk: Skeleton, pl: Placed, a: Anchor, names: dict[str, Any] | None) -> str:
    """A module whose output ``δ`` is combined with the host's ``h``; a routed mixture as router, experts and their sum."""
    m = pl.module
    f = m.form
    form = form_of(m)
    if getattr(m, "side", "output") == "input" and not _side(m):  # on the host's input path, as an input-side rescale
        body = _math("δ = ", m.compute) + _math("h ← ", m.integrate) + [("small", "(input side)")]
        nid = _module_node(sk, pl, a, body, names)
        for e in a.entries:
            _edge(sk, nid, sk.head[e], "flow", f)
            sk.head[e] = nid
        return nid
    routing = None if _side(m) else find_routing(m.compute, m.params)
    if routing is None:
        body = _math("s = " if _side(m) and pl.routes else "δ = ", m.compute)
        if pl.stack is not None:
            body.append(("small", f"a stack of {pl.stack} experts, mixed by the router's weights"))
        nid = _module_node(sk, pl, a, body, names, stack=pl.stack)
    else:
        body = [("markup", ln.dot()) for ln in Math((("δ", ""), (routing.letter, "sub"), (" = ", ""), *routing.experts.segments), "").lines(34)]
        nid = _module_node(sk, pl, a, body, names, skip=routing.router_params, stack=routing.count or "E")
        sk.graph.nodes[nid]["router_reads"] = routing.router_reads  # a connection only the router reads is drawn into it
    if _side(m) and pl.routes:
        _routing_module(sk, pl, a, nid)
        return nid
    if _side(m):
        _side_module(sk, pl, a, nid)
        return nid
    reads = parse_expr(m.integrate).names
    readers = [nid]
    delta = nid
    if routing is not None:
        router, delta = _router(sk, pl, a, routing, nid, names)
        readers.append(router)
    if form.reads_input == "x":  # a branch from the site's input (into the router where its gates read it)
        for src in a.inputs:
            for r in readers if routing is None or "x" in routing.gate_reads else readers[:1]:
                sk.pending.append((("out", src), ("node", r), {"role": "x", "label": "x", "dot": {"color": FORM_COLOURS[f], "fontcolor": FORM_COLOURS[f]}}))
    for out in a.outputs:
        c = _combine(sk, nid, pl, m.integrate, a, out)
        h = sk.tail[out]
        if form.reads_input == "h":
            for r in readers:
                _edge(sk, h, r, "h", f, "h")
        if "h" in reads or form.reads_input == "x":
            _edge(sk, h, c, "h", f, "h")
        _edge(sk, delta, c, "delta", f, "δ")
        sk.tail[out] = c
    return nid


def _router(sk: Skeleton, pl: Placed, a: Anchor, r: Routing, experts: str, names: dict[str, Any] | None) -> tuple[str, str]:
    """The router (its gates ``s``) and the weighted sum of the experts' outputs; returns both node ids."""
    m = pl.module
    colour, fill = FORM_COLOURS[m.form], FORM_FILLS[m.form]
    k = r.letter
    lines: list[tuple[str, str]] = [("b", "router")]
    lines += [("markup", ln.dot()) for ln in r.gates.lines(34, "s = ")]
    scope = f"the {r.sparse} largest of {r.count or 'the'} experts' scores, 0 elsewhere" if r.sparse else f"softmax over the {r.count or ''} experts".replace("  ", " ")
    lines.append(("small", scope))
    lines += _param_lines(m, names, a.layer, frozenset(m.params) - r.router_params)
    router = f"{experts}_router"
    sk.graph.add_node(router, role="router", technique=pl.technique, module=m.name, form=m.form, site=a.site, layer=a.layer,
                      label="router", html=html_lines(lines), cluster=a.cluster,
                      dot={"shape": "box", "style": "rounded,filled", "fillcolor": "#ffffff", "color": colour, "penwidth": "1.5"})
    mix = f"{experts}_mix"
    total = [("Σ", ""), (k, "sub"), (" s", ""), (k, "sub"), ("·δ", ""), (k, "sub")]
    sk.graph.add_node(mix, role="mix", technique=pl.technique, module=m.name, form=m.form, site=a.site, layer=a.layer,
                      label="weighted sum", html=html_lines([("markup", "δ = " + Math(tuple(total), "").dot()), ("small", "weighted sum")]),
                      cluster=a.cluster, dot={"shape": "box", "style": "rounded,filled", "fillcolor": fill, "color": colour})
    _edge(sk, router, mix, "gate", m.form, "s (gates)", style="dashed")
    sk.graph.add_edge(router, experts, role="layout", dot={"style": "invis"})  # the router above its experts: a narrower drawing
    _edge(sk, experts, mix, "delta", m.form, Math((("δ", ""), (k, "sub")), "").dot())
    return router, mix


def _routing_module(sk: Skeleton, pl: Placed, a: Anchor, nid: str) -> None:
    """A module that routes another (:attr:`Placed.routes`): drawn at its site as a router, fed by what it reads."""
    m = pl.module
    node = sk.graph.nodes[nid]
    node.update(router=pl.routes, label="router")
    node["html"] = html_lines([("b", "router"), ("small", f"weights over {pl.routes}'s stack")]) + "<BR/>" + node["html"]
    node["dot"].update(fillcolor="#ffffff", penwidth="1.5")
    if "x" in parse_expr(m.compute).names:
        for src in a.inputs:
            sk.pending.append((("out", src), ("node", nid), {"role": "x", "label": "x", "dot": {"color": FORM_COLOURS[m.form], "fontcolor": FORM_COLOURS[m.form]}}))


def _side(m: Any) -> bool:
    """A module whose integration leaves the host's output as it is (``integrate: h``): it only reads the backbone."""
    return " ".join(str(m.integrate).split()) == "h"


SIDE_CLUSTER = "side_network"
"""The box that holds a technique's side modules: beside the backbone, or above the layer box (:func:`_place_side`)."""


def _side_module(sk: Skeleton, pl: Placed, a: Anchor, nid: str) -> None:
    """A side module: drawn in the side network's box, with an edge from the backbone only for what it reads (x or h)."""
    m = pl.module
    cid = f"{SIDE_CLUSTER}_{pl.technique}"
    sk.graph.graph["clusters"].setdefault(cid, {
        "html": html_lines([("b", "side network"), ("small", "reads the backbone; writes to it only where a module integrates")]),
        "parent": None, "dot": {"style": "rounded,dashed", "color": FORM_COLOURS[m.form], "labeljust": "l"}})
    node = sk.graph.nodes[nid]
    node["cluster"], node["side"] = cid, True
    reads = parse_expr(m.compute).names
    _place_side(sk, cid, a, "h" in reads)
    if "x" in reads:
        for src in a.inputs:
            sk.pending.append((("out", src), ("node", nid), {"role": "x", "label": "x", "dot": {"color": FORM_COLOURS[m.form], "fontcolor": FORM_COLOURS[m.form], "style": "dashed"}}))
    if "h" in reads:
        for out in a.outputs:
            _edge(sk, sk.tail[out], nid, "h", m.form, "h", style="dashed")


def _outermost(sk: Skeleton, cluster: str | None) -> str | None:
    """The outermost group box around ``cluster`` (the layer box for a site in a layer)."""
    clusters = sk.graph.graph["clusters"]
    while cluster is not None and clusters.get(cluster, {}).get("parent") is not None:
        cluster = clusters[cluster]["parent"]
    return cluster


def _place_side(sk: Skeleton, cid: str, a: Anchor, reads_h: bool) -> None:
    """Where the side network's box goes: above the layer box while its modules read only what enters their sites
    (``x``): their results flow down into the layer, and the drawing stays as narrow as the layer box; beside it
    once one reads a site's output ``h`` (state that runs alongside the backbone)."""
    spec = sk.graph.graph["clusters"][cid]
    if reads_h or spec.get("beside"):
        spec["beside"] = True
        spec.pop("above", None)
        return
    top = _outermost(sk, a.cluster)
    if top is not None and spec.get("above", top) == top:
        spec["above"] = top
    else:  # modules at sites in different top-level boxes: beside them
        spec["beside"] = True
        spec.pop("above", None)
