"""Round trips through peft's adapter format, as data shared by the tests and the measurement script.

Each case names a catalog technique with its hyperparameters and placement per
family, and the peft config that builds the same kind of adapter in peft.
``export_case`` applies and perturbs the pefref adapter, saves it in peft's
format, loads it with ``peft.PeftModel.from_pretrained`` and back with
``pefref.from_pretrained``; ``import_case`` builds and perturbs the adapter in
peft, saves it with peft and loads it with ``pefref.from_pretrained``. Both
return the max abs differences of the fp32 outputs and the trainable counts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import peft.tuners.boft.layer as boft_layer
import peft.tuners.lora.layer as lora_layer
import torch
from torch import nn

import pefref
from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.runtime.calibration import random_batches

from .conftest import output_of
from .loftq_standin import peft_loftq_init
from .parity import max_diff, padded_batch

__all__ = ["Case", "CASES", "SHAPES", "export_case", "import_case", "Record", "base", "out", "perturb", "peft_kernel"]

CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-gpt2"]
ATTN = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
NORMS = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "gpt2": ["ln_1", "ln_2", "ln_f"]}
IA3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}
OSF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # the osf technique's sites on Llama
GPT2_WHOLE = ["attn.qkv", "attn.o", "ffn.up", "ffn.down"]  # GPT-2's projections as whole modules


@dataclass(frozen=True)
class Case:
    """A technique, its hyperparameters and GPT-2 sites, and peft's config for the same kind of adapter."""

    technique: str
    hps: dict[str, Any] = field(default_factory=dict)
    gpt2_sites: list[str] | None = None  # None: the technique's own sites
    peft: Callable[[str], Any] | None = None  # family -> peft config (None: pefref -> peft only)
    reads_as: str | None = None  # the technique peft's form reads back into (default: the same)
    linear_only: bool = False  # peft has no Conv1D form (GPT-2 is refused)
    kernel: str = "cpu"  # BOFT: 'cpu' (peft keeps one butterfly factor) or 'torch' (a stand-in for its CUDA kernel)
    task_ids: bool = False  # peft's forward takes every example's task id (multitask prompt tuning, Poly)
    calibration: bool = False  # initialised from data: applied with a few batches of random tokens
    refused_on: tuple[str, ...] = ()  # shapes whose family the row does not convert (families:), refused both ways
    experts: int = 0  # peft's config names this many perturbed LoRA adapters (saved first, config as the lora case) as its experts
    no_cache: bool = False  # peft refuses a model whose config caches keys and values (X-LoRA)


def apply_case(model: nn.Module, shape: str, case: Case) -> Any:
    """pefref's adapter of ``case`` on ``model`` (GPT-2: at the case's GPT-2 sites; calibration batches where it needs them)."""
    sites = case.gpt2_sites if shape == "tiny-gpt2" else None
    batches = random_batches(model, 2, seq=8) if case.calibration else None  # labelled: the cases are causal LMs
    return pefref.apply(model, case.technique, sites=sites, calibration=batches, **case.hps)


