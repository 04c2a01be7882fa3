"""Catalog-driven properties of every technique × every family it applies to."""

from __future__ import annotations

import pytest
import torch

from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.language.errors import PefrefError
from pefref.models.build import applicable
from pefref.runtime.api import ADAPTERS_ATTR, apply
from pefref.runtime.calibration import takes_labels
from pefref.view.analysis import modules_mergeable
from pefref.view.costs import efficiency
from pefref.view.params import count_params

from .conftest import TINY, invoking, model_inputs, output_of, tiny_model

_CAT = default_catalog()


def _without_a_loss(t: object, fam: str) -> bool:
    """A technique initialised from the loss gradient of its host weights (weight_grad) on a family whose tiny model
    has no loss (a base encoder without a head takes no labels): applying it is refused (tested below)."""
    stats = [st for m in expand_modules(t, _CAT.techniques)[0] for st in (getattr(m, "calibration", None) or {}).values()]
    return any(st.kind == "weight_grad" for st in stats) and not takes_labels(tiny_model(fam))


_APPLICABLE = [
    (tid, fam)
    for tid, t in sorted(_CAT.techniques.items())
    for fam in TINY
    if applicable(expand_modules(t, _CAT.techniques)[0], _CAT.family(fam))
    and count_params(t, _CAT.shape(TINY[fam]), _CAT).trainable > 0  # e.g. bias tuning on bias-free Llama
]
CASES = [pytest.param(tid, fam, id=f"{tid}-{fam}") for tid, fam in _APPLICABLE if not _without_a_loss(_CAT.technique(tid), fam)]
NO_LOSS = [pytest.param(tid, fam, id=f"{tid}-{fam}") for tid, fam in _APPLICABLE if _without_a_loss(_CAT.technique(tid), fam)]


@pytest.mark.parametrize("tid,fam", NO_LOSS)
def test_a_gradient_initialisation_on_a_model_without_a_loss_is_refused(tid: str, fam: str) -> None:
    model = tiny_model(fam)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PefrefError, match="weight_grad statistics differentiate the model's loss: give calibration batches with labels"):
        apply(model, tid)
    assert not hasattr(model, ADAPTERS_ATTR) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
FROZEN = [  # techniques that train nothing (a routed library of loaded experts)
    pytest.param(tid, fam, id=f"{tid}-{fam}")
    for tid, t in sorted(_CAT.techniques.items()) if t.frozen
    for fam in TINY
    if applicable(expand_modules(t, _CAT.techniques)[0], _CAT.family(fam))
]


def _compare_len(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The positions of ``out`` that correspond to the input (prompts prepend positions)."""
    return out[:, out.shape[1] - base.shape[1]:]


def _perturb(adapter) -> None:
    """Move the trained tensors; a frozen tensor that is all zero stands for tensors that are loaded, not trained
    (X-LoRA's experts, whose classifier alone trains): it is moved too, as experts put in."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for b in adapter.units.buffers():
            if b.is_floating_point() and not b.any():
                b.add_(torch.randn(b.shape, generator=g) * 0.05)


@pytest.mark.parametrize("fam", ["llama", "gpt2", "bert"])
def test_shown_mergeability_is_the_runtime_one(fam: str) -> None:
    """What `pefref show` says (efficiency on a shape) is the same derivation as above, per technique."""
    shape = _CAT.shape(TINY[fam])
    for tid, t in sorted(_CAT.techniques.items()):
        modules, _ = expand_modules(t, _CAT.techniques)
        if (tid, fam) in {(c.values[0], c.values[1]) for c in CASES}:
            assert efficiency(t, shape, _CAT).mergeable == modules_mergeable(modules, _CAT.reference, _CAT.family(fam)), tid


@pytest.mark.parametrize("tid,fam", CASES)
def test_properties(tid: str, fam: str) -> None:
    t = _CAT.technique(tid)
    model = tiny_model(fam)
    inputs = model_inputs(fam)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_names = [n for n, _ in model.named_parameters()]
    base_out = output_of(model, inputs)

    a = apply(model, tid, **invoking(tid, inputs["input_ids"]))
    trainable = a.named_trainable_parameters()
    own = {id(p) for p in trainable.values()}
    # only adapter (and selected) parameters require grad
    assert {id(p) for p in model.parameters() if p.requires_grad} == own
    assert a.report.trainable == sum(p.numel() for p in trainable.values()) > 0
    # the base model's state-dict keys and values are unchanged (adapters live under one prefix)
    sd = model.state_dict()
    assert set(base_state) <= set(sd)
    assert all(k.startswith(ADAPTERS_ATTR + ".") for k in set(sd) - set(base_state))
    from pefref.runtime.ledger import all_ledgers

    written = {id(t) for led in all_ledgers(model) if led.layers for t in led.tensors(True)}  # host updates
    written_names = {n for n, p in model.named_parameters() if id(p) in written}
    for k, v in base_state.items():
        if k not in a._host_backup and k not in written_names:
            assert torch.equal(sd[k], v), k

    out = _compare_len(output_of(model, inputs), base_out)
    if t.identity_at_init:
        torch.testing.assert_close(out, base_out, atol=1e-6, rtol=0)

    _perturb(a)
    adapted = output_of(model, inputs)
    with a.disable():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)

    # the view's mergeability on this family is what merge() does (one derivation for both)
    modules, _ = expand_modules(t, _CAT.techniques)
    view = modules_mergeable(modules, _CAT.reference, _CAT.family(fam))
    if view:
        a.merge()
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)
        a.unmerge()
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-6, rtol=0)
    else:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(PefrefError, match="cannot be merged"):
            a.merge()
        assert not a.merged
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # refused: nothing changed
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)

    # a few optimiser steps change adapter parameters only
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = output_of(model, inputs)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * target).sum().backward()  # not a norm of the output: LayerNorm outputs have fixed norms
        opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed, "training changed nothing"
    assert all(id(model.get_parameter(n)) in own for n in changed)

    # adapter state save/load reproduces outputs
    trained = output_of(model, inputs)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.zero_()
    a.load_state_dict(state)
    torch.testing.assert_close(output_of(model, inputs), trained, atol=0, rtol=0)

    # remove() restores names, values (selected parameters were trained: restore from the snapshot) and outputs
    a.remove()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base_state[n])
    assert [n for n, _ in model.named_parameters()] == base_names
    assert not hasattr(model, ADAPTERS_ATTR)
    assert set(model.state_dict()) == set(base_state)
    assert not any(p.requires_grad is False for p in model.parameters()) or all(
        p.requires_grad == tiny_model(fam).get_parameter(n).requires_grad for n, p in model.named_parameters())
    torch.testing.assert_close(output_of(model, inputs), base_out, atol=0, rtol=0)


