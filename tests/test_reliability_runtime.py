"""Transactions: apply, merge, unmerge, load and remove complete or change nothing; any order restores the base."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from pefref.language.errors import PefrefError
from pefref.runtime.api import apply

from .conftest import model_inputs, output_of, tiny_model
from .modelstate import assert_same_state, model_state


def _technique(tmp_path: Path, body: str, tid: str = "probe") -> Path:
    head = f"""\
    id: {tid}
    name: Probe
    paper: {{title: t, authors: a, year: 2024, arxiv: "2401.00001"}}
    """
    p = tmp_path / f"{tid}.yaml"
    p.write_text(textwrap.dedent(head) + textwrap.dedent(body))
    return p


def _randomise(adapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --- apply -----------------------------------------------------------------------------------------------


def test_apply_failing_late_initialiser_changes_nothing(tmp_path: Path) -> None:
    # the init reads W, whose shape matches at attn.q (d x d) but not at ffn.up (d_ff x d): fails after q is placed
    tech = _technique(tmp_path, """\
    modules:
      - name: m
        sites: [attn.q, ffn.up]
        form: parallel
        params:
          A: {shape: [d, d], init: W}
        compute: linear(x, A)
    """)
    import yaml

    from pefref.language.schema import Technique

    unchecked = Technique.model_validate(yaml.safe_load(tech.read_text()))  # a Technique built in Python skips validate
    model = tiny_model("llama")
    before = model_state(model)
    for t in (tech, unchecked):
        with pytest.raises(PefrefError, match=r"ffn\.up"):
            apply(model, t)
        assert_same_state(before, model_state(model))


@pytest.mark.parametrize("tid", ["pissa", "oft"])
def test_apply_rank_larger_than_a_dimension_changes_nothing(tid: str) -> None:
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(PefrefError):
        apply(model, tid, r=48)
    assert_same_state(before, model_state(model))


def test_apply_with_map_bound_to_wrong_module_changes_nothing(catalog) -> None:
    fam = catalog.family("llama").model_copy(deep=True)
    sites = dict(fam.sites)
    sites["attn.v"] = sites["attn.v"].model_copy(update={"path": "model.layers.{i}.input_layernorm"})
    fam = fam.model_copy(update={"sites": sites})
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(PefrefError, match="attn.v"):
        apply(model, "lora", family=fam)
    assert_same_state(before, model_state(model))


def test_apply_refuses_allocation_over_budget() -> None:
    from pefref.language.limits import limits

    model = tiny_model("llama")
    before = model_state(model)
    with limits(max_alloc_bytes=1000), pytest.raises(PefrefError, match="budget"):
        apply(model, "lora", r=8)
    assert_same_state(before, model_state(model))


# --- merge bookkeeping -----------------------------------------------------------------------------------


ORDERS = [("a", "b"), ("b", "a")]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("undo", ["unmerge", "remove"])
def test_two_merged_adapters_on_one_host_restore_base_in_any_order(order, undo) -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    base = model_state(model)
    base_out = output_of(model, inputs)
    ad = {"a": apply(model, "lora", name="a"), "b": apply(model, "pissa", name="b", r=4)}
    _randomise(ad["a"], 1)
    _randomise(ad["b"], 2)
    live = output_of(model, inputs)
    ad["a"].merge()
    ad["b"].merge()
    torch.testing.assert_close(output_of(model, inputs), live, atol=1e-5, rtol=0)
    for n in order:
        getattr(ad[n], undo)()
        if undo == "unmerge":
            torch.testing.assert_close(output_of(model, inputs), live, atol=1e-5, rtol=0)
    if undo == "unmerge":
        for n in order:
            ad[n].remove()
    torch.testing.assert_close(output_of(model, inputs), base_out, atol=0, rtol=0)
    assert_same_state(base, model_state(model))


def test_unmerge_in_the_middle_keeps_the_others_merged() -> None:
    model, inputs = tiny_model("gpt2"), model_inputs("gpt2")
    base = model_state(model)
    ads = [apply(model, "lora", name=f"l{i}") for i in range(3)]
    for i, a in enumerate(ads):
        _randomise(a, i)
    live = output_of(model, inputs)
    for a in ads:
        a.merge()
    ads[1].unmerge()
    torch.testing.assert_close(output_of(model, inputs), live, atol=1e-5, rtol=0)
    ads[0].remove()
    ads[1].merge()
    ads[2].unmerge()
    ads[1].remove()
    ads[2].remove()
    assert_same_state(base, model_state(model))


def test_host_updates_of_two_adapters_removed_in_apply_order() -> None:
    model = tiny_model("llama")
    base = model_state(model)
    a = apply(model, "pissa", name="a", r=2)
    b = apply(model, "pissa", name="b", r=2)
    a.remove()
    b.remove()
    assert_same_state(base, model_state(model))


def test_requires_grad_restored_in_any_order() -> None:
    model = tiny_model("gpt2")
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)  # a user's own choice, kept
    base = model_state(model)
    a = apply(model, "bitfit", name="a")
    b = apply(model, "lora", name="b")
    a.remove()
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("pefref_adapters"))
    assert b.num_trainable() > 0
    b.remove()
    assert_same_state(base, model_state(model))


def test_merge_on_removed_handle_is_refused() -> None:
    model = tiny_model("llama")
    a = apply(model, "lora")
    _randomise(a, 0)
    a.remove()
    before = model_state(model)
    with pytest.raises(PefrefError, match="removed"):
        a.merge()
    assert_same_state(before, model_state(model))


def test_merge_inside_disable_is_refused_and_block_restores() -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    base = model_state(model)
    a = apply(model, "lora")
    _randomise(a, 0)
    live = output_of(model, inputs)
    with a.disable():
        inside = model_state(model)
        with pytest.raises(PefrefError, match="disable"):
            a.merge()
        assert_same_state(inside, model_state(model))
    torch.testing.assert_close(output_of(model, inputs), live, atol=0, rtol=0)
    a.merge()
    with a.disable():
        pass
    torch.testing.assert_close(output_of(model, inputs), live, atol=1e-5, rtol=0)
    a.remove()
    assert_same_state(base, model_state(model))


def test_remove_inside_disable_leaves_base() -> None:
    model = tiny_model("gpt2")
    base = model_state(model)
    a = apply(model, "bitfit")
    _randomise(a, 0)
    with a.disable():
        a.remove()
    assert_same_state(base, model_state(model))


def test_merge_failure_on_a_later_host_changes_nothing() -> None:
    # gpt2's fused c_attn has a bias; a technique that adds an offset merges; one without a bias host refuses
    model = tiny_model("llama")
    a = apply(model, "lora")
    _randomise(a, 0)
    before = model_state(model)
    import pefref.runtime.patches as patches

    calls = {"n": 0}
    real = patches.HostPatch.run

    def flaky(self, entries, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, entries, args, kwargs)

    patches.HostPatch.run = flaky
    try:
        with pytest.raises(PefrefError, match="boom"):
            a.merge()
    finally:
        patches.HostPatch.run = real
    assert not a.merged
    assert_same_state(before, model_state(model))


# --- load ------------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, tid: str = "lora", family: str = "llama", **hps) -> Path:
    a = apply(tiny_model(family), tid, **hps)
    _randomise(a, 3)
    p = tmp_path / "a.safetensors"
    a.save(p)
    return p


def _rewrite(src: Path, dst: Path, fn=None, meta=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    if fn is not None:
        tensors = fn(tensors)
    md.update(meta or {})
    save_file(tensors, str(dst), metadata=md)
    return dst


def _last(t: dict) -> str:
    return sorted(t)[-1]


LOAD_CASES = {
    "shape of the last tensor": (lambda t: {**t, _last(t): torch.zeros(3, 3)}, None, "shape"),
    "dtype": (lambda t: {**t, _last(t): t[_last(t)].double()}, None, "dtype"),
    "nan": (lambda t: {**t, _last(t): torch.full_like(t[_last(t)], float("nan"))}, None, "finite"),
    "technique": (None, {"technique": "rslora"}, "technique"),
    "hyperparameters": (None, {"hyperparameters": json.dumps({"alpha": 32.0, "dropout": 0.0, "r": 8})}, "alpha"),
    "family": (None, {"family": "mistral"}, "family"),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_verifies_before_copying(tmp_path: Path, case: str) -> None:
    fn, meta, match = LOAD_CASES[case]
    bad = _rewrite(_saved(tmp_path), tmp_path / "bad.safetensors", fn, meta)
    model = tiny_model("llama")
    a = apply(model, "lora")
    before = model_state(model)
    with pytest.raises(PefrefError, match=match):
        a.load(bad)
    assert_same_state(before, model_state(model))


def test_load_into_another_technique_is_refused(tmp_path: Path) -> None:
    p = _saved(tmp_path)
    model = tiny_model("llama")
    a = apply(model, "rslora", alpha=4)
    before = model_state(model)
    with pytest.raises(PefrefError, match="technique"):
        a.load(p)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header"])
def test_corrupt_adapter_file_is_a_pefref_error(tmp_path: Path, damage: str) -> None:
    p = _saved(tmp_path)
    data = p.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 100, "empty": b"", "header": b"\xff" * 8 + data[8:]}[damage]
    p.write_bytes(bad)
    model = tiny_model("llama")
    a = apply(model, "lora")
    before = model_state(model)
    with pytest.raises(PefrefError, match="a.safetensors"):
        a.load(p)
    assert_same_state(before, model_state(model))


def test_load_round_trip_still_works(tmp_path: Path) -> None:
    model, inputs = tiny_model("llama"), model_inputs("llama")
    a = apply(model, "lora")
    _randomise(a, 5)
    want = output_of(model, inputs)
    a.save(tmp_path / "x.safetensors")
    fresh = tiny_model("llama")
    apply(fresh, "lora").load(tmp_path / "x.safetensors")
    torch.testing.assert_close(output_of(fresh, inputs), want, atol=0, rtol=0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("undo", ["unmerge", "remove"])
def test_merged_reparameterisation_and_lora_restore_base_in_any_order(order, undo) -> None:
    model = tiny_model("llama")
    base = model_state(model)
    ad = {"a": apply(model, "lora", name="a"), "b": apply(model, "dora", name="b")}
    _randomise(ad["a"], 1)
    _randomise(ad["b"], 2)
    ad["a"].merge()
    ad["b"].merge()
    for n in order:
        getattr(ad[n], undo)()
    for n in order:
        ad[n].remove()
    assert_same_state(base, model_state(model))
