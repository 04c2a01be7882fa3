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
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga

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
RESIDUAL = {m.technique for m in interop_table().methods if m.residual is not None}
EXPORT = [(s, n) for s in SHAPES for n, c in CASES.items() if not (s == "tiny-gpt2" and c.linear_only) and s not in c.refused_on]
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
            assert set(mm.by_target) | set(mm.grouped) | {g.labels for g in mm.grouped.values()} <= own, (m.technique, mm.module)


def test_every_catalog_technique_peft_implements_has_a_row() -> None:
    """The catalog techniques peft 0.21 implements (by its PeftType or a LoraConfig setting) all convert."""
    implemented = {"lora", "lora_plus", "rslora", "dora", "pissa", "vera", "fourierft", "adalora", "ia3", "loha", "lokr",
                   "hra", "oft", "boft", "ln_tuning", "prompt_tuning", "p_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_direct",
                   "randlora", "shira", "tinylora", "vblora", "psoft", "peanut", "supertuning", "multitask_prompt_tuning"}
    implemented |= {"beft", "cartridge", "delora", "glora", "gralora", "hira", "lily", "miss"}
    implemented |= {"olora", "lora_orthogonal", "lora_gaussian", "mica", "lora_bias", "kasa", "bdlora", "velora"}  # LoRA's variants (LoraConfig flags)
    implemented |= {"c3a", "deft", "poly", "pvera", "road", "unilora", "waveft"}
    implemented |= {"loftq", "eva", "corda", "lora_ga"}  # initialised from data
    implemented |= {"osf", "trainable_tokens", "cpt"}  # training-time behaviour (training hooks); a subset of an embedding's rows
    implemented |= {"adaption_prompt"}  # reads beyond the hidden state
    implemented |= {"alora"}  # LoRA with alora_invocation_tokens
    implemented |= {"shadow"}  # a side network whose backbone mirrors the host's block (Llama-architecture families)
    implemented |= {"frod", "adamss"}  # tensors shared by a projection's layers, keyed by projection; one tensor per cluster of rows
    implemented |= {"xlora"}  # experts kept as LoRA adapters of their own, in folders the config names
    assert implemented | set(REFUSED) <= set(CATALOG.techniques)
    assert {m.technique for m in interop_table().methods if not m.import_only} == implemented | set(REFUSED)
    assert {c.technique for c in CASES.values()} == implemented
    # every one of peft's types has a row
    assert {m.peft_type for m in interop_table().methods} == {t.value for t in peft.utils.PeftType}


@pytest.mark.parametrize(("shape", "name"), EXPORT)
def test_pefref_adapter_reads_into_peft_and_back(shape: str, name: str, tmp_path: Path) -> None:
    case = CASES[name]
    r = export_case(shape, name, tmp_path / "a")
    apart = ["experts"] if case.experts else []  # adapters peft keeps in folders of their own
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", *apart]
    assert r.diff <= TOL and r.back is not None and r.back <= TOL
    assert r.change > 1e-3  # not vacuous
    assert r.technique == (case.reads_as or case.technique)
    if case.technique in COMPUTED:  # peft holds what the module computes: its size is the inference form's
        assert r.counts["back"] == r.counts["peft"]
        assert (r.counts["pefref"] == r.counts["peft"]) == (case.technique in {"prompt_tuning", "prefix_direct", "cartridge", "cpt"})
    elif case.technique in RESIDUAL:  # peft's converted LoRA: [A; A0] and [B, -B0], twice the rank
        assert r.counts["peft"] == 2 * r.counts["pefref"] == r.counts["back"]
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


@pytest.mark.parametrize(("shape", "name"), [(s, n) for n, c in CASES.items() for s in c.refused_on])
def test_a_family_the_row_does_not_convert_is_refused_both_ways(shape: str, name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = copy.deepcopy(base(shape))
    a = pefref.apply(model, case.technique, **case.hps)
    with pytest.raises(PefrefError, match="models only"):
        a.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert case.peft is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base(shape)), case.peft(CATALOG.shape(shape).family))
    pm.save_pretrained(tmp_path / "p")
    fresh = copy.deepcopy(base(shape))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PefrefError, match="models only"):
        pefref.from_pretrained(fresh, tmp_path / "p")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


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


def _calibration_batches(labels: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, 100, (1, 9), generator=g) for _ in range(3)]
    return [{"input_ids": t, **({"labels": t} if labels else {})} for t in ids]


