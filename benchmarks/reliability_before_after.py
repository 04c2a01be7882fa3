"""Evidence for the reliability work: which reliability tests fail on the code before it and pass now.

Checks out the commit before the first reliability commit (the parent of the first commit that added
``pefref/language/atomic.py``, unless ``--before`` names another) into a temporary git worktree, copies
the current reliability and fuzz test files (and their helper ``tests/modelstate.py``) into it, and runs
them there and in this tree. Each run is a subprocess with an address-space limit (the old code
allocates what it is asked to) and a watchdog: a test that makes no progress for ``--idle`` seconds is
killed, recorded as a hang and deselected, and the run goes on. A test that fails on the old code with
an ``ImportError`` (an API that did not exist; the tests import new APIs inside the test functions that
need them) counts as failing, in a column of its own, as does every test of a module that cannot be imported.

Prints a Markdown table per class of the issue (half-applied models, merge bookkeeping, ...): tests,
failed before (hangs and import errors among them), pass now. ``--out FILE`` also writes it.
Run from the repository root: ``python benchmarks/reliability_before_after.py [--out table.md]``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_reliability_inputs.py", "tests/test_reliability_runtime.py", "tests/test_reliability_writes.py",
         "tests/test_reliability_bounds.py", "tests/test_reliability_probe.py", "tests/test_fuzz_inputs.py",
         "tests/test_fuzz_adapters.py"]
HELPERS = ["tests/modelstate.py"]

# the classes, by test function name (first match wins); controls check that sound input still works
CLASSES: list[tuple[str, str]] = [
    ("controls (sound input still works)", r"still_works|accepts_the_sound_version|round_trip"),
    ("half-applied models", r"^test_apply_(failing|rank|with_map)|probe_refuses|merge_failure_on_a_later_host|re_enabling"),
    ("merge bookkeeping", r"merged|unmerge|host_updates_of_two|requires_grad_restored|removed_handle|inside_disable"),
    ("load trusts its file", r"load|corrupt_adapter|save_is_atomic"),
    ("unbounded work", r"huge|allocation|budget|dimension_over|svd_workspace"),
    ("user maps", r"user_map"),
    ("accepted nonsense", r"division_by_zero|nan_and_inf|booleans|overrides_keep|negative_or_fractional"),
    ("tracebacks", r"use_self|long_expression|deep_yaml|control_bytes|huge_integer|named_after_a_size|schema_out_to"),
    ("writes", r"atomic_write|schema_out_deletes"),
    ("fuzzing (all classes)", r"random_operation|mutated|generated_techniques|fuzz"),
]

PLUGIN = '''
import os
_F = open(os.environ["PEFREF_RELOG"], "a", buffering=1)
def pytest_runtest_logstart(nodeid, location):
    _F.write(f"start {nodeid}\\n")
def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        text = str(report.longrepr) if report.failed else ""
        missing = "ImportError" in text or "ModuleNotFoundError" in text  # an API the code did not have
        _F.write(f"{report.when} {'missing-api' if missing else report.outcome} {report.nodeid}\\n")
def pytest_collectreport(report):
    if report.failed:
        _F.write(f"collect failed {report.nodeid}\\n")
'''


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def before_commit() -> str:
    first = _git("log", "--reverse", "--format=%H", "--", "pefref/language/atomic.py").splitlines()[0]
    return _git("rev-parse", f"{first}^")


def _limit_memory(nbytes: int) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def run_tests(tree: Path, files: list[str], idle: float, mem: int) -> tuple[dict[str, str], set[str]]:
    """Outcome per test id ('passed', 'failed', 'hang', 'skipped'), and the modules that failed to import."""
    tmp = Path(tempfile.mkdtemp(prefix="relog-"))
    (tmp / "_relog.py").write_text(PLUGIN)
    log = tmp / "log.txt"
    env = {**os.environ, "PEFREF_RELOG": str(log), "PYTHONPATH": f"{tmp}{os.pathsep}{tree}", "OMP_NUM_THREADS": "1"}
    out: dict[str, str] = {}
    broken: set[str] = set()
    hung: list[str] = []
    while True:
        done = [*out, *hung]
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-p", "_relog",
               *[a for t in done for a in ("--deselect", t)]]
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: _limit_memory(mem))
        last, size = time.monotonic(), -1
        killed = False
        while proc.poll() is None:
            time.sleep(1.0)
            now_size = log.stat().st_size if log.exists() else 0
            if now_size != size:
                size, last = now_size, time.monotonic()
            elif time.monotonic() - last > idle:
                os.killpg(proc.pid, 9)
                proc.wait()
                killed = True
        started: list[str] = []
        for line in log.read_text().splitlines() if log.exists() else []:
            when, _, rest = line.partition(" ")
            if when == "start":
                started.append(rest)
                continue
            outcome, _, nodeid = rest.partition(" ")
            if when == "collect":
                broken.add(nodeid)
            elif outcome != "passed":
                out.setdefault(nodeid, outcome)
            elif when == "call":
                out.setdefault(nodeid, "passed")
        if not killed:
            break
        stuck = next((t for t in reversed(started) if t not in out and t not in hung), None)
        if stuck is None:
            break
        hung.append(stuck)
    out.update({t: "hang" for t in hung})
    shutil.rmtree(tmp, ignore_errors=True)
    return out, broken


def collect(tree: Path, files: list[str]) -> list[str]:
    res = subprocess.run([sys.executable, "-m", "pytest", *files, "--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"],
                         cwd=tree, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [ln.strip() for ln in res.stdout.splitlines() if "::" in ln]


def classify(nodeid: str) -> str:
    name = nodeid.split("::")[-1].split("[")[0]
    return next((c for c, rx in CLASSES if re.search(rx, name)), "other")


def table(tests: list[str], old: dict[str, str], old_broken: set[str], new: dict[str, str]) -> str:
    rows: dict[str, list[int]] = {c: [0, 0, 0, 0, 0] for c, _ in CLASSES}
    rows["other"] = [0, 0, 0, 0, 0]
    for t in tests:
        r = rows[classify(t)]
        module = t.split("::")[0]
        before = "missing-api" if module in old_broken else old.get(t, "not run")
        r[0] += 1
        r[1] += before != "passed"
        r[2] += before == "hang"
        r[3] += before == "missing-api"
        r[4] += new.get(t) == "passed"
    lines = ["| class | tests | failed before | of which hangs (no progress in 120 s) | of which for a missing API | pass now |", "|---|---:|---:|---:|---:|---:|"]
    total = [0] * 5
    for c, r in rows.items():
        if r[0]:
            lines.append(f"| {c} | " + " | ".join(map(str, r)) + " |")
            total = [a + b for a, b in zip(total, r)]
    lines.append("| **all** | " + " | ".join(f"**{x}**" for x in total) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="commit of the old code (default: before the first reliability commit)")
    ap.add_argument("--worktree", default="/tmp/rel-before", help="where to check it out (removed afterwards)")
    ap.add_argument("--idle", type=float, default=120.0, help="seconds without progress before a test counts as a hang")
    ap.add_argument("--mem", type=int, default=6 << 30, help="address-space limit of each test process, bytes")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    sha = args.before or before_commit()
    wt = Path(args.worktree)
    subprocess.run(["git", "worktree", "add", "--detach", str(wt), sha], cwd=ROOT, check=True, capture_output=True)
    try:
        for f in FILES + HELPERS:
            shutil.copy(ROOT / f, wt / f)
        tests = collect(ROOT, FILES)
        old, old_broken = run_tests(wt, FILES, args.idle, args.mem)
        new, new_broken = run_tests(ROOT, FILES, args.idle, args.mem)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, check=False, capture_output=True)
    text = f"Before: {sha[:10]}; now: {_git('rev-parse', '--short=10', 'HEAD')}; {len(tests)} tests.\n\n" + table(tests, old, old_broken, new)
    failing_now = sorted(t for t in tests if new.get(t) != "passed")
    if new_broken or failing_now:
        text += "\nNot passing now: " + ", ".join(sorted(new_broken) + failing_now) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
