"""Fresh-process time of ``pefref list`` / ``show`` / ``params``: this checkout vs another (``--before DIR``), paired.

Each round runs every command once per checkout, in rotating order (paired
round-robin), with bytecode caching on and pefref's parsed-catalog cache warm
(one untimed run of each first); the table gives medians and the per-round
ratio this/before (median, IQR), and the load average.

Run: ``python benchmarks/bench_cli.py --before /tmp/before [--rounds 5] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"list": ["list"], "show": ["show", "lora"], "params": ["params", "lora", "--model", "llama-2-7b"]}


def run(root: Path, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PEFREF_NO_CACHE")}
    env["PYTHONPATH"] = str(root)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pefref", *args], cwd=root, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sides = {"now": ROOT, "before": args.before.resolve()}
    for root in sides.values():
        for cmd in COMMANDS.values():
            run(root, cmd)
    load0 = os.getloadavg()
    times = {(c, s): [] for c in COMMANDS for s in sides}  # type: dict[tuple[str, str], list[float]]
    for r in range(args.rounds):
        for c, cmd in COMMANDS.items():
            for s in (("now", "before") if r % 2 == 0 else ("before", "now")):
                times[(c, s)].append(run(sides[s], cmd))
    out: dict[str, object] = {"load_average": {"start": load0, "end": os.getloadavg()}, "rounds": args.rounds}
    print(f"load average {load0} at the start, {os.getloadavg()} at the end")
    print("| command | now (s, median) | before (s, median) | ratio now/before [IQR] |\n|---|---:|---:|---:|")
    for c in COMMANDS:
        ratios = [a / b for a, b in zip(times[(c, "now")], times[(c, "before")])]
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        now, before = statistics.median(times[(c, "now")]), statistics.median(times[(c, "before")])
        out[c] = {"now_s": now, "before_s": before, "ratio": {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}}
        print(f"| {' '.join(COMMANDS[c])} | {now:.3f} | {before:.3f} | {statistics.median(ratios):.3f} [{q[0]:.3f}-{q[2]:.3f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
