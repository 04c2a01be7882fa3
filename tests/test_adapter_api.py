"""The Adapter handle beyond the catalog-wide properties: files, coexistence, restrictions, dtype."""

from __future__ import annotations

import pytest
import torch

from pefref.language.errors import PefrefError, SiteError
from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model


def _randomise(adapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_safetensors_round_trip(tmp_path) -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    a = apply(model, "lora", r=4)
    _randomise(a)
    want = output_of(model, inputs)
    a.save(tmp_path / "adapter.safetensors")
    fresh = tiny_model("llama")
    b = apply(fresh, "lora", r=4)
    assert not torch.equal(output_of(fresh, inputs), want)
    b.load(tmp_path / "adapter.safetensors")
    torch.testing.assert_close(output_of(fresh, inputs), want, atol=0, rtol=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert f.metadata()["technique"] == "lora"
        assert len(list(f.keys())) == 2 * 2 * 2  # A and B at q and v of two layers


def test_wrong_state_is_refused() -> None:
    a = apply(tiny_model("llama"), "lora", r=4)
    state = a.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(PefrefError, match="missing"):
        a.load_state_dict(state)


def test_two_adapters_coexist_and_remove_in_any_order() -> None:
    model, inputs = tiny_model("gpt2"), model_inputs("gpt2")
    base = output_of(model, inputs)
    a = apply(model, "lora", name="one")
    b = apply(model, "ia3", name="two")
    _randomise(a, 1)
    _randomise(b, 2)
    both = output_of(model, inputs)
    with a.disable():
        only_b = output_of(model, inputs)
    a.remove()
    torch.testing.assert_close(output_of(model, inputs), only_b, atol=1e-6, rtol=0)
    assert not torch.allclose(only_b, both)
    b.remove()
    torch.testing.assert_close(output_of(model, inputs), base, atol=0, rtol=0)
    with pytest.raises(PefrefError, match="already applied"):
        apply(model, "lora", name="x")
        apply(model, "lora", name="x")


def test_site_and_layer_restrictions() -> None:
    a = apply(tiny_model("llama"), "lora", sites=["attn.v"], layers=[-1])
    assert [(r.site, r.paths) for r in a.report.rows] == [("attn.v", ["model.layers.1.self_attn.v_proj"])]
    with pytest.raises(SiteError, match="cannot be placed on 'attn.kv'"):  # another site of another kind
        apply(tiny_model("llama"), "lora", sites=["attn.kv"])
    with pytest.raises(SiteError, match="does not exist"):
        apply(tiny_model("llama"), "lora", layers=[7])


def test_gpt2_slices_touch_only_their_part() -> None:
    """LoRA on attn.q of GPT-2 changes only the first d outputs of the fused c_attn."""
    model = tiny_model("gpt2")
    host = model.transformer.h[0].attn.c_attn
    x = torch.randn(1, 3, 32)
    before = host(x)
    a = apply(model, "lora", sites=["attn.q"], layers=[0])
    _randomise(a)
    after = host(x)
    assert (after[..., :32] - before[..., :32]).abs().max() > 1e-4
    torch.testing.assert_close(after[..., 32:], before[..., 32:], atol=0, rtol=0)


def test_adapter_dtype_policy() -> None:
    """peft's autocast_adapter_dtype: fp32 adapters on a bf16 host; adapter_dtype="host" or dtype= otherwise."""
    model = tiny_model("llama").to(torch.bfloat16)
    a = apply(model, "lora")
    assert {p.dtype for p in a.trainable_parameters()} == {torch.float32}
    h = apply(tiny_model("llama").to(torch.bfloat16), "lora", adapter_dtype="host")
    assert {p.dtype for p in h.trainable_parameters()} == {torch.bfloat16}
    b = apply(tiny_model("llama").to(torch.bfloat16), "lora", dtype=torch.float16)
    assert {p.dtype for p in b.trainable_parameters()} == {torch.float16}


def test_unknown_technique_suggests() -> None:
    with pytest.raises(PefrefError, match="did you mean 'lora'"):
        apply(tiny_model("llama"), "lorra")


def test_attention_modules_skip_padded_keys() -> None:
    """Tiny-Attention reads the model's padding mask: on BERT, padded tokens do not reach real ones."""
    model, inputs = tiny_model("bert"), model_inputs("bert")  # row 0 has two padded positions
    assert inputs["attention_mask"][0, :2].sum() == 0
    a = apply(model, "tiny_attention_adapter")
    _randomise(a)
    out = output_of(model, inputs)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, :2] = 7  # change only what sits under the padding
    torch.testing.assert_close(output_of(model, other)[0, 2:], out[0, 2:], atol=1e-6, rtol=0)
    assert torch.isfinite(out).all()
    assert "_pefref_inputs" in model.__dict__
    a.remove()
    assert "_pefref_inputs" not in model.__dict__  # the input hook goes with the last adapter that used it
