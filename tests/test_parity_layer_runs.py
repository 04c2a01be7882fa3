"""Tensors shared by runs of k consecutive layers (``shared: layers`` with ``every: k``) or by groups of consecutive
placements (``shared: all`` with ``groups: G``), against HF peft 0.21.

Lily's down projection A is shared by runs of ``stride_A`` consecutive adapted layers of a site (peft's ``stride_A``).
On a five-layer Llama with stride_A = 2 the runs are layers {0, 1}, {2, 3} and {4}: pefref keeps one A per run (the
same tensor object in the run's units), counts it once per run (apply's report and the derived count agree with
peft's), computes peft's outputs within 1e-5 once peft's trained tensors are perturbed and copied in, and reads peft's
saved adapter and writes it back exactly. TinyLoRA's weight_tying w ties its coefficient vector v across the n
placements in G = max(1, round(n·(1 - w))) groups of consecutive placements in the model's order, as peft does:
outputs, counts (applied and derived) and peft's files agree for w in {0.3, 0.5, 1.0}. Validate refuses ``every``
and ``groups`` where they have no meaning, with a located error.
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
from transformers import LlamaConfig, LlamaForCausalLM

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.schema import ModelShape
from pefref.language.validate import validate_paths
from pefref.runtime.api import Adapter, apply
from pefref.view.params import count_params

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
LAYERS = 5
CONFIG = {**CATALOG.shape("tiny-llama").config, "num_hidden_layers": LAYERS}  # tiny-llama with five layers
HPS = {"r": 4, "num_B": 3, "scaling": 2.0, "stride_A": 2}


@functools.cache
def base_model() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch("tiny-llama"))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft(stride: int) -> peft.PeftModel:
    cfg = peft.LilyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, num_B=3, scaling=2.0, stride_A=stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model()), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # shared tensors are perturbed once (parameters() yields each once)
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return pm


def _host(pm: peft.PeftModel, unit_key: str) -> nn.Module:
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return pm.get_base_model().get_submodule(CATALOG.family("llama").sites[site].path.format(i=int(layer)))


def _pair(stride: int) -> tuple[peft.PeftModel, nn.Module, Adapter]:
    pm = _peft(stride)
    model = copy.deepcopy(base_model())
    adapter = apply(model, "lily", **{**HPS, "stride_A": stride})
    with torch.no_grad():
        for key, unit in adapter.units.items():
            layer = _host(pm, key)
            unit.A.copy_(layer.lily_A["default"].weight)  # a run's A: the same values from each of its layers
            unit.R.copy_(layer.lily_router["default"].weight)
            unit.B.copy_(layer.lily_B["default"].weight)
    return pm, model, adapter


@pytest.mark.parametrize("stride", [2, 3])
def test_runs_of_layers_share_one_down_projection_as_peft_does(stride: int) -> None:
    pm, model, adapter = _pair(stride)
    for site in ("attn_q", "attn_v"):
        units = [adapter.units[f"lily__{site}__{i}"] for i in range(LAYERS)]
        for i, u in enumerate(units):
            lead = units[(i // stride) * stride]
            assert u.A is lead.A  # the run's first layer's
            if i:
                assert (u.A is units[i - 1].A) == (i % stride != 0)  # a new run starts every stride layers
            assert _host(pm, f"lily__{site}__{i}").lily_A["default"] is _host(pm, f"lily__{site}__{(i // stride) * stride}").lily_A["default"]
    want = _output(pm)
    assert max_diff(_output(model), want) <= TOL
    assert max_diff(want, _output(base_model())) > 1e-3  # not vacuous
    runs = -(-LAYERS // stride)
    expected = 2 * (runs * 4 * 32 + LAYERS * 3 * 4) + 3 * 4 * 32 + 3 * 4 * 16  # A per run, a router per layer, B per site (q: 32 out, v: 16)
    assert adapter.report.trainable == _trainable(model) == _trainable(pm) == expected


def test_derived_count_has_one_tensor_per_run() -> None:
    shape = ModelShape(name="five-llama", family="llama", config=CONFIG)
    tech = CATALOG.technique("lily")
    counts = {s: count_params(tech, shape, CATALOG, {**HPS, "stride_A": s}).trainable for s in (1, 2, 5)}
    for stride, n in counts.items():
        assert n == apply(copy.deepcopy(base_model()), "lily", **{**HPS, "stride_A": stride}).report.trainable
    assert counts[1] - counts[2] == 2 * (LAYERS - 3) * 4 * 32 and counts[2] > counts[5]


def test_peft_adapter_with_runs_reads_into_pefref_and_back(tmp_path: Path) -> None:
    pm = _peft(2)
    want = _output(pm)
    pm.save_pretrained(tmp_path / "p")
    adapter = pefref.from_pretrained(copy.deepcopy(base_model()), tmp_path / "p")
    assert adapter.hyperparameters["stride_A"] == 2
    assert max_diff(_output(adapter.model), want) <= TOL
    adapter.save_pretrained(tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base_model()), tmp_path / "back").eval()
    assert max_diff(_output(back), want) <= TOL


PROBE = """\
id: probe_runs
name: Probe
paper: {{title: t, authors: a, year: 2024, arxiv: "2401.00001"}}
summary: s
hyperparameters:
  k: {{type: int, default: 2, min: 1}}