def _lora(**kw: Any) -> Callable[[str], Any]:
    return lambda fam: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN[fam], **kw)


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8}, None, _lora()),
    "lora_plus": Case("lora_plus", {"r": 4, "alpha": 8}, None, reads_as="lora"),
    "rslora": Case("rslora", {"r": 4, "alpha": 8}, None, _lora(use_rslora=True)),
    "dora": Case("dora", {"r": 4, "alpha": 8}, ["attn.qkv", "ffn.up"], _lora(use_dora=True)),
    "pissa": Case("pissa", {"r": 4, "alpha": 8}, GPT2_WHOLE, _lora(init_lora_weights="pissa", lora_dropout=0.0)),
    "vera": Case("vera", {"r": 8}, ["attn.qkv"], lambda fam: peft.VeraConfig(r=8, target_modules=ATTN[fam], save_projection=True)),
    "fourierft": Case("fourierft", {"n": 20, "alpha": 10.0}, ["attn.qkv"],
                      lambda fam: peft.FourierFTConfig(n_frequency=20, scaling=10.0, target_modules=ATTN[fam])),
    "adalora": Case("adalora", {"r": 4, "alpha": 8}, GPT2_WHOLE,
                    lambda fam: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=ATTN[fam])),
    "ia3": Case("ia3", {}, ["attn.qkv", "ffn.act"], lambda fam: peft.IA3Config(target_modules=IA3[fam][0], feedforward_modules=IA3[fam][1])),
    "loha": Case("loha", {"r": 2, "alpha": 4}, None, lambda fam: peft.LoHaConfig(r=2, alpha=4, target_modules=ATTN[fam]), linear_only=True),
    "lokr": Case("lokr", {"r": 2, "alpha": 4}, None, lambda fam: peft.LoKrConfig(r=2, alpha=4, target_modules=ATTN[fam]), linear_only=True),
    "hra": Case("hra", {"r": 2}, None, lambda fam: peft.HRAConfig(r=2, target_modules=ATTN[fam]), linear_only=True),
    "oft": Case("oft", {"r": 4, "neumann": 0}, None, lambda fam: peft.OFTConfig(
        r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=ATTN[fam]), linear_only=True),
    "oft_neumann": Case("oft", {"r": 4, "neumann": 5}, None, lambda fam: peft.OFTConfig(  # peft's defaults: block size, Neumann
        oft_block_size=8, target_modules=ATTN[fam]), linear_only=True),
    "boft": Case("boft", {"b": 8, "m": 1}, None, lambda fam: peft.BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=1, target_modules=ATTN[fam]), linear_only=True),
    "boft_m2": Case("boft", {"b": 8, "m": 2}, None, lambda fam: peft.BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=2, target_modules=ATTN[fam]), linear_only=True, kernel="torch"),
    "ln_tuning": Case("ln_tuning", {}, None, lambda fam: peft.LNTuningConfig(target_modules=NORMS[fam])),
    "prompt_tuning": Case("prompt_tuning", {"n": 3}, None, lambda fam: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p_tuning": Case("p_tuning", {"n": 3, "hidden": 8}, None, lambda fam: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8), reads_as="prompt_tuning"),
    "p_tuning_lstm": Case("p_tuning_lstm", {"n": 3, "hidden": 8}, None, reads_as="prompt_tuning"),
    "prefix_tuning": Case("prefix_tuning", {"n": 3, "hidden": 8}, None, lambda fam: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8), reads_as="prefix_direct"),
    "prefix_direct": Case("prefix_direct", {"n": 3}, None, lambda fam: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    # peft 0.21 breadth (a)
    "beft": Case("beft", {}, None, lambda fam: peft.BeftConfig(target_modules=["v_proj"]), linear_only=True),
    "cartridge": Case("cartridge", {"n": 3, "f": 1}, None, lambda fam: peft.CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=1)),
    "delora": Case("delora", {"r": 2}, None, lambda fam: peft.DeloraConfig(r=2, target_modules=ATTN[fam]), linear_only=True),
    "glora": Case("glora", {"r": 2}, None, lambda fam: peft.GloraConfig(r=2, target_modules=ATTN[fam]), linear_only=True),
    "gralora": Case("gralora", {"r": 4, "alpha": 8.0, "k": 2}, ["attn.qkv"], lambda fam: peft.GraloraConfig(
        r=4, alpha=8, gralora_k=2, target_modules=ATTN[fam], fan_in_fan_out=fam == "gpt2")),
    "hira": Case("hira", {"r": 2}, ["attn.qkv"], lambda fam: peft.HiraConfig(r=2, target_modules=ATTN[fam], fan_in_fan_out=fam == "gpt2")),
    "lily": Case("lily", {"r": 2, "num_B": 2}, None, lambda fam: peft.LilyConfig(r=2, num_B=2, target_modules=ATTN[fam]), linear_only=True),
    "miss": Case("miss", {"r": 8}, None, lambda fam: peft.MissConfig(r=8, target_modules=ATTN[fam]), linear_only=True),
    # peft 0.21 breadth (b)
    "randlora": Case("randlora", {"r": 8, "alpha": 16.0}, ["attn.qkv"],
                     lambda fam: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=ATTN[fam])),
    "shira": Case("shira", {"r": 2}, None, lambda fam: peft.ShiraConfig(r=2, random_seed=5, target_modules=ATTN[fam]), linear_only=True),
    "tinylora": Case("tinylora", {"r": 2, "u": 4}, ["attn.qkv"], lambda fam: peft.TinyLoraConfig(r=2, u=4, target_modules=ATTN[fam])),
    "vblora": Case("vblora", {"r": 2, "nv": 6, "vl": 8, "k": 2}, ["attn.qkv"], lambda fam: peft.VBLoRAConfig(
        r=2, num_vectors=6, vector_length=8, topk=2, target_modules=ATTN[fam])),
    "psoft": Case("psoft", {"r": 4, "alpha": 8.0}, None, lambda fam: peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=ATTN[fam]),
                  linear_only=True),
    "peanut": Case("peanut", {"r": 4, "scaling": 2.0}, None, lambda fam: peft.PeanutConfig(r=4, scaling=2.0, target_modules=ATTN[fam]),
                   linear_only=True),
    "supertuning": Case("supertuning", {"sparsity": 0.9}, None, lambda fam: peft.SupertuningConfig(
        sparsity=0.9, target_modules=ATTN[fam]), linear_only=True),
    "multitask_prompt_tuning": Case("multitask_prompt_tuning", {"n": 3, "k": 2}, None, lambda fam: peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_ranks=2), task_ids=True),
    # LoRA's variants (LoraConfig flags)
    "olora": Case("olora", {"r": 4, "alpha": 8}, None, _lora(init_lora_weights="olora", lora_dropout=0.0), linear_only=True),
    "lora_orthogonal": Case("lora_orthogonal", {"r": 4, "alpha": 8}, None, _lora(init_lora_weights="orthogonal")),
    "lora_gaussian": Case("lora_gaussian", {"r": 4, "alpha": 8}, None, _lora(init_lora_weights="gaussian")),
    "loftq": Case("loftq", {"r": 4, "alpha": 8, "bits": 4, "iters": 2}, None, _lora(
        init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2), lora_dropout=0.0), linear_only=True),
    "eva": Case("eva", {"r": 4, "alpha": 8}, GPT2_WHOLE, _lora(init_lora_weights="eva", lora_dropout=0.0), reads_as="lora",
                calibration=True),
    "corda": Case("corda", {"r": 4, "alpha": 8}, GPT2_WHOLE, reads_as="lora", calibration=True),
    "lora_ga": Case("lora_ga", {"r": 4, "alpha": 8}, GPT2_WHOLE, reads_as="lora", calibration=True),
    "mica": Case("mica", {"r": 4, "alpha": 8}, None, _lora(init_lora_weights="mica"), linear_only=True),
    "lora_bias": Case("lora_bias", {"r": 4, "alpha": 8}, None, _lora(lora_bias=True), linear_only=True),
    "kasa": Case("kasa", {"r": 4, "alpha": 8}, None, _lora(kasa_config=peft.KasaConfig()), linear_only=True),
    "bdlora": Case("bdlora", {"r": 4, "alpha": 8, "nblocks": 2}, None, lambda fam: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "o_proj", "down_proj"], use_bdlora=peft.tuners.lora.config.BdLoraConfig(
            target_modules_bd_a=["q_proj", "k_proj", "v_proj", "up_proj"], target_modules_bd_b=["o_proj", "down_proj"], nblocks=2)), linear_only=True),
    "velora": Case("velora", {"r": 4, "alpha": 8, "num_groups": 4, "scale": 0.5}, None, _lora(
        lora_dropout=0.0, velora_config=peft.VeloraConfig(num_groups=4, scale=0.5, init_type="random")), linear_only=True),
    # activated LoRA: token 0 (the padding of the batch's first row) is the invocation, so that row adapts from its last pad on
    "alora": Case("alora", {"r": 4, "alpha": 8, "tokens": [0]}, None, _lora(task_type="CAUSAL_LM", alora_invocation_tokens=[0]), linear_only=True),
    # peft 0.21 breadth (c)
    "c3a": Case("c3a", {"block_size": 8}, None, lambda fam: peft.C3AConfig(block_size=8, target_modules=ATTN[fam]), linear_only=True),
    "deft": Case("deft", {"r": 4}, ["attn.qkv"], lambda fam: peft.DeftConfig(r=4, target_modules=ATTN[fam], fan_in_fan_out=fam == "gpt2")),
    "poly": Case("poly", {"r": 2, "n_skills": 3, "n_splits": 2}, None, lambda fam: peft.PolyConfig(
        task_type="CAUSAL_LM", r=2, n_tasks=1, n_skills=3, n_splits=2, target_modules=ATTN[fam]), linear_only=True, task_ids=True),
    "pvera": Case("pvera", {"r": 4}, ["attn.qkv"], lambda fam: peft.PveraConfig(
        r=4, target_modules=ATTN[fam], save_projection=True, fan_in_fan_out=fam == "gpt2")),
    "road": Case("road", {"group_size": 8}, None, lambda fam: peft.RoadConfig(group_size=8, target_modules=ATTN[fam]), linear_only=True),
    "unilora": Case("unilora", {"r": 2, "theta_d_length": 32}, ["attn.qkv"], lambda fam: peft.UniLoraConfig(
        r=2, theta_d_length=32, save_indices=True, target_modules=ATTN[fam], fan_in_fan_out=fam == "gpt2")),
    "waveft": Case("waveft", {"n": 50, "scaling": 5.0}, ["attn.qkv"], lambda fam: peft.WaveFTConfig(
        n_frequency=50, scaling=5.0, target_modules=ATTN[fam], fan_in_fan_out=fam == "gpt2")),
    # tensors shared by a projection's layers, keyed by projection (FRoD); one tensor per cluster of rows (AdaMSS)
    "frod": Case("frod", {"sparse_rate": 0.05}, None, lambda fam: peft.FrodConfig(
        sparse_rate=0.05, target_modules=ATTN[fam], progressbar=False), linear_only=True),
    "adamss": Case("adamss", {"r": 16, "num_subspaces": 4}, None, lambda fam: peft.AdamssConfig(
        r=16, num_subspaces=4, target_modules=ATTN[fam]), linear_only=True),
    # training-time behaviour (pefref's training hooks)
    "osf": Case("osf", {"frac": 0.125}, None, lambda fam: peft.OSFConfig(effective_rank=0.125, target_modules=OSF_TARGETS), linear_only=True),
    # GPT-2 ties its head to the embedding: refused (peft would patch the head's rows too)
    "trainable_tokens": Case("trainable_tokens", {"rows": [3, 47, 111]}, None, lambda fam: peft.TrainableTokensConfig(
        token_indices=[3, 47, 111], target_modules=["embed_tokens"]), linear_only=True),
    "cpt": Case("cpt", {"ids": [28, 58, 70, 32], "types": [1, 2, 3, 4], "eps": 0.5, "format_eps": 0.3}, None, lambda fam: peft.CPTConfig(
        task_type="CAUSAL_LM", cpt_token_ids=[28, 58, 70, 32], cpt_tokens_type_mask=[1, 2, 3, 4], opt_projection_epsilon=0.5,
        opt_projection_format_epsilon=0.3), reads_as="prompt_tuning"),
    # reads beyond the hidden state (peft wraps Llama's attention; GPT-2 has no rotary queries, so pefref refuses it)
    "shadow": Case("shadow", {"dropout": 0.0}, None, lambda fam: peft.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=0.0),
                   refused_on=("tiny-gpt2",)),  # peft's mirror backbone is GPT-2's own block there
    "adaption_prompt": Case("adaption_prompt", {"n": 3}, None, lambda fam: peft.AdaptionPromptConfig(
        task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2), linear_only=True),
    # experts kept as LoRA adapters of their own (GPT-2: q and v are slices of c_attn, which peft's X-LoRA cannot split)
    "xlora": Case("xlora", {"E": 2, "r": 4, "alpha": 8}, None, lambda fam: peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=32), linear_only=True, experts=2, no_cache=True),
}


