"""peft's adapter format both ways (adapter_config.json + adapter_model.safetensors).

pefref → peft → pefref: an applied, perturbed pefref adapter is written with
``save_pretrained``, read by ``peft.PeftModel.from_pretrained`` on a copy of the
same base model, and read back by ``pefref.from_pretrained``; peft → pefref → peft:
a perturbed adapter built and saved by peft is read by ``pefref.from_pretrained``
and written again for peft. Outputs agree within 1e-5 (fp32) at every step and
the adapter really changes the base model's outputs; trainable counts are equal
except where the format itself differs (asserted exactly): peft stores prompts
and prefixes in their inference form, and LoRA on slices of GPT-2's fused c_attn
as one block-structured LoRA whose zero blocks peft counts as trainable. The
cases are in :mod:`tests.interop_cases`.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch

import pefref
from pefref.language.catalog import default_catalog
from pefref.language.check import expand_modules
from pefref.language.errors import PefrefError
from pefref.language.interop_table import interop_table

from .interop_cases import CASES, SHAPES, base, export_case, import_case, out, peft_kernel, perturb
from .parity import max_diff

TOL = 1e-5
CATALOG = default_catalog()
COMPUTED = {m.technique for m in interop_table().methods if any(mm.computed for mm in m.modules)}
FUSED = {m.technique for m in interop_table().methods if m.fused is not None}
EXPORT = [(s, n) for s in SHAPES for n, c in CASES.items() if not (s == "tiny-gpt2" and c.linear_only)]
IMPORT = [(s, n) for s, n in EXPORT if CASES[n].peft is not None]
REFUSED = {m.technique: m.refused for m in interop_table().methods if m.refused}


def test_every_row_names_a_catalog_technique_and_its_modules() -> None:
    for m in interop_table().methods:
        t = CATALOG.technique(m.technique)
        modules, hps = expand_modules(t, CATALOG.techniques)
        by_name = {x.name: x for x in modules}
        assert set(m.hyperparameters.values()) | set(m.when) | set(m.from_shapes) <= set(hps), m.technique
        for mm in m.modules:
            assert mm.module in by_name, (m.technique, mm.module)
            module = by_name[mm.module]
            own = set(module.targets) if module.form == "select" else set(module.params)
            assert set(mm.tensors) | set(mm.shared) | set(mm.repeated) | set(mm.indexed) | set(mm.negate) <= own, (m.technique, mm.module)


def test_every_catalog_technique_peft_implements_has_a_row() -> None:
    """The catalog techniques peft 0.21 implements (by its PeftType or a LoraConfig setting) all convert."""
    implemented = {"lora", "lora_plus", "rslora", "dora", "pissa", "vera", "fourierft", "adalora", "ia3", "loha", "lokr",
                   "hra", "oft", "boft", "ln_tuning", "prompt_tuning", "p_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_direct",
                   "randlora", "shira", "tinylora", "vblora", "psoft", "peanut", "supertuning", "multitask_prompt_tuning"}
    implemented |= {"beft", "cartridge", "delora", "glora", "gralora", "hira", "lily", "miss"}
    implemented |= {"olora", "lora_orthogonal", "lora_gaussian", "mica", "lora_bias", "kasa", "bdlora", "velora"}  # LoRA's variants (LoraConfig flags)
    implemented |= {"c3a", "deft", "poly", "pvera", "road", "unilora", "waveft"}
    implemented |= {"loftq"}
    implemented |= {"osf", "trainable_tokens", "cpt"}  # training-time behaviour (training hooks); a subset of an embedding's rows
    implemented |= {"adaption_prompt"}  # reads beyond the hidden state
    implemented |= {"alora"}  # LoRA with alora_invocation_tokens
    implemented |= set(REFUSED)  # Arrow (LoraConfig's arrow_config): rows that name peft's form and refuse it with the reason
    assert implemented <= set(CATALOG.techniques)
    assert {m.technique for m in interop_table().methods if not m.import_only} == implemented
    assert {c.technique for c in CASES.values()} == implemented - set(REFUSED)


@pytest.mark.parametrize(("shape", "name"), EXPORT)
def test_pefref_adapter_reads_into_peft_and_back(shape: str, name: str, tmp_path: Path) -> None:
    case = CASES[name]
    r = export_case(shape, name, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert r.diff <= TOL and r.back is not None and r.back <= TOL
    assert r.change > 1e-3  # not vacuous
    assert r.technique == (case.reads_as or case.technique)
    if case.technique in COMPUTED:  # peft holds what the module computes: its size is the inference form's
        assert r.counts["back"] == r.counts["peft"]
        assert (r.counts["pefref"] == r.counts["peft"]) == (case.technique in {"prompt_tuning", "prefix_direct", "cartridge", "cpt"})
    elif shape == "tiny-gpt2" and case.technique in FUSED and case.gpt2_sites is None:
        # q and v slices of c_attn: per layer r·(d + d) twice, versus A [2r, d] and B [3d, 2r] with k's rows zero
        assert r.counts["peft"] == 2 * r.counts["pefref"] and r.counts["back"] == r.counts["pefref"]
    else:
        assert r.counts["pefref"] == r.counts["peft"] == r.counts["back"]


@pytest.mark.parametrize(("shape", "name"), IMPORT)
def test_peft_adapter_reads_into_pefref_and_back(shape: str, name: str, tmp_path: Path) -> None:
    case = CASES[name]
    r = import_case(shape, name, tmp_path / "a")
    assert r.diff <= TOL and r.back is not None and r.back <= TOL
    assert r.change > 1e-3
    assert r.technique == (case.reads_as or case.technique)
    assert r.counts["pefref"] == r.counts["peft"]


# --- LoRA on slices of a fused projection ---------------------------------------------------------------


def test_lora_on_fused_slices_is_one_block_structured_lora(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-gpt2"))
    a = pefref.apply(model, "lora", r=2, alpha=6)  # GPT-2: q and v slices of c_attn
    perturb(a.trainable_parameters())
    a.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    host = "transformer.h.0.attn.c_attn"
    assert cfg["target_modules"] == [host, "transformer.h.1.attn.c_attn"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"][host], cfg["alpha_pattern"][host]) == (2, 6, 4, 12)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    B = state[f"base_model.model.{host}.lora_B.weight"]
    d = 32
    assert B.shape == (3 * d, 4)
    assert torch.equal(B[d:2 * d], torch.zeros(d, 4)) and torch.equal(B[:d, 2:], torch.zeros(d, 2))
    assert torch.equal(B[:d, :2], a.units["lora__attn_q__0"].B.detach())
    assert torch.equal(B[2 * d:, 2:], a.units["lora__attn_v__0"].B.detach())
    back = pefref.from_pretrained(copy.deepcopy(base("tiny-gpt2")), tmp_path)
    assert sorted(r.site for r in back.report.rows) == ["attn.q", "attn.v"]
    assert back.hyperparameters["r"] == 2 and back.hyperparameters["alpha"] == 6


def test_slices_without_a_block_form_are_refused(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-gpt2"))
    for technique in ("dora", "adalora", "pissa"):
        a = pefref.apply(model, technique, r=2)
        with pytest.raises(PefrefError, match="slice of the fused 'transformer.h.0.attn.c_attn'.*no exact form of a slice"):
            a.save_pretrained(tmp_path / technique)
        assert not (tmp_path / technique).exists()
        a.remove()


# --- transforms: PiSSA's conversion, AdaLoRA's rank masks ---------------------------------------------------


def test_pissa_converted_to_lora_reads_back_as_lora_on_the_original_weights(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base("tiny-llama")), CASES["pissa"].peft("llama")).eval()  # type: ignore[misc]
        pm.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
        pm.save_pretrained(tmp_path / "init")
        pm.peft_config["default"].init_lora_weights = "pissa"
        perturb(p for p in pm.parameters() if p.requires_grad)
        theirs = out(pm, "tiny-llama")
        pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    back = pefref.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path / "lora")
    assert back.technique.id == "lora" and back.hyperparameters["r"] == 8 and back.hyperparameters["alpha"] == 16
    assert max_diff(out(back.model, "tiny-llama"), theirs) <= TOL


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_adalora_pruned_ranks_read_back_as_zero_singular_values(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base("tiny-llama")), CASES["adalora"].peft("llama")).eval()  # type: ignore[misc]
    perturb(p for p in pm.parameters() if p.requires_grad)
    pattern = {}
    with torch.no_grad():
        for n, p in pm.base_model.model.named_parameters():
            if "lora_E" in n:
                keep = [i % 2 == 0 or "q_proj" in n for i in range(p.shape[0])]  # prune two ranks of every v_proj
                p[[not k for k in keep]] = 0.0
                pattern[n] = keep
    pm.peft_config["default"].rank_pattern = pattern
    theirs = out(pm, "tiny-llama")
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(not k for v in saved.values() for k in v) == 4
    assert max_diff(out(peft.PeftModel.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path).eval(), "tiny-llama"), theirs) <= TOL
    back = pefref.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path)
    assert back.technique.id == "adalora" and back.hyperparameters["r"] == 4
    assert max_diff(out(back.model, "tiny-llama"), theirs) <= TOL
    assert int((back.units["adalora__attn_v__0"].E == 0).sum()) == 2


# --- refusals and pefref's own format -------------------------------------------------------------------


def test_refusals_are_clear_and_write_nothing(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-gpt2"))
    other = pefref.apply(model, "houlsby_adapter")
    with pytest.raises(PefrefError, match="peft has no exact form"):
        other.save_pretrained(tmp_path / "b")
    other.remove()
    for technique in ("hra", "oft", "boft", "loha", "lokr"):
        a = pefref.apply(model, technique, sites=["attn.qkv"])
        with pytest.raises(PefrefError, match="adapts only linear modules"):
            a.save_pretrained(tmp_path / technique)
        a.remove()
    assert not any(tmp_path.iterdir())


def _saved(tmp_path: Path, name: str, config: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base("tiny-llama")), config)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_peft_forms_without_an_exact_catalog_form_are_refused_without_changing_the_model(tmp_path: Path) -> None:
    model = copy.deepcopy(base("tiny-llama"))
    cases = {
        "rank_pattern": (peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}), "per-module ranks"),
        "pissa_niter": (peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"), "matches no catalog technique exactly"),
        "vera": (peft.VeraConfig(r=8, target_modules=["q_proj"], save_projection=False), "vera needs save_projection=True"),
        "coft": (peft.OFTConfig(r=4, oft_block_size=0, coft=True, target_modules=["q_proj"]), "matches no catalog technique exactly"),
        "fourierft": (peft.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"], n_frequency_pattern={"q_proj": 10}), "n_frequency_pattern"),
        "one_layer": (peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]), None),
    }
    for name, (config, message) in cases.items():
        folder = _saved(tmp_path, name, config)
        if message is None:  # a subset of layers is a placement, not a refusal
            placed = pefref.from_pretrained(copy.deepcopy(base("tiny-llama")), folder)
            assert [(r.site, r.layers) for r in placed.report.rows] == [("attn.q", [0])]
            continue
        with pytest.raises(PefrefError, match=message):
            pefref.from_pretrained(model, folder)
    cfg = json.loads((tmp_path / "rank_pattern" / "adapter_config.json").read_text())
    cfg.update(rank_pattern={}, use_dora=True, lora_dropout=0.1)  # dora has no dropout in the catalog
    (tmp_path / "rank_pattern" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PefrefError, match="matches no catalog technique exactly"):
        pefref.from_pretrained(model, tmp_path / "rank_pattern")
    assert not hasattr(model, "pefref_adapters") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "arrow_gks"])
def test_arrow_is_refused_both_ways_with_the_reason(tmp_path: Path, gks: bool) -> None:
    """peft's Arrow router (create_arrow_model, saved one folder per adapter) is not read as a LoRA, nor written."""
    technique = "arrow_gks" if gks else "arrow"
    expert = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    experts = [str(_saved(tmp_path, f"e{i}", expert)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = peft.create_arrow_model(copy.deepcopy(base("tiny-llama")), experts[:2], peft.ArrowConfig(top_k=1, use_gks=gks),
                                         general_adapter_paths=experts[2:] if gks else None)
    routed.save_pretrained(tmp_path / "saved")
    model = copy.deepcopy(base("tiny-llama"))
    with pytest.raises(PefrefError, match=f"peft's form of {technique}, which is not converted: peft's Arrow"):
        pefref.from_pretrained(model, tmp_path / "saved" / "arrow_router")
    assert not hasattr(model, "pefref_adapters")
    assert pefref.from_pretrained(copy.deepcopy(base("tiny-llama")), experts[0]).technique.id == "lora"  # an expert alone is a LoRA
    a = pefref.apply(model, technique, r=4, E=2, k=1)
    with pytest.raises(PefrefError, match=f"{technique}: not converted to peft's format: peft's Arrow"):
        a.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_boft_with_several_factors_needs_peft_kernel(tmp_path: Path) -> None:
    """On CPU without its kernel peft keeps one butterfly factor; with the torch stand-in it loads m = 2 exactly."""
    model = copy.deepcopy(base("tiny-llama"))
    a = pefref.apply(model, "boft", b=8, m=2)
    perturb(a.trainable_parameters())
    a.save_pretrained(tmp_path)
    with peft_kernel("cpu"), pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path)


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


def test_lora_on_interleaved_slices_is_one_block_structured_lora(tmp_path: Path) -> None:
    """GPT-NeoX interleaves q, k and v per head in query_key_value: each B goes to its slice's rows in every period."""
    shape = "tiny-gpt-neox"
    model = copy.deepcopy(base(shape))
    a = pefref.apply(model, "lora", r=2, alpha=4)
    assert {r.site for r in a.report.rows} == {"attn.q", "attn.v"}
    perturb(a.trainable_parameters())
    mine = out(model, shape)
    a.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base(shape)), tmp_path).eval()
    assert max_diff(out(pm, shape), mine) <= TOL
    assert max_diff(mine, out(base(shape), shape)) > 1e-3
    back = pefref.from_pretrained(copy.deepcopy(base(shape)), tmp_path)
    assert sorted(r.site for r in back.report.rows) == ["attn.q", "attn.v"]
    assert max_diff(out(back.model, shape), mine) <= TOL and back.num_trainable() == a.num_trainable()
