"""Compositions from Python, checked against HF peft on tiny Llama: adapters by name, per-example selection,
weighted merging (peft's add_weighted_adapter), and blocks given as data."""

from __future__ import annotations

import copy
import functools
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.errors import CatalogError, PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import apply
from pefref.runtime.compose import Composition, compose
from pefref.runtime.merge_weighted import COMBINATIONS
from pefref.view.analysis import low_rank_factors

from .parity import max_diff, padded_batch

TOL = 1e-5
RANKS = {"a": (4, 8), "b": (4, 16), "c": (2, 4)}  # name -> (r, alpha)


@functools.cache
def _base() -> nn.Module:
    return build_model("tiny-llama", seed=0)


def _pair(names: tuple[str, ...] = ("a", "b")) -> tuple[Any, nn.Module, Composition]:
    """A peft model and a pefref composition with the same LoRA adapters (non-trivial, equal weights)."""
    pm = None
    for n in names:
        r, alpha = RANKS[n]
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(_base()), cfg, adapter_name=n)
        else:
            pm.add_adapter(n, cfg)
    model = copy.deepcopy(_base())
    ads = [apply(model, "lora", name=n, r=RANKS[n][0], alpha=RANKS[n][1]) for n in names]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, layer in enumerate(pm.base_model.model.model.layers):
            for proj, site in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
                host = getattr(layer.self_attn, proj)
                for ad in ads:
                    A, B = host.lora_A[ad.name].weight, host.lora_B[ad.name].weight
                    A.copy_(0.3 * torch.randn(A.shape, generator=g))
                    B.copy_(0.3 * torch.randn(B.shape, generator=g))
                    unit = ad.units[f"lora__{site}__{i}"]
                    unit.A.copy_(A)
                    unit.B.copy_(B)
    pm.eval()
    model.eval()
    return pm, model, compose(model, ads)


def _logits(m: nn.Module, batch: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch, **kw).logits


def test_low_rank_factors_are_recognised(catalog) -> None:
    from pefref.language.check import expand_modules

    for tid, want in (("lora", ("A", "B", "alpha / r")), ("rslora", ("A", "B", "alpha / sqrt(r)"))):
        (m,), _ = expand_modules(catalog.technique(tid), catalog.techniques)
        assert low_rank_factors(m) == want
    for tid in ("loha", "dora", "houlsby_adapter", "ia3", "channel_gated_lora"):
        ms, _ = expand_modules(catalog.technique(tid), catalog.techniques)
        assert all(low_rank_factors(m) is None for m in ms), tid


def test_activation_by_name_matches_peft() -> None:
    pm, model, comp = _pair()
    batch = padded_batch("tiny-llama")
    base = _logits(_base(), batch)
    for active in (["a"], ["b"]):
        pm.set_adapter(active[0])
        comp.set_active(active)
        assert comp.active_adapters == active
        assert max_diff(_logits(model, batch), _logits(pm, batch)) <= TOL
    comp.set_active(["a", "b"])
    both = _logits(model, batch)
    comp.deactivate("a", "b")
    assert torch.equal(_logits(model, batch), base)
    comp.activate("a", "b")
    assert torch.equal(_logits(model, batch), both)
    with pytest.raises(PefrefError, match="did you mean 'a'"):
        comp.deactivate("aa")
    comp.remove()
    assert torch.equal(_logits(model, batch), base) and not hasattr(model, "pefref_adapters")


