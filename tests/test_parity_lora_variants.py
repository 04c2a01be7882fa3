"""Numerical parity with HF peft 0.21.2 for LoRA's variants (LoraConfig flags), on tiny Llama and BERT.

Each variant is a catalog technique: OLoRA (init_lora_weights 'olora'), PiSSA's
fast SVD (pissa's niter, 'pissa_niter_K'), the orthogonal and Gaussian starts
('orthogonal', 'gaussian'), MiCA ('mica'), LoRA with a bias on B (lora_bias)
and KaSA (kasa_config). Checked per variant and family:

* the initialisation: A, B and (OLoRA, PiSSA, KaSA) the host weight peft
  rewrites agree within 1e-5. peft draws from torch's global generator; pefref
  from the unit's seed (init_seed): peft's draws are fed the same seeds, so the
  random values are equal, not only equally distributed;
* outputs after perturbing every trained tensor (and copying it from peft)
  agree within 1e-5 and differ from the base model's; gradients agree;
* the trainable counts are equal (MiCA's frozen B is not counted).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import peft
import peft.tuners.lora.layer as lora_layer
import pytest
import torch
from torch import nn

from pefref.runtime.api import Adapter, apply

from .parity import max_diff, padded_batch
from .test_parity_lora_family import OUTPUT, TASK, _tensor, base_model, family_of, host_paths, output, unit_key

TOL = 1e-5
GRAD_TOL = 1e-4
SHAPES = ["tiny-llama", "tiny-bert"]
R, ALPHA = 4, 8.0
LORA_AB = {"A": "lora_A.default.weight", "B": "lora_B.default.weight"}


@dataclass(frozen=True)
class Case:
    """pefref hyperparameters, peft's LoraConfig arguments, tensor names, and how peft's draws are seeded."""

    hps: dict[str, Any]
    config: dict[str, Any] | Callable[[dict[str, list[str]]], dict[str, Any]]  # or: of the host paths of each module
    tensors: dict[str, str] = field(default_factory=lambda: dict(LORA_AB))
    draws: str = ""  # '', 'randn' (orthogonal), 'normal' (gaussian), 'svd_lowrank' (pissa_niter)
    rewrites_host: bool = False  # peft replaces the host weight at initialisation
    free: tuple[str, ...] = ()  # drawn as plain LoRA draws them (torch's generator, not the variant's point): copied, not compared


CASES: dict[str, Case] = {
    "olora": Case({"r": R, "alpha": ALPHA}, {"init_lora_weights": "olora"}, rewrites_host=True),
    "pissa": Case({"r": R, "alpha": ALPHA, "niter": 2}, {"init_lora_weights": "pissa_niter_2"}, draws="svd_lowrank", rewrites_host=True),
    "lora_orthogonal": Case({"r": R, "alpha": ALPHA, "dropout": 0.0}, {"init_lora_weights": "orthogonal"}, draws="randn"),
    "lora_gaussian": Case({"r": R, "alpha": ALPHA, "dropout": 0.0}, {"init_lora_weights": "gaussian"}, draws="normal"),
    "mica": Case({"r": R, "alpha": ALPHA, "dropout": 0.0}, {"init_lora_weights": "mica"}),
    "lora_bias": Case({"r": R, "alpha": ALPHA, "dropout": 0.0}, {"lora_bias": True}, {**LORA_AB, "c": "lora_B.default.bias"}, free=("A",)),
    "kasa": Case({"r": R, "alpha": ALPHA, "dropout": 0.0}, {"kasa_config": peft.KasaConfig()}, {**LORA_AB, "d": "lora_diag.default"},
                 rewrites_host=True, free=("A", "d")),
    "bdlora": Case({"r": R, "alpha": ALPHA, "dropout": 0.0, "nblocks": 2}, lambda by: {"use_bdlora": peft.tuners.lora.config.BdLoraConfig(
        target_modules_bd_a=by["bd_a"], target_modules_bd_b=by["bd_b"], nblocks=2)}, free=("A",)),
    "velora": Case({"r": R, "alpha": ALPHA, "num_groups": 4, "scale": 0.5}, {"velora_config": peft.VeloraConfig(
        num_groups=4, scale=0.5, init_type="random")}, {**LORA_AB, "v": "lora_velora_embed.default"}, free=("A", "v")),
}
TECHNIQUES = list(CASES)


@contextlib.contextmanager
def seeded_peft_draws(kind: str, seeds: list[int]) -> Iterator[None]:
    """peft's random draws (from torch's global generator) taken instead from the given seeds, in order: the
    draws pefref's seeded initialisers make (``gaussian``, ``random_orthogonal``, ``svd_*(niter, seed)``)."""
    queue = list(seeds)
    if kind == "randn":  # orthogonal: randn(r, r), randn(in, r/2), randn(r/2, out) per layer
        real = torch.randn

        def fake_randn(*size: Any, **kw: Any) -> torch.Tensor:
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            return real(tuple(shape), generator=torch.Generator().manual_seed(queue.pop(0)))

        torch.randn = fake_randn  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.randn = real
    elif kind == "normal":  # gaussian: normal_(A, std=1/r) per layer
        real_normal = nn.init.normal_

        def fake_normal(t: torch.Tensor, mean: float = 0.0, std: float = 1.0, **_kw: Any) -> torch.Tensor:
            with torch.no_grad():
                return t.copy_(torch.randn(tuple(t.shape), generator=torch.Generator().manual_seed(queue.pop(0))) * std + mean)

        nn.init.normal_ = fake_normal  # type: ignore[assignment]
        try:
            yield
        finally:
            nn.init.normal_ = real_normal
    elif kind == "svd_lowrank":  # pissa_niter_K: one svd_lowrank per layer
        real_svd = lora_layer.svd_lowrank

        def fake_svd(a: torch.Tensor, q: int, niter: int = 2) -> Any:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(queue.pop(0))
                return real_svd(a, q, niter=niter)

        lora_layer.svd_lowrank = fake_svd
        try:
            yield
        finally:
            lora_layer.svd_lowrank = real_svd
    else:
        yield
    assert not queue or kind == "", f"{len(queue)} seeds left: peft drew less than pefref"


