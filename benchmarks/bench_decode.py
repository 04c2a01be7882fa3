"""One-token decoding after ``merge()``: pefref's merged model against the base model, side by side.

A seeded Llama (``transformers``, from a config; no download) is copied three
times: the *base*, a pefref model with LoRA applied and merged (``merged``: every
host whose adapters are all merged runs its own forward again), and the same
pefref model unmerged (``patched``: the adapter runs through the patched
forward), for context; with peft installed, peft's LoRA merged in place with
``merge_adapter()`` (``peft merged``: its layers stay wrapped) is timed too.
Every variant decodes one token at a time with a key/value cache holding a
prompt of ``--prompt`` tokens (the cache is cut back to the prompt after each
step, so every step sees the same length). The variants run in rotating order,
round after round (paired round-robin); each round keeps the median of
``--reps`` decoding steps per variant, and a ratio (variant / base) is the
median of the per-round ratios with its interquartile range. On CUDA the steps
are timed with CUDA events after a synchronize.

Run: ``python benchmarks/bench_decode.py [--device cuda --dtype bf16] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call takes: perf_counter on CPU, CUDA events (after a synchronize) on CUDA."""
    if device.startswith("cuda"):
        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def decoder(model: torch.nn.Module, prompt: torch.Tensor) -> Callable[[], Any]:
    """One decoding step of ``model`` after ``prompt`` (the cache is cut back to the prompt after the step)."""
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    n = prompt.shape[1]
    tok = prompt[:, -1:]
    pos = torch.full((prompt.shape[0], 1), n, dtype=torch.long, device=prompt.device)

    def step() -> Any:
        with torch.no_grad():
            out = model(input_ids=tok, past_key_values=cache, position_ids=pos, cache_position=pos[0], use_cache=True)
        cache.crop(-1)  # drop the decoded token (a negative count: every transformers version reads it so)
        return out.logits

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--no-peft", action="store_true", help="leave peft out")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the markdown table here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from pefref.runtime.api import apply

    dtype, dev = DTYPES[args.dtype], args.device
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   max_position_embeddings=max(512, args.prompt + 8), tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).to(device=dev, dtype=dtype).eval()
    models: dict[str, torch.nn.Module] = {"base": base}
    merged = copy.deepcopy(base)
    handle = apply(merged, "lora", r=8, alpha=16.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero update, so that merging changes the weights
        for p in handle.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    patched = copy.deepcopy(merged)
    handle.merge()
    models["pefref merged"] = merged
    models["pefref patched"] = patched
    if not args.no_peft:
        try:
            import peft
        except ImportError:
            peft = None
        if peft is not None:
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
            pm.merge_adapter()
            models["peft merged"] = pm.eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen).to(dev)
    steps = {k: decoder(m, prompt) for k, m in models.items()}
    with torch.no_grad():
        ref = steps["base"]().float()
        outs = {k: steps[k]().float() for k in steps}
    diff = {k: float((v - ref).abs().max()) for k, v in outs.items()}  # the update makes them differ from the base
    same = float((outs["pefref merged"] - outs["pefref patched"]).abs().max())  # merging must not change the output
    clock = timer(dev)
    names = list(steps)
    for _ in range(3):
        for n in names:
            steps[n]()
    load0 = os.getloadavg()
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            per_round[n].append(statistics.median(clock(steps[n]) for _ in range(args.reps)))
    result: dict[str, Any] = {
        "config": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
                   "kv_heads": args.kv_heads, "vocab": args.vocab, "batch": args.batch, "prompt": args.prompt, "rounds": args.rounds,
                   "reps": args.reps, "device": dev, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__,
                   "transformers": transformers.__version__, "machine": platform.machine(),
                   "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None,
                   "load_average": {"start": load0, "end": os.getloadavg()}},
        "step_s": {n: statistics.median(v) for n, v in per_round.items()},
        "max_abs_diff_vs_base": diff,
        "max_abs_diff_merged_vs_patched": same,
        "ratio_vs_base": {},
    }
    lines = [f"One-token decoding after a {args.prompt}-token prompt, Llama d={args.hidden} L={args.layers}, batch {args.batch}, "
             f"{dev} {args.dtype}; LoRA r=8 on q, v; {args.rounds} rounds x {args.reps} steps (median), paired round-robin",
             f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load0)}; merged vs patched logits: max abs diff {same:.2e}",
             "", "| variant | step (ms, median) | time / base [IQR] |", "|---|---:|---:|"]
    for n in names:
        q1, med, q3 = quartiles([a / b for a, b in zip(per_round[n], per_round["base"])])
        result["ratio_vs_base"][n] = {"median": med, "q1": q1, "q3": q3}
        lines.append(f"| {n} | {result['step_s'][n] * 1e3:.3f} | {med:.3f} [{q1:.3f}-{q3:.3f}] |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
