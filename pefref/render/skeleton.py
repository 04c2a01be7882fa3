"""The reference Transformer as a graph to draw on, built from its ``diagram`` data.

:class:`Skeleton` holds component instances (one per component, or one per
layer for components inside the repeated group), the group boxes around them,
and the data-flow edges between them, kept *pending* until modules have been
attached: attaching rewires where a component's output leaves (its ``tail``)
and where its input enters (its ``head``), and :meth:`Skeleton.finish` then
draws every flow edge from the tail of its source to the head of its target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, ReferenceArchitecture
from pefref.language.sizes import eval_scalar
from pefref.render.style import HOST_FILL, HOST_LINE, dims_text, html_lines, pretty

__all__ = ["Anchor", "NodeRef", "Skeleton"]

_BAND = "band__"
"""The prefix of a folded group's node: ``band__ffn`` is the feed-forward sublayer drawn as one box."""

NodeRef = tuple[str, str]
"""A lazily resolved end of an edge: ('out', component instance), ('in', component instance) or ('node', node id)."""


@dataclass
class Anchor:
    """Where a site is, at one layer: the instances whose output is the site's output, and the sources of its input."""

    site: str
    layer: int | None
    outputs: list[str]
    inputs: list[str]
    entries: list[str]
    component: str | None
    cluster: str | None


