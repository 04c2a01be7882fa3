"""Numerical parity with HF peft for OFT, BOFT, HRA, LN tuning and P-tuning (MLP and LSTM encoders),
and BitFit against plain torch (peft has no BitFit).

For each case one seeded tiny model (``build_model``) is deep-copied into a peft
model and a pefref model with the same hyperparameters; peft's trainable
tensors are perturbed (so nothing passes because an adapter is still at its
identity initialisation), copied into pefref's units (or selected host
parameters), and both run the same left-padded batch in fp32, eval mode.
Outputs agree within 1e-5 and the trainable counts are equal.

Conventions that map peft's tensors to pefref's, each checked here:

* OFT: pefref writes ``W' = W · diag(cayley(Q_i))`` with the paper's
  :math:`(I+Q)(I-Q)^{-1}`. peft's exact path computes
  :math:`W\\,\\mathrm{diag}((I-Q)(I+Q)^{-1})^\\top`, the same matrix, so its
  vectors copy unchanged. peft's Cayley–Neumann path approximates the
  transpose, :math:`W\\,\\mathrm{diag}(N(Q))^\\top = W\\,\\mathrm{diag}(N(-Q))`, so
  there its vectors are copied with their sign flipped.
* BOFT: peft builds the butterfly with a CUDA kernel (``fbd_cuda``); without it
  (CPU) peft silently forces one butterfly factor. The m = 1 case runs peft's
  CPU path; the m = 2 case stands a pure-torch block-diagonal in for the kernel,
  so peft's own butterfly permutations and products run on CPU.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
import transformers  # noqa: F401
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-qwen2", "tiny-bert"]
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")  # peft LN tuning on norms
N_VIRTUAL, HIDDEN = 5, 12
OFT_R, BOFT_B, HRA_R = 4, 8, 4

_BERT_ATTN = r".*\.(query|key|value)$|.*attention\.output\.dense$"
ATTN = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": _BERT_ATTN}
QV = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "bert": ["query", "value"]}
NORMS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bert": r".*encoder\.layer\.\d+\.(attention\.output|output)\.LayerNorm$",
}


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


@dataclass(frozen=True)
class Case:
    """One parity case: the pefref technique and hyperparameters, peft's config, and how tensors copy."""

    technique: str
    hps: dict[str, Any]
    config: Callable[[str], Any]
    copy: Callable[[nn.Module, Any, Adapter, str], None]
    kernel: str = "none"  # BOFT: 'cpu' (no fbd_cuda) or 'torch' (a torch stand-in for the kernel)


# --- copying peft's tensors into pefref's units -------------------------------------------------------


def _host_path(unit_key: str, family: str) -> str:
    """The module path of a pefref unit's host ('<module>__<site>__<layer>')."""
    _module, site_key, layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    return CATALOG.family(family).sites[site].path.format(i=int(layer))


