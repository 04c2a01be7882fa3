"""Numerical parity with HF peft 0.21 for AdaMSS (clustered subspaces of the host weight, peft's ``AdamssConfig``).

One seeded tiny Llama (and Mistral; bias-free projections, where pefref's decomposition of ``W`` is peft's) is deep-copied into a
peft model and a pefref model. Both sides compute the frozen projection (a seeded randomised SVD) and the clusters of
the output rows (k-means with a fixed seed) from the weights: pefref's projection and labels must equal peft's
(``adamss_newB`` and ``seg_result``). peft's trained tensors (one ``A_k``, ``B_k`` per cluster) are perturbed and
copied into pefref's (``A[k]`` and the rows of ``B`` labelled ``k``); both run the same left-padded batch in fp32.
Outputs agree within 1e-5, the adapter changes the base model, trainable counts are equal, merging agrees with
peft's, four SGD steps of the same loop end at the same tensors, and removing the adapter gives the base model back
bit-exactly.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .modelstate import assert_same_state, model_state
from .parity import max_diff, padded_batch

TOL = 1e-5
SHAPE = "tiny-llama"
CATALOG = default_catalog()


@functools.cache
def base_model(shape: str = SHAPE) -> nn.Module:
    return build_model(shape, seed=0)


def _output(model: nn.Module, shape: str = SHAPE) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch(shape))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft(shape: str = SHAPE, **kw: Any) -> peft.PeftModel:
    cfg = peft.AdamssConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base_model(shape)), cfg).eval()


def _host(pm: peft.PeftModel, unit_key: str, shape: str = SHAPE) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family(CATALOG.shape(shape).family).sites[site].path.format(i=int(layer)))


def _labels(layer: nn.Module) -> torch.Tensor:
    """peft's cluster of each output row, from its segments."""
    labels = torch.full((layer.out_features,), -1, dtype=torch.int64)
    for k, rows in layer.seg_result["default"].items():
        labels[rows] = k
    return labels


def _copy_into(adapter: Adapter, pm: peft.PeftModel, shape: str = SHAPE) -> None:
    """peft's per-cluster tensors into pefref's: A_k into A[k], B_k into the rows of B labelled k (past a cluster's
    rank, zeros)."""
    with torch.no_grad():
        for key, unit in adapter.units.items():
            layer = _host(pm, key, shape)
            assert torch.equal(unit.c, _labels(layer))  # peft's clusters, numbered as peft numbers them
            assert max_diff(unit.P, layer.adamss_newB["default"]) <= TOL  # the seeded randomised SVD
            unit.A.zero_()
            unit.B.zero_()
            for k, (a, b) in enumerate(zip(layer.adamss_A["default"], layer.adamss_B["default"])):
                unit.A[k, : a.shape[0]] = a
                unit.B[unit.c == k, : b.shape[1]] = b


def _pair(model: nn.Module | None = None, shape: str = SHAPE, **hps: Any) -> tuple[peft.PeftModel, nn.Module, Adapter]:
    pm = _peft(shape, **hps)
    model = copy.deepcopy(base_model(shape)) if model is None else model
    adapter = apply(model, "adamss", **hps)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    _copy_into(adapter, pm, shape)
    return pm, model, adapter


def test_adamss_at_init_is_the_base_model_and_counts_match_peft() -> None:
    pm = _peft()
    model = copy.deepcopy(base_model())
    adapter = apply(model, "adamss")
    base = _output(base_model())
    assert torch.equal(_output(model), base) and max_diff(_output(pm), base) <= TOL
    assert adapter.report.trainable == _trainable(model) == _trainable(pm)
    assert len(adapter.units) == 2 * CATALOG.shape(SHAPE).config["num_hidden_layers"]
    for key, unit in adapter.units.items():  # the clusters are peft's (asserted again with their numbering in _copy_into)
        assert torch.equal(unit.c, _labels(_host(pm, key)))


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral"])
@pytest.mark.parametrize("hps", [{}, {"r": 8, "num_subspaces": 3, "subspace_rank": 2, "random_seed": 3}], ids=["defaults", "r8k3rank2"])
def test_adamss_outputs_match_peft(hps: dict[str, Any], shape: str) -> None:
    pm, model, _adapter = _pair(shape=shape, **hps)
    want = _output(pm, shape)
    assert max_diff(_output(model, shape), want) <= TOL
    assert max_diff(want, _output(base_model(shape), shape)) > 1e-3  # not vacuous


