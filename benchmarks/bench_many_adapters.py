"""Many LoRA adapters on one model: memory, switching time and forward time, pefref vs peft.

One seeded Llama (built from a config) gets ``--adapters`` LoRA adapters (r=8 on
q_proj and v_proj), named a0, a1, ... in pefref (``apply(..., name=)``) and in
peft (``get_peft_model`` then ``add_adapter``). Measured side by side:

* *memory*: bytes allocated while adding all adapters (net, from the
  allocator's events recorded by :mod:`torch.profiler` with
  ``profile_memory=True``), and the bytes of the adapters' own tensors;
* *add time*: wall time to add all adapters;
* *switch*: making one adapter the only active one (pefref: every other
  handle's ``enabled`` set to False; peft: ``set_adapter``), timed in paired
  round-robin rounds (a different target adapter each call);
* *forward*: a one-token forward (batch 1, a 16-token cache-free input) with one
  adapter active among all of them, against the base model without adapters.

Run: ``python benchmarks/bench_many_adapters.py [--adapters 100] [--rounds 15] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
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
from torch import nn  # noqa: E402


def net_bytes(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """(result, bytes allocated and still live after ``fn``, seconds)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), dt


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from pefref.runtime.api import apply

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    n = args.adapters
    lcfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    m_pefref = copy.deepcopy(base)

    def add_pefref() -> list[Any]:
        return [apply(m_pefref, "lora", r=8, alpha=16, name=f"a{i}") for i in range(n)]

    handles, bytes_pefref, add_pefref_s = net_bytes(add_pefref)

    def add_peft() -> nn.Module:
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**lcfg), adapter_name="a0")
        for i in range(1, n):
            pm.add_adapter(f"a{i}", LoraConfig(**lcfg))
        return pm

    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    m_peft, bytes_peft, add_peft_s = net_bytes(add_peft)
    bytes_peft -= base_bytes  # the deep copy of the base inside the measured call
    own = {"pefref": sum(p.numel() * p.element_size() for h in handles for p in h.state_dict().values()),
           "peft": sum(p.numel() * p.element_size() for k, p in m_peft.state_dict().items() if "lora_" in k)}

    def switch_pefref(k: int) -> None:
        for i, h in enumerate(handles):
            h.enabled = i == k

    def switch_peft(k: int) -> None:
        m_peft.set_adapter(f"a{k}")

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    counter = {"pefref": 0, "peft": 0}

    def timed_switch(name: str, fn: Callable[[int], None]) -> float:
        best = float("inf")
        for _ in range(args.reps):
            counter[name] = (counter[name] + 7) % n
            t0 = time.perf_counter()
            fn(counter[name])
            best = min(best, time.perf_counter() - t0)
        return best

    def timed_forward(m: nn.Module) -> float:
        best = float("inf")
        with torch.no_grad():
            for _ in range(args.reps):
                t0 = time.perf_counter()
                m(input_ids=ids)
                best = min(best, time.perf_counter() - t0)
        return best

    # check: the same adapter active gives the same output in both (B copied from pefref to peft)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for h in handles:
            for name, p in h.named_trainable_parameters().items():
                if name.endswith(".B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for i, h in enumerate(handles):
            for key, unit in h.units.items():
                layer = int(key.rsplit("__", 1)[1])
                proj = "q_proj" if "attn_q" in key else "v_proj"
                lay = m_peft.base_model.model.model.layers[layer].self_attn.__getattr__(proj)
                lay.lora_A[f"a{i}"].weight.copy_(unit.A)
                lay.lora_B[f"a{i}"].weight.copy_(unit.B)
    switch_pefref(42 % n)
    switch_peft(42 % n)
    with torch.no_grad():
        diff = (m_pefref(input_ids=ids).logits - m_peft(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff

    sw: dict[str, list[float]] = {"pefref": [], "peft": []}
    fw: dict[str, list[float]] = {"pefref": [], "peft": [], "base": []}
    for r in range(args.rounds):
        for name in (["pefref", "peft"] if r % 2 == 0 else ["peft", "pefref"]):
            sw[name].append(timed_switch(name, switch_pefref if name == "pefref" else switch_peft))
        order = [("pefref", m_pefref), ("peft", m_peft), ("base", base)]
        k = r % 3
        for name, m in order[k:] + order[:k]:
            fw[name].append(timed_forward(m))

    def ratio(a: list[float], b: list[float]) -> dict[str, float]:
        q1, med, q3 = quartiles([x / y for x, y in zip(a, b)])
        return {"median": med, "q1": q1, "q3": q3}

    result: dict[str, Any] = {
        "adapters": n, "agreement_max_abs_diff": diff,
        "add_s": {"pefref": add_pefref_s, "peft": add_peft_s},
        "net_bytes_added": {"pefref": bytes_pefref, "peft": bytes_peft},
        "adapter_tensor_bytes": own,
        "switch_s": {k: quartiles(v)[1] for k, v in sw.items()},
        "switch_ratio_pefref_over_peft": ratio(sw["pefref"], sw["peft"]),
        "forward_s": {k: quartiles(v)[1] for k, v in fw.items()},
        "forward_ratio_pefref_over_peft": ratio(fw["pefref"], fw["peft"]),
        "forward_ratio_pefref_over_base": ratio(fw["pefref"], fw["base"]),
        "forward_ratio_peft_over_base": ratio(fw["peft"], fw["base"]),
    }
    f = lambda d: f"{d['median']:.3f} [{d['q1']:.3f}-{d['q3']:.3f}]"  # noqa: E731
    print(f"{n} LoRA adapters (r=8, q_proj+v_proj) on a 4-layer Llama d=256; outputs agree to {diff:.1e}")
    print("| measure | pefref | peft | pefref/peft [IQR] |")
    print("|---|---:|---:|---:|")
    print(f"| add all adapters (s) | {add_pefref_s:.2f} | {add_peft_s:.2f} | {add_pefref_s / add_peft_s:.3f} |")
    print(f"| memory allocated by adding them (MiB) | {bytes_pefref / 2**20:.2f} | {bytes_peft / 2**20:.2f} | {bytes_pefref / bytes_peft:.3f} |")
    print(f"| adapters' own tensors (MiB) | {own['pefref'] / 2**20:.2f} | {own['peft'] / 2**20:.2f} | {own['pefref'] / own['peft']:.3f} |")
    print(f"| switch the active adapter (us) | {result['switch_s']['pefref'] * 1e6:.1f} | {result['switch_s']['peft'] * 1e6:.1f} | "
          f"{f(result['switch_ratio_pefref_over_peft'])} |")
    print(f"| forward, 1 active of {n} (ms) | {result['forward_s']['pefref'] * 1e3:.2f} | {result['forward_s']['peft'] * 1e3:.2f} | "
          f"{f(result['forward_ratio_pefref_over_peft'])} |")
    print(f"| forward over the bare base model | {f(result['forward_ratio_pefref_over_base'])} | {f(result['forward_ratio_peft_over_base'])} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
