"""A training step of every catalog technique that peft implements, pefref vs peft, side by side.

The techniques are those the interop table (``catalog/interop/peft.yaml``) maps to a
peft type, in its order. Each runs with the hyperparameters and peft config sized
for this benchmark below where there is one (the 18 first measured, and OLoRA), else with
the pair of ``tests/interop_cases.py`` that the parity tests check (``case`` in
the JSON says which); a technique the table gains is measured without an edit here.

For each technique one seeded Llama (``transformers``, built from a config; no
download) is deep-copied into a pefref model and a peft 0.21 model with the same
hyperparameters and the same host modules; both must report the same trainable
count. A *step* is: forward on one batch, cross-entropy on the batch's tokens,
backward, ``torch.optim.AdamW`` step, gradients set to None.

*Time*: the variants of one technique (pefref, peft and the *frozen base*)
run in rotating order, round after round (paired round-robin); each round
keeps the minimum of ``--reps`` timed steps per variant, and a technique's
ratio is the median of its per-round ratios, with the interquartile range
(IQR) of those ratios. The frozen base is the step a technique cannot go below:
the same model with nothing trainable but the input embeddings' activations
(forward and backward through every layer, no optimizer), so ``pefref/frozen``
shows what a technique costs over it.

*Memory*: the peak of the bytes allocated during one step above those allocated
before it (after warm-up steps, so AdamW's state exists already), read from
the allocator's events that :mod:`torch.profiler` records with
``profile_memory=True`` (every CPU allocation and free with its size and
time; the running sum's maximum is the peak). This counts activations kept for
backward, gradients, temporaries and the optimizer's own work; it is
deterministic for a given input, and the median of ``--mem-reps`` runs is kept.

*Clock*: wall time by default; ``--clock cpu`` times CPU steps by the process's
CPU time instead (with ``--threads 1`` the step's work, less the time spent
waiting for a core, so a shared machine's load moves it far less).

*Devices*: ``--device cuda --dtype bf16`` runs every model (base, pefref, peft)
on the GPU in that dtype; steps are timed with CUDA events after a synchronize and
the peak is ``torch.cuda.max_memory_allocated`` during the step, above the bytes
allocated before it. peft keeps its adapters in the model's dtype there
(``autocast_adapter_dtype=False``), as pefref does.

*Compiled*: with ``--compile`` (default: LoRA only in ``--quick``, every technique
otherwise) pefref's step with ``torch.compile`` (inductor) is timed against its
eager step in the same round-robin.

*Verdict*: ``above`` where the whole IQR of the time or the memory ratio lies
above 1 (a measured loss), ``below`` where the time IQR lies below 1, else
``tie``; ``count`` where the trainable counts differ.

Writes a markdown table (stdout, ``--markdown``) and a JSON list (``--json``)
with one object per technique: ``technique``, ``time_ratio`` and
``memory_ratio`` (pefref/peft medians; the memory IQR over the ``--mem-reps``
pairs), their IQRs, absolute times and peaks,
the trainable counts and ``time_over_frozen``.

Run: ``python benchmarks/bench_techniques.py --quick --json OUT`` (a few minutes);
on a GPU: ``python benchmarks/bench_techniques.py --quick --device cuda --dtype bf16 --json OUT``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
QV = ["q_proj", "v_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


def _peft_cases() -> dict[str, tuple[dict[str, Any], Callable[[], Any]]]:
    """technique -> (pefref hyperparameters, peft config factory), on the same Llama modules."""
    import peft

    C = "CAUSAL_LM"
    lora = {"r": 8, "alpha": 16.0, "dropout": 0.0}
    qkvoud = ATTN[:4] + ["up_proj", "down_proj"]
    return {
        "lora": (lora, lambda: peft.LoraConfig(task_type=C, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QV)),
        "rslora": (lora, lambda: peft.LoraConfig(task_type=C, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QV, use_rslora=True)),
        "pissa": ({"r": 8, "alpha": 8.0}, lambda: peft.LoraConfig(task_type=C, r=8, lora_alpha=8, lora_dropout=0.0, target_modules=qkvoud,
                                                                  init_lora_weights="pissa")),
        # OLoRA's sites are the six projections (peft's interop case targets q and v only): both place it there
        "olora": ({"r": 8, "alpha": 8.0}, lambda: peft.LoraConfig(task_type=C, r=8, lora_alpha=8, lora_dropout=0.0, target_modules=qkvoud,
                                                                  init_lora_weights="olora")),
        "dora": ({"r": 8, "alpha": 16.0}, lambda: peft.LoraConfig(task_type=C, r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True,
                                                                  target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])),
        "adalora": ({"r": 12, "alpha": 8.0, "dropout": 0.0}, lambda: peft.AdaLoraConfig(task_type=C, init_r=12, target_r=8, lora_alpha=8,
                                                                                       lora_dropout=0.0, total_step=1000, target_modules=qkvoud)),
        "vera": ({"r": 256, "d_initial": 0.1, "dropout": 0.0}, lambda: peft.VeraConfig(task_type=C, r=256, d_initial=0.1, vera_dropout=0.0,
                                                                                      target_modules=QV, save_projection=True)),
        "loha": ({"r": 8, "alpha": 8.0}, lambda: peft.LoHaConfig(task_type=C, r=8, alpha=8, rank_dropout=0.0, module_dropout=0.0, target_modules=QV)),
        "lokr": ({"r": 4, "alpha": 8.0, "factor": -1}, lambda: peft.LoKrConfig(task_type=C, r=4, alpha=8, decompose_factor=-1, decompose_both=False,
                                                                               rank_dropout=0.0, module_dropout=0.0, target_modules=QV)),
        "fourierft": ({"n": 1000, "alpha": 300.0, "seed": 777}, lambda: peft.FourierFTConfig(task_type=C, n_frequency=1000, scaling=300.0,
                                                                                             random_loc_seed=777, target_modules=QV)),
        "ia3": ({}, lambda: peft.IA3Config(task_type=C, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        "oft": ({"r": 4, "neumann": 0}, lambda: peft.OFTConfig(task_type=C, r=4, oft_block_size=0, coft=False, block_share=False, module_dropout=0.0,
                                                               use_cayley_neumann=False, target_modules=ATTN)),
        # peft's butterfly needs a CUDA kernel; on CPU it forces one factor, so both run m=1
        "boft": ({"b": 8, "m": 1}, lambda: peft.BOFTConfig(task_type=C, boft_block_size=8, boft_block_num=0, boft_n_butterfly_factor=1,
                                                           boft_dropout=0.0, target_modules=ATTN)),
        "hra": ({"r": 8}, lambda: peft.HRAConfig(task_type=C, r=8, apply_GS=False, target_modules=QV)),
        "prompt_tuning": ({"n": 20}, lambda: peft.PromptTuningConfig(task_type=C, num_virtual_tokens=20)),
        "prefix_tuning": ({"n": 10, "hidden": 512}, lambda: peft.PrefixTuningConfig(task_type=C, num_virtual_tokens=10, prefix_projection=True,
                                                                                    encoder_hidden_size=512)),
        "p_tuning": ({"n": 20, "hidden": 128}, lambda: peft.PromptEncoderConfig(task_type=C, num_virtual_tokens=20, encoder_hidden_size=128,
                                                                                encoder_reparameterization_type="MLP", encoder_dropout=0.0)),
        "p_tuning_lstm": ({"n": 20, "hidden": 128, "lstm_layers": 2}, lambda: peft.PromptEncoderConfig(
            task_type=C, num_virtual_tokens=20, encoder_hidden_size=128, encoder_reparameterization_type="LSTM", encoder_num_layers=2,
            encoder_dropout=0.0)),
        "ln_tuning": ({}, lambda: peft.LNTuningConfig(task_type=C, target_modules=NORMS)),
    }


@dataclass
class BenchCase:
    """One technique of the interop table: pefref's hyperparameters, peft's config factory, and whether peft's
    forward takes task ids (``source``: where the pair comes from)."""

    hps: dict[str, Any]
    config: Callable[[], Any]
    task_ids: bool = False
    source: str = "tuned"


def peft_cases() -> dict[str, BenchCase]:
    """Every technique the interop table (``catalog/interop/peft.yaml``) maps to a peft type, in table order: the
    pairs sized for this benchmark above where there is one, else the interop cases' pair (``tests/interop_cases.py``,
    the same pair the parity tests check; a case peft reads as another technique's takes that one's config)."""
    from pefref.language.interop_table import interop_table
    from tests.interop_cases import CASES

    tuned = _peft_cases()
    out: dict[str, BenchCase] = {}
    for tid in dict.fromkeys(m.technique for m in interop_table().methods):
        if tid in tuned:
            out[tid] = BenchCase(*tuned[tid])
            continue
        case = next((c for c in CASES.values() if c.technique == tid and c.peft is not None), None)
        if case is None:  # peft builds it with another technique's config (e.g. an optimizer-side variant)
            own = next((c for c in CASES.values() if c.technique == tid), None)
            twin = CASES.get(own.reads_as) if own is not None and own.reads_as else None
            if own is None or twin is None or twin.peft is None:
                continue
            case = dataclasses.replace(twin, hps=own.hps, technique=tid)
        out[tid] = BenchCase(dict(case.hps), functools.partial(case.peft, "llama"), case.task_ids, "interop case")  # type: ignore[arg-type]
    return out


# --- models and steps --------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_model(args: argparse.Namespace) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   max_position_embeddings=max(512, getattr(args, "seq", 0) or 0), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    return model.to(device=getattr(args, "device", "cpu"), dtype=DTYPES[getattr(args, "dtype", "fp32")]).train()


def on_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def make_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, **extra: Any) -> Callable[[], None]:
    """forward, cross-entropy over the batch's own positions, backward, AdamW step (``extra``: more forward
    arguments, e.g. peft's task ids)."""
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    seq = ids.shape[1]

    def step() -> None:
        logits = model(input_ids=ids, **extra).logits[:, -seq:]  # prompts and prefixes may add positions in front
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def frozen_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """The frozen base: nothing trains, backward runs through every layer down to the input embeddings."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    seq = ids.shape[1]

    def step() -> None:
        x = emb(ids).requires_grad_(True)
        logits = model(inputs_embeds=x).logits[:, -seq:]
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()

    return step


def peak_step_bytes(step: Callable[[], None], device: str = "cpu") -> int:
    """Peak bytes allocated during one step above the bytes allocated before it: on CPU from the allocator
    events of torch.profiler, on CUDA from torch.cuda.max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    if on_cuda(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _t, n in events:
        live += n
        peak = max(peak, live)
    return peak


def clock(device: str, cpu_clock: bool = False) -> Callable[[Callable[[], None]], float]:
    """Seconds one call takes: perf_counter on CPU (``cpu_clock``: the process's CPU time, which time spent waiting
    for a core on a loaded machine does not count); CUDA events recorded around it, after a synchronize, on CUDA."""
    if on_cuda(device):
        def cuda_time(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    now = time.process_time if cpu_clock else time.perf_counter

    def cpu_time(fn: Callable[[], None]) -> float:
        t0 = now()
        fn()
        return now() - t0

    return cpu_time


def time_round_robin(steps: dict[str, Callable[[], None]], rounds: int, reps: int, warmup: int, device: str = "cpu",
                     cpu_clock: bool = False) -> dict[str, list[float]]:
    names = list(steps)
    timed = clock(device, cpu_clock)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(min(timed(steps[n]) for _ in range(reps)))
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    q1, med, q3 = quartiles([x / y for x, y in zip(a, b)])
    return {"median": med, "q1": q1, "q3": q3}


# --- one technique -----------------------------------------------------------------------------


def run_technique(tid: str, case: BenchCase, base: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                  args: argparse.Namespace, compile_it: bool) -> dict[str, Any]:
    from peft import get_peft_model

    from pefref.runtime.api import apply

    torch.manual_seed(1)
    m_pefref = copy.deepcopy(base)
    apply(m_pefref, tid, **case.hps)
    torch.manual_seed(1)
    m_peft = get_peft_model(copy.deepcopy(base), case.config(), autocast_adapter_dtype=False)  # adapters in the model's dtype, as pefref's
    n_pefref, n_peft = sum(p.numel() for p in trainable(m_pefref)), sum(p.numel() for p in trainable(m_peft))
    m_pefref.train()
    m_peft.train()
    extra = {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)} if case.task_ids else {}
    steps = {"pefref": make_step(m_pefref, ids, labels), "peft": make_step(m_peft, ids, labels, **extra),
             "frozen": frozen_step(copy.deepcopy(base), ids, labels)}
    if compile_it:
        compiled = torch.compile(m_pefref)
        steps["pefref+compile"] = make_step(compiled, ids, labels)
        t0 = time.perf_counter()
        steps["pefref+compile"]()
        compile_s = time.perf_counter() - t0
    times = time_round_robin(steps, args.rounds, args.reps, args.warmup, args.device, args.clock == "cpu")
    mems = {n: [peak_step_bytes(steps[n], args.device) for _ in range(args.mem_reps)] for n in ("pefref", "peft", "frozen")}
    mem = {n: statistics.median(v) for n, v in mems.items()}
    t, mq = paired(times["pefref"], times["peft"]), paired(mems["pefref"], mems["peft"])
    row: dict[str, Any] = {
        "technique": tid, "case": case.source,
        "time_ratio": t["median"], "time_ratio_q1": t["q1"], "time_ratio_q3": t["q3"],
        "memory_ratio": mem["pefref"] / mem["peft"], "memory_ratio_q1": mq["q1"], "memory_ratio_q3": mq["q3"],
        "time_over_frozen": paired(times["pefref"], times["frozen"]),
        "peft_over_frozen": paired(times["peft"], times["frozen"]),
        "time_s": {n: statistics.median(v) for n, v in times.items()},
        "peak_step_bytes": mem,
        "memory_over_frozen": mem["pefref"] / mem["frozen"],
        "trainable": {"pefref": n_pefref, "peft": n_peft},
        "hyperparameters": case.hps,
    }
    if compile_it:
        row["compiled_over_eager"] = paired(times["pefref+compile"], times["pefref"])
        row["compile_first_step_s"] = compile_s
    del steps, m_pefref, m_peft
    gc.collect()
    return row


def verdict(row: dict[str, Any]) -> str:
    """``above`` where the whole time or memory IQR lies above 1 (a measured loss), ``below`` where the time IQR lies
    below 1 (a measured gain), else ``tie``; ``count`` where the trainable counts differ."""
    if row["trainable"]["pefref"] != row["trainable"]["peft"]:
        return "count"
    if row["time_ratio_q1"] > 1 or row["memory_ratio_q1"] > 1:
        return "above"
    return "below" if row["time_ratio_q3"] < 1 else "tie"


def where(device: str) -> str:
    """The device in words: the GPU's name, or the CPU's architecture."""
    return f"{torch.cuda.get_device_name()} (CUDA)" if on_cuda(device) else f"CPU ({platform.machine()})"


def markdown(rows: list[dict[str, Any]], frozen: dict[str, Any] | None) -> str:
    out = ["| technique | trainable | time pefref/peft [IQR] | memory pefref/peft [IQR] | pefref/frozen time | peft/frozen time | compiled/eager | verdict |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r.get("compiled_over_eager")
        same = "" if r["trainable"]["pefref"] == r["trainable"]["peft"] else f" (peft {r['trainable']['peft']:,})"
        out.append(f"| {r['technique']} | {r['trainable']['pefref']:,}{same} | {r['time_ratio']:.3f} [{r['time_ratio_q1']:.3f}-{r['time_ratio_q3']:.3f}] | "
                   f"{r['memory_ratio']:.3f} [{r['memory_ratio_q1']:.3f}-{r['memory_ratio_q3']:.3f}] | {r['time_over_frozen']['median']:.3f} | "
                   f"{r['peft_over_frozen']['median']:.3f} | " + (f"{c['median']:.3f} [{c['q1']:.3f}-{c['q3']:.3f}]" if c else "-") + f" | {verdict(r)} |")
    if frozen:
        out.append(f"| *frozen base* | 0 | step {frozen['time_s'] * 1e3:.1f} ms (median) | peak {frozen['bytes'] / 2**20:.1f} MiB | 1 | | | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (a few minutes)")
    ap.add_argument("--techniques", help="comma-separated subset")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--compile", help="comma-separated techniques to also time compiled ('all', 'none'; default: lora with --quick, else all)")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timing with CUDA events, memory from torch.cuda.max_memory_allocated)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the models")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="CPU steps: wall time, or the process's CPU time (with --threads 1, steady on a loaded machine)")
    ap.add_argument("--json", help="write the JSON list here")
    ap.add_argument("--markdown", help="write the markdown table here")
    args = ap.parse_args(argv)
    small = dict(hidden=128, intermediate=344, layers=2, batch=2, seq=64, rounds=5)
    full = dict(hidden=256, intermediate=688, layers=4, batch=4, seq=128, rounds=11)
    for k, v in (small if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    cases = peft_cases()
    chosen = args.techniques.split(",") if args.techniques else list(cases)
    unknown = [t for t in chosen if t not in cases]
    if unknown:
        ap.error(f"not benchmarked against peft: {unknown} (known: {', '.join(cases)})")
    comp = args.compile or ("lora" if args.quick else "all")
    compiled = set(chosen) if comp == "all" else set() if comp == "none" else set(comp.split(","))

    base = base_model(args)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    load0 = os.getloadavg()
    print(f"Llama d={args.hidden} ff={args.intermediate} L={args.layers} heads={args.heads}/{args.kv_heads} vocab={args.vocab}; "
          f"batch {args.batch} x seq {args.seq}; {args.rounds} rounds x {args.reps} reps (min), threads={args.threads}, "
          f"{args.clock} clock, torch {torch.__version__}, {args.dtype} on {where(args.device)}; load average {' '.join(f'{x:.2f}' for x in load0)}", flush=True)

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for tid in chosen:
        try:
            row = run_technique(tid, cases[tid], base, ids, labels, args, tid in compiled)
        except Exception as e:  # one failing technique (e.g. an op without a kernel for the dtype) does not end the run
            failed.append({"technique": tid, "error": f"{type(e).__name__}: {e}"[:500], "device": args.device, "dtype": args.dtype})
            print(f"  {tid:<14} FAILED: {failed[-1]['error']}", flush=True)
            gc.collect()
            continue
        row["device"], row["dtype"] = args.device, args.dtype
        rows.append(row)
        print(f"  {tid:<14} time {row['time_ratio']:.3f} [{row['time_ratio_q1']:.3f}-{row['time_ratio_q3']:.3f}]  "
              f"memory {row['memory_ratio']:.3f}  {verdict(row)}  over frozen {row['time_over_frozen']['median']:.3f}  "
              f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    frozen = {"time_s": statistics.median(r["time_s"]["frozen"] for r in rows),
              "bytes": statistics.median(r["peak_step_bytes"]["frozen"] for r in rows)} if rows else None
    table = markdown(rows, frozen) + "".join(f"\n| {f['technique']} | failed: {f['error'][:120]} | | | | | | |" for f in failed)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows + failed, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
