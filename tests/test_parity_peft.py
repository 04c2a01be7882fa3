"""Numerical parity with HF peft (issue 3, item 8).

For LoRA, (IA)³, prompt tuning and prefix tuning on tiny GPT-2, BERT and Llama
configs: one seeded base model is deep-copied into a peft model and a pefref
model, peft's adapter weights are made non-trivial and copied into pefref's
units, and both run the same padded batch in fp32, eval mode. Outputs agree
within 1e-5, trainable counts are equal, and LoRA's merged host weights equal
peft's. On the decoder models ``generate()`` continues the forward: its tokens
and per-step logits equal greedy decoding by peft's forward without a cache
(and equal peft's own ``generate()`` where that works). Logits are compared,
not only tokens, because a random tiny GPT-2 mostly repeats its last token.

GPT-2's q, k and v are slices of the fused ``c_attn``, which is all peft can
target; there pefref's modules on attn.q/k/v are moved to the fused site
``attn.qkv`` so both sides adapt the same thing.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.language.schema import Technique
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
FAMILIES = ["tiny-gpt2", "tiny-bert", "tiny-llama"]
DECODERS = ["tiny-gpt2", "tiny-llama"]
TECHNIQUES = ["lora", "ia3", "prompt_tuning", "prefix_tuning"]
N_VIRTUAL, PREFIX_HIDDEN, LORA_R, LORA_ALPHA = 5, 12, 4, 8

# family -> (peft task type, output compared); the model itself is built as its family's map says
TASKS = {
    "gpt2": ("CAUSAL_LM", "logits"),
    "llama": ("CAUSAL_LM", "logits"),
    "bert": ("FEATURE_EXTRACTION", "last_hidden_state"),
}

# peft's names for the hosts of pefref's sites (GPT-2: the fused c_attn)
LORA_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
_BERT_FFN_DOWN = r".*layer\.\d+\.output\.dense$"  # not attention.output.dense
IA3_TARGETS = {  # (target_modules, feedforward_modules)
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (rf".*\.(key|value)$|{_BERT_FFN_DOWN}", _BERT_FFN_DOWN),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def peft_config(technique: str, family: str) -> Any:
    task = TASKS[family][0]
    if technique == "lora":
        return peft.LoraConfig(task_type=task, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                               target_modules=LORA_TARGETS[family], fan_in_fan_out=family == "gpt2")
    if technique == "ia3":
        targets, feedforward = IA3_TARGETS[family]
        return peft.IA3Config(task_type=task, target_modules=targets, feedforward_modules=feedforward,
                              fan_in_fan_out=family == "gpt2")
    if technique == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL)
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL, prefix_projection=True,
                                   encoder_hidden_size=PREFIX_HIDDEN)


PEFREF_HPS = {
    "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0},
    "ia3": {},
    "prompt_tuning": {"n": N_VIRTUAL},
    "prefix_tuning": {"n": N_VIRTUAL, "hidden": PREFIX_HIDDEN},
}
FUSED = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv"}


def pefref_technique(technique: str, family: str) -> Technique:
    """The catalog technique; for GPT-2 its q/k/v sites moved to the fused attn.qkv (what peft targets)."""
    tech = CATALOG.technique(technique)
    if family != "gpt2":
        return tech

    def fused(sites: list[str]) -> list[str]:
        return list(dict.fromkeys(FUSED.get(s, s) for s in sites))

    return tech.model_copy(update={"modules": [m.model_copy(update={"sites": fused(list(m.sites))}) for m in tech.modules]})


# --- copying peft's weights into pefref's units ------------------------------------------------------


@dataclass
class Place:
    """Where a pefref unit sits: its module, site, layer and (for host sites) the host's module path."""

    module: str
    site: str
    layer: int | None
    path: str | None


_SITE_BY_KEY = {s.replace(".", "_"): s for s in CATALOG.reference.sites}


def place_of(unit_key: str, family: str) -> Place:
    module, site_key, *layer = unit_key.split("__")
    site = _SITE_BY_KEY[site_key]
    i = int(layer[0]) if layer else None
    path = CATALOG.family(family).sites[site].path
    return Place(module, site, i, path.format(i=i) if path else None)


