"""peft's adapter format both ways (adapter_config.json + adapter_model.safetensors).

pefref → peft: an applied, perturbed pefref adapter is written with
``save_pretrained`` and read by ``peft.PeftModel.from_pretrained`` on a copy of
the same base model; peft → pefref: a perturbed peft adapter saved by peft is
read by ``pefref.from_pretrained``. Outputs agree within 1e-5 (fp32), and the
adapter really changes the base model's outputs. GPT-2's q/k/v are slices of
the fused ``c_attn``; peft adapts whole modules, so there the cases place
pefref's modules on ``attn.qkv``.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

import pefref
from pefref.interop.table import interop_table
from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.models.build import build_model

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-gpt2"]
GPT2_FUSED = {"lora": ["attn.qkv"], "rslora": ["attn.qkv"], "dora": ["attn.qkv", "ffn.up"], "ia3": ["attn.qkv", "ffn.act"]}
HPS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "alpha": 8}, "rslora": {"r": 4, "alpha": 8}, "dora": {"r": 4, "alpha": 8}, "ia3": {},
    "loha": {"r": 2, "alpha": 4}, "lokr": {"r": 2, "alpha": 4}, "hra": {"r": 2},
    "prompt_tuning": {"n": 3}, "p_tuning": {"n": 3, "hidden": 8}, "p_tuning_lstm": {"n": 3, "hidden": 8},
    "prefix_tuning": {"n": 3, "hidden": 8},
}
LINEAR_ONLY = {m.technique for m in interop_table().methods if "conv1d" not in m.hosts}
EXPORT = [(s, t) for s in SHAPES for t in HPS if not (s == "tiny-gpt2" and t in LINEAR_ONLY)]


@functools.cache
def base(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


def perturb(params: Any, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))


def out(model: Any, shape: str) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, padded_batch(shape))


def test_every_row_names_a_catalog_technique_and_its_modules() -> None:
    from pefref.language.check import expand_modules

    for m in interop_table().methods:
        t = CATALOG.technique(m.technique)
        modules = {x.name: x for x in expand_modules(t, CATALOG.techniques)[0]}
        assert set(m.hyperparameters.values()) <= set(expand_modules(t, CATALOG.techniques)[1]), m.technique
        for mm in m.modules:
            assert mm.module in modules, (m.technique, mm.module)
            assert set(mm.tensors) <= set(modules[mm.module].params), (m.technique, mm.module)


@pytest.mark.parametrize(("shape", "technique"), EXPORT)
def test_pefref_adapter_reads_into_peft(shape: str, technique: str, tmp_path: Path) -> None:
    model = copy.deepcopy(base(shape))
    sites = GPT2_FUSED.get(technique) if shape == "tiny-gpt2" else None
    adapter = pefref.apply(model, technique, sites=sites, **HPS[technique])
    perturb(adapter.trainable_parameters())
    mine = out(model, shape)
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base(shape)), tmp_path).eval()
    theirs = out(pm, shape)
    assert max_diff(mine, theirs) <= TOL
    plain = out(base(shape), shape)
    assert max_diff(mine[:, -plain.shape[1]:], plain) > 1e-3  # not vacuous

    # and back into pefref (prefixes read back only as what they are: see the table's notes)
    method = next(m for m in interop_table().methods if m.technique == technique)
    if method.export_only:
        with pytest.raises(PefrefError, match="exact catalog counterpart") if method.peft_type != "PROMPT_TUNING" else _nothing():
            back = pefref.from_pretrained(copy.deepcopy(base(shape)), tmp_path)
            assert max_diff(out(back.model, shape), mine) <= TOL
        return
    back = pefref.from_pretrained(copy.deepcopy(base(shape)), tmp_path)
    assert back.technique.id == technique
    assert max_diff(out(back.model, shape), mine) <= TOL
    assert back.num_trainable() == adapter.num_trainable()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# --- peft → pefref ----------------------------------------------------------------------------------

_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
_IA3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def peft_config(technique: str, family: str) -> Any:
    t = _TARGETS[family]
    return {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t),
        "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_rslora=True),
        "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
        "ia3": lambda: peft.IA3Config(target_modules=_IA3[family][0], feedforward_modules=_IA3[family][1]),
        "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=t),
        "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=t),
        "hra": lambda: peft.HRAConfig(r=2, target_modules=t),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[technique]()


IMPORT = [(s, t) for s in SHAPES for t in ("lora", "rslora", "dora", "ia3", "loha", "lokr", "hra", "prompt_tuning")
          if not (s == "tiny-gpt2" and t in LINEAR_ONLY)]


@pytest.mark.parametrize(("shape", "technique"), IMPORT)
def test_peft_adapter_reads_into_pefref(shape: str, technique: str, tmp_path: Path) -> None:
    family = CATALOG.shape(shape).family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base(shape)), peft_config(technique, family)).eval()
    perturb(p for p in pm.parameters() if p.requires_grad)
    theirs = out(pm, shape)
    pm.save_pretrained(tmp_path)
    adapter = pefref.from_pretrained(copy.deepcopy(base(shape)), tmp_path)
    assert adapter.technique.id == technique
    assert max_diff(out(adapter.model, shape), theirs) <= TOL
    assert adapter.num_trainable() == sum(p.numel() for p in pm.parameters() if p.requires_grad)


# --- refusals and pefref's own format -------------------------------------------------------------------


def test_refusals_are_clear_and_write_nothing(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-gpt2"))
    sliced = pefref.apply(model, "lora", r=2)  # on GPT-2: q and v slices of c_attn
    with pytest.raises(PefrefError, match="slice of the fused 'transformer.h.0.attn.c_attn'"):
        sliced.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    sliced.remove()
    other = pefref.apply(model, "houlsby_adapter")
    with pytest.raises(PefrefError, match="peft has no exact form"):
        other.save_pretrained(tmp_path / "b")
    other.remove()
    hra = pefref.apply(model, "hra", sites=["attn.qkv"], r=2)
    with pytest.raises(PefrefError, match="adapts only linear modules"):
        hra.save_pretrained(tmp_path / "c")


def test_peft_prefix_and_patterns_are_refused_without_changing_the_model(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base("tiny-llama")), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(tmp_path / "prefix")
    model = copy.deepcopy(base("tiny-llama"))
    with pytest.raises(PefrefError, match="PREFIX_TUNING' has no exact catalog counterpart"):
        pefref.from_pretrained(model, tmp_path / "prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base("tiny-llama")), peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}))
    pm.save_pretrained(tmp_path / "pattern")
    with pytest.raises(PefrefError, match="rank_pattern"):
        pefref.from_pretrained(model, tmp_path / "pattern")
    cfg = json.loads((tmp_path / "pattern" / "adapter_config.json").read_text())
    cfg.update(rank_pattern={}, use_dora=True, lora_dropout=0.1)  # dora has no dropout in the catalog
    (tmp_path / "pattern" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PefrefError, match="matches no catalog technique exactly"):
        pefref.from_pretrained(model, tmp_path / "pattern")
    assert not hasattr(model, "pefref_adapters") and all(p.requires_grad for p in model.parameters())


def test_pefref_own_file_loads_through_from_pretrained(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-llama"))
    a = pefref.apply(model, "loreft")
    perturb(a.trainable_parameters())
    mine = out(model, "tiny-llama")
    a.save(tmp_path / "a.safetensors")
    back = pefref.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path / "a.safetensors")
    assert back.technique.id == "loreft"
    assert max_diff(out(back.model, "tiny-llama"), mine) == 0.0


def test_task_head_saved_with_the_adapter_reads_into_peft(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.AutoConfig.for_model("llama", **CATALOG.shape("tiny-llama").config, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    clf = transformers.LlamaForSequenceClassification(cfg).eval()
    model = copy.deepcopy(clf)
    a = pefref.apply(model, "lora", r=2, modules_to_save=["head"])
    perturb(a.trainable_parameters())
    mine = out(model, "tiny-llama")
    a.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["score"] and saved["task_type"] == "SEQ_CLS"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(clf), tmp_path).eval()
    assert max_diff(out(pm, "tiny-llama"), mine) <= TOL
    back = pefref.from_pretrained(copy.deepcopy(clf), tmp_path)
    assert max_diff(out(back.model, "tiny-llama"), mine) <= TOL