def test_adamss_merges_like_peft_and_removes_bit_exactly() -> None:
    model = copy.deepcopy(base_model())
    before = model_state(model)
    pm, model, adapter = _pair(model)
    unmerged = _output(model)
    assert len(adapter.mergeable_units) == len(adapter.units)
    adapter.merge()
    merged = _output(model)
    assert max_diff(merged, unmerged) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert max_diff(merged, _output(pm.merge_and_unload())) <= TOL
    adapter.unmerge()
    adapter.remove()
    assert_same_state(model_state(model), before)


def _train(model: nn.Module, params: list[torch.Tensor], steps: int = 4) -> None:
    model.train()
    batch = padded_batch(SHAPE)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_adamss_trains_like_peft() -> None:
    """Four SGD steps of the same loop from the same tensors end at the same tensors (B starts non-zero, so A trains
    from the first step), and they moved."""
    pm, model, adapter = _pair(subspace_rank=2, num_subspaces=4)
    start = {k: (u.A.detach().clone(), u.B.detach().clone()) for k, u in adapter.units.items()}
    _train(pm, [p for p in pm.parameters() if p.requires_grad])
    _train(model, [p for p in model.parameters() if p.requires_grad])
    moved = 0.0
    for key, unit in adapter.units.items():
        layer = _host(pm, key)
        for k, (a, b) in enumerate(zip(layer.adamss_A["default"], layer.adamss_B["default"])):
            assert max_diff(unit.A[k, : a.shape[0]], a) <= TOL
            assert max_diff(unit.B[unit.c == k, : b.shape[1]], b) <= TOL
            assert not unit.A[k, a.shape[0]:].any() and not unit.B[unit.c == k, b.shape[1]:].any()  # padding stays zero
        moved = max(moved, max_diff(unit.A, start[key][0]), max_diff(unit.B, start[key][1]))
    assert moved > 1e-3
    assert max_diff(_output(model), _output(pm)) <= TOL


@pytest.mark.parametrize("seed", range(6))
def test_kmeans_labels_are_scikit_learns(seed: int) -> None:
    """The clusters, numbered alike, of scikit-learn's KMeans(init='random', n_init=1) that peft runs: on orthonormal
    columns (as peft clusters) and on Gaussian rows, more rows than one of its chunks (256) included."""
    from sklearn.cluster import KMeans

    from pefref.ops.clustering import kmeans_labels

    g = torch.Generator().manual_seed(seed)
    n, f, k = (300, 24, 5) if seed % 2 else (48, 8, 3)
    x = torch.linalg.svd(torch.randn(n, n, generator=g), full_matrices=False)[0][:, :f] if seed % 3 else torch.randn(n, f, generator=g)
    want = KMeans(n_clusters=k, init="random", n_init=1, max_iter=10, random_state=123456789).fit_predict(x.numpy())
    assert torch.equal(kmeans_labels(x, k, 10, 123456789), torch.from_numpy(want).long())


# --- ASA (peft's adaptive subspace allocation: importance states, a global ranking on a schedule, freezing) ---------

ASA = {"num_subspaces": 4, "use_asa": True, "asa_target_subspaces": 6, "init_warmup": 1, "final_warmup": 9, "mask_interval": 2}
ASA_STEPS = 12


