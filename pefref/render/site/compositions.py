"""The site's compositions: view models of the catalog's composition files.

Every fact comes from the view and the language layer: members and blocks
from :func:`pefref.view.composition.composition_summary`, counts from
:func:`~pefref.view.composition.count_composition` (what ``pefref params``
prints), mergeability from
:func:`~pefref.view.composition.composition_merge_problems` (the checks of
``Composition.merge()``), what each block kind computes and combines from the
interaction rules (``catalog/reference/interactions.yaml``), and the stage of
each module that meets at a block's sites from
:func:`~pefref.language.composition.module_stage`. Nothing here formats HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.composition import ResolvedComposition, load_composition, load_rules, module_stage
from pefref.language.errors import PefrefError
from pefref.language.schema import Composition, InteractionRules
from pefref.view.composition import CompositionCount, composition_merge_problems, composition_summary, count_composition, frozen_adapters

__all__ = ["MemberView", "Meeting", "BlockView", "CompositionShape", "CompositionView", "RulesView",
           "catalog_compositions", "composition_views", "rules_view", "block_combines"]


@dataclass
class MemberView:
    """One adapter of a composition: its technique (``linked``: the site has a page for it) and its settings."""

    name: str
    technique: str
    technique_name: str
    linked: bool
    hyperparameters: dict[str, Any]
    sites: list[str]
    layers: str
    frozen: bool


@dataclass
class Meeting:
    """One module that a block combines at one of its sites: adapter, module, form and the stage it runs in."""

    site: str
    adapter: str
    module: str
    form: str
    stage: str


@dataclass
class BlockView:
    """One block: its kind, adapters, sites and options, what its kind computes and combines, and what meets where."""

    index: int
    kind: str
    adapters: list[str]
    sites: list[str]
    options: dict[str, Any]
    description: str
    semantics: str
    combines: str
    meetings: list[Meeting] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (forms, how they combine) of the forms that meet


@dataclass
class CompositionShape:
    """A composition's counts and mergeability on one model shape (``error`` when it cannot be placed there)."""

    shape: str
    family: str
    counts: CompositionCount | None = None
    merge_problems: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def mergeable(self) -> bool:
        return self.counts is not None and not self.merge_problems


@dataclass
class CompositionView:
    """Everything the site shows about one composition."""

    id: str
    name: str
    summary: str
    papers: list[dict[str, Any]]
    notes: str
    source: str
    yaml: str
    members: list[MemberView]
    blocks: list[BlockView]
    shapes: list[CompositionShape]
    diagram: str | None = None

    def on(self, shape: str) -> CompositionShape | None:
        return next((s for s in self.shapes if s.shape == shape), None)

    @property
    def block_kinds(self) -> list[str]:
        return list(dict.fromkeys(b.kind for b in self.blocks))

    def merge_outcomes(self) -> list[tuple[list[str], list[str]]]:
        """``(problems, shapes)``: the shapes grouped by why the composition does not merge on them (``[]``: it does)."""
        out: dict[tuple[str, ...], list[str]] = {}
        for s in self.shapes:
            if s.counts is not None:
                out.setdefault(tuple(s.merge_problems), []).append(s.shape)
        return [(list(k), v) for k, v in out.items()]


@dataclass
class RulesView:
    """The interaction rules as the compositions index shows them."""

    stage_order: list[str]
    blocks: list[tuple[str, str, bool, str]]  # (kind, combines, one stage only, semantics)
    pairs: list[tuple[str, bool, str]]  # (forms, allowed, how)


def block_combines(rules: InteractionRules, kind: str) -> str:
    """What a block kind may combine at one host, in words (from the rules)."""
    b = rules.blocks[kind]
    what = "modules of forms " + ", ".join(b.forms) if b.forms else "modules of stages " + ", ".join(b.stages)
    return what + (" (of one stage at each host)" if b.same_stage else " (of any of these stages, in stage order)")


def rules_view(rules: InteractionRules) -> RulesView:
    return RulesView(list(rules.stage_order),
                     [(k, block_combines(rules, k), b.same_stage, b.semantics) for k, b in rules.blocks.items()],
                     [(" + ".join(p.forms), p.allowed, p.combine) for p in rules.pairs])


def catalog_compositions(catalog: Catalog, files: list[Path]) -> list[ResolvedComposition]:
    """The compositions of ``files`` (sorted by id) whose catalog techniques are all in ``catalog``; the others are left out.

    Raises:
        CatalogError: a composition that names only known techniques has problems (every one, located).
    """
    from pefref.language.loader import load_file

    out = []
    for f in files:
        comp, _pos = load_file(Composition, f)
        if all(u.technique.endswith((".yaml", ".yml")) or u.technique in catalog.techniques for u in comp.techniques):
            out.append(load_composition(f, catalog))
    return sorted(out, key=lambda r: r.composition.id)


def _blocks(res: ResolvedComposition, summary: dict[str, Any], rules: InteractionRules) -> list[BlockView]:
    out = []
    for i, b in enumerate(summary["blocks"]):
        options = {k: v for k, v in b.items() if k not in ("kind", "adapters", "sites", "description")}
        view = BlockView(i, b["kind"], list(b["adapters"]), list(b["sites"]), options, b.get("description", ""),
                         rules.blocks[b["kind"]].semantics, block_combines(rules, b["kind"]))
        forms: list[str] = []
        for site in view.sites:
            for a in view.adapters:
                for m in res.modules_at(a, site):
                    view.meetings.append(Meeting(site, a, m.name, m.form, module_stage(m, rules)))
                    forms.append(m.form)
        for p in rules.pairs:
            fa, fb = p.forms
            if (forms.count(fa) >= 2 if fa == fb else fa in forms and fb in forms):
                view.pairs.append((" + ".join(p.forms), p.combine if p.allowed else f"not allowed: {p.combine}"))
        out.append(view)
    return out


def _shapes(res: ResolvedComposition, catalog: Catalog) -> list[CompositionShape]:
    out = []
    for name, shape in catalog.shapes.items():
        try:
            out.append(CompositionShape(name, shape.family, count_composition(res, shape, catalog),
                                        composition_merge_problems(res, shape, catalog)))
        except PefrefError as e:
            out.append(CompositionShape(name, shape.family, error=str(e)))
    return out


def composition_views(compositions: list[ResolvedComposition], catalog: Catalog, pages: set[str], source: Any) -> list[CompositionView]:
    """The view of each composition; ``pages``: technique ids with a page; ``source(path, id)``: the YAML's label."""
    rules = load_rules()
    views = []
    for res in compositions:
        summary = composition_summary(res)
        frozen = frozen_adapters(res)
        members = [MemberView(t["name"], t["technique"], t["technique_name"], t["technique"] in pages, t["hyperparameters"],
                              list(t["sites"]), t["layers"], t["name"] in frozen) for t in summary["techniques"]]
        views.append(CompositionView(
            res.composition.id, res.composition.name, res.composition.summary, summary["papers"], res.composition.notes,
            source(res.source, res.composition.id), Path(res.source).read_text(encoding="utf-8") if res.source else "",
            members, _blocks(res, summary, rules), _shapes(res, catalog)))
    return views
