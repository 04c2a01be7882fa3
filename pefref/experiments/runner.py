"""Run a whole experiment: every run of the grid in order, skipping finished ones, resuming an interrupted one.

Ctrl-C asks the current run to stop at its next step boundary: it writes a
checkpoint, marks the run ``interrupted`` and the command exits; finished runs
are already in the database. A second Ctrl-C stops at once (the last
checkpoint still resumes the run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pefref.experiments.distributed import broadcast, init, launched
from pefref.experiments.grid import RunSpec, expand, load_experiment
from pefref.experiments.records import Records
from pefref.experiments.train import RunEnv, StopFlag, train_run
from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError

__all__ = ["Outcome", "default_output", "run_experiment"]


@dataclass
class Outcome:
    """What one invocation did: runs finished now, skipped (already done), failed, and whether it was interrupted."""

    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: str | None = None
    seconds: float = 0.0


def default_output(path: str | Path) -> Path:
    """``results/<experiment file stem>`` in the working folder."""
    return Path("results") / Path(path).stem


@contextlib.contextmanager
def _sigint(flag: StopFlag) -> Iterator[None]:
    """First Ctrl-C sets the flag; the second one raises KeyboardInterrupt (only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def run_experiment(path: str | Path, out: str | Path | None = None, *, progress: bool = True, only: str | None = None,
                   seeds: list[int] | None = None, jobs: int = 1, on_step: Callable[[int], None] | None = None,
                   echo: Callable[[str], None] | None = None, _worker: tuple[int, int, Any] | None = None) -> Outcome:
    """Run (or continue) every run of the experiment at ``path``, recording into ``out/results.sqlite``.

    Args:
        path: the experiment YAML file.
        out: output folder (default :func:`default_output`).
        progress: show a rich progress bar.
        only: run only the runs whose label contains this text.
        seeds: run only these seeds (the runs keep their ids: a later full run skips them).
        jobs: train this many runs at once, each in its own process with ``cores / jobs`` threads (CPU).
        on_step: called with the step number after each optimizer step (tests use it).
        echo: where to print one line per run (default: nowhere).
    """
    exp, _pos = load_experiment(path)
    runs = expand(exp, path)
    if only:
        runs = [r for r in runs if only in r.label]
    if seeds:
        runs = [r for r in runs if r.seed in seeds]
    out = Path(out) if out is not None else default_output(path)
    if _worker is None and jobs > 1 and not launched():
        return _run_parallel(path, out, runs, jobs, only, seeds, progress, echo)
    _check_device(path, exp.training.device)  # before anything is recorded
    d = init(exp.training.device if exp.training.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if exp.training.threads and not torch.cuda.is_available():
        torch.set_num_threads(exp.training.threads)
    elif _worker is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _worker[1]))
    records = Records(out) if d.main else None
    stop = StopFlag()
    env = RunEnv(Path(path).resolve().parent, out, exp.data, exp.training, default_catalog(), records, d, stop, on_step=on_step)
    outcome = Outcome(out)
    t0 = time.perf_counter()
    say = echo if (echo and d.main) else (lambda s: None)
    try:
        with _sigint(stop), _progress(progress and d.main, len(runs)) as bar:
            for i, spec in _assigned(runs, _worker[2] if _worker is not None else None):
                row = records.run(spec.id) if records else None
                row = broadcast(row, d)
                if row and row["status"] == "done":
                    outcome.skipped.append(spec.id)
                    bar.skip(spec)
                    continue
                env.progress = bar.start(spec, i)
                try:
                    status = train_run(spec, env)
                except KeyboardInterrupt:
                    if records:
                        records.upsert(spec.id, status="interrupted")
                    outcome.interrupted = spec.id
                    raise
                except Exception as e:  # a failed run is recorded; the others go on
                    if d.active:
                        raise
                    if records:
                        records.upsert(spec.id, **_identity(spec), status="failed", error=f"{type(e).__name__}: {e}")
                    outcome.failed.append((spec.id, f"{type(e).__name__}: {e}"))
                    say(f"failed  {spec.label} seed={spec.seed}: {type(e).__name__}: {e}")
                    continue
                if status == "interrupted":
                    outcome.interrupted = spec.id
                    say(f"interrupted {spec.label} seed={spec.seed}; rerun the same command to resume")
                    break
                outcome.done.append(spec.id)
                bar.finish(spec)
    except KeyboardInterrupt:
        say("stopped; rerun the same command to resume")
    finally:
        outcome.seconds = time.perf_counter() - t0
        if records:
            records.close()
    return outcome


def _assigned(runs: list[RunSpec], queue: Any) -> Iterator[tuple[int, RunSpec]]:
    """Every run in order, or (a worker of ``--jobs``) the runs whose indices this worker takes from the shared queue."""
    if queue is None:
        yield from enumerate(runs)
        return
    while (i := queue.get()) is not None:
        yield i, runs[i]


