"""Read an experiment's results database: every run, and runs aggregated over seeds (mean ± std), ranked.

These are the view models of ``pefref results`` (text, JSON, CSV), of the plots
and of the site's results pages.
"""

from __future__ import annotations

import csv
import io
import math
import sqlite3
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pefref.experiments.records import DB_NAME, Records
from pefref.language.errors import PefrefError

__all__ = ["Group", "Results", "RunRow", "groups_csv", "load_results", "runs_csv"]


@dataclass
class RunRow:
    """One run as the results show it."""

    id: str
    experiment: str
    label: str
    technique: str
    seed: int
    lr: float
    status: str
    step: int
    total_steps: int | None
    trainable: int | None
    trainable_pct: float | None
    main_metric: str | None
    metrics: dict[str, Any]
    step_time: float | None
    peak_memory: int | None
    memory_source: str | None
    wall_time: float | None
    hyperparameters: Any = None
    curve: list[tuple[int, str, dict[str, float]]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return dict(self.metrics.get("final") or {})

    @property
    def diverged(self) -> bool:
        """Whether a metric of the run (final, or any point of its curve) is NaN or infinite."""
        values = [*_floats(self.metrics), *(v for _s, _split, ms in self.curve for v in _floats(ms))]
        return any(not math.isfinite(v) for v in values)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("curve")
        d.pop("config")
        d["diverged"] = self.diverged
        return d


def _floats(obj: Any) -> list[float]:
    """Every float in nested dicts and lists."""
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _floats(v)]
    if isinstance(obj, (list, tuple)):
        return [f for v in obj for f in _floats(v)]
    return []


@dataclass
class Mean:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(xs: list[float]) -> Mean | None:
        xs = [x for x in xs if x is not None and not math.isnan(x)]
        if not xs:
            return None
        return Mean(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))

    def text(self, fmt: str = ".3f") -> str:
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}"


@dataclass
class Group:
    """The runs of one label (technique, composition or baseline with its hyperparameters) over seeds."""

    experiment: str
    label: str
    technique: str
    rank: int
    runs: list[RunRow]
    metrics: dict[str, Mean]
    trainable: int | None
    trainable_pct: float | None
    step_time: Mean | None
    peak_memory: Mean | None

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "label": self.label, "technique": self.technique, "rank": self.rank,
                "seeds": sorted(r.seed for r in self.runs), "runs": [r.id for r in self.runs],
                "metrics": {k: asdict(v) for k, v in self.metrics.items()}, "trainable": self.trainable,
                "trainable_pct": self.trainable_pct, "step_time": asdict(self.step_time) if self.step_time else None,
                "peak_memory": asdict(self.peak_memory) if self.peak_memory else None}


@dataclass
class Results:
    """Every run of a results folder and their aggregates, ranked by the main metric (best first)."""

    folder: Path
    runs: list[RunRow]
    groups: list[Group]

    @property
    def main_metric(self) -> str | None:
        return next((r.main_metric for r in self.runs if r.main_metric), None)

    @property
    def higher_is_better(self) -> bool:
        return self.main_metric not in ("loss", "perplexity")

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "main_metric": self.main_metric, "runs": [r.as_dict() for r in self.runs],
                "groups": [g.as_dict() for g in self.groups]}


def load_results(folder: str | Path) -> Results:
    """Read ``folder/results.sqlite`` (runs of any status; aggregates use finished runs only)."""
    folder = Path(folder)
    if not (folder / DB_NAME).is_file():
        raise PefrefError(f"no {DB_NAME} in {str(folder)!r}: run an experiment with `pefref run EXPERIMENT.yaml -o {folder}` first")
    rec = Records(folder, read_only=True)  # reading writes nothing (no table, no journal mode)
    try:
        steps: dict[str, list[tuple[int, str, dict[str, float]]]] = {}
        for s in rec.steps():
            steps.setdefault(s["run_id"], []).append((s["step"], s["split"], s["metrics"]))
        runs = [RunRow(r["id"], r["experiment"], r["label"], r["technique"], r["seed"], r["lr"], r["status"], r["step"] or 0,
                       r["total_steps"], r["trainable"], r["trainable_pct"], r["main_metric"],
                       {"final": r["final_metrics"], "best": r["best_metrics"], "best_step": r["best_step"]},
                       r["step_time"], r["peak_memory"], r["memory_source"], r["wall_time"], r["hyperparameters"], steps.get(r["id"], []), r["config"] or {})
                for r in rec.runs()]
    except sqlite3.DatabaseError as e:
        raise PefrefError(f"{folder / DB_NAME}: the results database is damaged ({e}); move it away and rerun the experiment") from None
    finally:
        rec.close()
    return Results(folder, runs, _groups(runs))


def _groups(runs: list[RunRow]) -> list[Group]:
    by: dict[tuple[str, str], list[RunRow]] = {}
    for r in runs:
        if r.status == "done":
            by.setdefault((r.experiment, r.label), []).append(r)
    groups: list[Group] = []
    for (exp, label), rs in by.items():
        names = sorted({k for r in rs for k in r.final})
        metrics = {k: m for k in names if (m := Mean.of([r.final.get(k) for r in rs])) is not None}  # type: ignore[misc]
        groups.append(Group(exp, label, rs[0].technique, 0, sorted(rs, key=lambda r: r.seed), metrics, rs[0].trainable, rs[0].trainable_pct,
                            Mean.of([r.step_time for r in rs if r.step_time is not None]),
                            Mean.of([float(r.peak_memory) for r in rs if r.peak_memory is not None])))
    main = next((r.main_metric for r in runs if r.main_metric), None)
    higher = main not in ("loss", "perplexity")

    def key(g: Group) -> tuple[Any, ...]:
        m = g.metrics.get(main or "")
        v = m.mean if m else (-math.inf if higher else math.inf)
        return (g.experiment, -v if higher else v, g.trainable or 0, g.label)
    groups.sort(key=key)
    for exp in {g.experiment for g in groups}:
        for i, g in enumerate(x for x in groups if x.experiment == exp):
            g.rank = i + 1
    return groups


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def runs_csv(res: Results) -> str:
    """One CSV line per run, final metrics as columns."""
    names = sorted({k for r in res.runs for k in r.final})
    rows = [{"experiment": r.experiment, "label": r.label, "technique": r.technique, "seed": r.seed, "lr": r.lr, "status": r.status,
             "step": r.step, "trainable": r.trainable, "trainable_pct": r.trainable_pct,
             **{k: r.final.get(k) for k in names}, "step_time": r.step_time, "peak_memory": r.peak_memory, "wall_time": r.wall_time, "id": r.id}
            for r in res.runs]
    return _csv(rows)


def groups_csv(res: Results) -> str:
    """One CSV line per aggregate (mean and std columns per metric)."""
    names = sorted({k for g in res.groups for k in g.metrics})
    rows = []
    for g in res.groups:
        row: dict[str, Any] = {"experiment": g.experiment, "rank": g.rank, "label": g.label, "technique": g.technique, "seeds": len(g.runs),
                               "trainable": g.trainable, "trainable_pct": g.trainable_pct}
        for k in names:
            m = g.metrics.get(k)
            row[f"{k}_mean"], row[f"{k}_std"] = (m.mean, m.std) if m else (None, None)
        row["step_time_mean"] = g.step_time.mean if g.step_time else None
        row["peak_memory_mean"] = g.peak_memory.mean if g.peak_memory else None
        rows.append(row)
    return _csv(rows)