modules:
  - name: m
    sites: [attn.q]
    form: parallel
    params:
      A: {{shape: [2, d_in], init: zeros(), {spec}}}
      B: {{shape: [d_out, 2], init: zeros()}}
    compute: linear(linear(x, A), B)
"""


@pytest.mark.parametrize(("spec", "want"), [("shared: all, every: k", "not shared: all"), ("shared: layers, every: kk", "'kk' is none")])
def test_validate_refuses_every_without_runs_of_layers(tmp_path: Path, spec: str, want: str) -> None:
    path = tmp_path / "probe_runs.yaml"
    path.write_text(PROBE.format(spec=spec))
    problems, _ = validate_paths([path])
    hits = [p for p in problems if p.field.endswith("params.A.every")]
    assert len(hits) == 1 and want in hits[0].message, problems
    assert hits[0].location.line == 12


# --- TinyLoRA: one coefficient vector per group of placements (weight_tying) ----------------------------------------


def _tied_pair(tying: float) -> tuple[peft.PeftModel, nn.Module, Adapter]:
    cfg = peft.TinyLoraConfig(r=2, u=4, weight_tying=tying, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model()), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base_model())
    adapter = apply(model, "tinylora", r=2, u=4, weight_tying=tying)
    with torch.no_grad():
        for key, unit in adapter.units.items():
            layer = _host(pm, key)
            for mine, theirs in (("A", layer.tinylora_A), ("B", layer.tinylora_B), ("P", layer.tinylora_P)):
                getattr(unit, mine).copy_(theirs["default"])
            unit.v.copy_(layer.tinylora_v["default"][layer._tinylora_v_key["default"]])  # a group's vector, from each member
    return pm, model, adapter


@pytest.mark.parametrize("tying", [0.3, 0.5, 1.0])
def test_tinylora_ties_its_vectors_in_groups_of_placements_as_peft_does(tying: float, tmp_path: Path) -> None:
    pm, model, adapter = _tied_pair(tying)
    order = [f"tinylora__{s}__{i}" for i in range(LAYERS) for s in ("attn_q", "attn_v")]  # the model's module order
    n = len(order)
    groups = max(1, round(n * (1 - tying)))
    for j, key in enumerate(order):
        want = min(j // max(1, n // groups), groups - 1)
        assert _host(pm, key)._tinylora_v_key["default"] == str(want)
        first = order[[min(i // max(1, n // groups), groups - 1) for i in range(n)].index(want)]
        assert adapter.units[key].v is adapter.units[first].v
    assert len({id(u.v) for u in adapter.units.values()}) == len(pm.base_model.tinylora_v["default"]) == groups
    want_out = _output(pm)
    assert max_diff(_output(model), want_out) <= TOL
    assert max_diff(want_out, _output(base_model())) > 1e-3
    shape = ModelShape(name="five-llama", family="llama", config=CONFIG)
    derived = count_params(CATALOG.technique("tinylora"), shape, CATALOG, {"r": 2, "u": 4, "weight_tying": tying}).trainable
    assert adapter.report.trainable == _trainable(model) == _trainable(pm) == derived == 4 * groups
    pm.save_pretrained(tmp_path / "p")  # peft -> pefref -> peft
    read = pefref.from_pretrained(copy.deepcopy(base_model()), tmp_path / "p")
    assert read.hyperparameters["weight_tying"] == tying and max_diff(_output(read.model), want_out) <= TOL
    read.save_pretrained(tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base_model()), tmp_path / "back").eval()
    assert max_diff(_output(back), want_out) <= TOL


@pytest.mark.parametrize(("spec", "want"), [("shared: layers, groups: 2", "not shared: layers"), ("shared: all, groups: m + 1", "'m'")])
def test_validate_refuses_groups_without_placements_to_group(tmp_path: Path, spec: str, want: str) -> None:
    path = tmp_path / "probe_runs.yaml"
    path.write_text(PROBE.format(spec=spec))
    problems, _ = validate_paths([path])
    hits = [p for p in problems if p.field.endswith("params.A.groups")]
    assert len(hits) == 1 and want in hits[0].message, problems
    assert hits[0].location.line == 12