def test_per_example_adapters_match_peft() -> None:
    pm, model, comp = _pair()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(3, 100, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    names = ["a", "__base__", "b", "a"]
    want = _logits(pm, batch, adapter_names=names)
    with comp.per_example(names):
        got = _logits(model, batch)
    assert max_diff(got, want) <= TOL
    # each row is the row of its own adapter run alone
    comp.set_active(["b"])
    assert max_diff(got[2], _logits(model, batch)[2]) <= TOL
    comp.set_active(["a", "b"])
    with pytest.raises(PefrefError, match="4 names for a batch of 2"), comp.per_example(names):
        _logits(model, padded_batch("tiny-llama"))


@pytest.mark.parametrize("kind", COMBINATIONS)
def test_weighted_merge_matches_peft(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("a", "c") if kind in ("cat", "svd") else ("a", "b")  # cat and svd take adapters of different ranks
    pm, model, comp = _pair(names)
    weights = [0.7, -0.4] if "ties" not in kind and "dare" not in kind else [0.7, 0.4]
    extra: dict[str, Any] = {"density": 0.5} if kind not in ("linear", "cat", "svd") else {}
    real = torch.bernoulli

    def seeded() -> Any:  # both sides draw DARE's masks from one fresh generator, in the same order
        gen = torch.Generator().manual_seed(11)
        return lambda p, *a, **k: real(p, generator=gen)

    monkeypatch.setattr(torch, "bernoulli", seeded())
    pm.add_weighted_adapter(list(names), weights, "m", combination_type=kind, **extra)
    monkeypatch.setattr(torch, "bernoulli", seeded())
    new = comp.add_weighted_adapter(list(names), weights, "m", combination_type=kind, **extra)
    monkeypatch.setattr(torch, "bernoulli", real)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    unit = new.units["merged_attn_v__attn_v__1"]
    assert max_diff(unit.A, layer.lora_A["m"].weight) <= TOL and max_diff(unit.B, layer.lora_B["m"].weight) <= TOL
    pm.set_adapter("m")
    comp.set_active(["m"])
    batch = padded_batch("tiny-llama")
    assert max_diff(_logits(model, batch), _logits(pm, batch)) <= TOL
    assert new.num_trainable() == sum(p.numel() for n, p in pm.named_parameters() if ".m." in n or n.endswith(".m.weight"))


def test_merge_refuses_what_is_not_low_rank() -> None:
    model = copy.deepcopy(_base())
    a = apply(model, "lora", name="a")
    d = apply(model, "loha", name="h")
    comp = compose(model, [a, d])
    with pytest.raises(PefrefError, match="not a low-rank update"):
        comp.add_weighted_adapter(["a", "h"], [0.5, 0.5], "m", combination_type="svd")
    with pytest.raises(PefrefError, match="one rank"):
        b = apply(model, "lora", name="b", r=2)
        comp.adapters["b"] = b
        comp.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="linear")
    assert "m" not in comp.adapters and "m" not in model.pefref_adapters


def _two_loras(model: nn.Module, b_scale: float = 1.0) -> tuple[Any, Any]:
    a = apply(model, "lora", name="a")
    b = apply(model, "lora", name="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in (a, b):
            for n, p in ad.named_trainable_parameters().items():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))  # set, not added to: apply's own init draws from the global RNG
                if n.endswith(".B"):
                    p.mul_(b_scale)
    return a, b


def test_blocks_from_python_are_checked_and_combine() -> None:
    batch = padded_batch("tiny-llama")
    model = copy.deepcopy(_base())
    a, b = _two_loras(model)
    comp = compose(model, [a, b], blocks=[{"kind": "average", "adapters": ["a", "b"], "weights": [0.5, 0.5]}])
    avg = _logits(model, batch)
    ref = copy.deepcopy(_base())
    _two_loras(ref, b_scale=0.5)  # the mean of two LoRA updates: each update halved, side by side
    assert max_diff(avg, _logits(ref, batch)) <= TOL
    comp.deactivate("b")
    assert max_diff(_logits(model, batch), avg) > 1e-3
    comp.activate("b")
    d = apply(model, "dora", name="d")
    with pytest.raises(CatalogError, match="run in different stages"):
        compose(model, [a, d], blocks=[{"kind": "parallel", "adapters": ["a", "d"]}], name="bad")
    d.remove()
    comp.remove()
    assert not hasattr(model, "pefref_adapters")
    assert torch.equal(_logits(model, batch), _logits(_base(), batch))
