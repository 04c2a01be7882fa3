"""The site's results section (``pefref site --results DIR``): an experiment folder's runs as pages.

``results.html`` shows, for every experiment in the folder, the runs aggregated
over seeds (mean ± std) ranked by the main metric, every run, and the
experiment's plots, written as ``results/<experiment>/<plot>.svg``. The pages
format their view model (:class:`~pefref.render.site.resultsview.ResultsView`),
which the caller builds from the results folder and passes in; nothing here
reads or writes the results folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from pefref.render.site.build import Page, SiteContext
from pefref.render.site.resultsview import ExperimentView

__all__ = ["linked", "results_pages"]


def linked(experiments: list[ExperimentView], known: set[str]) -> list[ExperimentView]:
    """The experiments with each ranking row's links set to its techniques that have a page (``known``)."""
    return [replace(e, groups=[replace(g, links=tuple(t for t in g.techniques if t in known)) for g in e.groups]) for e in experiments]


def results_pages(ctx: SiteContext) -> Iterable[Page]:
    """``results.html`` and ``results/<experiment>/*.svg``: the experiments of ``--results DIR``."""
    assert ctx.data.results is not None
    views = linked(ctx.data.results.experiments, {t.id for t in ctx.data.techniques})
    yield ctx.render("results.html", "results.html", title="Experiment results", section="results", experiments=views, wide=True)
    for path, svg in sorted((p.path, p.svg) for e in views for p in e.plots):
        yield Page(path, svg)
