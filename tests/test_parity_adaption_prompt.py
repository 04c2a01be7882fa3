"""Numerical parity with HF peft 0.21 for the adaption prompt (LLaMA-Adapter, peft's ADAPTION_PROMPT).

The technique reads two capabilities beyond a site's hidden state: the queries after the rotary
position embedding (site attn.q_rot, bound in rotary families) and the frozen weights of
neighbouring projections (connections with tensor W). One seeded tiny model is deep-copied into a
peft model and a pefref model; peft's prompts and gates are perturbed (the gate starts at zero),
copied into pefref's units by hand, and both run the same left-padded batch in fp32. peft has no
entry for Qwen2 (its attention is Llama's): the test gives it Llama's, which computes the same function.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch
from peft.tuners.adaption_prompt import config as ap_config
from torch import nn

from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
ROTARY = ("tiny-llama", "tiny-mistral", "tiny-qwen2")


def _peft_model(base: nn.Module, n: int, top: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(ap_config.TRANSFORMERS_MODEL_CONFIG, "qwen2", ap_config.TRANSFORMERS_MODEL_CONFIG["llama"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=n, adapter_layers=top))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return pm.eval()


def _copy_from_peft(adapter: Adapter, pm: Any) -> None:
    layers = pm.get_base_model().model.layers
    with torch.no_grad():
        for key, unit in adapter.units.items():
            if key.startswith("adaption__"):
                attn = layers[int(key.rsplit("__", 1)[1])].self_attn
                unit.P.copy_(attn.adaption_prompt[0])  # peft: [1, n, d]
                unit.gate.copy_(attn.adaption_gate)


def _output(model: nn.Module, shape: str) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch(shape))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", ROTARY)
@pytest.mark.parametrize("top", [2, 1])
def test_outputs_and_trainable_counts_match_peft(shape: str, top: int, monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_model(shape, seed=0)
    pm = _peft_model(base, 3, top, monkeypatch)
    model = copy.deepcopy(base)
    L = base.config.num_hidden_layers
    adapter = apply(model, "adaption_prompt", layers=list(range(L - top, L)), n=3)
    _copy_from_peft(adapter, pm)
    want = _output(pm, shape)
    assert max_diff(_output(model, shape), want) <= TOL
    assert max_diff(want, _output(base, shape)) > 1e-3  # the adapter changes the output
    assert adapter.report.trainable == _trainable(model) == _trainable(pm) == top * (3 * 32 + 1)


def test_identity_at_init_and_base_back_bit_exactly() -> None:
    base = build_model("tiny-llama", seed=0)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = apply(model, "adaption_prompt", n=4)
    assert torch.equal(_output(model, "tiny-llama"), _output(base, "tiny-llama"))  # the gate starts at zero
    adapter.remove()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the rotary hooks are gone


def test_gradients_reach_the_prompt_and_gate_only() -> None:
    model = build_model("tiny-llama", seed=0)
    adapter = apply(model, "adaption_prompt", n=2)
    with torch.no_grad():
        for unit in adapter.units.values():
            for p in unit.parameters():
                p.add_(0.1)
    output_of(model, padded_batch("tiny-llama")).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("shape", ["tiny-gpt2", "tiny-bert"])
def test_families_without_rotary_positions_refuse(shape: str) -> None:
    model = build_model(shape, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PefrefError, match="attn.q_rot"):
        apply(model, "adaption_prompt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_refuses_layers_peft_cannot_name(tmp_path: Any) -> None:
    """peft's adapter_layers counts layers from the last: a prompt on the first layer only has no peft form."""
    model = build_model("tiny-llama", seed=0)
    adapter = apply(model, "adaption_prompt", layers=[0], n=2)
    with pytest.raises(PefrefError, match="last"):
        adapter.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_generation_with_the_cache_matches_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding token by token: each new query is rotated at its own position (the cell follows the cache)."""
    base = build_model("tiny-llama", seed=0)
    pm = _peft_model(base, 3, 2, monkeypatch)
    model = copy.deepcopy(base)
    _copy_from_peft(apply(model, "adaption_prompt", n=3), pm)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        want, got = pm.generate(input_ids=ids, **kw), model.generate(input_ids=ids, **kw)
    assert torch.equal(want.sequences, got.sequences)
    assert max(max_diff(a, b) for a, b in zip(got.scores, want.scores)) <= TOL
