"""The site's results section (``pefref site --results DIR``): an experiment folder's runs as pages.

``results.html`` shows, for every experiment in the folder, the runs aggregated
over seeds (mean ± std) ranked by the main metric, every run, and the plots of
:mod:`pefref.experiments.plots` (metric against trainable parameters with the
Pareto front, training curves, step time and memory), which are written as
``results/<experiment>/<plot>.svg``. The pages read the results through their
view model (:func:`pefref.experiments.results.load_results`); nothing here
writes to the results folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pefref.render.site.build import Page, SiteContext

__all__ = ["ExperimentView", "results_pages", "results_views"]


@dataclass
class ExperimentView:
    """One experiment of a results folder, as the results page shows it."""

    id: str
    metric: str
    other: str
    higher: bool
    setup: list[tuple[str, str]]
    groups: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    plots: list[tuple[str, str, str]] = field(default_factory=list)  # (name, file under the site root, what it shows)
    unfinished: int = 0


def _model_text(model: dict[str, Any]) -> str:
    for key in ("package", "shape", "path"):
        if key in model:
            return f"{key} {model[key]}" if key != "path" else "local checkpoint"
    return "-"


def _setup(cfg: dict[str, Any], seeds: list[int]) -> list[tuple[str, str]]:
    tr = cfg.get("training", {})
    length = f"{tr['max_steps']} steps" if tr.get("max_steps") else f"{tr.get('epochs')} epochs"
    return [("model", _model_text(cfg.get("model", {}))),
            ("task", f"{cfg.get('task', {}).get('type', '-')}, max {cfg.get('task', {}).get('max_length', '-')} tokens"),
            ("training", f"batch {tr.get('batch_size', '-')}, {length}, {tr.get('schedule', '-')} schedule, warmup {tr.get('warmup', '-')}"
                         + (f", head lr {tr['head_lr']:g}" if tr.get("head_lr") else "")),
            ("seeds", ", ".join(map(str, seeds)))]


def results_views(ctx: SiteContext) -> tuple[list[ExperimentView], dict[str, bytes]]:
    """The experiments of ``ctx.data.results`` and their plot files (site path → SVG bytes)."""
    from pefref.experiments.plots import PLOTS, experiment_plots
    from pefref.experiments.results import load_results

    assert ctx.data.results is not None
    res = load_results(ctx.data.results)
    configs: dict[str, dict[str, Any]] = {}
    for r in res.runs:
        configs.setdefault(r.experiment, r.config)
    known = {t.id for t in ctx.data.techniques}
    plots = experiment_plots(res)
    metric = res.main_metric or "accuracy"
    other = "f1" if metric == "accuracy" else "perplexity"
    files: dict[str, bytes] = {}
    views: list[ExperimentView] = []
    for exp in sorted({r.experiment for r in res.runs}):
        runs = [r for r in res.runs if r.experiment == exp]
        groups = []
        for g in (x for x in res.groups if x.experiment == exp):
            m, o = g.metrics.get(metric), g.metrics.get(other)
            parts = g.technique.split("+")
            groups.append({"rank": g.rank, "label": g.label, "links": [p for p in parts if p in known], "technique": g.technique,
                           "seeds": len(g.runs), "lr": g.runs[0].lr, "metric": m, "other": o, "trainable": g.trainable,
                           "pct": g.trainable_pct, "ms": 1000 * g.step_time.mean if g.step_time else None,
                           "ms_std": 1000 * g.step_time.std if g.step_time else None,
                           "mib": g.peak_memory.mean / 2**20 if g.peak_memory else None})
        rows = [{"label": r.label, "seed": r.seed, "lr": r.lr, "status": r.status, "step": r.step, "total": r.total_steps,
                 "metric": r.final.get(metric), "other": r.final.get(other), "ms": 1000 * r.step_time if r.step_time else None,
                 "wall": r.wall_time, "id": r.id}
                for r in sorted(runs, key=lambda r: (r.label, r.seed, r.lr))]
        view = ExperimentView(exp, metric, other, res.higher_is_better, _setup(configs.get(exp, {}), sorted({r.seed for r in runs})),
                              groups, rows, unfinished=sum(r.status != "done" for r in runs))
        for name, svg in plots.get(exp, {}).items():
            path = f"results/{exp}/{name}.svg"
            files[path] = svg
            view.plots.append((name, path, PLOTS[name]))
        views.append(view)
    return views, files


def results_pages(ctx: SiteContext) -> Iterable[Page]:
    """``results.html`` and ``results/<experiment>/*.svg``: the experiments of ``--results DIR``."""
    views, files = results_views(ctx)
    yield ctx.render("results.html", "results.html", title="Experiment results", section="results", experiments=views, wide=True)
    for path, svg in sorted(files.items()):
        yield Page(path, svg)