def _residual_lora(technique: str, model: torch.nn.Module) -> Any:
    """peft's LoRA of ``technique`` (CorDA or LoRA-GA: the host weights rewritten from calibration data), r=4, alpha=8."""
    batches = _calibration_batches(labels=technique == "lora_ga")
    common = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    if technique == "corda":
        cfg = peft.LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(), **common)
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in batches])
    else:
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **common)
        preprocess_loraga(model, cfg, train_step=lambda: [model(**b).loss.backward() for b in batches])
    return peft.get_peft_model(model, cfg).eval()


@pytest.mark.given_calibration
@pytest.mark.parametrize("technique", ["corda", "lora_ga"])
def test_data_initialised_lora_with_a_residual_converts_only_as_plain_lora(technique: str, tmp_path: Path) -> None:
    """peft's CorDA and LoRA-GA rewrite the host weights; their file holds A and B only. Saved as is, it names
    init_lora_weights 'corda' / 'lora_ga' and is refused (on the original weights peft itself cannot rebuild the
    residual without the data: its corda_init asks for preprocess_corda, its lora_ga_init falls back to a plain LoRA
    start and leaves the host unchanged); converted (path_initial_model_for_weight_conversion) it is a LoRA of rank
    2r on the original weights and reads back as lora. pefref writes its corda and lora_ga in that converted form
    (the export cases); its file and peft's agree with each other."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = _residual_lora(technique, copy.deepcopy(base("tiny-llama")))
        pm.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
        pm.save_pretrained(tmp_path / "init")
        pm.peft_config["default"].init_lora_weights = technique
        perturb(p for p in pm.parameters() if p.requires_grad)
        theirs = out(pm, "tiny-llama")
        pm.save_pretrained(tmp_path / "as_is")
        pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = copy.deepcopy(base("tiny-llama"))
    with pytest.raises(PefrefError, match="matches no catalog technique exactly"):
        pefref.from_pretrained(model, tmp_path / "as_is")
    assert not hasattr(model, "pefref_adapters")
    back = pefref.from_pretrained(model, tmp_path / "lora")
    assert back.technique.id == "lora" and back.hyperparameters["r"] == 8 and back.hyperparameters["alpha"] == 16
    assert max_diff(out(back.model, "tiny-llama"), theirs) <= TOL
    mine = pefref.apply(copy.deepcopy(base("tiny-llama")), technique, sites=["attn.q", "attn.v"], r=4, alpha=8,
                        calibration=_calibration_batches(labels=True))
    perturb(mine.trainable_parameters())
    want = out(mine.model, "tiny-llama")
    mine.save_pretrained(tmp_path / "mine")
    cfg = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base("tiny-llama")), tmp_path / "mine").eval()
    assert max_diff(out(theirs, "tiny-llama"), want) <= TOL and max_diff(want, out(base("tiny-llama"), "tiny-llama")) > 1e-3


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


# --- tensors keyed by projection (FRoD) and pieces per group of rows (AdaMSS) -------------------------------------------


def test_frod_writes_each_projection_basis_once_under_peft_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = copy.deepcopy(base("tiny-llama"))
    adapter = pefref.apply(model, "frod", sparse_rate=0.05)
    adapter.save_pretrained(tmp_path / "f")
    state = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    q = sorted(k for k in adapter.units if "attn_q" in k)[0]
    for proj, unit_key in (("self_attn_q_proj", q), ("self_attn_v_proj", q.replace("attn_q", "attn_v"))):
        assert torch.equal(state[f"base_model.frod_V.{proj}"], adapter.units[unit_key].V)
        assert torch.equal(state[f"base_model.frod_s_indices.{proj}"], adapter.units[unit_key].loc)
        assert state[f"base_model.frod_s_size.{proj}"].tolist() == [32, 32]
    assert sum(k.startswith("base_model.frod_") for k in state) == 6  # once per projection, not per layer
    state["base_model.frod_s_size.self_attn_q_proj"] = torch.tensor([32, 31])
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "f" / "adapter_model.safetensors"))
    fresh = copy.deepcopy(base("tiny-llama"))
    with pytest.raises(PefrefError, match="frod_s_size.self_attn_q_proj"):
        pefref.from_pretrained(fresh, tmp_path / "f")
    assert not hasattr(fresh, "pefref_adapters")


def test_adamss_refuses_what_peft_cannot_hold(tmp_path: Path) -> None:
    """A host with a bias (peft decomposes [W | b]), and values past the rank of a cluster smaller than subspace_rank."""
    a = pefref.apply(copy.deepcopy(base("tiny-bert")), "adamss")
    with pytest.raises(PefrefError, match="decomposes the host's bias"):
        a.save_pretrained(tmp_path / "bert")
    model = copy.deepcopy(base("tiny-llama"))
    a = pefref.apply(model, "adamss", num_subspaces=5, subspace_rank=2)
    unit = next(u for u in a.units.values() if int(torch.bincount(u.c).min()) == 1)  # a cluster of one row
    with torch.no_grad():
        unit.B.add_(1.0)
    with pytest.raises(PefrefError, match="past the ranks of its smaller groups"):
        a.save_pretrained(tmp_path / "padded")
    assert not (tmp_path / "padded").exists() or not any((tmp_path / "padded").iterdir())


# --- experts kept as adapters of their own (X-LoRA) ------------------------------------------------------------------------


def _xlora_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """pefref's X-LoRA written in peft's format (experts in experts/0, experts/1); the folder and pefref's outputs."""
    model = copy.deepcopy(base("tiny-llama", True))
    a = pefref.apply(model, "xlora", **CASES["xlora"].hps)
    perturb(a.trainable_parameters())
    perturb((b for b in a.units.buffers() if b.is_floating_point()), seed=4)
    a.save_pretrained(tmp_path / "x")
    return tmp_path / "x", out(model, "tiny-llama")


