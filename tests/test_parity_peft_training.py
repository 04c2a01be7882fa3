"""Numerical parity with HF peft 0.21 for techniques whose training-time behaviour is part of the method (OSF, CPT)
or that train a part of a host tensor (trainable tokens: chosen rows of the token embedding).

One seeded tiny model is deep-copied into a peft model and a pefref model; what
peft trains is perturbed and copied into pefref's units, and both run the same
batch in fp32. Checked: outputs within 1e-5 (and different from the base
model's), equal trainable counts, and the trained tensors after several SGD
steps of the same loop within 1e-5, where peft runs its own training-time
behaviour (OSF: gradient hooks; CPT: a gradient mask and the prompt's projection into its eps-ball) and pefref the technique's ``training:`` hooks
(``adapter.before_optimizer_step`` / ``after_optimizer_step``). Each check is
shown not vacuous: the same pefref loop without the hooks ends elsewhere.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

from pefref.language.catalog import default_catalog
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply

from .conftest import output_of
from .parity import max_diff, padded_batch

TOL = 1e-5
CATALOG = default_catalog()
SHAPES = ["tiny-llama", "tiny-bert"]
LINEAR = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
          "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}


EMBED = {"llama": "embed_tokens", "bert": "word_embeddings"}


def family_of(shape: str) -> str:
    return CATALOG.shape(shape).family


def task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


@dataclass(frozen=True)
class Case:
    """A technique with its hyperparameters, peft's config per family, and its trained tensors: pefref name -> peft
    name under the host module (or a callable giving peft's tensor for a pefref unit key)."""

    technique: str
    hps: dict[str, Any]
    config: Callable[[str], Any]
    tensors: dict[str, str]  # a name starting with '/' is peft's full parameter name (a prompt encoder's)
    shapes: tuple[str, ...] = ("tiny-llama", "tiny-bert")


CASES: dict[str, Case] = {
    "osf": Case("osf", {"frac": 0.125}, lambda fam: peft.OSFConfig(task_type=task(fam), target_modules=LINEAR[fam], effective_rank=0.125),
                {"U": "osf_svd_params.default.U_low", "S": "osf_svd_params.default.S_low", "V": "osf_svd_params.default.V_low"}),
    # BERT's base model has no output head: peft patches the embedding alone there too (a tied head is refused by interop)
    "trainable_tokens": Case("trainable_tokens", {"rows": [3, 47, 111]}, lambda fam: peft.TrainableTokensConfig(
        task_type=task(fam), token_indices=[3, 47, 111], target_modules=[EMBED[fam]]), {"R": "trainable_tokens_delta.default"}),
}
CPT = {"ids": [28, 58, 70, 32], "types": [1, 2, 3, 4], "eps": 0.5, "format_eps": 0.3}
CASES["cpt"] = Case("cpt", CPT, lambda fam: peft.CPTConfig(
    task_type="CAUSAL_LM", cpt_token_ids=CPT["ids"], cpt_tokens_type_mask=CPT["types"], opt_projection_epsilon=CPT["eps"],
    opt_projection_format_epsilon=CPT["format_eps"]), {"D": "/prompt_encoder.default.delta_embedding.weight"}, ("tiny-llama",))
HOOKED = [n for n in CASES if CATALOG.technique(CASES[n].technique).training]


@functools.cache
def base_model(shape: str) -> nn.Module:
    return build_model(shape, seed=0)


@dataclass
class Pair:
    peft_model: Any
    model: nn.Module
    adapter: Adapter
    tensors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]  # (unit key, name) -> (pefref tensor, peft tensor)


def _host(pm: Any, unit_key: str, family: str) -> nn.Module:
    """The peft layer at the host of a pefref unit ('<module>__<site>__<layer>', or '<module>__<site>' once per model)."""
    _module, site_key, *layer = unit_key.split("__")
    site = next(s for s in CATALOG.reference.sites if s.replace(".", "_") == site_key)
    path = CATALOG.family(family).sites[site].path
    return pm.get_base_model().get_submodule(path.format(i=int(layer[0])) if layer else path)


