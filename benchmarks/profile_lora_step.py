"""Where LoRA's training step spends what the frozen base does not: torch.profiler tables of both, and paired timings.

The model and steps are :mod:`bench_techniques`' (its full Llama: d=256, 4 layers,
batch 4 x 128 tokens, fp32, CPU): the *frozen* step (forward and backward down to
the input embeddings, no optimizer) and pefref LoRA's step (r=8 on q, v;
forward, backward, ``torch.optim.AdamW`` step), once with AdamW's default
implementation, with ``foreach=True``, with ``fused=True``, and without the optimizer
(what AdamW's share is). Paired round-robin rounds give the
ratios over the frozen step (median, IQR); the profiler tables (self CPU time by
operator, top ``--top``) show what the difference is made of.

Run: ``python benchmarks/profile_lora_step.py [--rounds 15] [--top 18] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_techniques as bt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS: dict[str, dict[str, bool] | None] = {"lora": {}, "lora_foreach": {"foreach": True}, "lora_fused": {"fused": True}, "lora_no_optimizer": None}
"""LoRA's step with AdamW's default implementation, ``foreach``, ``fused``, and without the optimizer (its share)."""


def lora_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, opt_kw: dict[str, bool] | None) -> Callable[[], None]:
    opt = None if opt_kw is None else torch.optim.AdamW(bt.trainable(model), lr=1e-4, **opt_kw)
    seq = ids.shape[1]

    def step() -> None:
        logits = model(input_ids=ids).logits[:, -seq:]
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step


def table(step: Callable[[], None], top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv: list[str] | None = None) -> int:
    from pefref.runtime.api import apply

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-tables", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="time steps by wall time or by the process's CPU time")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(vocab=1000, hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, seq=128, device="cpu", dtype="fp32")
    base = bt.base_model(ns)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ns.vocab, (4, ns.seq), generator=g)
    labels = torch.randint(0, ns.vocab, (4, ns.seq), generator=g)
    steps: dict[str, Callable[[], None]] = {"frozen": bt.frozen_step(copy.deepcopy(base), ids, labels)}
    for name, kw in VARIANTS.items():
        m = copy.deepcopy(base)
        apply(m, "lora", r=8)
        steps[name] = lora_step(m, ids, labels, kw)
    load0 = os.getloadavg()
    times = bt.time_round_robin(steps, args.rounds, args.reps, 2, cpu_clock=args.clock == "cpu")
    out: dict[str, object] = {"threads": args.threads, "rounds": args.rounds, "clock": args.clock,
                              "load_average": {"start": load0, "end": os.getloadavg()}}
    for name in VARIANTS:
        r = [a / b for a, b in zip(times[name], times["frozen"])]
        q = statistics.quantiles(r, n=4, method="inclusive")
        out[f"{name}_over_frozen"] = {"median": statistics.median(r), "q1": q[0], "q3": q[2]}
    out["ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(json.dumps(out, indent=2))
    if not args.no_tables:
        for name in ("frozen", "lora", "lora_no_optimizer"):
            print(f"\n## {name}: self CPU time by operator, 3 steps\n")
            print(table(steps[name], args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
