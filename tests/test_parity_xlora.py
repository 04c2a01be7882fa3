"""X-LoRA against peft 0.21's XLoraModel: two-pass routing (``pass: first``).

peft builds X-LoRA from LoRA adapters saved to disk: two LoRAs (rank 4, alpha 8,
query and value projections) are built on the base model, perturbed and saved;
peft's XLoraModel loads them as its experts and its classifier is perturbed too.
pefref's ``xlora`` gets the same experts (A stacked, B stacked) and classifier. In
fp32 the outputs agree within 1e-5, the trainable counts (the classifier only: peft
freezes the experts) are equal, and the adapter changes the output. The first pass
is checked on its own too: it runs once per call, without the experts, under
no_grad, and a key/value cache is refused.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
SHAPES = ["tiny-llama", "tiny-qwen2"]
E, R, ALPHA = 2, 4, 8


@functools.cache
def base_model(shape: str) -> nn.Module:
    model = build_model(shape, seed=0).eval()
    model.config.use_cache = False  # peft's X-LoRA refuses a model that caches keys and values
    return model


def _save_experts(base: nn.Module, tmp: Path) -> list[str]:
    """E perturbed LoRA adapters saved in peft's format; their folders."""
    paths = []
    for i in range(E):
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn_like(p))
        pm.save_pretrained(str(tmp / f"expert{i}"))
        paths.append(str(tmp / f"expert{i}"))
    return paths


def _peft_xlora(base: nn.Module, paths: list[str]) -> Any:
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters={str(i): p for i, p in enumerate(paths)})
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "internal_xlora_classifier" in name:
                p.copy_(torch.randn_like(p))
    return pm


def _copy(pm: Any, adapter: Adapter) -> None:
    """peft's experts and classifier into pefref's units (A stacked over the experts, B stacked)."""
    hosts = dict(pm.base_model.lora_model.model.named_modules())
    lin = pm.base_model.internal_xlora_classifier.layers[0]
    with torch.no_grad():
        for key, unit in adapter.units.items():
            if not key.startswith("experts__"):
                continue
            _, site, layer = key.split("__")
            proj = {"attn_q": "q_proj", "attn_v": "v_proj"}[site]
            host = hosts[f"model.layers.{layer}.self_attn.{proj}"]
            unit.A.copy_(torch.cat([host.lora_A[str(i)].weight for i in range(E)]))
            unit.B.copy_(torch.stack([host.lora_B[str(i)].weight for i in range(E)]))
            unit.Wc.copy_(lin.weight)
            unit.bc.copy_(lin.bias)


@functools.cache
def pair(shape: str) -> tuple[nn.Module, Any, nn.Module, Adapter]:
    import tempfile

    base = base_model(shape)
    with tempfile.TemporaryDirectory() as tmp:
        pm = _peft_xlora(base, _save_experts(base, Path(tmp)))
    model = copy.deepcopy(base)
    adapter = apply(model, "xlora", E=E, r=R, alpha=ALPHA)
    _copy(pm, adapter)
    return base, pm, model, adapter


def output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, inputs)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_trainable_counts_match_peft(shape: str) -> None:
    base, pm, model, adapter = pair(shape)
    inputs = padded_batch(shape)
    want = output(pm, inputs)
    got = output(model, inputs)
    assert max_diff(got, want) <= TOL
    assert max_diff(want, output(base, inputs)) > 1e-3  # not vacuous: the experts change the output
    n_peft = n_trainable(pm)
    assert n_peft == E * base.config.hidden_size + E  # peft trains the classifier only
    assert adapter.num_trainable() == n_peft == adapter.report.trainable
    assert n_trainable(model) == n_peft


def test_the_classifier_reads_the_first_pass() -> None:
    """The routing weights come from the first pass: changing the classifier changes the output, the experts
    are off during that pass (it gives the base model's final hidden state), and it runs once per call."""
    base, _pm, model, adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    before = output(model, inputs)
    unit = adapter.units["experts__attn_q__0"]
    seen: list[torch.Tensor] = []
    handle = model.get_submodule("model.norm").register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        output(model, inputs)
    finally:
        handle.remove()
    assert len(seen) == 2  # the first pass, then the real one
    want = base.model(**inputs).last_hidden_state
    assert max_diff(seen[0], want) <= TOL and max_diff(seen[1], want) > 1e-3
    with torch.no_grad():
        old = unit.bc.clone()
        unit.bc.add_(torch.tensor([3.0, -3.0]))
    try:
        assert max_diff(output(model, inputs), before) > 1e-4
    finally:
        with torch.no_grad():
            unit.bc.copy_(old)
    with adapter.disable():  # disabled: no first pass, the base model
        assert torch.equal(output(model, inputs), output(base, inputs))