@dataclass
class Record:
    """One direction of one case: output differences and trainable counts."""

    diff: float  # pefref vs peft (max abs, fp32)
    back: float | None  # the round trip's second leg vs the first (None: not read back)
    change: float  # the adapter vs the base model (not vacuous)
    counts: dict[str, int]
    technique: str = ""  # what the second leg read into


class _TorchBlockDiag:
    """A pure-torch stand-in for peft's ``fbd_cuda`` extension: [N, D, H, H] blocks -> [N, D·H, D·H]."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x])]


@contextlib.contextmanager
def peft_kernel(kind: str) -> Iterator[None]:
    """BOFT's butterfly kernel for peft on CPU: none (peft keeps one factor) or the torch stand-in; LoftQ's
    initialisation on the CPU without bitsandbytes (tests/loftq_standin.py)."""
    old, old_loftq = boft_layer.get_fbd_cuda, lora_layer.loftq_init
    boft_layer.get_fbd_cuda = (lambda: None) if kind == "cpu" else (lambda: _TorchBlockDiag)  # type: ignore[assignment]
    lora_layer.loftq_init = peft_loftq_init()
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda = old  # type: ignore[assignment]
        lora_layer.loftq_init = old_loftq


@functools.cache
def base(shape: str, no_cache: bool = False) -> nn.Module:
    model = build_model(shape, seed=0)
    if no_cache:
        model.config.use_cache = False
    return model


def perturb(params: Any, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))


def out(model: Any, shape: str, task_ids: bool = False) -> torch.Tensor:
    """fp32 outputs on the padded batch (with ``task_ids``: task 0 for every example, for peft's multitask prompt)."""
    batch = padded_batch(shape)
    extra = {"task_ids": torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)} if task_ids else {}
    with torch.no_grad():
        return output_of(model, {**batch, **extra})
    batch = padded_batch(shape)
    if task_ids:
        batch["task_ids"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    with torch.no_grad():
        return output_of(model, batch)


def _changed(got: torch.Tensor, shape: str) -> float:
    plain = out(base(shape), shape)
    return max_diff(got[:, -plain.shape[1]:], plain)


def _peft_load(shape: str, folder: Path, trainable: bool, no_cache: bool = False) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base(shape, no_cache)), folder, is_trainable=trainable).eval()