def _host(pm: Any, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit."""
    return pm.get_base_model().get_submodule(_host_path(unit_key, family))


def _units(copy_one: Callable[[nn.Module, nn.Module], None]) -> Callable[[nn.Module, Any, Adapter, str], None]:
    def run(_model: nn.Module, pm: Any, adapter: Adapter, family: str) -> None:
        for key, unit in adapter.units.items():
            copy_one(unit, _host(pm, key, family))
    return run


def _copy_oft(sign: float) -> Callable[[nn.Module, nn.Module], None]:
    def one(unit: nn.Module, layer: nn.Module) -> None:
        unit.v.copy_(sign * layer.oft_R["default"].weight)
    return one


def _copy_boft(unit: nn.Module, layer: nn.Module) -> None:
    unit.R.copy_(layer.boft_R["default"])
    unit.s.copy_(layer.boft_s["default"])


def _copy_hra(unit: nn.Module, layer: nn.Module) -> None:
    unit.U.copy_(layer.hra_u["default"])


def _copy_norms(model: nn.Module, pm: Any, adapter: Adapter, family: str) -> None:
    """peft trains a copy of each norm: its tensors go into the selected host parameters."""
    assert adapter.selected
    for name, p in adapter.selected.items():
        path, tname = name.rsplit(".", 1)
        p.copy_(getattr(pm.get_base_model().get_submodule(path).ln_tuning_layers["default"], tname))


def _copy_prompt_mlp(model: nn.Module, pm: Any, adapter: Adapter, family: str) -> None:
    (unit,) = adapter.units.values()
    enc = pm.prompt_encoder["default"]
    unit.E.copy_(enc.embedding.weight)
    for i, j in ((1, 0), (2, 2), (3, 4)):
        getattr(unit, f"W{i}").copy_(enc.mlp_head[j].weight)
        getattr(unit, f"b{i}").copy_(enc.mlp_head[j].bias)


def _copy_prompt_lstm(model: nn.Module, pm: Any, adapter: Adapter, family: str) -> None:
    """torch.nn.LSTM's weight_ih_l{k}{_reverse} etc. are the pieces [k, direction] of pefref's split tensors
    (attributes Wih_{direction}, Wih_rest_{k-1}_{direction}, Whh_{k}_{direction}, ...), the same shapes."""
    (unit,) = adapter.units.values()
    enc = pm.prompt_encoder["default"]
    lstm = enc.lstm_head
    unit.E.copy_(enc.embedding.weight)
    for k in range(lstm.num_layers):
        for j, sfx in enumerate(("", "_reverse")):
            pieces = {"Wih_rest": (f"weight_ih_l{k}{sfx}", (k - 1, j))} if k else {"Wih": (f"weight_ih_l0{sfx}", (j,))}
            pieces.update({t: (f"{peft_name}_l{k}{sfx}", (k, j)) for t, peft_name in (("Whh", "weight_hh"), ("bih", "bias_ih"), ("bhh", "bias_hh"))})
            for t, (peft_name, idx) in pieces.items():
                mine, theirs = getattr(unit, "_".join((t, *map(str, idx)))), getattr(lstm, peft_name)
                assert mine.shape == theirs.shape, (t, idx)
                mine.copy_(theirs)
    for i, j in ((1, 0), (2, 2)):
        getattr(unit, f"W{i}").copy_(enc.mlp_head[j].weight)
        getattr(unit, f"b{i}").copy_(enc.mlp_head[j].bias)


def _prompt_config(kind: str) -> Callable[[str], Any]:
    return lambda fam: peft.PromptEncoderConfig(
        task_type=task(fam), num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=HIDDEN,
        encoder_reparameterization_type=kind, encoder_num_layers=2, encoder_dropout=0.0)


def _oft_config(neumann: bool) -> Callable[[str], Any]:
    return lambda fam: peft.OFTConfig(
        task_type=task(fam), target_modules=ATTN[fam], r=OFT_R, oft_block_size=0, coft=False, block_share=False,
        module_dropout=0.0, use_cayley_neumann=neumann, num_cayley_neumann_terms=5)


def _boft_config(m: int) -> Callable[[str], Any]:
    return lambda fam: peft.BOFTConfig(
        task_type=task(fam), target_modules=ATTN[fam], boft_block_size=BOFT_B, boft_block_num=0,
        boft_n_butterfly_factor=m, boft_dropout=0.0)


CASES: dict[str, Case] = {
    "oft": Case("oft", {"r": OFT_R, "neumann": 0}, _oft_config(False), _units(_copy_oft(1.0))),
    "oft_neumann": Case("oft", {"r": OFT_R, "neumann": 5}, _oft_config(True), _units(_copy_oft(-1.0))),
    "boft_m1": Case("boft", {"b": BOFT_B, "m": 1}, _boft_config(1), _units(_copy_boft), kernel="cpu"),
    "boft_m2": Case("boft", {"b": BOFT_B, "m": 2}, _boft_config(2), _units(_copy_boft), kernel="torch"),
    "hra": Case("hra", {"r": HRA_R}, lambda fam: peft.HRAConfig(task_type=task(fam), target_modules=QV[fam], r=HRA_R, apply_GS=False),
                _units(_copy_hra)),
    "ln_tuning": Case("ln_tuning", {}, lambda fam: peft.LNTuningConfig(task_type=task(fam), target_modules=NORMS[fam]), _copy_norms),
    "p_tuning": Case("p_tuning", {"n": N_VIRTUAL, "hidden": HIDDEN}, _prompt_config("MLP"), _copy_prompt_mlp),
    "p_tuning_lstm": Case("p_tuning_lstm", {"n": N_VIRTUAL, "hidden": HIDDEN, "lstm_layers": 2}, _prompt_config("LSTM"), _copy_prompt_lstm),
}
SITES_WITHOUT_FINAL_NORM = ("attn.norm", "ffn.norm")  # post-norm BERT has no final norm


# --- BOFT's kernel ---------------------------------------------------------------------------------------


class _TorchBlockDiag:
    """Pure-torch stand-in for peft's ``fbd_cuda`` extension: [N, D, H, H] blocks → [N, D·H, D·H]."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x])]

    @staticmethod
    def backward(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        _n, d, h, _ = x.shape
        return [torch.stack([torch.stack([g[i * h:(i + 1) * h, i * h:(i + 1) * h] for i in range(d)]) for g in grad])]


@pytest.fixture
def boft_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def use(kind: str) -> None:
        if kind == "cpu":  # what peft does when the extension cannot be built (skips its 5 s build attempt)
            monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
        elif kind == "torch":
            monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _TorchBlockDiag)
    return use


# --- building the pair ----------------------------------------------------------------------------------


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    base: nn.Module
    peft_model: Any
    model: nn.Module
    adapter: Adapter


def build(shape: str, name: str) -> Pair:
    case, family = CASES[name], family_of(shape)
    base = base_model(shape)
    pm = peft.get_peft_model(copy.deepcopy(base), case.config(family)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():  # rotations start at the identity, scales at 1: perturb everything trained
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model = copy.deepcopy(base)
    sites = list(SITES_WITHOUT_FINAL_NORM) if case.technique == "ln_tuning" and family == "bert" else None
    adapter = apply(model, case.technique, sites=sites, **case.hps)
    with torch.no_grad():
        case.copy(model, pm, adapter, family)
    return Pair(base, pm, model, adapter)


def output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, inputs)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- tests: peft parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str, boft_kernel: Callable[[str], None]) -> None:
    boft_kernel(CASES[name].kernel)
    pair = build(shape, name)
    inputs = padded_batch(shape)
    want = output(pair.peft_model, inputs)
    got = output(pair.model, inputs)
    assert max_diff(got, want) <= TOL
    # not vacuous: the adapter changes the outputs at the real positions (prompts come first)
    base = output(pair.base, inputs)
    assert max_diff(want[:, -base.shape[1]:], base) > 1e-3
    n_peft = n_trainable(pair.peft_model)
    assert pair.adapter.report.trainable == n_peft
    assert n_trainable(pair.model) == n_peft


