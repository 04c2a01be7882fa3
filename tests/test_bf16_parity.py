"""bf16 parity with peft's adapter dtype policy (``autocast_adapter_dtype=True``) on Llama and GPT-2.

peft keeps a bf16 model's adapter in fp32 and computes it in fp32, casting at the boundary; pefref does the
same by default: merged weights equal peft's bit for bit, outputs within bf16 tolerance of peft's (LoRA,
(IA)^3 and prefix tuning: identical), and not farther from the fp32 result than with ``adapter_dtype="host"``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pefref
from pefref.language.errors import PefrefError

from .bf16_cases import BF16_CASES, bf16_base, measure

BF16_ULP = 2.0**-8  # the spacing of bf16 numbers in [1, 2): outputs here are below 4 in magnitude


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_matches_peft(shape: str, name: str, tmp_path: Path) -> None:
    r = measure(shape, name, tmp_path / "adapter")
    assert r.adapter_dtypes == {torch.float32}
    assert r.vs_peft <= 2 * BF16_ULP, r
    if name != "dora":  # DoRA: peft forms its output from the base output and the norm; pefref from the weight
        assert r.vs_peft == 0.0, r
    if r.merged_equal is not None:
        assert r.merged_equal, r
    assert r.to_fp32 <= r.peft_to_fp32 + BF16_ULP, r  # as far from the fp32 result as peft is
    if name == "lora":  # the adapter's own rounding is gone: closer to fp32 than the host-dtype adapter
        assert r.mean_to_fp32 < r.host_mean_to_fp32, r
    else:  # DoRA's norm, (IA)^3's product, a prefix's keys are rounded to bf16 in either policy: not farther, up to noise
        assert r.mean_to_fp32 <= 1.05 * r.host_mean_to_fp32, r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_policy_keeps_the_host_dtype(dtype: torch.dtype) -> None:
    model = copy.deepcopy(bf16_base("tiny-llama")).to(dtype)
    auto = pefref.apply(model, "lora", name="auto")
    host = pefref.apply(model, "lora", name="host", adapter_dtype="host")
    assert {p.dtype for p in auto.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in host.trainable_parameters()} == {dtype}
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == dtype


def test_fp32_host_is_unchanged_and_bad_policy_refused() -> None:
    model = copy.deepcopy(bf16_base("tiny-llama")).float()
    a = pefref.apply(model, "lora")
    assert {p.dtype for p in a.trainable_parameters()} == {torch.float32}
    assert all("boundary" not in u.__dict__ for u in a.units.values())
    with pytest.raises(PefrefError, match="adapter_dtype"):
        pefref.apply(model, "lora", name="x", adapter_dtype="fp8")  # type: ignore[arg-type]
    assert list(a.model.pefref_adapters) == ["lora"] if hasattr(a.model, "pefref_adapters") else True


def test_saved_bf16_adapter_loads_into_fp32_policy(tmp_path: Path) -> None:
    """A file saved under adapter_dtype="host" (bf16 tensors) loads exactly into the default fp32 adapter."""
    model = copy.deepcopy(bf16_base("tiny-llama"))
    a = pefref.apply(model, "lora", adapter_dtype="host")
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    a.save(tmp_path / "a.safetensors")
    b = pefref.from_pretrained(copy.deepcopy(bf16_base("tiny-llama")), tmp_path / "a.safetensors")
    for k, v in a.state_dict().items():
        assert b.state_dict()[k].dtype == torch.float32
        assert torch.equal(b.state_dict()[k], v.float())