def _experts(shape: str, case: Case, folder: Path) -> dict[str, str]:
    """``case.experts`` perturbed LoRA adapters built by peft and saved in folders beside ``folder``; name -> folder."""
    out = {}
    for i in range(case.experts):
        pm = peft.get_peft_model(copy.deepcopy(base(shape)), _lora()(CATALOG.shape(shape).family))
        perturb((p for p in pm.parameters() if p.requires_grad), seed=10 + i)
        pm.save_pretrained(folder.parent / f"{folder.name}-expert{i}")
        out[str(i)] = str(folder.parent / f"{folder.name}-expert{i}")
    return out


def _peft_save(pm: Any, folder: Path, case: Case) -> None:
    """peft's save_pretrained; with experts, the trainable tensors it drops written in under its own keys (peft 0.21
    filters out keys holding '.0.' as those of its expert named '0', the classifier's layers.0 among them)."""
    from safetensors.torch import load_file, save_file

    pm.save_pretrained(folder)
    if case.experts:
        state = load_file(str(folder / "adapter_model.safetensors"))
        state.update({k: p.detach().clone() for k, p in pm.named_parameters() if p.requires_grad and k not in state})
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _peft_count(shape: str, folder: Path, no_cache: bool = False) -> int:
    """peft's trainable count of a saved adapter (prompt learning: the saved prompt, which peft loads frozen)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    if "prompt_embeddings" in state:
        emb = state["prompt_embeddings"]
        frozen = json.loads((folder / "adapter_config.json").read_text()).get("num_frozen_tokens") or 0  # Cartridges' frozen rows
        return sum(t.numel() for t in state.values()) - frozen * emb.shape[1]
    pm = _peft_load(shape, folder, trainable=True, no_cache=no_cache)
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


def export_case(shape: str, name: str, folder: Path) -> Record:
    """pefref -> peft -> pefref."""
    case = CASES[name]
    model = copy.deepcopy(base(shape, case.no_cache))
    adapter = apply_case(model, shape, case)
    perturb(adapter.trainable_parameters())
    if case.experts:  # frozen experts: perturbed too, or the adapter would be the identity
        perturb((b for b in adapter.units.buffers() if b.is_floating_point()), seed=4)
    mine = out(model, shape)
    adapter.save_pretrained(folder)
    with peft_kernel(case.kernel):
        theirs = out(_peft_load(shape, folder, trainable=False, no_cache=case.no_cache), shape, case.task_ids)
        n_peft = _peft_count(shape, folder, case.no_cache)
    back = pefref.from_pretrained(copy.deepcopy(base(shape, case.no_cache)), folder)
    return Record(max_diff(mine, theirs), max_diff(out(back.model, shape), mine), _changed(mine, shape),
                  {"pefref": adapter.num_trainable(), "peft": n_peft, "back": back.num_trainable()}, back.technique.id)


def import_case(shape: str, name: str, folder: Path) -> Record:
    """peft -> pefref (and on to peft again)."""
    case = CASES[name]
    assert case.peft is not None
    family = CATALOG.shape(shape).family
    with peft_kernel(case.kernel), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = case.peft(family)
        if case.experts:
            config.adapters = _experts(shape, case, folder)
        pm = peft.get_peft_model(copy.deepcopy(base(shape, case.no_cache)), config).eval()
        perturb(p for p in pm.parameters() if p.requires_grad)
        theirs = out(pm, shape, case.task_ids)
        _peft_save(pm, folder, case)
        n_peft = _peft_count(shape, folder, case.no_cache)
    adapter = pefref.from_pretrained(copy.deepcopy(base(shape, case.no_cache)), folder)
    mine = out(adapter.model, shape)
    again = folder.parent / (folder.name + "-again")
    adapter.save_pretrained(again)
    with peft_kernel(case.kernel):
        back = out(_peft_load(shape, again, trainable=False, no_cache=case.no_cache), shape, case.task_ids)
    return Record(max_diff(mine, theirs), max_diff(back, mine), _changed(theirs, shape),
                  {"peft": n_peft, "pefref": adapter.num_trainable()}, adapter.technique.id)
