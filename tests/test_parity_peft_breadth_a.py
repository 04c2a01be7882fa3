"""Numerical parity with HF peft 0.21 for BEFT, Cartridges, DeLoRA, GLoRA, GraLoRA, HiRA, Lily and MiSS.

For each case one seeded tiny model (``build_model``) is deep-copied into a peft
model and a pefref model with the same hyperparameters; peft's trainable
tensors are perturbed (so nothing passes because an adapter is still at its
identity initialisation), copied into pefref's units by hand (independently of
the interop table), and both run the same left-padded batch in fp32, eval
mode. Outputs agree within 1e-5, the adapter changes the base model's outputs
and the trainable counts are equal. Each technique runs on tiny Llama and on
GPT-2 where peft adapts transformers' Conv1D (GraLoRA, HiRA on the fused
c_attn; Cartridges as a prefix), BERT otherwise. Mergeable cases also merge:
pefref's merged model equals its unmerged one and peft's ``merge_and_unload``.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
QV = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
V = {"llama": ["v_proj"], "bert": ["value"]}
WHOLE = {"gpt2": ["attn.qkv"]}  # sites of the peft targets where pefref's default sites are slices of a fused module


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
    copy: Callable[[nn.Module, nn.Module], None]  # (pefref unit, peft layer at its host); prompts: (adapter, peft model)
    shapes: tuple[str, ...]
    prompt: bool = False


def _beft(unit: nn.Module, layer: nn.Module) -> None:
    unit.beta.copy_(layer.beft_bias["default"].reshape(-1))


def _delora(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.delora_A["default"])
    unit.B.copy_(layer.delora_B["default"])
    unit.lam.copy_(layer.delora_lambda["default"])
    assert torch.equal(unit.w_norm, layer.delora_w_norm["default"])  # both read the host's column norms at init


def _glora(unit: nn.Module, layer: nn.Module) -> None:
    for mine, theirs in (("A", layer.glora_A["default"]), ("B", layer.glora_B["default"])):
        getattr(unit, mine + "d").copy_(theirs.Xd)
        getattr(unit, mine + "u").copy_(theirs.Xu)


def _gralora(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.gralora_A["default"])
    unit.B.copy_(layer.gralora_B["default"])


def _hira(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.hira_A["default"])
    unit.B.copy_(layer.hira_B["default"])


def _lily(unit: nn.Module, layer: nn.Module) -> None:
    unit.A.copy_(layer.lily_A["default"].weight)
    unit.R.copy_(layer.lily_router["default"].weight)
    unit.B.copy_(layer.lily_B["default"].weight)  # shared by the site's layers on both sides


def _miss(unit: nn.Module, layer: nn.Module) -> None:
    unit.M.copy_(layer.miss_block["default"])


def _cartridge(adapter: Adapter, pm: Any) -> None:
    """peft's cache [n, L·2·d] (each layer's keys then values) into each layer's frozen and trained rows."""
    enc = pm.prompt_encoder["default"]
    cache = enc.weight.detach()
    f = enc.num_frozen_tokens
    for key, unit in adapter.units.items():
        i = int(key.rsplit("__", 1)[1])
        d = unit.K.shape[-1]
        keys, values = cache[:, 2 * i * d:(2 * i + 1) * d], cache[:, (2 * i + 1) * d:(2 * i + 2) * d]
        unit.Kf.copy_(keys[:f])
        unit.K.copy_(keys[f:])
        unit.Vf.copy_(values[:f])
        unit.V.copy_(values[f:])


