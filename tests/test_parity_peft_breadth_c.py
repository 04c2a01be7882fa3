"""Numerical parity with HF peft 0.21 for C3A, DEFT, Poly, PVeRA, RoAd, Uni-LoRA and WaveFT.

As in the breadth (a) tests, one seeded tiny model is deep-copied into a peft
model and a pefref model with the same hyperparameters; peft's adapter tensors
are perturbed (so nothing passes at an identity start), copied into pefref's
units by hand (independently of the interop table), and both run the same
left-padded batch in fp32. Outputs agree within 1e-5 in eval mode, the adapter
changes the base model and the trainable counts are equal. Each technique runs
on tiny Llama and on GPT-2 where peft adapts transformers' Conv1D (on the fused
c_attn), BERT otherwise. Mergeable cases also merge. The stochastic techniques
(PVeRA, Poly) also agree in training mode: the same torch seed gives the same
draws on both sides.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply
from pefref.view.analysis import stochastic_ops

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
QV = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
WHOLE = {"gpt2": ["attn.qkv"]}  # GPT-2: peft adapts the fused c_attn


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


@dataclass(frozen=True)
class Case:
    """A technique with its hyperparameters, peft's config per family, how peft's tensors copy, where it runs."""

    technique: str
    hps: dict[str, Any]
    config: Callable[[str], Any]
    copy: Callable[[nn.Module, nn.Module, str, Any], None]  # (pefref unit, peft layer at its host, unit's module, peft model)
    shapes: tuple[str, ...]
    task_ids: bool = False  # Poly: peft's forward takes task ids (all 0: one task)


def _c3a(unit: nn.Module, layer: nn.Module, _m: str, _pm: Any) -> None:
    unit.w.copy_(layer.c3a_kernel["default"])


def _deft(unit: nn.Module, layer: nn.Module, _m: str, _pm: Any) -> None:
    unit.P.copy_(layer.deft_P["default"])
    unit.R.copy_(layer.deft_R["default"])


def _road(unit: nn.Module, layer: nn.Module, _m: str, _pm: Any) -> None:
    unit.theta.copy_(layer.road_theta["default"])
    unit.alpha.copy_(layer.road_alpha["default"])


def _pvera(unit: nn.Module, layer: nn.Module, _m: str, pm: Any) -> None:
    unit.d.copy_(layer.pvera_lambda_d["default"])
    unit.b.copy_(layer.pvera_lambda_b["default"])
    unit.A.copy_(pm.base_model.pvera_A["default"])  # shared by every placement on both sides
    unit.B.copy_(pm.base_model.pvera_B["default"])


def _waveft(unit: nn.Module, layer: nn.Module, _m: str, _pm: Any) -> None:
    unit.c.copy_(layer.waveft_spectrum["default"])
    assert torch.equal(unit.loc, layer.waveft_indices["default"])  # the same seeded positions on both sides


def _unilora(unit: nn.Module, layer: nn.Module, _m: str, pm: Any) -> None:
    unit.theta.copy_(pm.base_model.unilora_theta_d["default"])  # the one vector, shared
    unit.iA.copy_(layer.unilora_indices_A["default"])
    unit.iB.copy_(layer.unilora_indices_B["default"])
    unit.sA.copy_(layer.unilora_scales_A["default"])
    unit.sB.copy_(layer.unilora_scales_B["default"])


def _poly(unit: nn.Module, layer: nn.Module, module: str, _pm: Any) -> None:
    if module == "router":
        unit.logits.copy_(layer.poly_router["default"].module_logits)
    else:
        unit.A.copy_(layer.poly_lora_A["default"])
        unit.B.copy_(layer.poly_lora_B["default"])


LB = ("tiny-llama", "tiny-bert")
LG = ("tiny-llama", "tiny-gpt2")
CASES: dict[str, Case] = {
    "c3a": Case("c3a", {"block_size": 8}, lambda fam: peft.C3AConfig(
        task_type=task(fam), target_modules=QV[fam], block_size=8), _c3a, LB),
    "deft": Case("deft", {"r": 4}, lambda fam: peft.DeftConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, fan_in_fan_out=fam == "gpt2"), _deft, LG),
    "poly": Case("poly", {"r": 4, "n_skills": 3, "n_splits": 2}, lambda fam: peft.PolyConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, n_tasks=1, n_skills=3, n_splits=2), _poly, LB, task_ids=True),
    "pvera": Case("pvera", {"r": 4}, lambda fam: peft.PveraConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, fan_in_fan_out=fam == "gpt2"), _pvera, LG),
    "road": Case("road", {"group_size": 8}, lambda fam: peft.RoadConfig(
        task_type=task(fam), target_modules=QV[fam], group_size=8), _road, LB),
    "unilora": Case("unilora", {"r": 4, "theta_d_length": 64}, lambda fam: peft.UniLoraConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, theta_d_length=64), _unilora, LG),
    "waveft": Case("waveft", {"n": 100, "scaling": 25.0}, lambda fam: peft.WaveFTConfig(
        task_type=task(fam), target_modules=QV[fam], n_frequency=100, scaling=25.0, fan_in_fan_out=fam == "gpt2"), _waveft, LG),
    "waveft_all": Case("waveft", {"n": 600, "scaling": 2.0}, lambda fam: peft.WaveFTConfig(  # more than Llama's v has (512): all kept
        task_type=task(fam), target_modules=["q_proj"], n_frequency=600, scaling=2.0), _waveft, ("tiny-llama",)),
}
PAIRS = [(shape, name) for name, case in CASES.items() for shape in case.shapes if name != "waveft_all"]


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    task_ids: bool


def _host(pm: Any, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family(family).sites[site].path.format(i=int(layer)))


def build(shape: str, name: str, sites: list[str] | None = None) -> Pair:
    case, family = CASES[name], family_of(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), case.config(family)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # up projections and output scales start at zero: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, case.technique, sites=sites or WHOLE.get(family), **case.hps)
    with torch.no_grad():
        for key, unit in adapter.units.items():
            case.copy(unit, _host(pm, key, family), key.split("__")[0], pm)
    return Pair(pm, model, adapter, case.task_ids)


def run(model: Any, shape: str, task_ids: bool = False) -> torch.Tensor:
    """The model's fp32 output on the padded batch (peft's Poly: with every example's task id 0)."""
    batch = padded_batch(shape)
    if task_ids:
        batch = {**batch, "task_ids": torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)}
    return output_of(model, batch)


