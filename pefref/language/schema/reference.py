"""The reference architecture (a standard Transformer) and its sites, as data."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import Field, model_validator

from pefref.language.schema.common import SITE_PATTERN, ExprStr, Identifier, Strict
from pefref.language.schema.technique import FormName

__all__ = ["SizeSpec", "SiteKind", "Site", "SiteSelector", "DiagramGroup", "DiagramComponent", "ReferenceDiagram", "ReferenceArchitecture", "WORKSPACES"]

WORKSPACES = ("embedding", "attention", "ffn", "layer", "head")
_FORM = FormName


class SizeSpec(Strict):
    """A size of the architecture (d_model, number of layers ...)."""

    description: str
    optional: bool = Field(False, description="Only families that bind a site measured in it give it (the number of experts).")


class SiteKind(Strict):
    """What a kind of site offers: the tensors a module may read and the forms it accepts."""

    description: str
    reads: list[Identifier] = Field(description="Names a module attached here may read (x: host input, h: host output, W, b: host weight and bias).")
    forms: list[_FORM] = Field(description="Forms a module may take at this kind of site (the interaction table).")
    takes: list[Identifier] = Field(
        default_factory=list, description=("Kinds whose modules may also be placed here (sites=): a raw parameter slice takes "
                                           "the modules written for linear sites that fold into a weight."))


class Site(Strict):
    """A named place of the standard Transformer where a module can attach."""

    kind: Identifier = Field(description="One of the site kinds.")
    workspace: Literal[WORKSPACES] = Field(description="The PEFT-Ref workspace of modules placed here.")  # type: ignore[valid-type]
    per_layer: bool = Field(True, description="Whether the site exists once per Transformer layer.")
    in_: ExprStr | None = Field(None, alias="in", description="Input width (expression over the sizes).")
    out: ExprStr | None = Field(None, description="Output width (expression over the sizes).")
    slices: ExprStr | None = Field(None, description="The site is a stack of this many independent maps (the experts of a mixture-of-experts layer): one update per slice.")
    description: str


class DiagramGroup(Strict):
    """A box drawn around components: a sublayer, or the layer that repeats L times."""

    label: str = Field(description="Caption of the box.")
    site: Annotated[str, Field(pattern=SITE_PATTERN)] | None = Field(None, description="The block site the box stands for (its input is what enters the box, its output what leaves it).")
    parent: Identifier | None = Field(None, description="The group this one is drawn inside.")
    repeat: bool = Field(False, description="The box repeats once per Transformer layer (drawn once as '× L', or unrolled).")
    optional: bool = Field(False, description=("The box and what it holds are drawn only where they exist: when the family drawn binds a site "
                                               "inside it, or a module attaches there (cross-attention, in encoder-decoder models); otherwise "
                                               "the flow goes around it."))


class DiagramComponent(Strict):
    """A component of the standard Transformer as drawn: a projection, a norm, an operation, a residual add."""

    label: str = Field(description="Text drawn in the component.")
    kind: Literal["io", "embedding", "linear", "norm", "op", "add"] = Field("linear", description="How the component is drawn.")
    site: Annotated[str, Field(pattern=SITE_PATTERN)] | None = Field(None, description="The site the component carries (modules at that site attach here).")
    group: Identifier | None = Field(None, description="The group the component is drawn inside.")


class ReferenceDiagram(Strict):
    """The drawable structure of the reference Transformer: components, groups and data-flow edges."""

    groups: dict[Identifier, DiagramGroup] = Field(default_factory=dict, description="Boxes drawn around components, by id.")
    components: dict[Identifier, DiagramComponent] = Field(description="Components by id, in drawing order.")
    flow: list[tuple[Identifier, Identifier]] = Field(description="Data-flow edges [from, to] between components.")
    residual: list[tuple[Identifier, Identifier]] = Field(default_factory=list, description="Residual (skip) edges [from, to], drawn apart from the main flow.")

    @model_validator(mode="after")
    def _references(self) -> ReferenceDiagram:
        for gid, g in self.groups.items():
            seen = {gid}
            p = g.parent
            while p is not None:
                if p not in self.groups:
                    raise ValueError(f"group {gid!r} has unknown parent {p!r}; known: {sorted(self.groups)}")
                if p in seen:
                    raise ValueError(f"group {gid!r} is inside itself")
                seen.add(p)
                p = self.groups[p].parent
        for cid, c in self.components.items():
            if c.group is not None and c.group not in self.groups:
                raise ValueError(f"component {cid!r} is in unknown group {c.group!r}; known: {sorted(self.groups)}")
        for a, b in [*self.flow, *self.residual]:
            for end in (a, b):
                if end not in self.components:
                    raise ValueError(f"edge [{a}, {b}] names unknown component {end!r}; known: {sorted(self.components)}")
        return self


class SiteSelector(Strict):
    """A named group of sites (e.g. every linear projection), usable wherever sites are chosen."""

    kinds: list[Identifier] | None = Field(None, description="Sites of these kinds (None: any kind).")
    workspaces: list[Literal[WORKSPACES]] | None = Field(None, description="Sites of these workspaces (None: any).")  # type: ignore[valid-type]
    per_layer: bool | None = Field(None, description="Only per-layer sites (true), only model-level ones (false), or both (None).")
    description: str


class ReferenceArchitecture(Strict):
    """The standard Transformer that techniques are described against."""

    name: str
    description: str
    sizes: dict[Identifier, SizeSpec]
    site_kinds: dict[Identifier, SiteKind]
    sites: dict[Annotated[str, Field(pattern=SITE_PATTERN)], Site]
    diagram: ReferenceDiagram = Field(description="How the architecture is drawn: every site is carried by exactly one component or group.")
    order: list[Annotated[str, Field(pattern=SITE_PATTERN)]] = Field(
        default_factory=list, description="Sites in the order a forward pass computes them (model-level and per-layer sites of one layer); a module may read the output of a module at an earlier site, or at the same site when declared before it.")
    selectors: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")], SiteSelector] = Field(
        default_factory=dict, description="Named groups of sites (e.g. 'all-linear'), accepted by sites= and --sites.")

    @model_validator(mode="after")
    def _kinds_exist(self) -> ReferenceArchitecture:
        for name, site in self.sites.items():
            if site.kind not in self.site_kinds:
                raise ValueError(f"site {name!r} has unknown kind {site.kind!r}; known: {sorted(self.site_kinds)}")
        carried = [cast(Any, x).site for x in [*self.diagram.components.values(), *self.diagram.groups.values()] if cast(Any, x).site is not None]
        for s in carried:
            if s not in self.sites:
                raise ValueError(f"the diagram names unknown site {s!r}; known: {sorted(self.sites)}")
            if carried.count(s) > 1:
                raise ValueError(f"site {s!r} is carried by {carried.count(s)} diagram elements; give it to one")
        missing = [s for s in self.sites if s not in carried]
        if missing:
            raise ValueError(f"the diagram does not draw the sites {missing}; give each to a component or group")
        for s in self.order:
            if s not in self.sites:
                raise ValueError(f"order names unknown site {s!r}")
        for name, sel in self.selectors.items():
            for k in sel.kinds or []:
                if k not in self.site_kinds:
                    raise ValueError(f"selector {name!r} names unknown kind {k!r}; known: {sorted(self.site_kinds)}")
        return self
