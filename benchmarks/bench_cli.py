"""Fresh-process time of ``pefref list`` / ``show`` / ``params``: this checkout alone, or against another (``--before DIR``), paired.

Each round runs every command once per checkout, in rotating order (paired
round-robin), with bytecode caching on and pefref's parsed-catalog cache warm
(one untimed run of each first); the table gives medians of the wall time and
of the child's CPU time (user + system, from ``resource.getrusage``: what the
command computed, which waiting for a core on a loaded machine does not add
to), the per-round ratios this/before of both (median, IQR), and the load average.

Run: ``python benchmarks/bench_cli.py [--before /tmp/before] [--rounds 5] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"list": ["list"], "show": ["show", "lora"], "params": ["params", "lora", "--model", "llama-2-7b"]}


def run(root: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh ``python -m pefref ARGS`` in ``root``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PEFREF_NO_CACHE")}
    env["PYTHONPATH"] = str(root)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pefref", *args], cwd=root, env=env, check=True, capture_output=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _iqr(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return [q[0], statistics.median(xs), q[2]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="another checkout to time in the same rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sides = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    for root in sides.values():
        for cmd in COMMANDS.values():
            run(root, cmd)
    load0 = os.getloadavg()
    wall: dict[tuple[str, str], list[float]] = {(c, s): [] for c in COMMANDS for s in sides}
    cpu: dict[tuple[str, str], list[float]] = {(c, s): [] for c in COMMANDS for s in sides}
    for r in range(args.rounds):
        for c, cmd in COMMANDS.items():
            for s in list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]:
                w, u = run(sides[s], cmd)
                wall[(c, s)].append(w)
                cpu[(c, s)].append(u)
    out: dict[str, object] = {"load_average": {"start": load0, "end": os.getloadavg()}, "rounds": args.rounds}
    print(f"load average {load0} at the start, {os.getloadavg()} at the end")
    print("| command | side | wall s [IQR] | CPU s [IQR] | wall ratio now/before [IQR] | CPU ratio now/before [IQR] |\n|---|---|---:|---:|---:|---:|")
    for c in COMMANDS:
        rec: dict[str, object] = {}
        for s in sides:
            w, u = _iqr(wall[(c, s)]), _iqr(cpu[(c, s)])
            rec[s] = {"wall_s": w, "cpu_s": u}
            ratio = _iqr([a / b for a, b in zip(wall[(c, "now")], wall[(c, "before")])]) if s == "before" else None
            cratio = _iqr([a / b for a, b in zip(cpu[(c, "now")], cpu[(c, "before")])]) if s == "before" else None
            if ratio and cratio:
                rec["ratio"] = {"median": ratio[1], "q1": ratio[0], "q3": ratio[2]}
                rec["cpu_ratio"] = {"median": cratio[1], "q1": cratio[0], "q3": cratio[2]}
            print(f"| {' '.join(COMMANDS[c])} | {s} | {w[1]:.3f} [{w[0]:.3f}-{w[2]:.3f}] | {u[1]:.3f} [{u[0]:.3f}-{u[2]:.3f}] | "
                  + (f"{ratio[1]:.3f} [{ratio[0]:.3f}-{ratio[2]:.3f}] | {cratio[1]:.3f} [{cratio[0]:.3f}-{cratio[2]:.3f}]" if ratio and cratio else " |") + " |")
        out[c] = rec
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