def _copy_lora(unit: nn.Module, pm: Any, at: Place) -> None:
    host = pm.get_base_model().get_submodule(at.path)
    unit.A.copy_(host.lora_A["default"].weight)
    unit.B.copy_(host.lora_B["default"].weight)


def _copy_ia3(unit: nn.Module, pm: Any, at: Place) -> None:
    unit.l.copy_(pm.get_base_model().get_submodule(at.path).ia3_l["default"].flatten())  # [out, 1] or [1, in]


def _copy_prompt(unit: nn.Module, pm: Any, at: Place) -> None:
    unit.P.copy_(pm.prompt_encoder["default"].embedding.weight)


def _copy_prefix(unit: nn.Module, pm: Any, at: Place) -> None:
    """peft's MLP emits, per virtual token, [k_0, v_0, k_1, v_1, ...] each of width d_kv."""
    enc = pm.prompt_encoder["default"]
    W2, b2 = enc.transform[2].weight, enc.transform[2].bias
    d_kv = enc.embedding.weight.shape[1]
    rows = slice(2 * at.layer * d_kv, (2 * at.layer + 2) * d_kv)  # this layer's keys then values: its slice of the stacked heads
    unit.E.copy_(enc.embedding.weight)
    unit.W1.copy_(enc.transform[0].weight)
    unit.b1.copy_(enc.transform[0].bias)
    unit.own("Wkv").copy_(W2[rows])
    unit.own("bkv").copy_(b2[rows])


COPY: dict[str, Callable[[nn.Module, Any, Place], None]] = {
    "lora": _copy_lora,
    "ia3": _copy_ia3,
    "prompt_tuning": _copy_prompt,
    "prefix_tuning": _copy_prefix,
}


# --- building the pair --------------------------------------------------------------------------------


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    base: nn.Module
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    output: str  # the output compared


def build(shape: str, technique: str) -> Pair:
    """peft and pefref on copies of one base model, with peft's (perturbed) adapter weights copied into pefref."""
    family = family_of(shape)
    base = base_model(shape)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(technique, family)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # LoRA's B starts at 0 and (IA)³'s vectors at 1: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    adapter = apply(model, pefref_technique(technique, family), **PEFREF_HPS[technique])
    with torch.no_grad():
        for key, unit in adapter.units.items():
            COPY[technique](unit, pm, place_of(key, family))
    return Pair(base, pm, model, adapter, TASKS[family][1])


def output(model: nn.Module, key: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(**inputs), key)


# --- tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("shape", FAMILIES)
def test_outputs_and_trainable_counts_match_peft(shape: str, technique: str) -> None:
    pair = build(shape, technique)
    inputs = padded_batch(shape)
    want = output(pair.peft_model, pair.output, inputs)
    got = output(pair.model, pair.output, inputs)
    assert max_diff(got, want) <= TOL
    base = output(pair.base, pair.output, inputs)  # not vacuous: the adapter changes the output
    assert max_diff(base, want[:, -base.shape[1]:]) > 1e-3

    n_peft = sum(p.numel() for p in pair.peft_model.parameters() if p.requires_grad)
    assert pair.adapter.report.trainable == n_peft
    assert sum(p.numel() for p in pair.adapter.trainable_parameters()) == n_peft


@pytest.mark.parametrize("shape", FAMILIES)
def test_lora_merged_weights_match_peft(shape: str) -> None:
    pair = build(shape, "lora")
    inputs = padded_batch(shape)
    unmerged = output(pair.model, pair.output, inputs)
    hosts = sorted({place_of(k, family_of(shape)).path for k in pair.adapter.units})

    merged_peft = pair.peft_model.merge_and_unload()
    pair.adapter.merge()
    for path in hosts:
        mine, theirs = pair.model.get_submodule(path), merged_peft.get_submodule(path)
        assert max_diff(mine.weight, theirs.weight) <= TOL, path
        if theirs.bias is not None:
            assert max_diff(mine.bias, theirs.bias) <= TOL, path
    got = output(pair.model, pair.output, inputs)
    assert max_diff(got, output(merged_peft, pair.output, inputs)) <= TOL
    assert max_diff(got, unmerged) <= TOL