def test_gradient_reaches_the_classifier_only() -> None:
    _base, _pm, model, adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    adapter.units.zero_grad()
    output_of(model, inputs).sum().backward()
    grads = {n: p.grad for n, p in adapter.named_trainable_parameters().items()}
    assert set(grads) == {"experts__attn_q__0.Wc", "experts__attn_q__0.bc"}
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    adapter.units.zero_grad()


def test_peft_format_both_ways_and_peft_s_own_save_without_its_classifier_refused(tmp_path: Path) -> None:
    """pefref's adapter (equal to peft's) written in peft's format loads in peft with the same outputs; the folder
    peft 0.21's save_pretrained writes lacks the classifier (it filters keys holding '.0.') and is refused, the model
    unchanged. The round trips are tests/test_interop_peft.py's xlora case."""
    from pefref.interop.peft_format import from_pretrained

    base, pm, _model, adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    adapter.save_pretrained(tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    assert max_diff(output(loaded, inputs), output(pm, inputs)) <= TOL
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh = copy.deepcopy(base)
    with pytest.raises(PefrefError, match="no tensor 'base_model.internal_xlora_classifier.layers.0.(weight|bias)'.*leaves it out"):
        from_pretrained(fresh, tmp_path / "peft")
    assert torch.equal(output(fresh, inputs), output(base, inputs))


def test_a_cache_is_refused_and_nothing_changes() -> None:
    from transformers import DynamicCache

    base, _pm, model, _adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    before = output(model, inputs)
    with pytest.raises(PefrefError, match="use_cache=False"):
        model(**inputs, use_cache=True, past_key_values=DynamicCache(config=base.config))
    assert torch.equal(output(model, inputs), before)


def test_saved_adapter_carries_the_experts_and_the_classifier(tmp_path: Path) -> None:
    """pefref's own file holds every tensor (frozen experts included): a fresh X-LoRA loaded from it computes the same."""
    base, _pm, model, adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    adapter.save(tmp_path / "x.safetensors")
    other = copy.deepcopy(base)
    b = apply(other, "xlora", E=E, r=R, alpha=ALPHA)
    assert max_diff(output(other, inputs), output(base, inputs)) == 0  # fresh: zero experts
    b.load(tmp_path / "x.safetensors")
    assert max_diff(output(other, inputs), output(model, inputs)) == 0


def test_another_adapter_runs_in_both_passes() -> None:
    """Beside X-LoRA, a LoRA on the FFN computes in the first pass too (only X-LoRA's modules are off there): the
    classifier reads the final norm's output of the base model with that LoRA."""
    base, _pm, model, adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    lora = apply(model, "lora", sites=["ffn.up"], name="ffn_lora")
    try:
        with torch.no_grad():
            for p in lora.trainable_parameters():
                p.copy_(0.3 * torch.randn_like(p))
        seen: list[torch.Tensor] = []
        handle = model.get_submodule("model.norm").register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
        try:
            output(model, inputs)
        finally:
            handle.remove()
        with adapter.disable():
            want = model.model(**inputs).last_hidden_state  # the base model with the FFN LoRA only
        assert len(seen) == 2 and max_diff(seen[0], want) <= TOL
        assert max_diff(want, base.model(**inputs).last_hidden_state) > 1e-3
    finally:
        lora.remove()


def test_a_forward_that_skips_the_first_pass_is_refused() -> None:
    """The backbone called alone runs no first pass: its readers are refused, never given the last call's values."""
    _base, _pm, model, _adapter = pair("tiny-llama")
    inputs = padded_batch("tiny-llama")
    output(model, inputs)
    with pytest.raises(PefrefError, match="first forward pass"):
        model.model(**inputs)