LB = ("tiny-llama", "tiny-bert")
LG = ("tiny-llama", "tiny-gpt2")
CASES: dict[str, Case] = {
    "beft": Case("beft", {}, lambda fam: peft.BeftConfig(task_type=task(fam), target_modules=V[fam]), _beft, LB),
    "cartridge": Case("cartridge", {"n": 4, "f": 1}, lambda fam: peft.CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_frozen_tokens=1), _cartridge, LG, prompt=True),  # type: ignore[arg-type]
    "delora": Case("delora", {"r": 4, "lambda0": 15.0}, lambda fam: peft.DeloraConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, delora_lambda=15), _delora, LB),
    "glora": Case("glora", {"r": 4}, lambda fam: peft.GloraConfig(  # peft's defaults; no bias paths on BERT (see glora.yaml)
        task_type=task(fam), target_modules=QV[fam], r=4,
        **({"config_C": "none", "config_D_E": "none"} if fam == "bert" else {})), _glora, LB),
    "gralora": Case("gralora", {"r": 4, "alpha": 8.0, "k": 2}, lambda fam: peft.GraloraConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, alpha=8, gralora_k=2, fan_in_fan_out=fam == "gpt2"), _gralora, LG),
    "hira": Case("hira", {"r": 4}, lambda fam: peft.HiraConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, fan_in_fan_out=fam == "gpt2"), _hira, LG),
    "lily": Case("lily", {"r": 4, "num_B": 3, "scaling": 2.0}, lambda fam: peft.LilyConfig(
        task_type=task(fam), target_modules=QV[fam], r=4, num_B=3, scaling=2.0), _lily, LB),
    "miss": Case("miss", {"r": 8}, lambda fam: peft.MissConfig(task_type=task(fam), target_modules=QV[fam], r=8), _miss, LB),
    "miss_padded": Case("miss", {"r": 6}, lambda fam: peft.MissConfig(  # 6 does not divide 32 (or 16): peft pads the last shard
        task_type=task(fam), target_modules=QV[fam], r=6), _miss, LB),
}
PAIRS = [(shape, name) for name, case in CASES.items() for shape in case.shapes]


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    peft_model: Any
    model: nn.Module
    adapter: Adapter


def _host(pm: Any, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family(family).sites[site].path.format(i=int(layer)))


def build(shape: str, name: str) -> Pair:
    case, family = CASES[name], family_of(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BEFT on bias-free projections: "cannot merge"
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), case.config(family)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # up projections start at zero: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, case.technique, sites=None if case.prompt else WHOLE.get(family), **case.hps)
    with torch.no_grad():
        if case.prompt:
            case.copy(adapter, pm)  # type: ignore[arg-type]
        else:
            for key, unit in adapter.units.items():
                case.copy(unit, _host(pm, key, family))
    return Pair(pm, model, adapter)


def output(model: Any, shape: str) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch(shape))


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    want = output(pair.peft_model, shape)
    got = output(pair.model, shape)
    assert max_diff(got, want) <= TOL
    base = output(base_model(shape), shape)
    assert max_diff(want[:, -base.shape[1]:], base) > 1e-3  # not vacuous (prefixes come first)
    n_peft = n_trainable(pair.peft_model)
    assert pair.adapter.report.trainable == n_trainable(pair.model) == n_peft


MERGED = [(s, n) for s, n in PAIRS if not CASES[n].prompt and n != "lily" and not (n == "beft" and family_of(s) == "llama")]


@pytest.mark.parametrize(("shape", "name"), MERGED)
def test_merged_model_matches_peft_merge(shape: str, name: str) -> None:
    pair = build(shape, name)
    unmerged = output(pair.model, shape)
    pair.adapter.merge()
    got = output(pair.model, shape)
    assert max_diff(got, unmerged) <= TOL
    merged = pair.peft_model.merge_and_unload()
    assert max_diff(got, output(merged, shape)) <= TOL
    pair.adapter.unmerge()
    assert max_diff(output(pair.model, shape), unmerged) <= TOL


@pytest.mark.parametrize("name", ["lily", "cartridge"])
def test_unmergeable_cases_are_refused(name: str) -> None:
    pair = build("tiny-llama", name)
    assert not pair.adapter.mergeable_units


def test_beft_on_a_bias_free_projection_does_not_merge() -> None:
    """Llama's value projection has no bias to absorb BEFT's shift; BERT's has."""
    assert not build("tiny-llama", "beft").adapter.mergeable_units
    assert build("tiny-bert", "beft").adapter.mergeable_units


