"""Phase one of a site build: view models (plain dataclasses) gathered from the catalog and the view.

Nothing here formats HTML; the templates only format what these classes hold.
Every fact comes from :mod:`pefref.view` (summary rows, typology, counts,
costs), never re-derived here. Iteration is sorted so that two builds are
byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.composition import ResolvedComposition
from pefref.language.errors import PefrefError
from pefref.language.schema import TYPOLOGY_PROPERTIES, ModelShape, ModuleUse, Technique
from pefref.language.sizes import eval_scalar, model_sizes
from pefref.view.peft_config import PeftSnippet, SiteModule, peft_snippets, site_modules
from pefref.render.site.compositions import CompositionView, composition_views
from pefref.render.site.resultsview import ResultsView
from pefref.view.choose import FamilyFacts, MatchedCount, backbone_backward, family_facts, matched_counts, size_hyperparameters
from pefref.view.costs import Efficiency, efficiency
from pefref.view.typology import initialisation, training_time
from pefref.render.behaviour import HookView, InputView, LossView, StatView, hooks_of, inputs_of, loss_of, stats_of
from pefref.render.mathtext import Math, math_of

__all__ = [
    "ShapeCount", "TypologyCell", "Related", "TechniqueView", "ShapeView", "SiteData",
    "gather", "property_label", "similar_techniques", "builds_on",
]

SIMILAR = 5
"""How many of the most similar techniques a technique page lists."""


def property_label(prop: str) -> str:
    """A typology property as a heading: ``insertion_form`` → ``insertion form``."""
    return prop.replace("_", " ")


@dataclass
class ShapeCount:
    """Trainable parameters of one technique on one model shape (``error`` when it cannot be placed)."""

    shape: str
    family: str
    trainable: int = 0
    base: int = 0
    percent: float = 0.0
    formula: str = ""
    error: str = ""
    dropped: list[str] = field(default_factory=list)  # parts not placed on this model (the count leaves them out)

    @property
    def test_shape(self) -> bool:
        """A small shape made for tests (``tiny-*``): hidden from tables unless asked for."""
        return self.shape.startswith("tiny-")


@dataclass
class TypologyCell:
    """One typology property of a technique: its value, whether it was declared, and where it comes from.

    ``derived_from`` holds one ``(module, form, sites, layers, value)`` tuple per concrete
    module: the structure the technique's value was derived from.
    """

    prop: str
    label: str
    value: str
    declared: bool
    derived_from: list[tuple[str, str, str, str, str]] = field(default_factory=list)


@dataclass
class Related:
    """A link to another technique, with why it is related."""

    id: str
    name: str
    why: str


@dataclass
class TechniqueView:
    """Everything the site shows about one technique."""

    id: str
    name: str
    summary: dict[str, Any]
    row: dict[str, Any]
    from_catalog: bool
    source: str
    yaml: str
    typology: list[TypologyCell]
    training_time: str  # "none", or its training: hook kinds (pefref.view.typology.training_time)
    initialisation: str  # "calibration data", "host weights" or "data-free" (pefref.view.typology.initialisation)
    counts: list[ShapeCount]
    efficiency: list[Efficiency]
    builds_on: list[Related] = field(default_factory=list)
    used_by: list[Related] = field(default_factory=list)
    similar: list[Related] = field(default_factory=list)
    compositions: list[Related] = field(default_factory=list)  # the compositions that use it (id, name, as which adapters)
    diagram: str | None = None
    peft: list[PeftSnippet] = field(default_factory=list)  # the peft config on each family (empty: no peft equivalent)
    modules_on: dict[str, list[SiteModule]] = field(default_factory=dict)  # family -> the technique's sites there
    size_hyperparameters: list[str] = field(default_factory=list)
    families: list[FamilyFacts] = field(default_factory=list)
    backbone_backward: bool = True
    matched: list[MatchedCount] = field(default_factory=list)  # counts at the compare page's settings, on the first model
    origin: str | None = None  # the name of the user's catalog it comes from (None: the bundled catalog or an included folder)
    hooks: list[HookView] = field(default_factory=list)  # its training: hooks, as math (pefref.render.behaviour)
    loss: LossView | None = None  # its weighted token loss (loss:), as math
    calibration: list[StatView] = field(default_factory=list)  # its modules' calibration statistics
    host_updates: list[tuple[str, Math]] = field(default_factory=list)  # (module, W ← ...): host weights rewritten at apply
    inputs: list[InputView] = field(default_factory=list)  # what its modules read besides their sites (the model's call, ...)

    @property
    def typology_values(self) -> dict[str, str]:
        return {c.prop: c.value for c in self.typology}

    def count_on(self, shape: str) -> ShapeCount | None:
        return next((c for c in self.counts if c.shape == shape), None)

    def efficiency_on(self, shape: str) -> Efficiency | None:
        return next((e for e in self.efficiency if e.model == shape), None)


@dataclass
class ShapeView:
    """A named model shape with its reference sizes and base parameter count."""

    name: str
    family: str
    description: str
    source: str
    sizes: dict[str, int]
    base: int
    config: dict[str, Any]


@dataclass
class SiteData:
    """All view models of one build."""

    techniques: list[TechniqueView]
    shapes: list[ShapeView]
    models: list[str]
    properties: list[tuple[str, str]]
    results: ResultsView | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    compositions: list[CompositionView] = field(default_factory=list)

    def technique(self, tid: str) -> TechniqueView:
        return next(t for t in self.techniques if t.id == tid)

    def composition(self, cid: str) -> CompositionView:
        return next(c for c in self.compositions if c.id == cid)


def _source_label(path: Path | None, tid: str, catalog: Catalog, from_catalog: bool) -> str:
    """Where the YAML came from, without absolute paths (the site must not depend on the checkout's place):
    relative to the folder above its catalog folder (``catalog/techniques/<id>.yaml``)."""
    if path is None:
        return f"{tid}.yaml"
    path = Path(path)
    home = catalog.catalog_of(path) if from_catalog else None
    if home is not None:
        return path.resolve().relative_to(home.root.resolve().parent).as_posix()
    return f"{path.parent.name}/{path.name}"


def _typology_cells(t: Technique, catalog: Catalog) -> list[TypologyCell]:
    from pefref.view.summary import layers_text
    from pefref.view.typology import derive_typology, module_typology

    typ = derive_typology(t, catalog.reference, catalog.techniques)
    modules, _ = expand_modules(t, {**catalog.techniques, t.id: t})
    from pefref.view.analysis import connected_modules

    conn = connected_modules(modules)
    per_module = [(m, module_typology(m, catalog.reference, m.name in conn)) for m in modules]
    cells = []
    for prop in TYPOLOGY_PROPERTIES:
        rows = []
        for m, mt in per_module:
            value = mt.get(prop)
            if value is None:  # insertions: the module's sites and layers are the structure
                value = f"{len(m.sites)} site{'s' * (len(m.sites) != 1)} × layers {layers_text(m.layers)}"
            rows.append((m.name, m.form, ", ".join(m.sites), layers_text(m.layers), value))
        cells.append(TypologyCell(prop, property_label(prop), typ.values[prop], prop in typ.declared, rows))
    return cells


def _counts(t: Technique, catalog: Catalog) -> list[ShapeCount]:
    from pefref.view.params import count_params

    out = []
    for name, shape in catalog.shapes.items():
        try:
            pc = count_params(t, shape, catalog)
        except PefrefError as e:
            out.append(ShapeCount(name, shape.family, error=str(e)))
            continue
        why = _grouped(pc.dropped)
        if pc.trainable == 0 and pc.dropped:  # nothing placed: not applicable, not "0 parameters"
            out.append(ShapeCount(name, shape.family, error=why, dropped=[why]))
            continue
        out.append(ShapeCount(name, shape.family, pc.trainable, pc.base, pc.percent, pc.formula, dropped=[why] if why else []))
    return out


def _grouped(dropped: list[str]) -> str:
    """``"m at a: why"`` notes joined per module and reason: ``"m at a, b: why"`` (a site named in the reason becomes "it")."""
    groups: dict[tuple[str, str], list[str]] = {}
    for note in dropped:
        where, _, why = note.partition(": ")
        module, _, site = where.partition(" at ")
        groups.setdefault((module, why.replace(site, "it") if site else why), []).append(site)
    return "; ".join(f"{m} at {', '.join(sites)}: {why}" for (m, why), sites in groups.items())


def _choice_facts(t: Technique, catalog: Catalog, model: str) -> dict[str, Any]:
    """What the chooser, the compare page's settings and the peft section need (all from the view and the interop table)."""
    shape = catalog.shapes[model]
    L = model_sizes(catalog.family(shape.family), dict(shape.config))["L"]
    return {
        "peft": peft_snippets(t, catalog),
        "modules_on": {f: site_modules(t, catalog.families[f], catalog) for f in sorted(catalog.families)},
        "size_hyperparameters": size_hyperparameters(t, catalog),
        "families": family_facts(t, catalog),
        "backbone_backward": backbone_backward(t, catalog, L),
        "matched": matched_counts(t, shape, catalog),
    }


def _efficiency(t: Technique, catalog: Catalog, models: list[str]) -> list[Efficiency]:
    return [efficiency(t, catalog.shapes[name], catalog) for name in models]


def builds_on(t: Technique) -> list[tuple[str, str]]:
    """The techniques ``t`` builds on, as ``(id, how)``: modules reused with ``use:`` and a declared ``extends``."""
    out: dict[str, list[str]] = {}
    for m in t.modules:
        if isinstance(m, ModuleUse):
            tid, mname = m.use.split(".")
            out.setdefault(tid, []).append(f"reuses module {mname}")
    ext = getattr(t, "extends", None)
    for tid in [ext] if isinstance(ext, str) else list(ext or []):
        out.setdefault(tid, []).insert(0, "extends it")
    return [(tid, "; ".join(why)) for tid, why in out.items()]


def similar_techniques(tid: str, values: dict[str, dict[str, str]], n: int = SIMILAR) -> list[tuple[str, list[str]]]:
    """The ``n`` techniques sharing the most typology values with ``tid``: ``(id, shared properties)``,
    most shared first, ties by id; techniques sharing nothing are left out."""
    mine = values[tid]
    scored = []
    for other in sorted(values):
        if other == tid:
            continue
        shared = [p for p in TYPOLOGY_PROPERTIES if p in mine and mine[p] == values[other].get(p)]
        if shared:
            scored.append((-len(shared), other, shared))
    scored.sort(key=lambda x: (x[0], x[1]))
    return [(other, shared) for _, other, shared in scored[:n]]


def _shape_view(s: ModelShape, catalog: Catalog) -> ShapeView:
    fam = catalog.family(s.family)
    sizes = model_sizes(fam, dict(s.config))
    base = int(eval_scalar(fam.base_params, {**sizes, **s.config}))
    return ShapeView(s.name, s.family, s.description, s.source or "", dict(sorted(sizes.items())), base, dict(s.config))


def gather(catalog: Catalog, models: list[str], included: frozenset[str] = frozenset(), results: ResultsView | None = None,
           compositions: list[ResolvedComposition] | None = None) -> SiteData:
    """Assemble the view models of the whole site (the first phase of :func:`pefref.render.site.build.build_site`).

    Args:
        catalog: the catalog, with any included techniques already added to it.
        models: the model shapes the index, costs and comparisons are shown on.
        included: ids of techniques that do not come from the catalog.
        results: the experiment results to show (built by the caller), handed to the results section.
        compositions: the compositions to show (their techniques link back to them).
    """
    from pefref.view.summary import technique_row, technique_summary

    for m in models:
        try:
            catalog.shape(m)
        except KeyError as e:  # the message suggests a name
            raise PefrefError(str(e.args[0])) from None
    views: list[TechniqueView] = []
    for tid in sorted(catalog.techniques):
        t = catalog.techniques[tid]
        src = catalog.sources.get(tid)
        summary = technique_summary(t, catalog)
        summary.pop("file", None)
        modules = expand_modules(t, {**catalog.techniques, t.id: t})[0]
        views.append(TechniqueView(
            id=tid, name=t.name, summary=summary, row=technique_row(t, catalog.techniques),
            from_catalog=tid not in included, source=_source_label(src, tid, catalog, tid not in included), origin=catalog.origin(tid),
            yaml=Path(src).read_text(encoding="utf-8") if src is not None else "",
            typology=_typology_cells(t, catalog), training_time=training_time(t),
            initialisation=initialisation(modules), counts=_counts(t, catalog), efficiency=_efficiency(t, catalog, models),
            hooks=hooks_of(t), loss=loss_of(t), calibration=stats_of(modules), inputs=inputs_of(modules),
            host_updates=[(str(m.name), math_of(m.host_update)) for m in modules if getattr(m, "host_update", None)],
            **_choice_facts(t, catalog, models[0]),
        ))
    by_id = {v.id: v for v in views}
    values = {v.id: v.typology_values for v in views}
    for v in views:
        for tid, why in builds_on(catalog.techniques[v.id]):
            if tid in by_id:
                v.builds_on.append(Related(tid, by_id[tid].name, why))
                by_id[tid].used_by.append(Related(v.id, v.name, why))
        for tid, shared in similar_techniques(v.id, values):
            v.similar.append(Related(tid, by_id[tid].name, ", ".join(property_label(p) for p in shared)))
    comps = composition_views(compositions or [], catalog, set(by_id), lambda path, cid: _source_label(path, cid, catalog, True))
    for c in comps:
        names: dict[str, list[str]] = {}
        for member in c.members:
            if member.linked:
                names.setdefault(member.technique, []).append(member.name)
        for tid, ns in names.items():
            by_id[tid].compositions.append(Related(c.id, c.name, f"as adapter{'s' * (len(ns) > 1)} {', '.join(ns)}"))
    shapes = [_shape_view(catalog.shapes[n], catalog) for n in catalog.shapes]
    props = [(p, property_label(p)) for p in TYPOLOGY_PROPERTIES]
    return SiteData(views, shapes, list(models), props, results, compositions=comps)
