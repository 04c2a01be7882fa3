"""Numerical parity with HF peft 0.21 for techniques whose initialisers see every layer of a site (``W_layers``).

FRoD builds one input basis per projection from that projection's weights at every adapted layer. One seeded
tiny model is deep-copied into a peft model and a pefref model; the bases and per-layer directions both sides
compute from the weights must agree, peft's trained tensors are perturbed and copied into pefref's units (its
sparse positions too: peft draws the positions of every projection from one generator in turn, pefref each
site's from its own, equal for the first projection), and both run the same left-padded batch in fp32.
Outputs agree within 1e-5, the adapter changes the base model, trainable counts are equal, merging agrees
with peft's, and removing the adapter gives the base model back bit-exactly. Validate refuses ``W_layers``
where no initialiser sees every layer, with a located error.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.language.validate import validate_paths
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .modelstate import assert_same_state, model_state
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
QV = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
SHAPES = ("tiny-llama", "tiny-bert")


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


def _family(shape: str) -> str:
    return CATALOG.shape(shape).family


def _host(pm: peft.PeftModel, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family(family).sites[site].path.format(i=int(layer)))


def _output(model: nn.Module, shape: str) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch(shape))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_frod(shape: str, **kw: object) -> peft.PeftModel:
    family = _family(shape)
    cfg = peft.FrodConfig(task_type="FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM", target_modules=QV[family], progressbar=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base_model(shape)), cfg).eval()


def _pair(shape: str, model: nn.Module | None = None) -> tuple[peft.PeftModel, nn.Module, Adapter]:
    """peft's FRoD with perturbed trained tensors, and pefref's (on ``model``, else a copy of the base) with the same values copied in."""
    pm = _peft_frod(shape, sparse_rate=0.05)
    model = copy.deepcopy(base_model(shape)) if model is None else model
    adapter = apply(model, "frod", sparse_rate=0.05)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        for key, unit in adapter.units.items():
            layer = _host(pm, key, _family(shape))
            assert max_diff(unit.V, layer.frod_V["default"]) <= TOL  # the joint basis of the site's layers
            assert max_diff(unit.U, layer.frod_U["default"]) <= TOL
            unit.loc.copy_(layer.frod_s_indices["default"])  # shared by the site's layers on both sides
            unit.lam.copy_(layer.frod_lambda_l["default"])
            unit.s.copy_(layer.frod_lambda_s_values["default"])
    return pm, model, adapter


@pytest.mark.parametrize("shape", SHAPES)
def test_frod_at_init_reconstructs_the_base_and_matches_peft(shape: str) -> None:
    pm = _peft_frod(shape)
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, "frod")
    base = _output(base_model(shape), shape)
    assert max_diff(_output(model, shape), _output(pm, shape)) <= TOL
    assert max_diff(_output(model, shape), base) <= TOL  # U·diag(λ)·Vᵀ rebuilds W up to rounding
    assert adapter.report.trainable == _trainable(model) == _trainable(pm)
    first = sorted(k for k in adapter.units if "attn_q" in k)[0]  # peft's first category draws from a fresh generator
    assert torch.equal(adapter.units[first].loc, _host(pm, first, _family(shape)).frod_s_indices["default"])


@pytest.mark.parametrize("shape", SHAPES)
def test_frod_outputs_and_trainable_counts_match_peft(shape: str) -> None:
    pm, model, adapter = _pair(shape)
    want = _output(pm, shape)
    assert max_diff(_output(model, shape), want) <= TOL
    assert max_diff(want, _output(base_model(shape), shape)) > 1e-3  # not vacuous
    assert adapter.report.trainable == _trainable(model) == _trainable(pm)
    sites = {k.split("__")[1] for k in adapter.units}
    assert len(sites) == 2 and len(adapter.units) == 2 * CATALOG.shape(shape).config["num_hidden_layers"]


def test_frod_shares_one_basis_per_site_and_counts_it_once() -> None:
    model = copy.deepcopy(base_model("tiny-llama"))
    adapter = apply(model, "frod")
    q = [u for k, u in adapter.units.items() if "attn_q" in k]
    v = [u for k, u in adapter.units.items() if "attn_v" in k]
    assert all(u.V is q[0].V for u in q) and q[0].V is not v[0].V
    assert all(u.U is not q[0].U for u in q[1:])  # per layer


def test_frod_merges_like_peft_and_removes_bit_exactly() -> None:
    shape = "tiny-llama"
    model = copy.deepcopy(base_model(shape))
    before = model_state(model)
    pm, model, adapter = _pair(shape, model)
    unmerged = _output(model, shape)
    assert len(adapter.mergeable_units) == len(adapter.units)
    adapter.merge()
    merged = _output(model, shape)
    assert max_diff(merged, unmerged) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert max_diff(merged, _output(pm.merge_and_unload(), shape)) <= TOL
    adapter.unmerge()
    adapter.remove()
    assert_same_state(model_state(model), before)


PROBE = """\
id: {tid}
name: Probe
paper: {{title: t, authors: a, year: 2024, arxiv: "2401.00001"}}
summary: s
modules:
  - name: m
    sites: [attn.q]
    form: reparameterise
    params:
      V: {{shape: [d_in, d_in], init: "joint_row_basis(W_layers)", trainable: false{shared}}}
      g: {{shape: [d_in], init: zeros()}}
    weight: W @ (V + diag(g))
"""


@pytest.mark.parametrize(("shared", "want"), [("", "shared: layers"), (", shared: all", "shared: layers")])
def test_validate_refuses_layer_weights_outside_a_tensor_shared_across_layers(tmp_path: Path, shared: str, want: str) -> None:
    path = tmp_path / "probe_xl.yaml"
    path.write_text(PROBE.format(tid="probe_xl", shared=shared))
    problems, _ = validate_paths([path])
    hits = [p for p in problems if "W_layers" in p.message]
    assert len(hits) == 1, problems
    assert want in hits[0].message and hits[0].field.endswith("params.V.init")
    assert hits[0].location.line == 10 and hits[0].location.column > 1


def test_validate_accepts_layer_weights_in_a_tensor_shared_across_layers(tmp_path: Path) -> None:
    path = tmp_path / "probe_xl.yaml"
    path.write_text(PROBE.format(tid="probe_xl", shared=", shared: layers"))
    problems, _ = validate_paths([path])
    assert not problems, problems


def test_validate_refuses_layer_weights_in_a_forward_expression(tmp_path: Path) -> None:
    path = tmp_path / "probe_xl.yaml"
    path.write_text(PROBE.format(tid="probe_xl", shared=", shared: layers").replace("weight: W @", "weight: sum(W_layers, 0) @"))
    problems, _ = validate_paths([path])
    assert any("W_layers" in p.message and p.field.endswith("weight") for p in problems), problems