def _work(path: str, out: str, only: str | None, seeds: list[int] | None, worker: tuple[int, int, Any]) -> None:
    run_experiment(path, out, progress=False, only=only, seeds=seeds, _worker=worker)


def _check_device(path: str | Path, device: str) -> None:
    """A device the experiment names must exist on this machine."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (index and int(index) >= n):
            raise PefrefError(f"{path}: training.device: {device!r}: this machine has {n} CUDA device(s); use 'auto' or 'cpu'")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PefrefError(f"{path}: training.device: 'mps' is not available on this machine; use 'auto' or 'cpu'")


def _run_parallel(path: str | Path, out: Path, runs: list[RunSpec], jobs: int, only: str | None, seeds: list[int] | None,
                  progress: bool, echo: Callable[[str], None] | None) -> Outcome:
    """Train the runs in ``jobs`` worker processes, each taking the next run not yet taken; the database collects them.

    Ctrl-C reaches every worker (one process group); each stops its run at the next step boundary.
    """
    import multiprocessing

    t0 = time.perf_counter()
    Records(out).close()  # create the database before the workers race to
    before = _statuses(out, runs)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for i, r in enumerate(runs):
        if before.get(r.id) != "done":
            queue.put(i)
    for _ in range(jobs):
        queue.put(None)
    procs = [ctx.Process(target=_work, args=(str(path), str(out), only, seeds, (i, jobs, queue))) for i in range(jobs)]
    for p in procs:
        p.start()
    flag = StopFlag()
    with _sigint(flag), _progress(progress, len(runs)) as bar:
        shown = 0
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=1.0 / len(procs))
            done = sum(s == "done" for s in _statuses(out, runs).values())
            for _ in range(done - shown):
                bar.finish(runs[0])
            shown = max(shown, done)
    after = _statuses(out, runs)
    outcome = Outcome(out, seconds=time.perf_counter() - t0)
    rec = Records(out)
    try:
        for r in runs:
            st = after.get(r.id)
            if before.get(r.id) == "done":
                outcome.skipped.append(r.id)
            elif st == "done":
                outcome.done.append(r.id)
            elif st == "failed":
                outcome.failed.append((r.id, str((rec.run(r.id) or {}).get("error"))))
            elif (st in ("interrupted", "running") and outcome.interrupted is None) or (st is None and outcome.interrupted is None and flag.requested):
                outcome.interrupted = r.id
    finally:
        rec.close()
    if echo:
        for rid, err in outcome.failed:
            echo(f"failed {rid}: {err}")
    if any(p.exitcode not in (0, None) for p in procs) and not outcome.failed and outcome.interrupted is None:
        outcome.failed.append(("-", f"a worker process exited with status {[p.exitcode for p in procs]}"))
    return outcome


def _statuses(out: Path, runs: list[RunSpec]) -> dict[str, str]:
    rec = Records(out)
    try:
        return {r.id: row["status"] for r in runs if (row := rec.run(r.id))}
    finally:
        rec.close()


def _identity(spec: RunSpec) -> dict[str, Any]:
    cfg = spec.config
    tech = cfg.get("baseline") or (cfg["composition"]["id"] if "composition" in cfg else "+".join(Path(u["technique"]).stem for u in cfg.get("compose", [])))
    return {"experiment": cfg["experiment"], "label": spec.label, "technique": tech, "seed": spec.seed, "lr": spec.lr, "config": cfg}


class _NoBar:
    def start(self, spec: RunSpec, i: int) -> Callable[[int, int], None] | None:
        return None

    def skip(self, spec: RunSpec) -> None:
        return None

    def finish(self, spec: RunSpec) -> None:
        return None


class _Bar(_NoBar):
    def __init__(self, progress: Any, n: int) -> None:
        self.p = progress
        self.overall = progress.add_task("runs", total=n)
        self.current: Any = None

    def start(self, spec: RunSpec, i: int) -> Callable[[int, int], None]:
        if self.current is not None:
            self.p.remove_task(self.current)
        self.current = self.p.add_task(f"{spec.label} seed={spec.seed}", total=None)

        def advance(step: int, total: int) -> None:
            self.p.update(self.current, completed=step, total=total)
        return advance

    def skip(self, spec: RunSpec) -> None:
        self.p.advance(self.overall)

    def finish(self, spec: RunSpec) -> None:
        self.p.advance(self.overall)


@contextlib.contextmanager
def _progress(enabled: bool, n: int) -> Iterator[_NoBar]:
    if not enabled:
        yield _NoBar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as p:
        yield _Bar(p, n)
