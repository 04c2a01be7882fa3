"""Injection speed: pefref.apply vs peft's get_peft_model, LoRA on a Llama-3-70B-shaped model on the meta device.

The model is built once on the meta device (no weights allocated) from the
catalog's ``llama-3-70b`` shape and deep-copied (untimed) before every timed
call. Each round times both tools once, in a rotating order (paired
round-robin), so load on the machine hits both alike; the table gives the
per-round ratio pefref/peft (median and interquartile range) and the speed-up
peft/pefref. Both put LoRA (r=16, alpha=16) on q_proj and v_proj of all 80
layers (LoRA's catalog sites) and must report the same trainable count.

*warm*: in one process, after a first untimed call of each (imports done);
*warm_cpu*: the same calls' CPU time (``time.process_time``: what the call itself
computed, less sensitive than wall time to other processes on a loaded machine).
pefref's compiled programs are cleared before each timed call (``--keep-programs``
keeps them), so every timed apply traces and generates its code anew.
*cold* (``--cold-rounds``): a fresh process per call, timing the import of the
tool, its catalog (pefref) and the call, after the model is built (torch and
transformers are imported before the clock starts, for both). Python runs as
installed packages do, with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` is
removed from the children's environment), and one untimed fresh process of each
tool runs first, so bytecode and pefref's parsed-catalog cache
(:mod:`pefref.language.catalog_cache`) are written. *cold_no_cache*: the same with
``PEFREF_NO_CACHE=1`` (every catalog file parsed again), in the same rotation. Each cold mode has a
``_cpu`` twin: the same calls' CPU time in the child (``time.process_time``), steadier under load.
``--before DIR``: also time another pefref checkout (e.g. ``git worktree add
/tmp/before HEAD~3``) in the same rotation, as *cold_before*.

Run: ``python benchmarks/bench_inject.py [--rounds 15] [--cold-rounds 5] [--before DIR] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

R, ALPHA, TARGETS = 16, 16, ("q_proj", "v_proj")


def meta_model(shape: str) -> torch.nn.Module:
    from pefref.language.catalog import load_catalog

    cfg = transformers.AutoConfig.for_model("llama", **load_catalog(only=set()).shape(shape).config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def run_pefref(model: torch.nn.Module, keep_programs: bool) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, trainable count) of one apply."""
    from pefref.compiler import units
    from pefref.runtime.api import apply

    if not keep_programs:
        units.clear_programs()
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    apply(model, "lora", r=R, alpha=ALPHA)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, dc, trainable(model)


def run_peft(model: torch.nn.Module) -> tuple[float, float, int]:
    from peft import LoraConfig, get_peft_model

    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS)))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, dc, trainable(pm)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(times["pefref"], times["peft"])]
    q1, med, q3 = quartiles(ratios)
    return {
        "times_s": {k: dict(zip(("q1", "median", "q3"), quartiles(v))) | {"rounds": v} for k, v in times.items()},
        "ratio_pefref_over_peft": {"median": med, "q1": q1, "q3": q3, "rounds": ratios},
        "speedup_peft_over_pefref": {"median": 1 / med, "q1": 1 / q3, "q3": 1 / q1},
    }