@pytest.mark.parametrize("tid,fam", CASES)
def test_analytic_count_equals_counted(tid: str, fam: str) -> None:
    t = _CAT.technique(tid)
    counted = apply(tiny_model(fam), tid).report.trainable
    assert count_params(t, _CAT.shape(TINY[fam]), _CAT).trainable == counted


def test_every_technique_applies_somewhere() -> None:
    assert {c.values[0] for c in CASES + FROZEN} == set(_CAT.techniques)


@pytest.mark.parametrize("tid,fam", FROZEN)
def test_frozen_technique_properties(tid: str, fam: str) -> None:
    """A technique that trains nothing: no tensor trains; with its tensors set (as one loads them) it changes the
    output; disable, the merge refusal or merge, save/load and remove behave as for any technique."""
    t = _CAT.technique(tid)
    model = tiny_model(fam)
    inputs = model_inputs(fam)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = output_of(model, inputs)
    a = apply(model, tid)
    assert a.report.trainable == 0 and not a.trainable_parameters() and not any(p.requires_grad for p in model.parameters())
    if t.identity_at_init:
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [v for v in a.state_dict().values() if v.is_floating_point()]:  # fixed tensors (buffers), as loaded
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    adapted = output_of(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-3
    with a.disable():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=1e-6, rtol=0)
    if modules_mergeable(expand_modules(t, _CAT.techniques)[0], _CAT.reference, _CAT.family(fam)):
        a.merge()
        torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=0)
        a.unmerge()
    else:
        with pytest.raises(PefrefError, match="cannot be merged"):
            a.merge()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        for p in [v for v in a.state_dict().values() if v.is_floating_point()]:  # fixed tensors (buffers), as loaded
            p.zero_()
    a.load_state_dict(state)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)
    a.remove()
    assert not hasattr(model, ADAPTERS_ATTR)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(output_of(model, inputs), base_out, atol=0, rtol=0)


REAL_SHAPES = ("gpt2", "bert-base-uncased", "qwen2-0.5b")


@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_analytic_count_equals_counted_on_real_shapes(shape: str) -> None:
    """Real model sizes, built on the meta device (nothing allocated): every technique's count agrees."""
    from pefref.models.build import build_model

    s = _CAT.shape(shape)
    fam = _CAT.family(s.family)
    checked = 0
    for tid, t in sorted(_CAT.techniques.items()):
        if not applicable(expand_modules(t, _CAT.techniques)[0], fam):
            continue
        want = count_params(t, s, _CAT).trainable
        if want == 0:
            continue
        got = apply(build_model(s, device="meta"), tid).report.trainable
        assert got == want, tid
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize("shape", sorted(_CAT.shapes))
def test_base_params_formula_equals_the_built_model(shape: str) -> None:
    """Each family's base_params expression counts the real model of every named shape (meta device)."""
    from pefref.language.sizes import eval_scalar, model_sizes
    from pefref.models.build import build_model

    s = _CAT.shape(shape)
    fam = _CAT.family(s.family)
    want = eval_scalar(fam.base_params, {**model_sizes(fam, dict(s.config)), **s.config})
    model = build_model(s, device="meta")
    assert sum(p.numel() for p in model.parameters()) == want
