"""SVG plots of an experiment's results (matplotlib, Agg, deterministic output).

* ``metric_vs_params.svg``: main metric (mean ± std over seeds; the value alone with one seed) against trainable
  parameters (log scale, ticks spanning the runs), with the Pareto front; the run labels in a legend beside the axes;
* ``curves.svg``: evaluation metric and training loss (smoothed, the raw loss faint beneath) against steps, one
  line per label (mean over seeds), the legend under the axes;
* ``cost.svg``: step time and memory per label.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pefref.experiments.results import Group, Results
from pefref.language.atomic import atomic_write_bytes

__all__ = ["PLOTS", "SMOOTHING", "experiment_plots", "pareto_front", "plot_svgs", "write_plots"]


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


SMOOTHING = 0.6
"""Weight of the past in the training loss's exponential moving average (the raw loss is drawn faintly beneath)."""


def _compact(x: float) -> str:
    """A tick label: 150k, 2.6M, 40."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round values spanning [lo, hi] (one below and one above included): 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k over
    a short range, 1, 2, 5 × 10^k over a longer one, powers of ten beyond three decades; at most ``most``."""
    import math

    span = math.log10(hi / lo)
    steps: tuple[float, ...] = (1,) if span > 3 else (1, 2, 5) if span > 1.2 else (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8)
    cands = [m * 10**k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1) for m in steps]
    below = [c for c in cands if c < lo]
    above = [c for c in cands if c > hi]
    ticks = below[-1:] + [c for c in cands if lo <= c <= hi] + above[:1]
    while len(ticks) > most:
        ticks = ticks[::2]
    return ticks


def _seeds_text(groups: list[Group], metric: str) -> str:
    ns = sorted({g.metrics[metric].n for g in groups})
    if ns == [1]:
        return "one seed (n=1)"
    return f"mean ± std over {ns[0]} seeds" if len(ns) == 1 else f"mean ± std over {ns[0]}–{ns[-1]} seeds"


def _metric_vs_params(res: Results, groups: list[Group]) -> bytes:
    """Each run label as a point (error bar where there are several seeds), the Pareto front, a log x axis whose
    ticks span the runs' range; the labels are in a legend beside the axes, not on the data."""
    plt = _fig()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    metric = res.main_metric or "accuracy"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pts = [(float(g.trainable or 1), g.metrics[metric].mean) for g in groups]
    markers = "osD^vP*Xh<>p"
    for k, (g, (x, y)) in enumerate(zip(groups, pts)):
        m = g.metrics[metric]
        ax.errorbar([x], [y], yerr=[m.std] if m.n > 1 else None, fmt=markers[k % len(markers)], capsize=3, markersize=6,
                    label=f"{g.label} (n={m.n})")
    front = pareto_front(pts, res.higher_is_better)
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="grey", zorder=0, label="Pareto front")
    ax.set_xscale("log")
    xs = [x for x, _ in pts]
    lo, hi = min(xs), max(xs)
    ticks = _log_ticks(lo / 1.05, hi * 1.05)
    ax.set_xlim(min(ticks[0], lo / 1.15), max(ticks[-1], hi * 1.15))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _compact(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} ({_seeds_text(groups, metric)})")
    ax.set_title(f"{groups[0].experiment}: {metric} against trainable parameters")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, title="run (seeds)", title_fontsize=8)
    return _svg(fig)


def _ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def _mean_curve(g: Group, split: str, key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in g.runs:
        for step, s, m in r.curve:
            if s == split and key in m:
                by_step.setdefault(step, []).append(m[key])
    xs = sorted(by_step)
    return xs, [sum(by_step[x]) / len(by_step[x]) for x in xs]


def _curves(res: Results, groups: list[Group]) -> bytes:
    """Evaluation metric (points where evaluated) and training loss (smoothed; the raw loss faint beneath) against
    optimizer steps, mean over seeds; one legend under both axes."""
    plt = _fig()
    from matplotlib.ticker import MaxNLocator

    metric = res.main_metric or "accuracy"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, labels = [], []
    evaluated: set[int] = set()
    for k, g in enumerate(groups):
        c = colours[k % len(colours)]
        xs, ys = _mean_curve(g, "eval", metric)
        line = None
        if xs:
            (line,) = a1.plot(xs, ys, color=c, marker="o", markersize=3)
            evaluated.update(xs)
        xs, ys = _mean_curve(g, "train", "loss")
        if xs:
            a2.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
            (line,) = a2.plot(xs, _ema(ys), color=c, linewidth=1.6)
        if line is not None:
            handles.append(line)
            labels.append(g.label)
    a1.set_title(f"evaluation {metric}")
    a1.set_ylabel(metric)
    a2.set_title(f"training loss (smoothed, EMA {SMOOTHING}; raw faint)")
    a2.set_ylabel("loss")
    for ax in (a1, a2):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if 0 < len(evaluated) <= 12:  # ticks where the evaluations are
        a1.set_xticks(sorted(evaluated))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.18 + 0.05 * ((len(labels) - 1) // 5))
    return _svg(fig)


def _cost(groups: list[Group]) -> bytes:
    """Step time (± std where several seeds) and training memory, one bar per run label."""
    plt = _fig()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.5 + 0.35 * len(groups) + 1.5))
    labels = [g.label for g in groups]
    ys = list(range(len(groups)))
    several = any(g.step_time and g.step_time.n > 1 for g in groups)
    a1.barh(ys, [1000 * g.step_time.mean if g.step_time else 0 for g in groups],
            xerr=[1000 * g.step_time.std if g.step_time and g.step_time.n > 1 else 0 for g in groups] if several else None)
    a2.barh(ys, [g.peak_memory.mean / 2**20 if g.peak_memory else 0 for g in groups])
    a1.set_yticks(ys, labels, fontsize=8)
    a2.set_yticks(ys, [""] * len(ys))
    a1.set_ylabel("run")
    a1.set_xlabel("ms per optimizer step" + (" (mean ± std over seeds)" if several else ""))
    a2.set_xlabel("training memory, MiB")
    for ax in (a1, a2):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


PLOTS = {"metric_vs_params": "main metric against trainable parameters, with the Pareto front",
         "curves": "evaluation metric and training loss (smoothed; the raw loss faint) against optimizer steps (mean over seeds)",
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
