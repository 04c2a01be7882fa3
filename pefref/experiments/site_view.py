"""An experiment folder's results as the site's view model (:class:`~pefref.render.site.resultsview.ResultsView`).

The caller of the site build (``pefref site --results DIR``) builds it here and
passes it to :func:`pefref.render.site.build.site_files`: the experiments layer
reads its own results (:func:`~pefref.experiments.results.load_results`) and draws
its plots (:mod:`pefref.experiments.plots`); rendering only formats the view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pefref.experiments.plots import PLOTS, experiment_plots
from pefref.experiments.results import Group, Mean, Results, RunRow, load_results
from pefref.render.site.resultsview import ExperimentView, Fact, GroupLine, Plot, ResultsView, RunLine, Spread

__all__ = ["results_view"]


def _model_text(model: dict[str, Any]) -> str:
    for key in ("package", "shape", "path"):
        if key in model:
            return f"{key} {model[key]}" if key != "path" else "local checkpoint"
    return "-"


def _setup(cfg: dict[str, Any], seeds: list[int]) -> list[Fact]:
    tr = cfg.get("training", {})
    length = f"{tr['max_steps']} steps" if tr.get("max_steps") else f"{tr.get('epochs')} epochs"
    return [Fact("model", _model_text(cfg.get("model", {}))),
            Fact("task", f"{cfg.get('task', {}).get('type', '-')}, max {cfg.get('task', {}).get('max_length', '-')} tokens"),
            Fact("training", f"batch {tr.get('batch_size', '-')}, {length}, {tr.get('schedule', '-')} schedule, warmup {tr.get('warmup', '-')}"
                             + (f", head lr {tr['head_lr']:g}" if tr.get("head_lr") else "")),
            Fact("seeds", ", ".join(map(str, seeds)))]


def _spread(m: Mean | None) -> Spread | None:
    return None if m is None else Spread(m.mean, m.std)


def _group_line(g: Group, metric: str, other: str) -> GroupLine:
    return GroupLine(rank=g.rank, label=g.label, techniques=tuple(g.technique.split("+")), seeds=len(g.runs), lr=g.runs[0].lr,
                     metric=_spread(g.metrics.get(metric)), other=_spread(g.metrics.get(other)), trainable=g.trainable,
                     pct=g.trainable_pct, ms=1000 * g.step_time.mean if g.step_time else None,
                     ms_std=1000 * g.step_time.std if g.step_time else None,
                     mib=g.peak_memory.mean / 2**20 if g.peak_memory else None)


def _run_line(r: RunRow, metric: str, other: str) -> RunLine:
    return RunLine(label=r.label, seed=r.seed, lr=r.lr, status=r.status, step=r.step, total=r.total_steps,
                   metric=r.final.get(metric), other=r.final.get(other), ms=1000 * r.step_time if r.step_time else None,
                   wall=r.wall_time, id=r.id)


def results_view(results: str | Path | Results) -> ResultsView:
    """The site's view of a results folder (or of results already loaded): every experiment, its ranking, runs and plots.

    Raises:
        PefrefError: the folder holds no results database.
    """
    res = results if isinstance(results, Results) else load_results(results)
    configs: dict[str, dict[str, Any]] = {}
    for r in res.runs:
        configs.setdefault(r.experiment, r.config)
    plots = experiment_plots(res)
    metric = res.main_metric or "accuracy"
    other = "f1" if metric == "accuracy" else "perplexity"
    views: list[ExperimentView] = []
    for exp in sorted({r.experiment for r in res.runs}):
        runs = [r for r in res.runs if r.experiment == exp]
        views.append(ExperimentView(
            exp, metric, other, res.higher_is_better, _setup(configs.get(exp, {}), sorted({r.seed for r in runs})),
            [_group_line(g, metric, other) for g in res.groups if g.experiment == exp],
            [_run_line(r, metric, other) for r in sorted(runs, key=lambda r: (r.label, r.seed, r.lr))],
            [Plot(name, f"results/{exp}/{name}.svg", PLOTS[name], svg) for name, svg in plots.get(exp, {}).items()],
            unfinished=sum(r.status != "done" for r in runs)))
    return ResultsView(views)