@pytest.mark.parametrize("name", ["oft", "boft_m2", "hra"])
@pytest.mark.parametrize("shape", SHAPES)
def test_merged_weights_match_peft(shape: str, name: str, boft_kernel: Callable[[str], None]) -> None:
    boft_kernel(CASES[name].kernel)
    pair = build(shape, name)
    inputs = padded_batch(shape)
    unmerged = output(pair.model, inputs)
    family = family_of(shape)
    paths = sorted({_host_path(key, family) for key in pair.adapter.units})
    merged = pair.peft_model.merge_and_unload()
    pair.adapter.merge()
    for path in paths:
        assert max_diff(pair.model.get_submodule(path).weight, merged.get_submodule(path).weight) <= TOL, path
    got = output(pair.model, inputs)
    assert max_diff(got, output(merged, inputs)) <= TOL
    assert max_diff(got, unmerged) <= TOL


def test_oft_neumann_sign_convention_is_needed() -> None:
    """peft's Neumann path really is the transpose of its exact path: copying without the sign flip differs."""
    pair = build("tiny-llama", "oft_neumann")
    with torch.no_grad():
        for unit in pair.adapter.units.values():
            unit.v.neg_()
    inputs = padded_batch("tiny-llama")
    assert max_diff(output(pair.model, inputs), output(pair.peft_model, inputs)) > 1e-3