def _edit_config(folder: Path, **values: Any) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(values)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _refused(folder: Path, match: str) -> None:
    fresh = copy.deepcopy(base("tiny-llama", True))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PefrefError, match=match):
        pefref.from_pretrained(fresh, folder)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and not hasattr(fresh, "pefref_adapters")


def test_xlora_experts_are_lora_folders_named_by_absolute_path_and_read_relative_to_the_folder(tmp_path: Path) -> None:
    folder, mine = _xlora_folder(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["adapters"] == {str(i): str((folder / "experts" / str(i)).resolve()) for i in range(2)}
    assert json.loads((folder / "experts" / "0" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    moved = folder.rename(tmp_path / "moved")
    _edit_config(moved, adapters={"0": "experts/0", "1": "experts/1"})  # relative: from the X-LoRA folder
    back = pefref.from_pretrained(copy.deepcopy(base("tiny-llama", True)), moved)
    assert back.technique.id == "xlora" and back.hyperparameters["E"] == 2 and max_diff(out(back.model, "tiny-llama"), mine) <= TOL


@pytest.mark.parametrize(("field", "value"), [("xlora_depth", 2), ("layerwise_scalings", True), ("top_k_lora", 1),
                                              ("enable_softmax", False), ("scaling_pass_value", 0.5)])
def test_xlora_options_the_technique_does_not_express_are_refused(tmp_path: Path, field: str, value: Any) -> None:
    folder, _ = _xlora_folder(tmp_path)
    _edit_config(folder, **{field: value})
    _refused(folder, f"matches no catalog technique exactly.*{field}")


def test_xlora_missing_or_differing_experts_and_a_missing_classifier_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = _xlora_folder(tmp_path)
    _edit_config(folder, adapters={"0": "experts/0", "1": "nowhere"})
    _refused(folder, r"adapters\['1'\] is 'nowhere'.*looked in")
    _edit_config(folder, adapters={"0": "experts/0", "1": "experts/1"})
    _edit_config(folder / "experts" / "1", lora_alpha=4.0)
    _refused(folder, "experts .* differ .*lora_alpha 8.0 vs 4.0")
    _edit_config(folder / "experts" / "1", lora_alpha=8.0)
    state = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if "bias" not in k}, str(folder / "adapter_model.safetensors"))
    _refused(folder, "no tensor 'base_model.internal_xlora_classifier.layers.0.bias'")


def test_xlora_on_gpt2_conv1d_is_refused(tmp_path: Path) -> None:
    a = pefref.apply(copy.deepcopy(base("tiny-gpt2", True)), "xlora")
    with pytest.raises(PefrefError, match="XLORA adapts only linear modules"):
        a.save_pretrained(tmp_path / "g")
    assert not (tmp_path / "g" / "adapter_config.json").exists()