def build(shape: str, name: str, perturb: bool = True) -> Pair:
    """peft and pefref models of one case; peft's trained tensors perturbed (seeded) and copied into pefref's."""
    case, family = CASES[name], family_of(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model(shape)), case.config(family)).eval()
    model = copy.deepcopy(base_model(shape))
    adapter = apply(model, case.technique, **case.hps)
    tensors = {(key, n): (getattr(unit, n), pm.get_parameter(pn[1:]) if pn.startswith("/") else _host(pm, key, family).get_parameter(pn))
               for key, unit in adapter.units.items() for n, pn in case.tensors.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for _mine, theirs in tensors.values():
            if perturb:
                theirs.add_(0.3 * torch.randn_like(theirs))
        output_of(pm, _batch(shape))  # peft's CPT projects its prompt change when it computes the prompt
        for mine, theirs in tensors.values():
            mine.copy_(theirs)
    return Pair(pm, model, adapter, tensors)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batch(shape: str) -> dict[str, torch.Tensor]:
    return padded_batch(shape)


def _loss(model: nn.Module, shape: str) -> torch.Tensor:
    """A fixed loss of the output: its mean against seeded random weights (a normalised output's squares sum to a constant)."""
    out = output_of(model, _batch(shape))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * w).mean() + 0.1 * (out * w).pow(2).mean()


def train_both(pair: Pair, shape: str, steps: int = 4, lr: float = 0.5, hooks: bool = True) -> float:
    """Both models trained ``steps`` SGD steps of one loop on a fixed loss (peft runs its own training-time behaviour,
    pefref its hooks unless ``hooks`` is False); the largest difference of the trained tensors afterwards."""
    pm, model, ad = pair.peft_model.eval(), pair.model.eval(), pair.adapter  # no dropout: both see one function
    p_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=lr)
    for step in range(steps):
        _loss(pm, shape).backward()
        p_opt.step()
        p_opt.zero_grad()
        (_loss(model, shape) + (ad.aux_loss() if hooks else 0.0)).backward()
        if hooks:
            ad.before_optimizer_step(step)
        opt.step()
        if hooks:
            ad.after_optimizer_step(step)
        opt.zero_grad()
    with torch.no_grad():
        output_of(pm, _batch(shape))  # what peft holds between steps (CPT: projected when the prompt is computed)
    return max(max_diff(a.detach(), b.detach()) for a, b in pair.tensors.values())


PAIRS = [(s, n) for n in CASES for s in CASES[n].shapes]


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_outputs_and_trainable_counts_match_peft(shape: str, name: str) -> None:
    pair = build(shape, name)
    with torch.no_grad():
        want, got, base = (output_of(m, _batch(shape)) for m in (pair.peft_model, pair.model, base_model(shape)))
    assert max_diff(got, want) <= TOL
    assert max_diff(want[:, -base.shape[1]:], base) > 1e-3  # the adapter changes the output (at the input's positions)
    assert pair.adapter.report is not None
    assert pair.adapter.report.trainable == n_trainable(pair.model) == n_trainable(pair.peft_model)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_initialisation_matches_peft(shape: str, name: str) -> None:
    """Unperturbed, pefref's initial tensors are peft's (OSF: the same SVD of each weight; CPT: D at zero)."""
    pair = build(shape, name, perturb=False)
    for (key, n), (mine, theirs) in pair.tensors.items():
        assert max_diff(mine.detach(), theirs.detach()) <= TOL, (key, n)


@pytest.mark.parametrize(("shape", "name"), PAIRS)
def test_training_steps_match_peft(shape: str, name: str) -> None:
    assert train_both(build(shape, name), shape) <= TOL


@pytest.mark.parametrize("name", HOOKED)
def test_training_without_the_hooks_departs_from_peft(name: str) -> None:
    """Not vacuous: the same steps without the technique's training hooks end elsewhere."""
    assert train_both(build(SHAPES[0], name), SHAPES[0], hooks=False) > 1e-4