def _adamw_loop(model: nn.Module, params: list[torch.Tensor], after: Any, before: Any = None, steps: int = ASA_STEPS) -> None:
    """AdamW (torch's defaults: weight decay 0.01) over every trainable tensor, the loop peft documents for ASA:
    backward, step, then the allocation hook before the gradients are cleared."""
    model.train()
    batch = padded_batch(SHAPE)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        if before is not None:
            before(step)
        opt.step()
        after(step)
        opt.zero_grad()
    model.eval()


def _asa_pair(**hps: Any) -> tuple[peft.PeftModel, Adapter]:
    pm, model, adapter = _pair(**{**ASA, **hps})
    _adamw_loop(pm, [p for p in pm.parameters() if p.requires_grad], pm.base_model.update_and_allocate)
    _adamw_loop(model, list(adapter.trainable_parameters()), adapter.after_optimizer_step, adapter.before_optimizer_step)
    return pm, adapter


def _frozen(adapter: Adapter) -> dict[str, set[int]]:
    """Unit -> the subspaces its freezing mask froze."""
    hooks = adapter._training_hooks()
    out: dict[str, set[int]] = {k: set() for k in adapter.units}
    for (_i, key), kept in hooks.masks.items():
        out[key] = {int(j) for j in torch.nonzero(~kept.reshape(-1)).reshape(-1)}
    return out


def test_adamss_asa_equals_peft_after_twelve_adamw_steps() -> None:
    """Twelve AdamW steps with peft's ASA (four rankings, the schedule from 16 subspaces over 4 layers to 6) end at
    peft's tensors within 1e-5 with the same subspaces frozen; frozen subspaces kept their values while the optimiser
    ran on (momentum, weight decay)."""
    pm, adapter = _asa_pair()
    frozen = _frozen(adapter)
    n_frozen = 0
    for key, unit in adapter.units.items():
        layer = _host(pm, key)
        for k, (a, b) in enumerate(zip(layer.adamss_A["default"], layer.adamss_B["default"])):
            assert (not a.requires_grad) == (k in frozen[key]) and (not b.requires_grad) == (k in frozen[key])
            assert max_diff(unit.A[k], a) <= TOL
            assert max_diff(unit.B[unit.c == k], b) <= TOL
            n_frozen += k in frozen[key]
    assert n_frozen == 16 - 5  # the schedule's 6 at its end, less the one at the threshold (peft keeps scores above it)
    assert max_diff(_output(adapter.model), _output(pm)) <= TOL


def test_adamss_asa_changes_training_and_is_off_by_default() -> None:
    """The same loop without ASA ends elsewhere (and equals peft's use_asa=False: no subspace freezes)."""
    _pm, with_asa = _asa_pair()
    pm, without = _asa_pair(use_asa=False)
    assert not any(_frozen(without).values())
    diff = max(max_diff(with_asa.units[k].A, u.A) for k, u in without.units.items())
    assert diff > 1e-3
    for key, unit in without.units.items():
        layer = _host(pm, key)
        for k, a in enumerate(layer.adamss_A["default"]):
            assert a.requires_grad and max_diff(unit.A[k], a) <= TOL


def test_adamss_asa_settings_travel_in_peft_format(tmp_path: Any) -> None:
    """use_asa and its schedule are AdamssConfig fields both ways: written on export, read back on import."""
    import pefref

    hps = {"use_asa": True, "asa_target_subspaces": 7, "init_warmup": 3, "final_warmup": 30, "mask_interval": 5}
    adapter = apply(copy.deepcopy(base_model()), "adamss", **hps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter.save_pretrained(tmp_path / "asa")
        cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "asa"))
        back = pefref.from_pretrained(copy.deepcopy(base_model()), tmp_path / "asa")
    assert isinstance(cfg, peft.AdamssConfig) and all(getattr(cfg, k) == v for k, v in hps.items())
    assert isinstance(back, Adapter) and all(back.hyperparameters[k] == v for k, v in hps.items())
