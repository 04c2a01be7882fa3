"""Numerical parity of the shadow technique with HF peft 0.21's ShadowPEFT (PeftType.SHADOW, task CAUSAL_LM).

peft builds a one-layer "mirror" backbone of the host's decoder class that reads
the shared token embeddings (s0 = its final norm's output), adds
shadow_alpha * W_up W_down dropout(x - s) to each decoder block's input and
advances s by a gated update from each block's output; with labels it adds
auxiliary_loss_weight * CE(lm_head(s0), labels) to the loss. One seeded tiny
model (Llama, and Mistral: the same block) is deep-copied into a peft model and
a pefref model; peft's tensors are perturbed and copied into pefref's units.
Checked: outputs within 1e-5 of peft's and different from the base model's,
equal trainable counts, the auxiliary loss equal to peft's shadow loss, and the
tensors after 4 SGD steps on the task loss plus the auxiliary loss within 1e-5
(the same loop without the auxiliary loss ends elsewhere).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .parity import max_diff, padded_batch

TOL = 1e-5
SHAPES = ["tiny-llama", "tiny-mistral"]
BACKBONE = {"Wq": "layers.0.self_attn.q_proj.weight", "Wk": "layers.0.self_attn.k_proj.weight",
            "Wv": "layers.0.self_attn.v_proj.weight", "Wo": "layers.0.self_attn.o_proj.weight",
            "ln1": "layers.0.input_layernorm.weight", "ln2": "layers.0.post_attention_layernorm.weight",
            "Wg": "layers.0.mlp.gate_proj.weight", "Wu": "layers.0.mlp.up_proj.weight", "Wd": "layers.0.mlp.down_proj.weight",
            "lnf": "norm.weight"}
PER_LAYER = {"W_down": "shadow_down.default.weight", "W_up": "shadow_up.default.weight",
             "T1": "shadow_update_transform.default.0.weight", "Tb1": "shadow_update_transform.default.0.bias",
             "T2": "shadow_update_transform.default.2.weight", "Tb2": "shadow_update_transform.default.2.bias",
             "G1": "shadow_update_gate.default.0.weight", "Gb1": "shadow_update_gate.default.0.bias",
             "G2": "shadow_update_gate.default.2.weight", "Gb2": "shadow_update_gate.default.2.bias"}


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (pefref tensor, peft tensor)


def _theirs(pm: Any, key: str, name: str) -> torch.Tensor:
    module, _site, *layer = key.split("__")
    if module.startswith("backbone"):
        return pm.base_model.shadow_backbone["default"].get_parameter(BACKBONE[name])
    return pm.base_model.model.model.layers[int(layer[0])].get_parameter(PER_LAYER[name])


def build(shape: str, dropout: float = 0.2, **hps: Any) -> Pair:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), peft.ShadowConfig(task_type="CAUSAL_LM", shadow_dropout=dropout, **hps))
    model = copy.deepcopy(base_model(shape))
    mine = {"r": hps["r"]} if "r" in hps else {}
    if "update_hidden_size" in hps:
        mine["r_update"] = hps["update_hidden_size"]
    adapter = apply(model, "shadow", dropout=dropout, **mine)
    torch.manual_seed(1)
    tensors = []
    with torch.no_grad():
        for key, unit in adapter.units.items():
            for name, p in unit.named_parameters():
                theirs = _theirs(pm, key, name)
                theirs.add_(0.3 * torch.randn_like(theirs))
                p.copy_(theirs)
                tensors.append((p, theirs))
    return Pair(pm, model, adapter, tensors)


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_counts_equal_peft(shape: str) -> None:
    p = build(shape)
    p.peft_model.eval()
    p.model.eval()
    batch = padded_batch(shape)
    with torch.no_grad():
        theirs = p.peft_model(**batch).logits
        mine = p.model(**batch).logits
        base = base_model(shape).eval()(**batch).logits
    assert max_diff(mine, theirs) <= TOL
    assert max_diff(mine, base) > 1e-3  # the perturbed adapter changes the output
    assert p.adapter.report is not None
    assert p.adapter.report.trainable == p.peft_model.get_nb_trainable_parameters()[0] == 12544


def test_other_ranks_equal_peft() -> None:
    p = build("tiny-llama", r=4, update_hidden_size=6)
    p.peft_model.eval()
    p.model.eval()
    batch = padded_batch("tiny-llama")
    with torch.no_grad():
        assert max_diff(p.model(**batch).logits, p.peft_model(**batch).logits) <= TOL
    assert p.adapter.report is not None and p.adapter.report.trainable == p.peft_model.get_nb_trainable_parameters()[0]


def test_identity_at_init() -> None:
    model = copy.deepcopy(base_model("tiny-llama")).eval()
    batch = padded_batch("tiny-llama")
    with torch.no_grad():
        before = model(**batch).logits
        apply(model, "shadow")
        assert torch.equal(model(**batch).logits, before)


def test_aux_loss_is_peft_shadow_loss_and_needs_labels() -> None:
    p = build("tiny-llama", dropout=0.0)
    batch = padded_batch("tiny-llama")
    labels = _labels(batch)
    out = p.peft_model(**batch, labels=labels)
    mine = p.model(**batch, labels=labels).loss
    aux = p.adapter.aux_loss()
    shadow_loss = p.peft_model.base_model.last_shadow_loss
    assert abs(aux.item() - 0.05 * shadow_loss.item()) <= TOL and aux.item() > 1e-3
    assert abs((mine + aux).item() - out.loss.item()) <= TOL
    p.model(**batch)  # a call without labels: the shadow loss has nothing to predict
    assert p.adapter.aux_loss().item() == 0.0
    with p.adapter.disable():
        p.model(**batch, labels=labels)  # the shadow path did not run
        assert p.adapter.aux_loss().item() == 0.0


def _steps(p: Pair, batch: dict[str, torch.Tensor], aux: bool, n: int = 4) -> None:
    labels = _labels(batch)
    opt = torch.optim.SGD([t for t, _ in p.tensors], lr=0.5)
    for _ in range(n):
        opt.zero_grad()
        loss = p.model(**batch, labels=labels).loss
        (loss + p.adapter.aux_loss() if aux else loss).backward()
        opt.step()


@pytest.mark.parametrize("shape", SHAPES)
def test_four_training_steps_equal_peft(shape: str) -> None:
    p = build(shape, dropout=0.0)
    p.peft_model.train()
    p.model.train()
    batch = padded_batch(shape)
    start = [t.detach().clone() for t, _ in p.tensors]
    opt = torch.optim.SGD([theirs for _, theirs in p.tensors], lr=0.5)
    for _ in range(4):
        opt.zero_grad()
        p.peft_model(**batch, labels=_labels(batch)).loss.backward()
        opt.step()
    _steps(p, batch, aux=True)
    assert max(max_diff(mine, theirs) for mine, theirs in p.tensors) <= TOL
    assert max(max_diff(mine, s) for (mine, _), s in zip(p.tensors, start)) > 1e-3  # they trained
    q = build(shape, dropout=0.0)
    q.model.train()
    with pytest.warns(UserWarning, match="does not run"):  # the loop leaves out the declared auxiliary loss
        _steps(q, batch, aux=False)  # and the backbone ends elsewhere
    assert max(max_diff(a, b) for (a, _), (b, _) in zip(q.tensors, p.tensors)) > 1e-4


@pytest.mark.parametrize("shape", ["tiny-gpt2", "tiny-bert"])
def test_runs_on_other_families(shape: str) -> None:
    """Validate means it runs: the Llama-style shadow block runs on GPT-2 and BERT too (peft mirrors their own blocks
    there). BERT's base model has no LM head (its head site is the pooler): the shadow loss reads nothing and adds nothing."""
    model = build_model(shape, seed=0).eval()
    a = apply(model, "shadow")
    batch = padded_batch(shape)
    with torch.no_grad():
        out = model(**batch)
        aux = a.aux_loss()
    first = out.logits if shape == "tiny-gpt2" else out.last_hidden_state
    assert torch.isfinite(first).all() and a.report is not None and a.report.trainable > 0
    assert aux.item() == 0.0
    if shape == "tiny-gpt2":
        model(**batch, labels=batch["input_ids"])
        assert a.aux_loss().item() > 0.1  # GPT-2's LM head gives the shadow path a prediction