def test_osf_gradients_stay_orthogonal_to_the_frozen_subspace() -> None:
    pair = build(SHAPES[0], "osf")
    _loss(pair.model, SHAPES[0]).backward()
    units = list(pair.adapter.units.values())
    assert all(u.U.grad is not None and float((u.Uh.T @ u.U.grad).abs().max()) > 1e-6 for u in units)  # not vacuous
    pair.adapter.before_optimizer_step(0)
    assert all(float((u.Uh.T @ u.U.grad).abs().max()) < 1e-6 and float((u.V.grad @ u.Vh.T).abs().max()) < 1e-6 for u in units)


def test_trainable_tokens_train_only_their_rows() -> None:
    """After training, the model's embedding equals the base's except at the chosen rows, which hold the trained copy."""
    pair = build(SHAPES[0], "trainable_tokens")
    train_both(pair, SHAPES[0])
    unit = next(iter(pair.adapter.units.values()))
    base_w = base_model(SHAPES[0]).get_input_embeddings().weight
    assert torch.equal(pair.model.get_input_embeddings().weight, base_w)  # the host's own table is untouched
    rows = [3, 47, 111]
    with torch.no_grad():
        merged = pair.model.get_input_embeddings()(torch.arange(base_w.shape[0]))  # the table the adapted embedding runs with
    keep = torch.ones(merged.shape[0], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(merged[keep], base_w[keep]) and torch.equal(merged[rows], unit.R.detach())
    assert max_diff(merged[rows], base_w[rows]) > 1e-2


# --- the language pieces trainable tokens needs: an `ints` hyperparameter, count() and index_copy() ------------


def test_ints_hyperparameters_convert_and_bound_every_entry() -> None:
    from pefref.language.errors import PefrefError
    from pefref.language.hparams import resolve_hyperparameters

    decl = CATALOG.technique("trainable_tokens").hyperparameters
    assert resolve_hyperparameters(decl)["rows"] == (28, 58, 70)
    assert resolve_hyperparameters(decl, {"rows": [3, 9]})["rows"] == (3, 9)
    assert resolve_hyperparameters(decl, {"rows": "[4, 7, 11]"})["rows"] == (4, 7, 11)  # --set rows=4,7,11
    for bad, said in (([3, -1], "below its minimum 0"), ([], "non-empty list"), ([1.5], "list of integers"), ("a,b", "list of integers"),
                      (3, "list of integers"), ([True], "list of integers")):
        with pytest.raises(PefrefError, match=said):
            resolve_hyperparameters(decl, {"rows": bad})


@pytest.mark.parametrize(("rows", "message"), [([3, 3], "distinct positions"), ([3, 100000], "run past dimension 0")])
def test_bad_rows_are_refused_before_anything_changes(rows: list[int], message: str) -> None:
    from pefref.language.errors import PefrefError

    model = copy.deepcopy(base_model(SHAPES[0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PefrefError, match=message):
        apply(model, "trainable_tokens", rows=rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainable_tokens_parameters_are_count_of_rows_times_d() -> None:
    from pefref.view.params import count_params

    tech = CATALOG.technique("trainable_tokens")
    assert count_params(tech, CATALOG.shape(SHAPES[0]), CATALOG).trainable == 3 * base_model(SHAPES[0]).config.hidden_size


def test_cpt_keeps_its_frozen_examples_and_its_ball() -> None:
    """CPT after training: E is peft's frozen example embeddings, D = 0 on the label token (its gradient masked) and
    every row of D within its radius (the ball was reached: lr pushes D beyond it)."""
    pair = build("tiny-llama", "cpt")
    train_both(pair, "tiny-llama", lr=5.0)
    unit = next(iter(pair.adapter.units.values()))
    enc = pair.peft_model.prompt_encoder["default"]
    assert torch.equal(unit.E, enc.embedding.weight)
    norms = unit.D.detach().norm(dim=1)
    assert float(norms[3]) <= 1e-9 and bool((norms <= unit.R.flatten() * (1 + 1e-5)).all())
    assert float(norms[1]) == pytest.approx(float(unit.R[1]), rel=1e-4)


# --- CPT's loss: prompt labels, the input's type mask, the decay weighting -------------------------------------------

CPT_LOSS = {"ids": [28, 58, 70, 32, 11, 45, 61, 90], "types": [1, 2, 3, 4, 5, 6, 7, 8], "eps": 0.5, "format_eps": 0.3, "decay": 0.5}


def _cpt_loss_pair(decay: float) -> tuple[Any, nn.Module, Adapter]:
    hps = {**CPT_LOSS, "decay": decay}
    config = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=hps["ids"], cpt_tokens_type_mask=hps["types"],
                            opt_projection_epsilon=hps["eps"], opt_projection_format_epsilon=hps["format_eps"],
                            opt_weighted_loss_type="decay" if decay != 1.0 else "none", opt_loss_decay_factor=decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base_model("tiny-llama")), config).eval()
    model = copy.deepcopy(base_model("tiny-llama")).eval()
    adapter = apply(model, "cpt", **hps)
    unit = next(iter(adapter.units.values()))
    enc = pm.prompt_encoder["default"]
    torch.manual_seed(1)
    with torch.no_grad():
        enc.delta_embedding.weight.add_(0.3 * torch.randn_like(enc.delta_embedding.weight))
        enc.delta_embedding.weight.copy_(enc.get_projection())
        unit.D.copy_(enc.delta_embedding.weight)
    return pm, model, adapter


def _cpt_inputs() -> dict[str, torch.Tensor]:
    """Two rows: an input example (types 1, 2, 3 and its label 4) then a query whose label tokens are typed 8; the
    first row left-padded (type 0, label -100)."""
    b = padded_batch("tiny-llama")
    ids = b["input_ids"]
    types = torch.tensor([[0, 0, 1, 2, 3, 4, 4], [1, 2, 3, 4, 5, 7, 8]])
    labels = ids.masked_fill(b["attention_mask"] == 0, -100)
    return {**b, "input_type_mask": types, "labels": labels}


def _cpt_loss(model: nn.Module) -> torch.Tensor:
    inputs = _cpt_inputs()
    return model(**{**inputs, "input_type_mask": inputs["input_type_mask"].clone()}).loss  # peft shifts the mask in place


@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_cpt_loss_matches_peft(decay: float) -> None:
    """outputs.loss of peft's CPT (prompt labels, the shifted type mask, the decay weighting) equals pefref's, and so do
    the trained prompt changes after 4 SGD steps of that loss with the training hooks."""
    pm, model, ad = _cpt_loss_pair(decay)
    want, got = _cpt_loss(pm), _cpt_loss(model)
    assert abs(float(want.detach()) - float(got.detach())) <= TOL
    unit = next(iter(ad.units.values()))
    start = unit.D.detach().clone()
    p_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=0.5)
    for step in range(4):
        _cpt_loss(pm).backward()
        p_opt.step()
        p_opt.zero_grad()
        _cpt_loss(model).backward()
        ad.before_optimizer_step(step)
        opt.step()
        ad.after_optimizer_step(step)
        opt.zero_grad()
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        theirs = enc.get_projection()
    assert max_diff(unit.D.detach(), theirs) <= TOL
    assert max_diff(unit.D.detach(), start) > 1e-3  # the loss trained the prompt


def test_cpt_loss_weighting_changes_the_loss() -> None:
    """The decay weighting is not vacuous: it gives another loss than the plain (decay 1) one, which is not the
    model's own loss of the input's labels either (the prompt's labels and the type mask count)."""
    _pm, model, _ad = _cpt_loss_pair(0.5)
    _pm1, plain, ad1 = _cpt_loss_pair(1.0)
    weighted, unweighted = float(_cpt_loss(model)), float(_cpt_loss(plain))
    assert abs(weighted - unweighted) > 1e-3
    with ad1.disable():
        own = float(plain(**{k: v for k, v in _cpt_inputs().items() if k != "input_type_mask"}).loss)
    assert abs(own - unweighted) > 1e-3
