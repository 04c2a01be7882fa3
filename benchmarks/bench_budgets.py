"""Budgets the test suite used to assert as durations, measured here as ratios against a baseline on the same machine.

Each pair is timed in rounds, the two sides in alternating order (so load on a
shared machine hits both alike); the table gives the median of the per-round
ratios and each side's median time:

* *catalog*: loading and checking the whole catalog (uncached) against only
  parsing its YAML files (``yaml.safe_load``): what the checks cost over reading.
* *params 70B*: the analytic count of LoRA on ``llama-3-70b`` against the same on
  ``tiny-llama``: about 1 when no model is built, whatever its size.
* *diagrams*: graph and DOT of every catalog technique against rendering them to
  SVG through graphviz's ``dot`` (CPU time of this process and its children).
* *params CLI*: ``pefref params lora --model llama-3-70b --json`` in a fresh
  process against a fresh ``python -c "import torch"`` (what pefref adds to the
  import it cannot avoid).

Run: ``python benchmarks/bench_budgets.py [--rounds 5] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu() -> float:
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def paired(a: Callable[[], object], b: Callable[[], object], rounds: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of ``a`` and ``b`` and the median of the per-round ratios a/b (alternating which goes first)."""
    a(), b()  # warm: imports, caches of the interpreter
    ta, tb = [], []
    for i in range(rounds):
        if i % 2:
            tb.append(_timed(b, clock))
            ta.append(_timed(a, clock))
        else:
            ta.append(_timed(a, clock))
            tb.append(_timed(b, clock))
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb), "ratio": statistics.median(x / y for x, y in zip(ta, tb))}


def bench_catalog(rounds: int) -> dict[str, float]:
    import yaml

    from pefref.language.catalog import catalog_root, load_catalog

    files = sorted(p for p in catalog_root().rglob("*.yaml") if "experiments" not in p.parts)
    return paired(load_catalog, lambda: [yaml.safe_load(p.read_text(encoding="utf-8")) for p in files], rounds)


def bench_params(rounds: int) -> dict[str, float]:
    from pefref.language.catalog import default_catalog
    from pefref.view.params import count_params

    cat = default_catalog()
    lora = cat.technique("lora")
    return paired(lambda: count_params(lora, cat.shape("llama-3-70b"), cat), lambda: count_params(lora, cat.shape("tiny-llama"), cat), rounds)


def bench_diagrams(rounds: int) -> dict[str, float]:
    from pefref.language.catalog import default_catalog
    from pefref.render.diagram import technique_graph, to_dot
    from pefref.render.dot import render_many

    cat = default_catalog()
    techniques = [cat.techniques[k] for k in sorted(cat.techniques)]
    dots = [to_dot(technique_graph(cat, [t])) for t in techniques]
    return paired(lambda: [to_dot(technique_graph(cat, [t])) for t in techniques], lambda: render_many(dots, "svg"), rounds, _cpu)


def bench_cli(rounds: int) -> dict[str, float]:
    cli = [sys.executable, "-c", "from pefref.cli.app import app; app()", "params", "lora", "--model", "llama-3-70b", "--json"]
    bare = [sys.executable, "-c", "import torch"]
    return paired(lambda: subprocess.run(cli, check=True, capture_output=True, cwd=ROOT),
                  lambda: subprocess.run(bare, check=True, capture_output=True, cwd=ROOT), rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = {
        "catalog (load+check / parse)": bench_catalog(args.rounds),
        "params 70B (llama-3-70b / tiny-llama)": bench_params(args.rounds),
        "diagrams CPU (graph+DOT / dot)": bench_diagrams(args.rounds),
        "params CLI (fresh pefref / fresh import torch)": bench_cli(args.rounds),
    }
    print(f"{'pair':48} {'a (s)':>9} {'b (s)':>9} {'a/b':>7}")
    for name, r in rows.items():
        print(f"{name:48} {r['a_s']:9.4f} {r['b_s']:9.4f} {r['ratio']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
