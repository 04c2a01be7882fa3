"""A training step eager vs under ``training.compile``, on an experiment's run (default: LoRA of the MiniLM experiment).

Two copies of the run's model (same seed, the same technique applied by
``pefref.experiments``) train side by side on the experiment's length-grouped
batches: one eager, one wrapped by :func:`pefref.experiments.compiled.compile_model`
with the sequence dimension marked dynamic, as ``pefref run`` does. The first
``--warmup`` steps of each are untimed (the compiled side compiles there; that
time is reported as ``compile_s``); then each round times one step of each, in
rotating order (paired), on the same batch. Reported: ms/step medians, the per-round
ratio compiled/eager (median, IQR), the compile time, how many steps the
compile time takes to earn back, the load average, and the largest difference
between the two sides' trainable tensors at the end (the same batches, the same
updates).

Run: ``python benchmarks/bench_compile.py [--experiment catalog/experiments/minilm_rt_polarity.yaml] [--run 0] [--steps 30] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from pefref.experiments.compiled import compile_model, mark_dynamic
    from pefref.experiments.data import collate, grouped_order, load_examples, read_table
    from pefref.experiments.grid import expand, load_experiment
    from pefref.experiments.tasks import build_task_model, decay_groups, prepare_run
    from pefref.language.catalog import default_catalog

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", type=Path, default=ROOT / "catalog" / "experiments" / "minilm_rt_polarity.yaml")
    ap.add_argument("--run", type=int, default=0, help="index of the run in the expanded grid (default: the first, LoRA seed 0)")
    ap.add_argument("--steps", type=int, default=30, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    exp, _pos = load_experiment(args.experiment)
    spec = expand(exp, args.experiment)[args.run]
    cfg, root, cat = spec.config, args.experiment.parent, default_catalog()
    n_labels = len(set(map(str, read_table(root / exp.data.train)[exp.data.label])))
    sides: dict[str, Any] = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(spec.seed)
        model, tok = build_task_model(cfg["model"], cfg["task"]["type"], n_labels, cat)
        prep = prepare_run(model, cfg, root, cat)
        model.train()
        opt = torch.optim.AdamW(decay_groups(prep.adapters, prep.trainable, spec.lr, exp.training.weight_decay, prep.head, exp.training.head_lr), lr=spec.lr)
        sides[name] = (compile_model(model) if name == "compiled" else model, model, prep, opt)
    ex = load_examples(root / exp.data.train, exp.data.text, exp.data.label, tok, cfg["task"]["max_length"], exp.data.limit_train)
    B = exp.training.batch_size
    order = grouped_order([len(x) for x in ex.ids], B, spec.seed, 0)
    n_batches = len(ex) // B

    def step(name: str, i: int) -> float:
        fwd, _model, _prep, opt = sides[name]
        batch = collate(ex, order[(i % n_batches) * B:(i % n_batches + 1) * B], tok.pad_token_id, False)
        if name == "compiled":
            mark_dynamic(batch)
        t0 = time.perf_counter()
        logits = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    compile_s = 0.0
    for i in range(args.warmup):
        step("eager", i)
        compile_s += step("compiled", i)
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.steps):
        i = args.warmup + r
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            times[name].append(step(name, i))
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    a, b = sides["eager"][2].trainable, sides["compiled"][2].trainable
    diff = max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)
    med = {k: statistics.median(v) for k, v in times.items()}
    saved = med["eager"] - med["compiled"]
    out = {"experiment": str(args.experiment.name), "run": spec.label, "batch_size": B, "threads": args.threads,
           "ms_per_step": {k: v * 1e3 for k, v in med.items()},
           "ratio_compiled_over_eager": {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "rounds": len(ratios)},
           "compile_s": compile_s, "break_even_steps": compile_s / saved if saved > 0 else None,
           "max_abs_diff_trainable": diff, "load_average": {"start": load0, "end": os.getloadavg()},
           "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