NEW_TOKENS = 4
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
# peft 0.21.2's generate() is no reference for prompt learning under transformers 5.x: its
# prepare_inputs_for_generation reads and writes `past_key_values`, but generate() passes the cache as
# `cache`, so the prefix is dropped and the prompt is re-prepended every step. For those two techniques
# the reference is greedy decoding by peft's forward (the two tests above); peft's generate() is compared
# for the others only.


def decoder_cases(without: tuple[str, ...] = ()) -> list[Any]:
    """(shape, technique) for the decoder models, leaving out the techniques ``without``."""
    return [pytest.param(s, t) for s in DECODERS for t in TECHNIQUES if t not in without]


def greedy_reference(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of one unpadded sequence by full forward passes (no cache): tokens and per-step logits."""
    logits = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


def generate(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate() of NEW_TOKENS tokens (no stopping at EOS): sequences and per-step logits."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(("shape", "technique"), decoder_cases())
def test_generate_continues_the_forward(shape: str, technique: str) -> None:
    """Each row of a batched generate() (no padding) equals greedy decoding by peft's forward, token and logit."""
    _check_generate_rows(build(shape, technique), {**padded_batch(shape), "attention_mask": torch.ones(2, 7, dtype=torch.long)})


@pytest.mark.parametrize(("shape", "technique"), decoder_cases())
def test_generate_left_padded_continues_the_forward(shape: str, technique: str) -> None:
    """The same with a left-padded row: padding must not change what that row generates."""
    _check_generate_rows(build(shape, technique), padded_batch(shape))


def _check_generate_rows(pair: Pair, inputs: dict[str, torch.Tensor]) -> None:
    sequences, logits = generate(pair.model, inputs)
    assert sequences.shape == (2, 7 + NEW_TOKENS)
    for row, mask in enumerate(inputs["attention_mask"].bool()):
        pads = int((~mask).sum())
        want_ids, want_logits = greedy_reference(pair.peft_model, inputs["input_ids"][row:row + 1, mask])
        assert torch.equal(sequences[row:row + 1, pads:], want_ids), row
        assert max_diff(logits[row:row + 1], want_logits) <= TOL, row


@pytest.mark.parametrize(("shape", "technique"), decoder_cases(without=PROMPT_LEARNING))
def test_generate_matches_peft_generate(shape: str, technique: str) -> None:
    """Left-padded batch: pefref's generate() gives peft's tokens and per-step logits."""
    pair = build(shape, technique)
    mine, mine_logits = generate(pair.model, padded_batch(shape))
    theirs, their_logits = generate(pair.peft_model, padded_batch(shape))
    assert torch.equal(mine, theirs)
    assert max_diff(mine_logits, their_logits) <= TOL


@pytest.mark.parametrize("n", [1, 4])
def test_prompt_tuning_sequence_classification_reads_the_first_virtual_token_as_peft(n: int) -> None:
    """BERT classification with prompt tuning (peft SEQ_CLS: the classifier trains with the prompt): the pooler
    reads position 0, the first virtual token, in both; logits agree and the trainable counts are equal."""
    import transformers

    cfg = transformers.BertConfig(**{"pad_token_id": 0, **CATALOG.shape("tiny-bert").config, "num_labels": 2})
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n)).eval()
    model = copy.deepcopy(base)
    adapter = apply(model, "prompt_tuning", n=n, modules_to_save=["head"])
    with torch.no_grad():
        (unit,) = adapter.units.values()
        unit.P.copy_(pm.prompt_encoder["default"].embedding.weight)
        model.classifier.weight.add_(0.5)  # a trained head: both sides train and save the classifier
        pm.base_model.classifier.modules_to_save["default"].weight.copy_(model.classifier.weight)
    inputs = padded_batch("tiny-bert")
    with torch.no_grad():
        want, got, plain = (m(**inputs).logits for m in (pm, model, base))
    assert max_diff(got, want) <= TOL and max_diff(got, plain) > 1e-3
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert adapter.report.trainable == n_peft == n * cfg.hidden_size + sum(p.numel() for p in base.classifier.parameters())