def test_lily_shares_up_projections_across_layers_and_mixes_over_the_batch() -> None:
    pair = build("tiny-llama", "lily")
    units = pair.adapter.units
    q0, q1, v0 = units["lily__attn_q__0"], units["lily__attn_q__1"], units["lily__attn_v__0"]
    assert q0.B is q1.B and q0.B is not v0.B and q0.A is not q1.A
    # the router's weights average over the whole batch: one example's output depends on the others
    batch = padded_batch("tiny-llama")
    with torch.no_grad():
        both = output_of(pair.model, batch)
        alone = output_of(pair.model, {k: v[1:] for k, v in batch.items()})
    assert max_diff(both[1:], alone) > 1e-6


# --- peft's format: what has no exact catalog form is refused ------------------------------------------


def _saved(tmp_path: Path, name: str, shape: str, config: Any, perturb: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), config)
    if perturb:
        torch.manual_seed(2)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def _unchanged(model: nn.Module, shape: str) -> bool:
    want = base_model(shape).state_dict()
    return not hasattr(model, "pefref_adapters") and all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_peft_forms_of_these_methods_without_a_catalog_form_are_refused(tmp_path: Path) -> None:
    cases = {
        "glora_bias_paths": ("tiny-bert", peft.GloraConfig(r=2, target_modules=["query", "value"]), "no place for: .*glora_C"),
        "gralora_hybrid": ("tiny-llama", peft.GraloraConfig(r=4, hybrid_r=2, target_modules=["q_proj"]), "gralora needs .*hybrid_r=0"),
        "miss_bat": ("tiny-llama", peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]), "miss needs .*init_weights=True"),
        "delora_pattern": ("tiny-llama", peft.DeloraConfig(r=2, target_modules=["q_proj"], lambda_pattern={"q_proj": 3}), "lambda_pattern"),
        "cartridge_unfrozen": ("tiny-llama", peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=0), "'f'.* 0"),
    }
    for name, (shape, config, message) in cases.items():
        folder = _saved(tmp_path, name, shape, config)
        model = copy.deepcopy(base_model(shape))
        with pytest.raises(PefrefError, match=message):
            pefref.from_pretrained(model, folder)
        assert _unchanged(model, shape), name


def test_glora_reads_peft_defaults_on_bias_free_hosts_and_refuses_a_nonzero_disabled_path(tmp_path: Path) -> None:
    """On Llama peft's default GLoRA keeps its bias paths as zero buffers: that is the catalog technique exactly."""
    folder = _saved(tmp_path, "glora", "tiny-llama", peft.GloraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    state = load_file(str(folder / "adapter_model.safetensors"))
    zeros = sorted(k for k in state if k.endswith(".zeros"))
    assert len(zeros) == 3 * 4 and not any(state[k].count_nonzero() for k in zeros)
    assert pefref.from_pretrained(copy.deepcopy(base_model("tiny-llama")), folder).technique.id == "glora"
    state[zeros[0]] = torch.ones_like(state[zeros[0]])
    save_file(state, str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(base_model("tiny-llama"))
    with pytest.raises(PefrefError, match="is not zero"):
        pefref.from_pretrained(model, folder)
    assert _unchanged(model, "tiny-llama")


def test_lily_keeps_its_sharing_across_layers_in_peft_format(tmp_path: Path) -> None:
    """Targets are written by module name, so peft shares the up projections too; per-layer up projections are refused."""
    model = copy.deepcopy(base_model("tiny-llama"))
    adapter = pefref.apply(model, "lily", r=2)
    adapter.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model("tiny-llama")), tmp_path / "a", is_trainable=True)
    layers = pm.get_base_model().model.layers
    assert layers[0].self_attn.q_proj.lily_B["default"] is layers[1].self_attn.q_proj.lily_B["default"]
    assert n_trainable(pm) == adapter.report.trainable
    adapter.remove()
    one = pefref.apply(model, "lily", r=2, layers=[0])
    with pytest.raises(PefrefError, match="only placements on all layers convert"):
        one.save_pretrained(tmp_path / "b")
    one.remove()
    # peft shares within one target entry: listed by full path, each layer has its own up projection
    paths = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    folder = _saved(tmp_path, "per_layer", "tiny-llama", peft.LilyConfig(r=2, target_modules=paths))
    with pytest.raises(PefrefError, match="differ, but 'B' is one tensor shared"):
        pefref.from_pretrained(model, folder)
    assert _unchanged(model, "tiny-llama")