_COLD = r"""
import sys, time, warnings, torch, transformers
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
cfg = transformers.AutoConfig.for_model("llama", **{config!r})
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(cfg)
t0, c0 = time.perf_counter(), time.process_time()
if {tool!r} == "pefref":
    from pefref.runtime.api import apply
    apply(model, "lora", r={r}, alpha={alpha})
else:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r={r}, lora_alpha={alpha}, lora_dropout=0.0, target_modules={targets!r}))
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def run_cold(tool: str, config: dict[str, Any], root: Path = ROOT, no_cache: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the child's import and first call."""
    code = _COLD.format(root=str(root), config=config, tool=tool, r=R, alpha=ALPHA, targets=list(TARGETS))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PEFREF_NO_CACHE")}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    if no_cache:
        env["PEFREF_NO_CACHE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def cold_rounds(config: dict[str, Any], rounds: int, before: Path | None) -> dict[str, Any]:
    """Fresh-process rounds of every side, in a rotating order; ratios against peft's round."""
    sides: dict[str, Any] = {"pefref": lambda: run_cold("pefref", config), "peft": lambda: run_cold("peft", config),
                             "pefref_no_cache": lambda: run_cold("pefref", config, no_cache=True)}
    if before is not None:
        sides["pefref_before"] = lambda: run_cold("pefref", config, root=before)
    for fn in sides.values():  # untimed: bytecode and the parsed-catalog cache are written
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            wall, c = sides[k]()
            times[k].append(wall)
            cpu[k].append(c)
    out = {}
    for suffix, got in (("", times), ("_cpu", cpu)):
        out["cold" + suffix] = summary({"pefref": got["pefref"], "peft": got["peft"]})
        out["cold_no_cache" + suffix] = summary({"pefref": got["pefref_no_cache"], "peft": got["peft"]})
        if before is not None:
            out["cold_before" + suffix] = summary({"pefref": got["pefref_before"], "peft": got["peft"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-70b", help="a llama model shape of the catalog")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cold-rounds", type=int, default=5, help="fresh-process rounds (0: skip)")
    ap.add_argument("--before", type=Path, help="another pefref checkout to time in the cold rounds")
    ap.add_argument("--keep-programs", action="store_true", help="let pefref reuse programs compiled by earlier calls")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    base = meta_model(args.shape)
    n_layers = base.config.num_hidden_layers
    # first (untimed) call of each: imports, the catalog, lazily built tables
    counts = {"pefref": run_pefref(copy.deepcopy(base), args.keep_programs)[2], "peft": run_peft(copy.deepcopy(base))[2]}
    assert counts["pefref"] == counts["peft"], counts
    times: dict[str, list[float]] = {"pefref": [], "peft": []}
    cpu: dict[str, list[float]] = {"pefref": [], "peft": []}
    load0 = os.getloadavg()
    for r in range(args.rounds):
        order = ["pefref", "peft"] if r % 2 == 0 else ["peft", "pefref"]
        for tool in order:
            m = copy.deepcopy(base)
            dt, dc, n = run_pefref(m, args.keep_programs) if tool == "pefref" else run_peft(m)
            assert n == counts[tool]
            times[tool].append(dt)
            cpu[tool].append(dc)
            del m
    result: dict[str, Any] = {
        "config": {"shape": args.shape, "layers": n_layers, "r": R, "alpha": ALPHA, "targets": list(TARGETS), "device": "meta",
                   "rounds": args.rounds, "keep_programs": args.keep_programs, "trainable": counts["pefref"],
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "load_average": {"start": load0, "end": os.getloadavg()}},
        "warm": summary(times),
        "warm_cpu": summary(cpu),
    }
    if args.cold_rounds:
        config = base.config.to_dict()
        config = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads")}
        result.update(cold_rounds(config, args.cold_rounds, args.before))
    result["config"]["load_average"]["end"] = os.getloadavg()

    print(f"LoRA r={R} on {', '.join(TARGETS)} of {args.shape} ({n_layers} layers, meta device), "
          f"{counts['pefref']:,} trainable parameters; paired round-robin, ratio = pefref/peft per round")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load0)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    print("| mode | rounds | pefref (s, median) | peft (s, median) | ratio pefref/peft [IQR] | speed-up peft/pefref [IQR] |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("warm", "warm_cpu", "cold", "cold_cpu", "cold_no_cache", "cold_no_cache_cpu", "cold_before", "cold_before_cpu"):
        if mode not in result:
            continue
        s = result[mode]
        rt, sp = s["ratio_pefref_over_peft"], s["speedup_peft_over_pefref"]
        n = len(rt["rounds"])
        print(f"| {mode} | {n} | {s['times_s']['pefref']['median']:.3f} | {s['times_s']['peft']['median']:.3f} | "
              f"{rt['median']:.3f} [{rt['q1']:.3f}-{rt['q3']:.3f}] | {sp['median']:.1f}x [{sp['q1']:.1f}-{sp['q3']:.1f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