def test_labels_are_read_by_aux_losses_only(tmp_path: Any) -> None:
    from pefref.language.catalog import default_catalog

    assert next(m for m in default_catalog().technique("shadow").modules if m.name == "inject").side == "input"  # type: ignore[union-attr]
    bad = tmp_path / "bad.yaml"
    bad.write_text("""id: bad
name: Bad
paper: {title: t, authors: x, year: 2020, arxiv: "2000.00000"}
modules:
  - name: m
    sites: [layer]
    form: sequential
    inputs:
      y: {call: labels}
    params:
      W: {shape: [d, d], init: zeros()}
    compute: linear(h, W)
""", encoding="utf-8")
    with pytest.raises(PefrefError, match="labels are read after the forward pass"):
        apply(copy.deepcopy(base_model("tiny-llama")), str(bad))


def test_new_ops_match_transformers_and_torch() -> None:
    """rms_norm, rotary and cross_entropy against Llama's own modules and torch."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from pefref.ops import PRIMITIVES

    torch.manual_seed(0)
    x, g = torch.randn(2, 5, 16), torch.randn(16)
    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(g)
        assert max_diff(PRIMITIVES["rms_norm"].fn(x, g, eps=1e-6), norm(x)) <= 1e-6
    cfg = base_model("tiny-llama").config
    q, k = torch.randn(2, 5, 4 * 8), torch.randn(2, 5, 2 * 8)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, torch.arange(5)[None].expand(2, 5))
    hq, hk = apply_rotary_pos_emb(q.view(2, 5, 4, 8).transpose(1, 2), k.view(2, 5, 2, 8).transpose(1, 2), cos, sin)
    rot = PRIMITIVES["rotary"].fn
    assert max_diff(rot(q, 8), hq.transpose(1, 2).reshape(2, 5, 32)) <= 1e-6
    assert max_diff(rot(k, 8), hk.transpose(1, 2).reshape(2, 5, 16)) <= 1e-6
    assert max_diff(rot(q, 8), q) > 1e-2  # positions after the first are rotated
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert max_diff(PRIMITIVES["cross_entropy"].fn(logits, labels, shift=1), want) <= 1e-6


def test_peft_format_reads_the_norm_epsilon_and_rotary_base_off_the_model(tmp_path: Any) -> None:
    """peft's mirror backbone takes its norm epsilon and rotary base from the host's config: an import sets the
    technique's norm_eps and rope_theta from the model, and an export with other values is refused."""
    import pefref

    cfg = base_model("tiny-llama").config.to_dict()
    cfg.update(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cfg["rope_theta"] = 500.0  # transformers 4.x reads this key, 5.x the rope_parameters
    model = type(base_model("tiny-llama"))(type(base_model("tiny-llama")).config_class(**cfg)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.ShadowConfig(task_type="CAUSAL_LM")).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "shadow" in n:
                t.add_(0.3 * torch.randn_like(t))
    pm.save_pretrained(tmp_path / "p")
    mine = copy.deepcopy(model)
    a = pefref.from_pretrained(mine, tmp_path / "p")
    assert a.hyperparameters["norm_eps"] == 1e-5 and a.hyperparameters["rope_theta"] == 500.0
    batch = padded_batch("tiny-llama")
    with torch.no_grad():
        assert max_diff(mine(**batch).logits, pm(**batch).logits) <= TOL
    other = apply(copy.deepcopy(model), "shadow")  # the defaults, Llama's usual 1e-6 and 10000
    with pytest.raises(PefrefError, match="the model's config says"):
        other.save_pretrained(tmp_path / "o")