def peft_seeds(kind: str, hosts: dict[str, str], unit_seeds: dict[str, int], base: nn.Module) -> list[int]:
    """The seeds of peft's draws in the order peft makes them (its targets in module order)."""
    by_path = {p: k for k, p in hosts.items()}
    order = [n for n, _ in base.named_modules() if n in by_path]
    per = {"randn": (0, 1, 2), "normal": (0,), "svd_lowrank": (0,)}.get(kind, ())
    return [unit_seeds[by_path[n]] + o for n in order for o in per]


@dataclass
class Pair:
    base: nn.Module
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    hosts: dict[str, str]
    output: str
    at_init: dict[str, Any]


def build(shape: str, technique: str) -> Pair:
    case, family = CASES[technique], family_of(shape)
    paths = host_paths(technique, shape)
    hosts = {unit_key(*k): p for k, p in paths.items()}
    base = base_model(shape)
    model = copy.deepcopy(base)
    torch.manual_seed(11)
    adapter = apply(model, technique, **case.hps)
    assert set(hosts) == set(adapter.units)
    torch.manual_seed(11)  # each unit drew its seed, in build order, from torch's generator
    unit_seeds = {k: int(torch.randint(0, 2**62, ()).item()) for k in adapter.units}
    by_module: dict[str, list[str]] = {}
    for (module, _site, _layer), path in sorted(paths.items()):
        by_module.setdefault(module, []).append(path)
    flags = case.config(by_module) if callable(case.config) else case.config
    config = peft.LoraConfig(task_type=TASK[family], target_modules=sorted(set(paths.values())), r=R, lora_alpha=ALPHA,
                             lora_dropout=0.0, **flags)
    with seeded_peft_draws(case.draws, peft_seeds(case.draws, hosts, unit_seeds, base)):
        pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    at_init = {
        "peft": {k: {n: _tensor(pm.get_base_model().get_submodule(p), t).detach().clone() for n, t in case.tensors.items()} for k, p in hosts.items()},
        "pefref": {k: {n: getattr(adapter.units[k], n).detach().clone() for n in case.tensors} for k in hosts},
    }
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # B, d and c start at 0 (or where the init puts them): perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
        for key, path in hosts.items():
            layer = pm.get_base_model().get_submodule(path)
            for name, peft_name in case.tensors.items():
                getattr(adapter.units[key], name).copy_(_tensor(layer, peft_name))
    return Pair(base, pm, model, adapter, hosts, OUTPUT[family], at_init)


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("shape", SHAPES)
def test_initialisation_matches_peft(shape: str, technique: str) -> None:
    """A, B (and d, c) as peft initialises them, and the host weight peft rewrites (OLoRA, PiSSA, KaSA)."""
    pair = build(shape, technique)
    for key, path in pair.hosts.items():
        for name in CASES[technique].tensors:
            if name in CASES[technique].free:
                continue
            mine, theirs = pair.at_init["pefref"][key][name], pair.at_init["peft"][key][name]
            assert max_diff(mine, theirs) <= TOL, (key, name)
        theirs_w = pair.peft_model.get_base_model().get_submodule(path).base_layer.weight
        mine_w = pair.model.get_submodule(path).weight
        assert max_diff(mine_w, theirs_w) <= TOL, path
        moved = max_diff(mine_w, pair.base.get_submodule(path).weight)
        assert (moved > 1e-4) == CASES[technique].rewrites_host, (path, moved)
    if technique in ("lora_orthogonal", "lora_gaussian", "olora", "mica"):  # not vacuous: the start is not zero
        assert any(pair.at_init["pefref"][k]["A" if technique != "mica" else "B"].abs().max() > 1e-3 for k in pair.hosts)


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_gradients_and_counts_match_peft(shape: str, technique: str) -> None:
    pair = build(shape, technique)
    inputs = padded_batch(shape)
    with torch.no_grad():
        want = output(pair.peft_model, pair.output, inputs)
        got = output(pair.model, pair.output, inputs)
        base = output(pair.base, pair.output, inputs)
    assert max_diff(got, want) <= TOL
    assert max_diff(base, want) > 1e-3  # the adapter changes the model: the comparison is not vacuous

    n_peft = sum(p.numel() for p in pair.peft_model.parameters() if p.requires_grad)
    assert pair.adapter.report.trainable == n_peft
    assert sum(p.numel() for p in pair.adapter.trainable_parameters()) == n_peft

    target = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    for path in pair.hosts.values():  # peft's LoRA layers in training mode (VeLoRA's backward); no dropout anywhere
        pair.peft_model.get_base_model().get_submodule(path).train()
    (output(pair.peft_model, pair.output, inputs) * target).sum().backward()
    (output(pair.model, pair.output, inputs) * target).sum().backward()
    compared = 0
    for key, path in pair.hosts.items():
        layer = pair.peft_model.get_base_model().get_submodule(path)
        for name, peft_name in CASES[technique].tensors.items():
            mine, theirs = getattr(pair.adapter.units[key], name), _tensor(layer, peft_name)
            assert mine.requires_grad == theirs.requires_grad, (key, name)  # MiCA's B is frozen on both sides
            if not theirs.requires_grad:
                continue
            assert mine.grad is not None and theirs.grad is not None, (key, name)
            assert max_diff(mine.grad, theirs.grad.reshape(mine.shape)) <= GRAD_TOL, (key, name)
            compared += 1
    assert compared >= len(pair.hosts)


