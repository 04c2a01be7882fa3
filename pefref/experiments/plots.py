"""SVG plots of an experiment's results (matplotlib, Agg, deterministic output).

* ``metric_vs_params.svg``: main metric (mean ± std over seeds) against trainable parameters (log scale), with the Pareto front;
* ``curves.svg``: evaluation metric and training loss against steps, one line per label (mean over seeds);
* ``cost.svg``: step time and memory per label.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pefref.experiments.results import Group, Results
from pefref.language.atomic import atomic_write_bytes

__all__ = ["PLOTS", "experiment_plots", "pareto_front", "plot_svgs", "write_plots"]


def pareto_front(points: list[tuple[float, float]], higher: bool = True) -> list[int]:
    """Indices of the points not dominated by another (fewer parameters and a better metric), by parameter count."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher else points[i][1]))
    front: list[int] = []
    best: float | None = None
    for i in order:
        v = points[i][1]
        if best is None or (v > best if higher else v < best):
            front.append(i)
            best = v
    return front


def _fig() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "pefref"
    plt.rcParams["svg.fonttype"] = "none"
    return plt


def _svg(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _metric_vs_params(res: Results, groups: list[Group]) -> bytes:
    plt = _fig()
    metric = res.main_metric or "accuracy"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(float(g.trainable or 1), g.metrics[metric].mean) for g in groups]
    for g, (x, y) in zip(groups, pts):
        m = g.metrics[metric]
        ax.errorbar([x], [y], yerr=[m.std], fmt="o", capsize=3)
        ax.annotate(g.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(pts, res.higher_is_better)
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="grey", label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{groups[0].experiment}: {metric} against trainable parameters")
    ax.grid(True, alpha=0.3)
    return _svg(fig)


def _curves(res: Results, groups: list[Group]) -> bytes:
    plt = _fig()
    metric = res.main_metric or "accuracy"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for g in groups:
        for ax, split, key in ((a1, "eval", metric), (a2, "train", "loss")):
            by_step: dict[int, list[float]] = {}
            for r in g.runs:
                for step, s, m in r.curve:
                    if s == split and key in m:
                        by_step.setdefault(step, []).append(m[key])
            if by_step:
                xs = sorted(by_step)
                ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], label=g.label, marker="o" if split == "eval" else None, markersize=3)
    a1.set_title(f"evaluation {metric}")
    a2.set_title("training loss")
    for ax in (a1, a2):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    a2.legend(fontsize=7, loc="best")
    return _svg(fig)


def _cost(groups: list[Group]) -> bytes:
    plt = _fig()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.5 + 0.35 * len(groups) + 1.5))
    labels = [g.label for g in groups]
    ys = list(range(len(groups)))
    a1.barh(ys, [1000 * g.step_time.mean if g.step_time else 0 for g in groups], xerr=[1000 * g.step_time.std if g.step_time else 0 for g in groups])
    a2.barh(ys, [g.peak_memory.mean / 2**20 if g.peak_memory else 0 for g in groups])
    a1.set_yticks(ys, labels, fontsize=8)
    a2.set_yticks(ys, [""] * len(ys))
    a1.set_xlabel("ms per optimizer step (mean ± std)")
    a2.set_xlabel("training memory, MiB")
    for ax in (a1, a2):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


PLOTS = {"metric_vs_params": "main metric against trainable parameters, with the Pareto front",
         "curves": "evaluation metric and training loss against optimizer steps (mean over seeds)",
         "cost": "time per optimizer step and training memory per run label"}
"""The plots of one experiment: name → what it shows."""


def experiment_plots(res: Results) -> dict[str, dict[str, bytes]]:
    """Experiment id → plot name (:data:`PLOTS`) → SVG bytes, for every experiment with finished runs."""
    out: dict[str, dict[str, bytes]] = {}
    for exp in sorted({g.experiment for g in res.groups}):
        groups = [g for g in res.groups if g.experiment == exp and (res.main_metric or "") in g.metrics]
        if groups:
            out[exp] = {"metric_vs_params": _metric_vs_params(res, groups), "curves": _curves(res, groups), "cost": _cost(groups)}
    return out


def plot_svgs(res: Results) -> dict[str, bytes]:
    """File name → SVG bytes for every plot (one set per experiment in the folder; names are prefixed when there are several)."""
    plots = experiment_plots(res)
    return {f"{exp}-{name}.svg" if len(plots) > 1 else f"{name}.svg": svg for exp, by in plots.items() for name, svg in by.items()}


def write_plots(res: Results, folder: Path | None = None) -> list[Path]:
    """Write the plots under ``folder`` (default: ``<results>/plots``); returns their paths."""
    folder = folder or res.folder / "plots"
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in plot_svgs(res).items():
        atomic_write_bytes(folder / name, data)
        paths.append(folder / name)
    return paths