@dataclass
class Skeleton:
    """Component instances, group boxes and pending flow edges of the reference Transformer."""

    ref: ReferenceArchitecture
    layers: list[int | None]
    L_text: str
    sizes: dict[str, int] | None = None
    family: ArchitectureMap | None = None
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    tail: dict[str, str] = field(default_factory=dict)
    head: dict[str, str] = field(default_factory=dict)
    pending: list[tuple[NodeRef, NodeRef, dict[str, Any]]] = field(default_factory=list)
    sites_used: set[str] = field(default_factory=set)  # sites modules attach to or read (optional groups holding one are drawn)
    fold: bool = True  # a group holding no site of sites_used is drawn as one band node
    _site_of: dict[str, tuple[str, str]] = field(default_factory=dict)
    _dropped: set[str] = field(default_factory=set)  # optional groups and components not drawn
    _flow: list[tuple[str, str]] = field(default_factory=list)

    # --- construction -----------------------------------------------------------

    def build(self) -> Skeleton:
        d = self.ref.diagram
        self.graph.graph.setdefault("clusters", {})
        repeat = [g for g, spec in d.groups.items() if spec.repeat]
        if len(repeat) > 1:
            raise PefrefError(f"the reference diagram repeats more than one group ({', '.join(repeat)}); one layer group is drawn")
        self._repeat = repeat[0] if repeat else None
        self._dropped = self._absent()
        self._fold = self._folded() if self.fold else {}
        for gid in d.groups:
            if gid in self._dropped or gid in self._fold:
                continue
            for i in self._instances_of_group(gid):
                self._add_cluster(gid, i)
        for cid, comp in d.components.items():
            if cid in self._dropped or cid in self._fold:
                continue
            for i in self._instances(cid):
                nid = self.cid(cid, i)
                self.graph.add_node(nid, role="component", component=cid, site=comp.site, layer=i, kind=comp.kind,
                                    label=comp.label, cluster=self.gid(comp.group, i) if comp.group else None)
                self.tail[nid] = self.head[nid] = nid
                if comp.site:
                    self._site_of[comp.site] = ("component", cid)
        for gid in sorted(set(self._fold.values()), key=list(d.groups).index):
            self._add_band(gid)
        for gid, g in d.groups.items():
            if g.site and gid not in self._dropped and gid not in self._fold:
                self._site_of[g.site] = ("group", gid)
        self._flow = self._folded_edges(_around(d.flow, self._dropped))
        self._wire(self._flow, "flow")
        self._wire(self._folded_edges(_around(d.residual, self._dropped)), "residual")
        return self

    # --- folding: a sublayer no module touches is one band -----------------------

    def _sites_within(self, gid: str) -> set[str]:
        d = self.ref.diagram
        sites = {d.groups[gid].site} | {c.site for c in d.components.values() if self._within(c.group, gid)}
        sites |= {x.site for x_id, x in d.groups.items() if self._within(x_id, gid)}
        return {s for s in sites if s}

    def _folded(self) -> dict[str, str]:
        """Component ids and group ids inside a group no module touches → that (outermost) group's id.

        The repeated layer group is never folded; a folded group is drawn as one band node."""
        d = self.ref.diagram
        foldable = [g for g, spec in d.groups.items()
                    if not spec.repeat and g not in self._dropped and not (self._sites_within(g) & self.sites_used)]
        outer = [g for g in foldable if d.groups[g].parent not in foldable]
        out: dict[str, str] = {}
        for g in outer:
            out.update({c: g for c, comp in d.components.items() if self._within(comp.group, g) and c not in self._dropped})
            out.update({x: g for x in d.groups if self._within(x, g)})
        return out

    def _add_band(self, gid: str) -> None:
        g = self.ref.diagram.groups[gid]
        inside = [c.label for cid, c in self.ref.diagram.components.items() if self._fold.get(cid) == gid]
        for i in self._instances_of_group(gid):
            nid = self.cid(_BAND + gid, i)
            parent = g.parent
            self.graph.add_node(nid, role="component", component=_BAND + gid, site=g.site, layer=i, kind="band", label=g.label,
                                folded=inside, folded_sites=sorted(self._sites_within(gid)), cluster=self.gid(parent, i if self.in_layer(parent) else None) if parent else None)
            self.tail[nid] = self.head[nid] = nid
            if g.site:
                self._site_of[g.site] = ("component", _BAND + gid)

    def _folded_edges(self, edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for a, b in edges:
            a2 = _BAND + self._fold[a] if a in self._fold else a
            b2 = _BAND + self._fold[b] if b in self._fold else b
            if a2 != b2 and (a2, b2) not in out:
                out.append((a2, b2))
        return out

    def group_of(self, cid: str) -> str | None:
        """The group a component (or a folded band) is drawn in."""
        if cid.startswith(_BAND):
            return self.ref.diagram.groups[cid[len(_BAND):]].parent
        return self.ref.diagram.components[cid].group

    def _within(self, group: str | None, gid: str) -> bool:
        while group is not None:
            if group == gid:
                return True
            group = self.ref.diagram.groups[group].parent
        return False

    def _absent(self) -> set[str]:
        """Optional groups with no site the family binds or a module uses, with everything inside them."""
        d = self.ref.diagram
        present = set(self.sites_used) | (set(self.family.sites) if self.family is not None else set())
        out: set[str] = set()
        for gid, g in d.groups.items():
            if not g.optional:
                continue
            sites = {g.site} | {c.site for c in d.components.values() if self._within(c.group, gid)}
            sites |= {x.site for x_id, x in d.groups.items() if self._within(x_id, gid)}
            if not (sites - {None}) & present:
                out |= {x for x in d.groups if self._within(x, gid)} | {c for c, comp in d.components.items() if self._within(comp.group, gid)}
        return out

    def in_layer(self, group: str | None) -> bool:
        """Whether a group (or a component's group) lies inside the repeated layer group."""
        g = group
        while g is not None:
            if g == self._repeat:
                return True
            g = self.ref.diagram.groups[g].parent
        return False

    def _instances(self, cid: str) -> list[int | None]:
        return list(self.layers) if self.in_layer(self.group_of(cid)) else [None]

    def _instances_of_group(self, gid: str) -> list[int | None]:
        return list(self.layers) if self.in_layer(gid) else [None]

    @staticmethod
    def cid(cid: str, layer: int | None) -> str:
        return f"c_{cid}" if layer is None else f"c_{cid}_L{layer}"

    @staticmethod
    def gid(gid: str, layer: int | None) -> str:
        return f"g_{gid}" if layer is None else f"g_{gid}_L{layer}"

    def _add_cluster(self, gid: str, layer: int | None) -> None:
        g = self.ref.diagram.groups[gid]
        if g.repeat:
            caption = f"{g.label} × {self.L_text}" if layer is None else f"{g.label} {layer}"
        else:
            caption = g.label
        lines = [("b", caption)] + ([("small", g.site)] if g.site else [])
        if g.site and self.family is not None and g.site not in self.family.sites:
            lines.append(("small", f"(no {g.site} in {self.family.family})"))
        elif g.site and self.family is not None:
            lines.append(("mono", self.path_text(g.site, layer)))
        self.graph.graph["clusters"][self.gid(gid, layer)] = {
            "html": html_lines(lines), "parent": self.gid(g.parent, layer) if g.parent else None,
            "group": gid, "layer": layer, "site": g.site, "repeat": g.repeat,
        }

    def _wire(self, edges: list[tuple[str, str]], role: str) -> None:
        d = self.ref.diagram
        comps = [c for c in d.components if c not in self._dropped and c not in self._fold] + sorted({_BAND + g for g in self._fold.values()})
        inside = {c for c in comps if self.in_layer(self.group_of(c))}
        exits = sorted({a for a, b in self._flow if a in inside and b not in inside})
        if self._repeat and len(self.layers) > 1 and len(exits) != 1:
            raise PefrefError(f"the repeated group needs exactly one component whose output leaves it; found {exits}")
        for a, b in edges:
            if a in inside and b in inside:
                pairs = [(self.cid(a, i), self.cid(b, i)) for i in self.layers]
            elif b in inside:  # entering the layer stack: the first layer from a, the others from the previous layer's exit
                pairs = [(self.cid(a, None), self.cid(b, self.layers[0]))]
                pairs += [(self.cid(exits[0], p), self.cid(b, i)) for p, i in zip(self.layers, self.layers[1:])]
            elif a in inside:
                pairs = [(self.cid(a, self.layers[-1]), self.cid(b, None))]
            else:
                pairs = [(self.cid(a, None), self.cid(b, None))]
            for x, y in pairs:
                self.pending.append((("out", x), ("in", y), {"role": role, "dot": {"color": "#9a9a9a"} if role == "residual" else {}}))

    # --- sites ------------------------------------------------------------------

    def members(self, gid: str, layer: int | None) -> set[str]:
        d = self.ref.diagram
        out = set()
        for cid, comp in d.components.items():
            g = comp.group
            while g is not None and g != gid:
                g = d.groups[g].parent
            if g == gid and cid not in self._dropped:
                name = _BAND + self._fold[cid] if cid in self._fold else cid
                out.add(self.cid(name, layer if self.in_layer(self.group_of(name)) else None))
        return out

    def anchor(self, site: str, layer: int | None) -> Anchor:
        """Where ``site`` is drawn at ``layer`` (None: the folded layer, or a site outside the layers)."""
        what, name = self._site_of[site]
        flow = [(a[1], b[1]) for a, b, attrs in self.pending if attrs["role"] == "flow"]
        if what == "component":
            group = self.group_of(name)
            nid = self.cid(name, layer if self.in_layer(group) else None)
            inputs = [a for a, b in flow if b == nid]
            return Anchor(site, layer, [nid], inputs, [nid], nid, self.gid(group, layer) if group and self.in_layer(group) else (self.gid(group, None) if group else None))
        members = self.members(name, layer)
        inputs = sorted({a for a, b in flow if b in members and a not in members})
        entries = sorted({b for a, b in flow if b in members and a not in members})
        outputs = sorted({a for a, b in flow if a in members and b not in members})
        parent = self.ref.diagram.groups[name].parent
        return Anchor(site, layer, outputs, inputs, entries, None, self.gid(parent, layer) if parent else None)

    def path_text(self, site: str, layer: int | None) -> str:
        """The module path a family binds ``site`` to (``{i}`` kept for the folded layer), with its slice."""
        assert self.family is not None
        b = self.family.sites.get(site)
        if b is None:
            return ""
        if b.cache:
            return f"<{self.family.forward.cache[0]}>[{'{i}' if layer is None else layer}]"
        path = b.path or ""
        if layer is not None:
            path = path.replace("{i}", str(layer))
        if b.side == "input":
            path = f"input of {path}"
        if b.slice is not None:
            sl = b.slice
            if self.sizes is not None:
                first = int(eval_scalar(sl.start, self.sizes))
                path += f"[{first}:{first + int(eval_scalar(sl.size, self.sizes))}]"
                if sl.period is not None:
                    path += f" every {int(eval_scalar(sl.period, self.sizes))}"
            else:
                start = pretty(sl.start)
                path += f"[{start}:{'' if start == '0' else start + ' + '}{pretty(sl.size)}]"
                if sl.period is not None:
                    path += f" every {pretty(sl.period)}"
        return path

    def component_labels(self) -> None:
        """Give every component its label: name, site, widths (numbers with a model) and the family's module path."""
        for _nid, a in self.graph.nodes(data=True):
            if a.get("role") != "component":
                continue
            lines = [("b", a["label"])]
            site = a["site"]
            if a["kind"] == "band":
                lines += [*([("small", site)] if site else []), ("small", "unchanged: " + ", ".join(a["folded"]))]
            elif site:
                lines.append(("small", site))
                s = self.ref.sites[site]
                dims = [x for x in (s.in_, s.out) if x is not None] if a["kind"] in ("linear",) else []
                if dims:
                    if self.sizes is not None:
                        dims = [str(int(eval_scalar(x, self.sizes))) for x in dims]
                    lines.append(("small", " → ".join(dims_text([x]) for x in dims)))
                if self.family is not None:
                    if site in self.family.sites:
                        lines.append(("mono", self.path_text(site, a["layer"])))
                    else:
                        lines.append(("small", f"(no {site} in {self.family.family})"))
                        a["unbound"] = True
            a["html"] = html_lines(lines)
            a["dot"] = {**_component_style(a["kind"], a.get("unbound", False)), **a.get("dot", {})}

    # --- the end ----------------------------------------------------------------

    def resolve(self, ref: NodeRef) -> str:
        kind, name = ref
        return self.tail[name] if kind == "out" else self.head[name] if kind == "in" else name

    def finish(self) -> nx.DiGraph:
        for a, b, attrs in self.pending:
            self.graph.add_edge(self.resolve(a), self.resolve(b), **attrs)
        self.pending = []
        self.component_labels()
        return self.graph


def _component_style(kind: str, unbound: bool) -> dict[str, str]:
    shape = {"io": "plaintext", "add": "circle", "op": "box", "norm": "box", "embedding": "box", "linear": "box", "band": "box"}[kind]
    style = {"io": "", "add": "filled", "op": "rounded,filled", "norm": "rounded,filled", "band": "rounded,filled,dashed"}.get(kind, "filled")
    out = {"shape": shape, "fillcolor": HOST_FILL, "color": HOST_LINE}
    if style:
        out["style"] = style + (",dashed" if unbound else "")
    if kind == "add":
        out.update(width="0.3", height="0.3", fixedsize="false")
    return out


def _around(edges: list[tuple[str, str]], dropped: set[str]) -> list[tuple[str, str]]:
    """The edges with the dropped components taken out, each one's inputs joined to its outputs in its place."""
    out: list[tuple[str, str]] = [(a, b) for a, b in edges]
    for n in sorted(dropped):
        succ = [b for a, b in out if a == n]
        new: list[tuple[str, str]] = []
        for a, b in out:
            if a == n:
                continue
            for e in ([(a, x) for x in succ] if b == n else [(a, b)]):
                if e not in new:
                    new.append(e)
        out = new
    return out