def test_lora_flags_without_an_exact_catalog_form_are_refused(tmp_path: Any) -> None:
    """PiSSA's fast SVD is not written (peft redraws it on load); VeLoRA's batch-average projection, a BD-LoRA mixed with
    plain LoRA modules (match_strict false) and trained host biases have no place in a catalog technique: peft
    adapters with them are refused, the model unchanged."""
    from pefref import from_pretrained
    from pefref.language.errors import PefrefError

    model = copy.deepcopy(base_model("tiny-llama"))
    adapter = apply(model, "pissa", r=R, alpha=ALPHA, niter=2)
    with pytest.raises(PefrefError, match="niter=0"):
        adapter.save_pretrained(tmp_path / "pissa")
    targets = ["q_proj", "v_proj"]
    refused = {
        "velora": (peft.LoraConfig(r=R, target_modules=targets, velora_config=peft.VeloraConfig(num_groups=4)), "matches no catalog technique exactly"),
        "bdlora_mixed": (peft.LoraConfig(r=R, target_modules=targets, use_bdlora=peft.tuners.lora.config.BdLoraConfig(
            target_modules_bd_a=["q_proj"], nblocks=2, match_strict=False)), "matches no catalog technique exactly"),
        "bias_all": (peft.LoraConfig(r=R, target_modules=targets, bias="all"), "matches no catalog technique exactly"),
    }
    for name, (config, message) in refused.items():
        peft.get_peft_model(copy.deepcopy(base_model("tiny-llama")), config).save_pretrained(tmp_path / name)
        fresh = copy.deepcopy(base_model("tiny-llama"))
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(PefrefError, match=message):
            from_pretrained(fresh, tmp_path / name)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), name


@pytest.mark.parametrize("shape", SHAPES)
def test_velora_trains_a_from_the_compressed_inputs(shape: str) -> None:
    """The projection vector is a unit vector, and A's gradient is VeLoRA's, not LoRA's (peft in eval mode)."""
    pair = build(shape, "velora")
    inputs = padded_batch(shape)
    for key in pair.hosts:
        assert abs(pair.at_init["pefref"][key]["v"].norm().item() - 1.0) < 1e-5
    target = torch.randn(output(pair.model, pair.output, inputs).shape, generator=torch.Generator().manual_seed(5))
    (output(pair.peft_model, pair.output, inputs) * target).sum().backward()  # eval: peft's plain LoRA backward
    (output(pair.model, pair.output, inputs) * target).sum().backward()
    key, path = next(iter(pair.hosts.items()))
    plain = _tensor(pair.peft_model.get_base_model().get_submodule(path), "lora_A.default.weight").grad
    assert plain is not None and max_diff(pair.adapter.units[key].A.grad, plain) > 1e-3


def test_an_eva_adapter_reads_as_lora(tmp_path: Any) -> None:
    """EVA initialises A from calibration activations and leaves the host alone: its saved adapter is a LoRA."""
    from pefref import from_pretrained

    base = base_model("tiny-llama")
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights="eva", eva_config=peft.EvaConfig())
    pm = peft.get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "eva")
    model = copy.deepcopy(base)
    adapter = from_pretrained(model, tmp_path / "eva")
    assert adapter.technique.id == "lora"
    inputs = padded_batch("tiny-llama")
    with torch.no_grad():
        want, got, plain = (output(m, "logits", inputs) for m in (pm, model, base))
    assert max_diff(got, want) <= TOL and max_diff(plain, want) > 1e-3
