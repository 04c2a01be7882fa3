"""Training metadata: parameters say how they train; the adapter hands torch optimizers ready groups."""

from __future__ import annotations

import torch
import yaml

from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model


def _one_adamw_step(adapter, model, inputs, groups) -> dict[str, torch.Tensor]:
    """|change| of every named trainable tensor after one AdamW step over ``groups``."""
    before = {n: p.detach().clone() for n, p in adapter.named_trainable_parameters().items()}
    opt = torch.optim.AdamW(groups)
    output_of(model, inputs).pow(2).mean().backward()
    opt.step()
    return {n: (p.detach() - before[n]).abs() for n, p in adapter.named_trainable_parameters().items()}


def test_trainable_parameters_go_to_an_optimizer_as_they_are() -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    a = apply(model, "lora", r=4)
    params = a.trainable_parameters()
    assert isinstance(params, list) and all(isinstance(p, torch.nn.Parameter) for p in params)
    assert len(params) == len(a.named_trainable_parameters()) == 2 * 2 * 2
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    opt = torch.optim.AdamW(a.trainable_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in params]
    output_of(model, inputs).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_lora_plus_gives_b_the_scaled_learning_rate() -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    ratio, lr = 8.0, 1e-3
    a = apply(model, "lora_plus", r=4, ratio=ratio)
    groups = a.param_groups(lr=lr, weight_decay=0.0)
    by_lr = {g["lr"]: g for g in groups}
    assert sorted(by_lr) == [lr, lr * ratio]  # equal settings merged: two groups
    assert all(n.endswith(".B") for n in by_lr[lr * ratio]["names"])
    assert all(n.endswith(".A") for n in by_lr[lr]["names"])
    assert sum(len(g["params"]) for g in groups) == len(a.trainable_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for p in a.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # Adam's first step moves each entry by lr * g / (|g| + eps): about lr where the gradient is not tiny
    step = _one_adamw_step(a, model, inputs, groups)
    for n, d in step.items():
        want = lr * ratio if n.endswith(".B") else lr
        assert abs(d.max().item() - want) < 0.01 * want, (n, d.max().item(), want)
    # plain LoRA puts everything in one group
    b = apply(tiny_model("llama"), "lora", r=4)
    assert [gr["lr"] for gr in b.param_groups(lr=lr)] == [lr]


def test_declared_weight_decay_overrides_the_optimizer_default(tmp_path) -> None:
    spec = {
        "id": "lora_wd", "name": "LoRA, no decay on A",
        "paper": {"title": "t", "authors": "a", "year": 2021, "arxiv": "2106.09685"},
        "hyperparameters": {"r": {"type": "int", "default": 4}},
        "modules": [{"use": "lora.lora", "params": {"A": {"shape": ["r", "d_in"], "init": "normal(std=0.02)", "weight_decay": 0.0}}}],
    }
    p = tmp_path / "lora_wd.yaml"
    p.write_text(yaml.safe_dump(spec))
    a = apply(tiny_model("gpt2"), p)
    groups = {g["weight_decay"]: g for g in a.param_groups(lr=1e-3, weight_decay=0.1)}
    assert sorted(groups) == [0.0, 0.1]
    assert all(n.endswith(".A") for n in groups[0.0]["names"])
    assert all(n.endswith(".B") for n in groups[0.1]["names"])