def output(model: Any, shape: str, task_ids: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return run(model, shape, task_ids)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    want = output(pair.peft_model, shape, pair.task_ids)
    got = output(pair.model, shape)
    assert max_diff(got, want) <= TOL
    base = output(base_model(shape), shape)
    assert max_diff(want, base) > 1e-3  # not vacuous
    n_peft = n_trainable(pair.peft_model)
    assert pair.adapter.report.trainable == n_trainable(pair.model) == n_peft


def test_waveft_keeps_every_entry_of_a_placement_smaller_than_n() -> None:
    """600 coefficients on Llama's 32x32 query projection: peft keeps 600; on a 16x32 one pefref keeps 512."""
    pair = build("tiny-llama", "waveft_all", sites=["attn.q"])
    assert max_diff(output(pair.model, "tiny-llama"), output(pair.peft_model, "tiny-llama")) <= TOL
    small = apply(copy.deepcopy(base_model("tiny-llama")), "waveft", sites=["attn.v"], n=600)
    assert small.units["waveft__attn_v__0"].c.numel() == 16 * 32


MERGED = [(s, n) for s, n in PAIRS if n != "poly"]


@pytest.mark.parametrize(("shape", "name"), MERGED)
def test_merged_model_matches_peft_merge(shape: str, name: str) -> None:
    pair = build(shape, name)
    unmerged = output(pair.model, shape)
    assert len(pair.adapter.mergeable_units) == len(pair.adapter.units)
    pair.adapter.merge()
    got = output(pair.model, shape)
    assert max_diff(got, unmerged) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pair.peft_model.merge_and_unload()
    assert max_diff(got, output(merged, shape)) <= TOL
    pair.adapter.unmerge()
    assert max_diff(output(pair.model, shape), unmerged) <= TOL


def test_poly_is_not_merged() -> None:
    pair = build("tiny-llama", "poly")
    assert not pair.adapter.mergeable_units


# --- stochastic techniques: training mode ---------------------------------------------------------------


@pytest.mark.parametrize(("shape", "name"), [(s, n) for s, n in PAIRS if n in ("pvera", "poly")])
def test_training_mode_draws_the_same_samples_as_peft(shape: str, name: str) -> None:
    """Both sides draw from torch's global generator in the same order: the same seed gives the same output."""
    pair = build(shape, name)
    assert stochastic_ops(next(m for m in CATALOG.technique(CASES[name].technique).modules if stochastic_ops(m)))
    pair.peft_model.train()
    pair.model.train()
    for module in (pair.peft_model, pair.model):  # no dropout anywhere: only the technique's draws are random
        for sub in module.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        want = output(pair.peft_model, shape, pair.task_ids)
        torch.manual_seed(seed)
        got = output(pair.model, shape)
        assert max_diff(got, want) <= TOL
        outs.append(got)
    assert torch.equal(outs[0], outs[1]) and max_diff(outs[0], outs[2]) > 1e-4  # a draw, reproducible under the seed
    pair.model.eval()
    assert max_diff(outs[0], output(pair.model, shape)) > 1e-4  # training samples; eval takes the mean / probabilities


def test_training_gradients_match_peft_for_pvera() -> None:
    """The reparameterised sample carries gradients to d and b as in peft."""
    pair = build("tiny-llama", "pvera")
    pair.peft_model.train()
    pair.model.train()
    torch.manual_seed(7)
    run(pair.peft_model, "tiny-llama").square().mean().backward()
    torch.manual_seed(7)
    run(pair.model, "tiny-llama").square().mean().backward()
    for key, unit in pair.adapter.units.items():
        layer = _host(pair.peft_model, key, "llama")
        assert max_diff(unit.d.grad, layer.pvera_lambda_d["default"].grad) <= 1e-5
        assert max_diff(unit.b.grad, layer.pvera_lambda_b["default"].grad) <= 1e-5


def test_poly_samples_each_example_separately() -> None:
    """One draw per example (as peft draws per task id): two equal examples differ in training, not in eval."""
    pair = build("tiny-llama", "poly")
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ev = output_of(pair.model, batch)
        pair.model.train()
        tr = output_of(pair.model, batch)
    assert torch.equal(ev[0], ev[1]) and max_diff(tr[0], tr[1]) > 1e-5


# --- peft's format: what has no exact catalog form is refused ------------------------------------------


def _unchanged(model: nn.Module, shape: str) -> bool:
    want = base_model(shape).state_dict()
    return not hasattr(model, "pefref_adapters") and all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


REFUSED = {
    "deft_qr": (peft.DeftConfig(r=2, decomposition_method="qr", target_modules=["q_proj"]), "deft needs .*decomposition_method='relu'"),
    "deft_para": (peft.DeftConfig(r=2, para=True, target_modules=["q_proj"]), "deft needs .*para=False"),
    "deft_alpha": (peft.DeftConfig(r=2, alpha=4, target_modules=["q_proj"]), "deft needs .*alpha=None"),
    "pvera_sampled": (peft.PveraConfig(r=2, sample_at_inference=True, target_modules=["q_proj"]), "pvera needs .*sample_at_inference=False"),
    "road_2": (peft.RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj"]), "road needs .*variant='road_1'"),
    "unilora_no_indices": (peft.UniLoraConfig(r=2, theta_d_length=16, target_modules=["q_proj"]), "unilora needs .*save_indices=True"),
    "waveft_db2": (peft.WaveFTConfig(n_frequency=10, wavelet_family="db2", target_modules=["q_proj"]), "waveft needs .*wavelet_family='db1'"),
    "waveft_sparse": (peft.WaveFTConfig(n_frequency=10, use_idwt=False, target_modules=["q_proj"]), "waveft needs .*use_idwt=True"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_peft_forms_without_a_catalog_form_are_refused(tmp_path: Any, name: str) -> None:
    import pefref
    from pefref.language.errors import PefrefError

    config, message = REFUSED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model("tiny-llama")), config)
    pm.save_pretrained(tmp_path / name)
    model = copy.deepcopy(base_model("tiny-llama"))
    with pytest.raises(PefrefError, match=message):
        pefref.from_pretrained(model, tmp_path / name)
    assert _unchanged(model, "tiny-llama")


# --- a connection to a module at several sites reads it at the reader's own site ---------------------------


def test_a_reader_placed_with_its_source_reads_it_at_its_own_site(tmp_path: Any) -> None:
    """Poly's skills read the router of their own projection (the parity above depends on it); a reader at a site
    its source does not attach to must name the source's site."""
    from pefref.language.catalog import load_techniques

    poly = (Path(__file__).parents[1] / "catalog" / "techniques" / "poly.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "poly.yaml"
    skills = "router's normalised weights\n    sites: [attn.q, attn.v]\n"  # the skills' sites (the router's are the same)
    assert poly.count(skills) == 1
    bad.write_text(poly.replace(skills, skills.replace("attn.v", "attn.k")), encoding="utf-8")
    others = {k: v for k, v in CATALOG.techniques.items() if k != "poly"}
    _loaded, _s, _p, problems = load_techniques([bad], CATALOG.reference, others)
    assert len(problems) == 1 and "name one of them with site:" in problems[0].message and problems[0].field.endswith("inputs.z.module")
    pair = build("tiny-llama", "poly")
    reads = {k: e.reads for k, e in ((k, e) for k, e in _entries(pair.adapter)) if k.startswith("skills")}
    assert reads["skills__attn_v__1"]["z"][0][1:] == ("router", "attn.v", 1)


def _entries(adapter: Adapter) -> list[tuple[str, Any]]:
    return [(e.unit_key, e) for _patch, e in adapter.entries]
