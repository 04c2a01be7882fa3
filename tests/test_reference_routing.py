"""Mixtures of LoRA experts (MoLoRA, soft and top-k routed) against plain-torch versions of the paper's equations,
on tiny Llama, GPT-2 and BERT: outputs within 1e-5 (fp32), equal trainable counts, and a few training steps lower the loss."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from pefref.runtime.api import apply

from .test_reference_impls import SHAPES, TOL, Hand, Units, _base, _perturb, family_of, inputs_for, model_sizes, output_of


def molora_delta(x: torch.Tensor, g: Any, E: int, r: int, k: int | None) -> torch.Tensor:
    """Zadouri et al.: sum_i s_i B_i A_i x, s = softmax(W_g x) (or a softmax over the k largest logits)."""
    logits = x @ g("Wg").T  # [b, s, E]
    if k is None:
        s = torch.softmax(logits, dim=-1)
    else:
        vals, idx = torch.topk(logits, k, dim=-1)
        s = torch.zeros_like(logits)
        s.scatter_(-1, idx, torch.softmax(vals, dim=-1))
    A, B = g("A").reshape(E, r, -1), g("B")
    out = 0
    for i in range(E):  # one LoRA per expert, weighted by its gate
        out = out + s[..., i:i + 1] * (x @ A[i].T @ B[i].T)
    return out


CASES = [("molora", {}, None), ("molora_topk", {"k": 2}, 2), ("molora_topk", {"k": 1, "E": 3}, 1)]


def _setup(tid: str, hps: dict[str, Any], shape: str) -> tuple[Any, Any, Hand, dict[str, torch.Tensor]]:
    fam = family_of(shape)
    model, ref = copy.deepcopy(_base(shape)), copy.deepcopy(_base(shape))
    a = apply(model, tid, **hps)
    _perturb(a)
    hp = a.hyperparameters
    hand = Hand(ref, fam, model_sizes(fam)["L"])
    u = Units(a)
    scale = hp["alpha"] / hp["r"]
    for i in range(hand.L):
        for key in ("q", "v"):
            g = u("experts", f"attn.{key}", i)
            hand.linear(key, i, lambda x, y, g=g: y + scale * molora_delta(x, g, hp["E"], hp["r"], hp.get("k") if "k" in hp else None))
    return model, a, hand, inputs_for(fam)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tid,hps,k", CASES, ids=lambda c: str(c))
def test_matches_plain_torch(tid: str, hps: dict[str, Any], k: int | None, shape: str) -> None:
    model, a, hand, inputs = _setup(tid, hps, shape)
    with torch.no_grad():
        base = output_of(_base(shape)(**inputs))
        ours = output_of(model(**inputs))
        theirs = hand.run(inputs)
    assert (theirs - base).abs().max() > 1e-3, "the reference did not change the model"
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{tid} on {shape}: max abs diff {diff:.3g}"
    z, hp = model_sizes(hand.fam), a.hyperparameters
    outs = (z["heads"] * z["d_head"], z["kv_heads"] * z["d_head"])  # q and v widths
    assert a.report.trainable == z["L"] * sum(hp["E"] * hp["r"] * z["d"] + hp["E"] * o * hp["r"] + hp["E"] * z["d"] for o in outs)


def train_steps(model: torch.nn.Module, adapter: Any, inputs: dict[str, torch.Tensor], steps: int = 8, lr: float = 1e-2) -> list[float]:
    """Losses of a few AdamW steps fitting a fixed random target (a tiny regression on the model's output)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        target = torch.randn_like(output_of(model(**inputs)))
    opt = torch.optim.AdamW(adapter.param_groups(lr=lr))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (output_of(model(**inputs)) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("tid", ["molora", "molora_topk"])
def test_trains(tid: str) -> None:
    model = copy.deepcopy(_base("tiny-llama"))
    a = apply(model, tid)
    losses = train_steps(model, a, inputs_for("llama"))
    assert losses[-1] < losses[0], losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.trainable_parameters())