def test_boft_torch_kernel_runs_the_butterfly(boft_kernel: Callable[[str], None]) -> None:
    """With the stand-in kernel peft keeps two butterfly factors (on CPU it would silently drop to one)."""
    boft_kernel("torch")
    pair = build("tiny-llama", "boft_m2")
    layer = pair.peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert tuple(layer.boft_R["default"].shape) == (2, 32 // BOFT_B, BOFT_B, BOFT_B)
    assert not torch.equal(layer.boft_P[1], torch.eye(32))  # a real butterfly permutation


# --- tests: BitFit against plain torch ------------------------------------------------------------------------

# hand-written: the modules whose biases BitFit trains (attention and FFN projections, layer norms), per layer
BITFIT_MODULES = {
    "tiny-bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense", "attention.output.LayerNorm", "output.LayerNorm"],
    "tiny-qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],  # Qwen2's only biases
    "tiny-gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_1", "ln_2"],
}
LAYERS = {"tiny-bert": "encoder.layer", "tiny-qwen2": "model.layers", "tiny-gpt2": "transformer.h"}


def bitfit_biases(model: nn.Module, shape: str) -> dict[str, nn.Parameter]:
    layers = model.get_submodule(LAYERS[shape])
    return {f"{LAYERS[shape]}.{i}.{m}.bias": layer.get_submodule(m).bias
            for i, layer in enumerate(layers) for m in BITFIT_MODULES[shape]}


def sgd_step(model: nn.Module, params: list[nn.Parameter], inputs: dict[str, torch.Tensor]) -> None:
    model.train()
    opt = torch.optim.SGD(params, lr=0.5)
    torch.manual_seed(7)  # the same dropout masks on both sides
    out = model(**inputs)
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    opt.zero_grad()
    (out * target).sum().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("shape", list(BITFIT_MODULES))
def test_bitfit_trains_exactly_the_biases(shape: str) -> None:
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, "bitfit")
    want = bitfit_biases(model, shape)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(want)
    assert adapter.report.trainable == sum(p.numel() for p in want.values()) == n_trainable(model)

    # a plain-torch BitFit on another copy: freeze everything, unfreeze those biases, same SGD step
    ref = copy.deepcopy(base_model(shape))
    ref.requires_grad_(False)
    ref_biases = bitfit_biases(ref, shape)
    for p in ref_biases.values():
        p.requires_grad_(True)
    inputs = padded_batch(shape)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd_step(model, [p for p in model.parameters() if p.requires_grad], inputs)
    sgd_step(ref, list(ref_biases.values()), inputs)

    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= set(want)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert max_diff(p.detach(), ref_params[n].detach()) <= 1e-6, n
    assert max_diff(output(model, inputs), output(ref, inputs)) <= TOL
    assert max_diff(output(model, inputs), output(base_model(shape), inputs)) > 1e-3


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral"])
def test_bitfit_refuses_bias_free_families(shape: str) -> None:
    model = copy.deepcopy(base_model(shape))
    with pytest.raises(PefrefError, match="nothing to train"):
        apply(model, "bitfit")
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad flags restored
    assert not hasattr(model, "pefref_adapters")
