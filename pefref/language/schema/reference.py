"""The reference architecture (a standard Transformer) and its sites, as data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pefref.language.schema.common import SITE_PATTERN, ExprStr, Identifier, Strict

__all__ = ["SizeSpec", "SiteKind", "Site", "SiteSelector", "ReferenceArchitecture", "WORKSPACES"]

WORKSPACES = ("embedding", "attention", "ffn", "layer", "head")
_FORM = Literal["parallel", "sequential", "reparameterise", "rescale", "prepend", "select"]


class SizeSpec(Strict):
    """A size of the architecture (d_model, number of layers ...)."""

    description: str


class SiteKind(Strict):
    """What a kind of site offers: the tensors a module may read and the forms it accepts."""

    description: str
    reads: list[Identifier] = Field(description="Names a module attached here may read (x: host input, h: host output, W, b: host weight and bias).")
    forms: list[_FORM] = Field(description="Forms a module may take at this kind of site (the interaction table).")


class Site(Strict):
    """A named place of the standard Transformer where a module can attach."""

    kind: Identifier = Field(description="One of the site kinds.")
    workspace: Literal[WORKSPACES] = Field(description="The PEFT-Ref workspace of modules placed here.")  # type: ignore[valid-type]
    per_layer: bool = Field(True, description="Whether the site exists once per Transformer layer.")
    in_: ExprStr | None = Field(None, alias="in", description="Input width (expression over the sizes).")
    out: ExprStr | None = Field(None, description="Output width (expression over the sizes).")
    description: str


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
    selectors: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")], SiteSelector] = Field(
        default_factory=dict, description="Named groups of sites (e.g. 'all-linear'), accepted by sites= and --sites.")

    @model_validator(mode="after")
    def _kinds_exist(self) -> ReferenceArchitecture:
        for name, site in self.sites.items():
            if site.kind not in self.site_kinds:
                raise ValueError(f"site {name!r} has unknown kind {site.kind!r}; known: {sorted(self.site_kinds)}")
        for name, sel in self.selectors.items():
            for k in sel.kinds or []:
                if k not in self.site_kinds:
                    raise ValueError(f"selector {name!r} names unknown kind {k!r}; known: {sorted(self.site_kinds)}")
        return self
