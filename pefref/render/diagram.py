"""Architecture diagrams: one or several techniques drawn on the reference Transformer.

The diagram is data first: :func:`technique_graph` returns a networkx
``DiGraph`` whose nodes are the reference components (``role='component'``,
with their ``site``), the modules (``role='module'``, with ``technique``,
``module``, ``form``, ``site``, ``layer`` and, for reused modules, ``source``),
their combine nodes (``role='combine'``) and shared tensors (``role='tensor'``),
and whose edges are the data flow (``role``: flow, residual, x, h, delta,
weight, prefix, tokens, unfreeze, param). :func:`to_dot` writes it as DOT;
:func:`technique_svg` renders one technique as an SVG element for HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.composition import ResolvedComposition
from pefref.language.errors import PefrefError
from pefref.language.hparams import resolve_hyperparameters
from pefref.language.limits import current
from pefref.language.schema import ArchitectureMap, LayerRange, ModuleUse, Technique
from pefref.language.sizes import model_sizes, select_layers
from pefref.render.attach import Placed, attach_module
from pefref.render.behaviour import hooks_of
from pefref.render.blocks import BLOCK_COLOUR, BLOCK_MEANING, draw_blocks
from pefref.render.connect import CONNECTION_COLOUR, draw_connections
from pefref.render.dot import inline_svg, render_graph
from pefref.render.dot import to_dot as _to_dot
from pefref.render.routing import mixed_stack, mixes_by
from pefref.render.skeleton import Skeleton
from pefref.render.style import (
    FORM_COLOURS,
    FORM_FILLS,
    FORM_MEANING,
    FROZEN,
    HOST_FILL,
    HOST_LINE,
    esc,
)

__all__ = ["resolve_family_map", "technique_graph", "technique_svg", "to_dot"]


def resolve_family_map(catalog: Catalog, family: str | Path | ArchitectureMap | None) -> ArchitectureMap | None:
    """An architecture map by catalog name, YAML file (checked) or object."""
    if family is None or isinstance(family, ArchitectureMap):
        return family
    text = str(family)
    if isinstance(family, Path) or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        from pefref.language.check import check_family
        from pefref.language.errors import CatalogError
        from pefref.language.loader import load_file

        fam, pos = load_file(ArchitectureMap, text)
        problems = check_family(fam, pos, catalog.reference)
        if problems:
            raise CatalogError(problems)
        return fam
    try:
        return catalog.family(text)
    except KeyError as e:
        raise PefrefError(str(e.args[0])) from None


def _layers_note(sel: Any) -> str:
    if sel == "all":
        return ""
    if isinstance(sel, LayerRange):
        parts = [f"{k} {getattr(sel, k)}" for k in ("first", "last", "every") if getattr(sel, k) is not None]
        return "layers: " + ", ".join(parts)
    return "layers: " + ", ".join(str(i) for i in sel)


def _placed(catalog: Catalog, t: Technique) -> list[Placed]:
    pool = {**catalog.techniques, t.id: t}
    modules, decl = expand_modules(t, pool)
    hps = resolve_hyperparameters(decl)
    hooks = hooks_of(t)
    out = []
    for raw, m in zip(t.modules, modules):
        source = raw.use if isinstance(raw, ModuleUse) else None
        out.append(Placed(t.id, m, source, hps, _layers_note(m.layers), routes=_routed(m, modules),
                          stack=_stack(m, modules), hooks=tuple(h for h in hooks if h.module == m.name)))
    return out


def _stack(m: Any, modules: list[Any]) -> str | None:
    """How many experts ``m`` stacks where it mixes them by the weights another module (its router) gives it."""
    routers = {n.name for n in modules if _routed(n, modules) == m.name}
    for name, conn in (getattr(m, "inputs", None) or {}).items():
        if getattr(conn, "module", None) in routers:
            return mixed_stack(m.compute, name, m.params)
    return None


def _routed(m: Any, modules: list[Any]) -> str | None:
    """The module ``m`` routes: one that reads ``m``'s output as weights over a stack of its tensors, where ``m``
    writes nothing to the backbone (``integrate: h``)."""
    if " ".join(str(getattr(m, "integrate", "")).split()) != "h":
        return None
    for n in modules:
        for name, conn in (getattr(n, "inputs", None) or {}).items():
            if getattr(conn, "module", None) == m.name and mixes_by(n.compute, name, n.params):
                return str(n.name)
    return None


def technique_graph(catalog: Catalog, techniques: list[Technique], *, model: str | None = None,
                    family: str | Path | ArchitectureMap | None = None, layers: int | str | None = None,
                    compositions: list[ResolvedComposition] | None = None, fold: bool = True) -> nx.DiGraph:
    """The diagram of ``techniques`` composed on one reference Transformer, as a networkx graph.

    Args:
        catalog: the catalog (reference architecture, families, shapes, techniques used with ``use:``).
        techniques: one or several techniques, drawn on the same model.
        model: a model shape name: shapes become numbers and the title gives parameter counts.
        family: an architecture map (name, YAML path or object) whose module paths label the components;
            defaults to the model's family when ``model`` is given.
        layers: None draws one layer as "× L"; N unrolls N layers; "all" unrolls every layer of ``model``.
        compositions: compositions whose adapters are among ``techniques`` (as their ``drawable()``
            gives them): their blocks are drawn where the adapters meet (:mod:`pefref.render.blocks`).
        fold: draw a sublayer no module attaches to (or reads) as one band box naming what it holds.
    """
    if not techniques:
        raise PefrefError("give at least one technique to draw")
    shape = None
    if model is not None:
        try:
            shape = catalog.shape(model)
        except KeyError as e:
            raise PefrefError(str(e.args[0])) from None
    fam = resolve_family_map(catalog, family)
    if shape is not None and fam is not None and fam.family != shape.family:
        raise PefrefError(f"model {shape.name!r} is a {shape.family} model; --family {fam.family!r} differs")
    if shape is not None and fam is None:
        fam = catalog.family(shape.family)
    sizes = model_sizes(fam, dict(shape.config)) if shape is not None and fam is not None else None
    L = sizes["L"] if sizes else None
    drawn, L_text = _drawn_layers(layers, L)
    placed = [pl for t in techniques for pl in _placed(catalog, t)]
    used = {s for pl in placed for s in pl.module.sites}
    used |= {c.site for pl in placed for c in (getattr(pl.module, "inputs", None) or {}).values() if getattr(c, "site", None)}
    sk = Skeleton(catalog.reference, drawn, L_text, sizes, fam, sites_used=used, fold=fold).build()
    model_L = L if L is not None else (len(drawn) if drawn != [None] else None)
    for pl in placed:
        for site in pl.module.sites:
            per_layer = catalog.reference.sites[site].per_layer
            if not per_layer:
                chosen: list[int | None] = [None]
            elif drawn == [None]:
                chosen = [None] if model_L is None or select_layers(pl.module.layers, model_L) else []
            else:
                keep = set(select_layers(pl.module.layers, model_L or len(drawn)))
                chosen = [i for i in drawn if i in keep]
            for i in chosen:
                attach_module(sk, pl, sk.anchor(site, i))
    draw_connections(sk, placed)
    g = sk.finish()
    widths = None
    if sizes is not None and fam is not None:
        from pefref.language.sizes import eval_scalar
        from pefref.view.params import host_widths

        widths = {s: int(eval_scalar(host_widths(s, fam, catalog)[1], sizes)) for s in fam.sites if s in catalog.reference.sites}
    for res in compositions or []:
        draw_blocks(g, res, widths)
    g.graph["attrs"] = {"rankdir": "TB", "nodesep": "0.15", "ranksep": "0.25", "compound": "true", "newrank": "true", "pad": "0.02"}
    g.graph["caption_nodes"] = True  # edges never run through a box's caption
    g.graph["techniques"] = [t.id for t in techniques]
    g.graph["model"] = model
    g.graph["family"] = fam.family if fam is not None else None
    g.graph["title"] = ('<TABLE BORDER="0" CELLBORDER="0" CELLPADDING="1"><TR><TD ALIGN="LEFT" BALIGN="LEFT">'
                        + _title(catalog, techniques, shape, compositions or []) + "</TD></TR><TR><TD ALIGN=\"LEFT\">" + _legend(g) + "</TD></TR></TABLE>")
    return g


def _drawn_layers(layers: int | str | None, L: int | None) -> tuple[list[int | None], str]:
    """The layers to draw (``[None]``: one layer standing for all) and the text of the layer count."""
    if layers is None:
        return [None], str(L) if L is not None else "L"
    if layers == "all":
        if L is None:
            raise PefrefError("--layers all needs a model (--model SHAPE); give a number of layers instead")
        n = L
    else:
        try:
            n = int(layers)
        except ValueError:
            raise PefrefError(f"--layers expects a number or 'all', found {layers!r}") from None
        most = min(L, current().max_layers) if L is not None else current().max_layers
        if n < 1 or n > most:
            raise PefrefError(f"--layers {n}: expected 1..{most}" + ("" if L is not None and most >= L else " (limits.max_layers)"))
    return list(range(n)), str(L if L is not None else n)


def _title(catalog: Catalog, techniques: list[Technique], shape: Any, compositions: list[ResolvedComposition]) -> str:
    lines = []
    for t in techniques:
        lines.append(f"<B>{esc(t.name)}</B>  <FONT POINT-SIZE=\"9\">{esc(t.id)} · {esc(t.paper.authors)} {t.paper.year}</FONT>")
    if shape is not None:
        from pefref.view.params import count_params

        total = base = 0
        for t in techniques:
            pc = count_params(t, shape, catalog)
            total += pc.trainable
            base = pc.base
            if len(techniques) > 1:
                lines.append(f"<FONT POINT-SIZE=\"9\">{esc(t.id)}: {pc.trainable:,} trainable</FONT>")
        pct = 100.0 * total / base if base else 0.0
        if compositions:  # the blocks' own parameters, and adapters a fusion freezes
            from pefref.view.composition import count_composition

            counts = [count_composition(res, shape, catalog) for res in compositions]
            total += sum(b.params for c in counts for b in c.blocks) - sum(m.params for c in counts for m in c.members if not m.trainable)
            pct = 100.0 * total / base if base else 0.0
            for c in counts:
                for b in c.blocks:
                    lines.append(f"<FONT POINT-SIZE=\"9\">{esc(c.composition)} blocks[{b.index}]: {esc(b.kind)} over {esc(', '.join(b.adapters))}, "
                                 f"{b.hosts} host{'s' * (b.hosts != 1)}, {b.params:,} parameters</FONT>")
        lines.append(f"<FONT POINT-SIZE=\"9\">on {esc(shape.name)}: {total:,} trainable parameters ({pct:.4f}% of {base:,})</FONT>")
    return "<BR/>".join(lines)


def _legend(g: nx.DiGraph) -> str:
    """The legend as a horizontal HTML table: the forms drawn, then host and tensor styles."""
    forms = [f for f in FORM_COLOURS if any(a.get("form") == f for _n, a in g.nodes(data=True))]
    g.graph["legend"] = forms
    cells = []
    for f in forms:
        cells.append(f'<TD BGCOLOR="{FORM_FILLS[f]}" BORDER="1" COLOR="{FORM_COLOURS[f]}"><FONT POINT-SIZE="9">{f}</FONT><BR/>'
                     f'<FONT POINT-SIZE="8">{esc(FORM_MEANING[f])}</FONT></TD>')
    for kind in BLOCK_MEANING:
        if any(a.get("role") == "block" and a.get("kind") == kind for _n, a in g.nodes(data=True)):
            cells.append(f'<TD BORDER="1" STYLE="rounded" COLOR="{BLOCK_COLOUR}"><FONT POINT-SIZE="9" COLOR="{BLOCK_COLOUR}">{kind} block</FONT><BR/>'
                         f'<FONT POINT-SIZE="8">{esc(BLOCK_MEANING[kind])}</FONT></TD>')
    if any(a.get("role") == "connection" for _u, _v, a in g.edges(data=True)):
        whence = "another module, a site or the model's call" if any(a.get("role") == "call_input" for _n, a in g.nodes(data=True)) else "another module or site"
        cells.append(f'<TD BORDER="1" STYLE="dotted" COLOR="{CONNECTION_COLOUR}"><FONT POINT-SIZE="9" COLOR="{CONNECTION_COLOUR}">connection</FONT><BR/>'
                     f'<FONT POINT-SIZE="8">an input read from {esc(whence)}</FONT></TD>')
    if any(a.get("role") == "calibration" for _n, a in g.nodes(data=True)):
        cells.append('<TD BORDER="1" STYLE="dashed" COLOR="#777777"><FONT POINT-SIZE="9">C = cov(x) on calibration data</FONT><BR/>'
                     '<FONT POINT-SIZE="8">a statistic that initialises the module</FONT></TD>')
    if any(a.get("hooks") for _n, a in g.nodes(data=True)):
        cells.append('<TD BORDER="1"><FONT POINT-SIZE="8" COLOR="#555555">training: …</FONT><BR/>'
                     '<FONT POINT-SIZE="8">what training does to the module besides its step</FONT></TD>')
    cells.append(f'<TD BGCOLOR="{HOST_FILL}" BORDER="1" COLOR="{HOST_LINE}"><FONT POINT-SIZE="9">host</FONT><BR/><FONT POINT-SIZE="8">frozen component, with its site</FONT></TD>')
    cells.append('<TD BORDER="1"><FONT POINT-SIZE="9">A: r × d</FONT><BR/><FONT POINT-SIZE="8">trainable tensor, shape</FONT></TD>')
    cells.append(f'<TD BORDER="1"><FONT POINT-SIZE="9" COLOR="{FROZEN}"><I>A (frozen)</I></FONT><BR/><FONT POINT-SIZE="8">stored, not trained</FONT></TD>')
    cells.append('<TD BORDER="1" STYLE="dashed"><FONT POINT-SIZE="9">shared tensor</FONT><BR/><FONT POINT-SIZE="8">drawn once, linked to every user</FONT></TD>')
    rows = ["<TR>" + "".join(cells[i:i + _LEGEND_ROW]) + "</TR>" for i in range(0, len(cells), _LEGEND_ROW)]
    return '<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="2">' + "".join(rows) + "</TABLE>"


_LEGEND_ROW = 4
"""Legend cells per row: the legend stays narrower than the diagram under it."""


def to_dot(graph: nx.DiGraph) -> str:
    """DOT source of a diagram (deterministic; every label escaped)."""
    return _to_dot(graph)


def technique_svg(catalog: Catalog, technique: Technique, *, model: str | None = None) -> str:
    """One technique's diagram as an SVG element (no XML prolog or DOCTYPE), safe to inline in HTML."""
    return inline_svg(render_graph(technique_graph(catalog, [technique], model=model), "svg"), id_prefix=f"diagram-{technique.id}")
