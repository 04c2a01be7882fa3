"""Phase two of a site build: the sections of the site and the pages each one renders.

A section is a :class:`~pefref.render.site.build.Section`: a navigation entry
and a function from the build context to pages. :data:`SECTIONS` lists them
in navigation order; a new kind of page (experiment results, say) is a new
function here or in its own module, added to that list with an ``enabled``
test (e.g. ``lambda ctx: ctx.data.results is not None``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pefref.render.site.build import Page, Section, SiteContext
from pefref.render.site.results import results_pages

__all__ = ["SECTIONS", "index_pages", "technique_pages", "composition_pages", "typology_pages", "compare_pages", "models_pages",
           "primitives_pages", "schema_pages", "compare_data", "diagram_files", "choose_pages", "choose_data"]


def index_pages(ctx: SiteContext) -> Iterable[Page]:
    """``index.html``: every technique in one sortable, filterable table."""
    forms = sorted({f for t in ctx.data.techniques for f in t.row["forms"]})
    yield ctx.render("index.html", "index.html", title="PEFT techniques", section="index", forms=forms, wide=True)


def technique_pages(ctx: SiteContext) -> Iterable[Page]:
    """``techniques/<id>.html``: one page per technique."""
    from pefref.language.interop_table import interop_table

    version = interop_table().peft_version
    for t in ctx.data.techniques:
        yield ctx.render("technique.html", f"techniques/{t.id}.html", title=t.name, section="index", t=t, peft_version=version)


def composition_pages(ctx: SiteContext) -> Iterable[Page]:
    """``compositions.html``: every composition and the rules of its blocks; ``compositions/<id>.html``: one page each."""
    from pefref.language.composition import load_rules
    from pefref.render.site.compositions import rules_view

    yield ctx.render("compositions.html", "compositions.html", title="Compositions", section="compositions",
                     rules=rules_view(load_rules()), wide=True)
    for c in ctx.data.compositions:
        yield ctx.render("composition.html", f"compositions/{c.id}.html", title=c.name, section="compositions", c=c)


def diagram_files(ctx: SiteContext) -> Iterable[Page]:
    """``diagrams/<id>.svg`` and ``diagrams/compositions/<id>.svg``: each technique's and composition's diagram as a file
    (the compare page shows the techniques' as images; the pages link to them)."""
    if ctx.pictures is None:
        return
    for t in ctx.data.techniques:
        yield Page(f"diagrams/{t.id}.svg", ctx.pictures.diagram_file(t.id))
    for c in ctx.data.compositions:
        yield Page(f"diagrams/compositions/{c.id}.svg", ctx.pictures.composition_file(c.id))


def typology_pages(ctx: SiteContext) -> Iterable[Page]:
    """``typology.html``: the PEFT-Ref table of the whole catalog (and its graphs, when available)."""
    from pefref.render.graphs import similarity_legend

    graphs: list[tuple[str, str]] = ctx.data.extra.get("graphs", [])
    names = {t.id: t.name for t in ctx.data.techniques}
    legend = [(colour, shared.replace("_", " ").replace("=", ": "), [(m, names.get(m, m)) for m in members])
              for colour, shared, members in similarity_legend(ctx.catalog)]
    yield ctx.render("typology.html", "typology.html", title="Typology", section="typology", graphs=graphs,
                     legend=legend, wide=True)


def compare_data(ctx: SiteContext) -> dict[str, Any]:
    """What the compare page's script needs: every technique's id and name, in table order, and its counts on the
    first model at the page's settings (size hyperparameter value x sites, counted at build time)."""
    from pefref.view.choose import SITE_SETS, SIZE_VALUES

    def matched(t: Any) -> dict[str, Any]:
        return {f"{m.sites}|{'' if m.value is None else m.value}": [m.trainable, m.why] for m in t.matched}

    return {"techniques": [{"id": t.id, "name": t.name, "knob": (t.size_hyperparameters or [""])[0], "counts": matched(t)}
                           for t in ctx.data.techniques],
            "values": list(SIZE_VALUES), "sites": list(SITE_SETS), "model": ctx.data.models[0]}


def choose_data(ctx: SiteContext) -> dict[str, Any]:
    """What the chooser's script needs: the model shapes, and each technique's count on each (null: n/a),
    mergeability and latency per family and whether it back-propagates through the backbone (all from the view)."""
    from pefref.render.site.filters import percent

    shapes = [{"name": s.name, "family": s.family, "base": s.base, "test": s.name.startswith("tiny-")} for s in ctx.data.shapes]
    techniques = []
    for t in ctx.data.techniques:
        techniques.append({
            "id": t.id, "name": t.name, "year": t.row["year"],
            "counts": {c.shape: None if c.error else [c.trainable, c.percent, percent(c.percent)] for c in t.counts},
            "why": {c.shape: c.error for c in t.counts if c.error},
            "mergeable": {f.family: f.mergeable for f in t.families},
            "no_latency": {f.family: f.no_added_latency for f in t.families},
            "latency": {f.family: f.latency for f in t.families},
            "less_memory": not t.backbone_backward,
        })
    return {"shapes": shapes, "techniques": techniques, "model": ctx.data.models[0]}


def choose_pages(ctx: SiteContext) -> Iterable[Page]:
    """``choose.html``: pick a model shape, a budget and constraints; the techniques that fit, smallest first."""
    model = ctx.data.models[0]
    shape = next(s for s in ctx.data.shapes if s.name == model)

    def footprint(t: Any) -> tuple[int, int, str]:
        c = t.count_on(model)
        return (1, 0, t.name.lower()) if c is None or c.error else (0, c.trainable, t.name.lower())

    ranked = sorted(ctx.data.techniques, key=footprint)
    yield ctx.render("choose.html", "choose.html", title="Choose a technique", section="choose", ranked=ranked,
                     model=model, family=shape.family, choose=choose_data(ctx), wide=True)


def compare_pages(ctx: SiteContext) -> Iterable[Page]:
    """``compare.html``: every technique as a column; the script shows the ones named by ``?ids=``."""
    yield ctx.render("compare.html", "compare.html", title="Compare techniques", section="compare",
                     compare=compare_data(ctx), wide=True)


def models_pages(ctx: SiteContext) -> Iterable[Page]:
    """``models.html``: the named model shapes and each technique's trainable share on each."""
    yield ctx.render("models.html", "models.html", title="Model shapes", section="models", wide=True)


def primitives_pages(ctx: SiteContext) -> Iterable[Page]:
    """``primitives.html``: every registered op and initialiser, with its signature and documentation."""
    from pefref.view.primitives import primitive_docs

    docs = primitive_docs()
    yield ctx.render("primitives.html", "primitives.html", title="Primitives", section="primitives",
                     ops=[d for d in docs if d.kind == "op"], inits=[d for d in docs if d.kind == "initialiser"])


def schema_pages(ctx: SiteContext) -> Iterable[Page]:
    """``schema.html``: the field reference of the catalog's file formats, from the pydantic models."""
    from pefref.view.schemadoc import schema_docs

    yield ctx.render("schema.html", "schema.html", title="Schema reference", section="schema", schemas=schema_docs())


SECTIONS: list[Section] = [
    Section("index", "Techniques", "index.html", index_pages),
    Section("technique", None, "techniques/", technique_pages),
    Section("compositions", "Compositions", "compositions.html", composition_pages),
    Section("diagrams", None, "diagrams/", diagram_files),
    Section("typology", "Typology", "typology.html", typology_pages),
    Section("choose", "Choose", "choose.html", choose_pages),
    Section("compare", "Compare", "compare.html", compare_pages),
    Section("models", "Models", "models.html", models_pages),
    Section("primitives", "Primitives", "primitives.html", primitives_pages),
    Section("schema", "Schema", "schema.html", schema_pages),
    Section("results", "Results", "results.html", results_pages, enabled=lambda ctx: ctx.data.results is not None),
]
"""The site's sections, in navigation order."""
