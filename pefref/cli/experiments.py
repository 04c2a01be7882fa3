"""``pefref run`` (train every run of an experiment) and ``pefref results`` (compare them)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from pefref.cli.app import _echo_json, _err, _wide, app

__all__ = ["results", "run"]


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="Experiment YAML file (the bundled ones are in catalog/experiments/)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder (default: results/<experiment file name>)."),
    only: str | None = typer.Option(None, "--only", help="Run only the runs whose label contains this text."),
    seed: list[int] | None = typer.Option(None, "--seed", help="Run only this seed (repeatable); the runs keep their ids, so a later full run skips them."),
    jobs: int = typer.Option(1, "-j", "--jobs", min=1, max=256, help="Train this many runs at once, each in its own process (CPU cores / jobs threads each)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train every run of an experiment into OUT/results.sqlite; a rerun skips finished runs and resumes an interrupted one.

    Under ``torchrun --nproc_per_node N -m pefref run ...`` the runs train with DDP (same global batch).
    """
    from pefref.experiments.runner import run_experiment

    con = _err()
    outcome = run_experiment(experiment, out, progress=progress, only=only, seeds=seed, jobs=jobs, echo=lambda s: con.print(Text(s)))
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    msg = (f"{len(outcome.done)} runs trained, {len(outcome.skipped)} already done, {len(outcome.failed)} failed "
           f"in {outcome.seconds:.1f} s; results: {outcome.out / 'results.sqlite'} (pefref results {outcome.out})")
    con.print(Text(msg))
    for rid, err in outcome.failed:
        con.print(Text(f"failed {rid}: {err}", style="red"))
    if outcome.interrupted:
        con.print(Text(f"interrupted during run {outcome.interrupted}; rerun the same command to resume it", style="yellow"))
        raise typer.Exit(130)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def results(
    folder: Path = typer.Argument(..., help="A results folder written by `pefref run`."),
    as_json: bool = typer.Option(False, "--json", help="Print every run and the aggregates as JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print one CSV line per run (with --groups: per aggregate)."),
    groups_only: bool = typer.Option(False, "--groups", help="With --csv: the aggregates instead of the runs."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write SVG plots into FOLDER/plots."),
) -> None:
    """Compare the runs of a results folder: every run, and the runs aggregated over seeds (mean ± std), ranked."""
    from pefref.experiments.plots import write_plots
    from pefref.experiments.results import groups_csv, load_results, runs_csv

    res = load_results(folder)
    written = write_plots(res) if plots else []
    if as_json:
        _echo_json({**res.as_dict(), "plots": [str(p) for p in written]})
        return
    if as_csv:
        typer.echo(groups_csv(res) if groups_only else runs_csv(res), nl=False)
        return
    metric = res.main_metric or "-"
    con = _wide()
    table = Table("rank", "run", "seeds", f"{metric}", "f1" if metric == "accuracy" else "perplexity", "trainable", "trainable %",
                  "ms/step", "memory MiB", title=f"{folder}: runs aggregated over seeds (mean ± std), ranked by {metric}")
    other = "f1" if metric == "accuracy" else "perplexity"
    for g in res.groups:
        m, o = g.metrics.get(metric), g.metrics.get(other)
        table.add_row(str(g.rank), Text(g.label), str(len(g.runs)), m.text() if m else "-", o.text() if o else "-",
                      f"{g.trainable:,}" if g.trainable is not None else "-", f"{g.trainable_pct:.3f}" if g.trainable_pct is not None else "-",
                      f"{1000 * g.step_time.mean:.0f}" if g.step_time else "-",
                      f"{g.peak_memory.mean / 2**20:.1f}" if g.peak_memory else "-")
    con.print(table)
    unfinished = [r for r in res.runs if r.status != "done"]
    if unfinished:
        con.print(Text(f"{len(unfinished)} runs not finished: " + ", ".join(f"{r.label} seed={r.seed} ({r.status})" for r in unfinished[:6])))
    sources = {r.memory_source for r in res.runs if r.memory_source}
    if "tensors" in sources:
        con.print(Text("memory: weights + gradients + optimizer state + activations saved for backward, measured on the first step (CPU)"))
    for p in written:
        con.print(Text(f"plot: {p}"))
