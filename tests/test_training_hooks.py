"""Training-time behaviour (``training:`` hooks): schema and located errors, the adapter's methods against plain
torch, AdaLoRA's orthogonality regulariser against peft after several optimiser steps, ``pefref run`` and the
``transformers.Trainer`` callback."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from pydantic import ValidationError

from pefref.language.catalog import default_catalog, load_techniques
from pefref.language.schema import Technique
from pefref.models.build import build_model
from pefref.runtime.api import Adapter, apply
from pefref.view.typology import derive_typology

from .test_parity_lora_family import CASES as PARITY_CASES
from .test_parity_lora_family import build as parity_pair

HEADER = 'id: hooked\nname: Hooked\npaper: {title: t, authors: a, year: 2024, arxiv: "2401.00001"}\n'
BODY = """hyperparameters:
  r: {type: int, default: 4, min: 1}
  eps: {type: float, default: 0.02, min: 0}
  lam: {type: float, default: 0.1, min: 0}
modules:
  - name: lora
    sites: [attn.q, attn.v]
    form: parallel
    params:
      A: {shape: [r, d_in], init: normal(std=0.02)}
      B: {shape: [d_out, r], init: zeros()}
      M: {shape: [1, r], init: ones(), trainable: false}
      U: {shape: [2, d_in], init: orthogonal(), trainable: false}
    compute: linear(linear(x, A), B * M)
"""
HOOKS = """training:
  - {kind: schedule, name: keep, value: "max(0.5, 1 - 0.1 * step)", tensor: lora.M}
  - {kind: grad_projection, tensor: lora.A, value: "grad - matmul(matmul(grad, t(U)), U)"}
  - {kind: after_step, tensor: lora.B, value: "initial + clamp(B - initial, min=-eps, max=eps)"}
  - {kind: aux_loss, module: lora, value: "sum(sum(B ** 2, -1), -1)", weight: lam * keep}
"""


def _write(tmp_path: Path, hooks: str = HOOKS) -> Path:
    p = tmp_path / "hooked.yaml"
    p.write_text(HEADER + BODY + hooks)
    return p


def _problems(path: Path) -> list[Any]:
    cat = default_catalog()
    return load_techniques([path], cat.reference, cat.techniques)[3]


# --- schema and validation ----------------------------------------------------------------------------


def test_hooks_validate_and_derive_into_the_typology(tmp_path: Path) -> None:
    p = _write(tmp_path)
    assert _problems(p) == []
    cat = default_catalog()
    t = load_techniques([p], cat.reference, cat.techniques)[0]["hooked"]
    row = derive_typology(t, cat.reference, cat.techniques)
    assert row.values["training_time"] == "schedule + gradient projection + after-step projection + auxiliary loss"
    assert derive_typology(cat.technique("lora"), cat.reference, cat.techniques).values["training_time"] == "none"
    assert derive_typology(cat.technique("adalora"), cat.reference, cat.techniques).values["training_time"] == (
        "schedule + auxiliary loss + running statistic + global mask")


@pytest.mark.parametrize(("hook", "field", "line", "col", "message"), [
    ("  - {kind: aux_loss, module: lroa, value: \"sum(sum(B, -1), -1)\"}", "training[0].module", 1, 30, "unknown module 'lroa'"),
    ("  - {kind: after_step, tensor: lora.C, value: C}", "training[0].tensor", 1, 32, "module 'lora' has no tensor 'C'"),
    ("  - {kind: grad_projection, tensor: lora.M, value: grad}", "training[0].tensor", 1, 37, "is not trainable"),
    ("  - {kind: grad_projection, tensor: lora.A, value: \"grad * Q\"}", "training[0].value", 1, 60, "unknown name 'Q'"),
    ("  - {kind: schedule, name: r, value: step}", "training[0].name", 1, 28, "already the name of a hyperparameter"),
    ("  - {kind: schedule, name: s, value: \"A * step\"}", "training[0].value", 1, 39, "unknown name 'A'"),
    ("  - {kind: aux_loss, module: lora, value: \"sum(dropout(B, 0.1), -1)\"}", "training[0].value", 1, 48, "op 'dropout' cannot be used"),
    ("  - {kind: grad_projection, tensor: lora.A, value: grad}\n  - {kind: schedule, name: s, value: step, tensor: lora.Z}", "training[1].tensor", 2, 52,
     "module 'lora' has no tensor 'Z'"),
    ("  - {kind: grad_projection, tensor: lora.A, value: \"matmul(grad, t(U))\"}", "training[0].value", 1, 52, "the value has shape [4, 2]; the tensor 'lora.A' is [4, 512]"),
    ("  - {kind: aux_loss, module: lora, value: \"sum(B ** 2, -1)\"}", "training[0].value", 1, 43, "an aux loss gives one value"),
    ("  - {kind: after_step, tensor: lora.B, value: \"matmul(B, U)\"}", "training[0].value", 1, 48, "matmul"),
    ("  - {kind: after_step, tensor: lora.B, value: B, when: 3}", "training[0].when", 1, 50, "unknown key 'when'"),
    ("  - {kind: warmup, value: step}", "training[0]", 1, 5, "kind"),
    ("  - {kind: state, name: s, tensor: lora.A, value: \"s + grad * Q\"}", "training[0].value", 1, 63, "unknown name 'Q'"),
    ("  - {kind: state, name: s, tensor: lora.M, value: M}", "training[0].tensor", 1, 36, "is not trainable"),
    ("  - {kind: state, name: r, tensor: lora.A, value: grad}", "training[0].name", 1, 25, "already the name of a hyperparameter"),
    ("  - {kind: state, name: s, tensor: lora.A, value: \"sum(grad, -1)\"}", "training[0].value", 1, 51, "the tensor 'lora.A' is [4, 512]"),
    ("  - {kind: mask, tensor: lora.A, score: A, keep: \"A\", when: [{}]}", "training[0].keep", 1, 51, "unknown name 'A' in the mask keep"),
    ("  - {kind: mask, tensor: lora.A, score: \"sum(A, -1)\", keep: total, when: [{}]}", "training[0].score", 1, 41, "the score has shape [4]"),
    ("  - {kind: mask, tensor: lora.A, score: A, keep: total, when: [{first: foo}]}", "training[0].when[0].first", 1, 72, "unknown name 'foo'"),
    ("  - {kind: mask, tensor: lora.A, score: A, keep: total, when: []}", "training[0].when", 1, 63, "at least 1 item"),
    ("  - {kind: state, name: s, tensor: lora.A, value: grad}\n  - {kind: mask, tensor: lora.B, score: s, keep: units, when: [{}]}",
     "training[1].score", 2, 41, "the score has shape [4, 512]; the tensor 'lora.B' is [512, 4]"),
    ("  - {kind: mask, tensor: lora.B, score: B, keep: total, when: [{}], also: {C: B}}", "training[0].also.C", 1, 79, "has no tensor 'C'"),
    ("  - {kind: mask, tensor: lora.B, score: B, keep: total, when: [{}], effect: freeze, also: {M: kept}}", "training[0].also.M", 1, 95,
     "not trainable: there is nothing to freeze"),
    ("  - {kind: mask, tensor: lora.M, score: M, keep: total, when: [{}], effect: freeze}", "training[0].tensor", 1, 26, "a freezing mask"),
    ("  - {kind: mask, tensor: lora.B, score: B, keep: total, when: [{}], also: {A: \"kept * Q\"}}", "training[0].also.A", 1, 87,
     "unknown name 'Q'"),
    ("  - {kind: mask, tensor: lora.B, score: \"mean(B, 0, keepdim=True)\", keep: active, when: [{}], also: {A: kept}}", "training[0].also.A",
     1, 105, "the mask of 'A' has shape [1, 4]; it must broadcast to the tensor's [4, 512]"),
])
def test_hook_errors_are_located(tmp_path: Path, hook: str, field: str, line: int, col: int, message: str) -> None:
    p = _write(tmp_path, "training:\n" + hook + "\n")
    problems = _problems(p)
    assert problems, hook
    pr = problems[0]
    first = (HEADER + BODY).count("\n") + 1  # the line of "training:"
    assert (pr.field, pr.location.line, message in pr.message) == (field, first + line, True), (pr, hook)
    assert pr.location.column == col, (pr, hook)


def test_hooks_are_a_closed_frozen_set() -> None:
    data = {"id": "x", "name": "x", "paper": {"title": "t", "authors": "a", "year": 2024, "arxiv": "2401.00001"},
            "modules": [{"name": "m", "sites": ["attn.q"], "form": "parallel", "compute": "x"}],
            "training": [{"kind": "aux_loss", "module": "m", "value": "0"}]}
    t = Technique.model_validate(data)
    with pytest.raises(ValidationError):
        t.training[0].value = "1"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Technique.model_validate({**data, "training": [{"kind": "optimizer", "value": "0"}]})


# --- the adapter's methods against plain torch ----------------------------------------------------------


def _batch(vocab: int, n: int = 4, length: int = 10, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _hooked(tmp_path: Path) -> tuple[torch.nn.Module, Adapter]:
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(3)
    ad = apply(model, _write(tmp_path))
    assert isinstance(ad, Adapter)
    return model, ad


def _units(ad: Adapter) -> list[torch.nn.Module]:
    return list(ad.units.values())


def test_adapter_hooks_equal_the_equations_in_plain_torch(tmp_path: Path) -> None:
    """Schedule into M, OSF-style gradient projection of A, CPT-style eps-ball of B, an L2 aux loss: the adapter's
    methods against the same steps written out in torch, 4 SGD steps."""
    model, ad = _hooked(tmp_path)
    ref_model, ref_ad = _hooked(tmp_path)  # the same seeds: the same initial tensors; its hook methods are never called
    ref_units = _units(ref_ad)
    assert all(torch.equal(a.A, b.A) and torch.equal(a.U, b.U) for a, b in zip(_units(ad), ref_units))
    init_b = [u.B.detach().clone() for u in ref_units]
    batch, lam, eps = _batch(model.config.vocab_size), 0.1, 0.02
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=1.0)
    ref_opt = torch.optim.SGD([p for u in ref_units for p in (u.A, u.B)], lr=1.0)
    for step in range(4):
        loss = model(**batch).loss + ad.aux_loss()
        loss.backward()
        ad.before_optimizer_step(step)
        opt.step()
        ad.after_optimizer_step(step)
        opt.zero_grad()
        keep = max(0.5, 1 - 0.1 * step)  # the schedule as the reference computes it (step 0 was set at apply)
        prev_keep = max(0.5, 1 - 0.1 * (step - 1)) if step else 1.0
        ref_loss = ref_model(**batch).loss + lam * prev_keep * torch.stack([(u.B ** 2).sum() for u in ref_units]).mean()
        ref_loss.backward()
        with torch.no_grad():
            for u in ref_units:
                u.M.fill_(keep)
                u.A.grad -= u.A.grad @ u.U.T @ u.U
        ref_opt.step()
        with torch.no_grad():
            for u, b0 in zip(ref_units, init_b):
                u.B.copy_(b0 + (u.B - b0).clamp(-eps, eps))
        ref_opt.zero_grad()
    diff = max(float((getattr(a, n) - getattr(b, n)).detach().abs().max()) for a, b in zip(_units(ad), ref_units) for n in ("A", "B", "M"))
    assert diff <= 1e-6
    moved = max(float((u.B - b0).abs().max()) for u, b0 in zip(_units(ad), init_b))
    assert moved == pytest.approx(eps)  # the eps-ball was reached and held (lr 1.0 pushes B past it)
    for u in _units(ad):
        assert float((u.A.grad if u.A.grad is not None else torch.zeros(1)).abs().max()) == 0.0
        assert float(u.M.max()) == pytest.approx(0.7)


STATE_MASK = """training:
  - {kind: state, name: g2, tensor: lora.B, at: before_step, value: "0.5 * g2 + 0.5 * grad ** 2"}
  - {kind: mask, tensor: lora.B, score: "abs(B) * g2", keep: "floor(total * 3 / 4)", when: [{first: 1, last: 1}], hold: [{first: 3}]}
"""


def test_state_and_global_mask_equal_plain_torch(tmp_path: Path) -> None:
    """A state before the step (an EMA of grad²) and a mask after it, ranking |B|·EMA over every unit together at
    step 1, held from step 3 (not at step 2): against the same steps in torch, 5 SGD steps."""
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(3)
    ad = apply(model, _write(tmp_path, STATE_MASK))
    assert isinstance(ad, Adapter)
    with torch.no_grad():
        for u in _units(ad):
            u.B.normal_(std=0.1)
    b0 = [u.B.detach().clone() for u in _units(ad)]
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=0.5)
    batch, ema, mask = _batch(model.config.vocab_size), [torch.zeros_like(b) for b in b0], None
    for step in range(5):
        model(**batch).loss.backward()
        grads = [u.B.grad.detach().clone() for u in _units(ad)]
        before = [u.B.detach().clone() for u in _units(ad)]
        ad.before_optimizer_step(step)
        opt.step()
        ad.after_optimizer_step(step)
        opt.zero_grad()
        ema = [0.5 * e + 0.5 * g ** 2 for e, g in zip(ema, grads)]
        want = [b - 0.5 * g for b, g in zip(before, grads)]  # the SGD step, then the mask
        if step == 1:
            scores = [w.abs() * e for w, e in zip(want, ema)]
            flat = torch.cat([sc.reshape(-1) for sc in scores])
            threshold = torch.kthvalue(flat, flat.numel() - flat.numel() * 3 // 4)[0]
            mask = [sc > threshold for sc in scores]
        if mask is not None and step != 2:
            want = [w.masked_fill(~m, 0.0) for w, m in zip(want, mask)]
        assert max(float((u.B.detach() - w).abs().max()) for u, w in zip(_units(ad), want)) <= 1e-6, step
        zeros = sum(int((u.B == 0).sum()) for u in _units(ad))
        total = sum(b.numel() for b in b0)
        assert (zeros == 0) if step in (0, 2) else (zeros >= total - total * 3 // 4), step


def test_gradient_projection_removes_the_frozen_subspace(tmp_path: Path) -> None:
    model, ad = _hooked(tmp_path)
    with torch.no_grad():
        for u in _units(ad):
            u.B.normal_()
    (model(**_batch(model.config.vocab_size)).loss).backward()
    before = [u.A.grad.clone() for u in _units(ad)]
    assert all(float((g @ u.U.T).abs().max()) > 1e-6 for g, u in zip(before, _units(ad)))  # not vacuous
    ad.before_optimizer_step(0)
    assert all(float((u.A.grad @ u.U.T).abs().max()) < 1e-6 for u in _units(ad))


def test_aux_loss_is_zero_without_hooks_and_the_unused_hooks_warn_once(tmp_path: Path) -> None:
    lora = apply(build_model("tiny-llama", seed=0), "lora")
    z = lora.aux_loss()
    assert isinstance(z, torch.Tensor) and z.shape == () and float(z) == 0.0
    model, _ad = _hooked(tmp_path)
    model.train()
    batch = _batch(model.config.vocab_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(**batch)
    said = [w for w in caught if "declares training-time behaviour" in str(w.message)]
    assert len(said) == 1 and "adapter.aux_loss()" in str(said[0].message)
    model2, ad2 = _hooked(tmp_path)
    model2.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model2(**batch).loss.backward()
            ad2.before_optimizer_step(step)
    assert not [w for w in caught if "declares training-time behaviour" in str(w.message)]
    assert not [h for h in model2._forward_pre_hooks.values() if type(h).__name__ == "_Watch"]  # off the model once the loop calls it
    base = {k: v.clone() for k, v in build_model("tiny-llama", seed=0).state_dict().items()}
    back = ad2.remove().state_dict()
    assert all(torch.equal(base[k], back[k]) for k in base)  # removing takes the watch and the units out


# --- AdaLoRA's orthogonality regulariser and rank budget allocation against peft ----------------------------

SCHEDULE = {"target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
"""Warm-up (steps 0-2), the pruning window (3-8, masking at 4, 6 and 8), the final mask (9) kept for steps 10-11."""


def adalora_case(schedule: dict[str, int]) -> Any:
    """The AdaLoRA parity case with ``schedule`` (peft's config fields, pefref's hyperparameters of the same names)."""
    case = PARITY_CASES["adalora"]
    return replace(case, hps={**case.hps, **schedule}, config=lambda task, t: peft.AdaLoraConfig(
        task_type=task, target_modules=t, init_r=4, lora_alpha=8.0, lora_dropout=0.0, **schedule))


def adalora_parity(steps: int = 5, lr: float = 0.05, aux: bool = True, schedule: dict[str, int] | None = None,
                   hooks: bool = True) -> tuple[float, Any, Adapter]:
    """Both AdaLoRA models trained ``steps`` AdamW steps on one batch, peft the way its docs say (orth_reg added to the
    loss with labels; ``update_and_allocate(step)`` after ``optimizer.step()``, before ``zero_grad()``), pefref with
    adapter.aux_loss() and its hooks; the largest difference of P, E, Q afterwards, peft's model and pefref's adapter."""
    pair = parity_pair("tiny-llama", "adalora", adalora_case(schedule or {"target_r": 2, "total_step": 10}))
    pm, model, ad = pair.peft_model.train(), pair.model.train(), pair.adapter
    batch = _batch(model.config.vocab_size)
    p_opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=lr)
    for step in range(steps):
        pm(**batch).loss.backward()
        p_opt.step()
        pm.base_model.update_and_allocate(step)
        p_opt.zero_grad()
        (model(**batch).loss + (ad.aux_loss() if aux else 0.0)).backward()
        if hooks:
            ad.before_optimizer_step(step)
        opt.step()
        if hooks:
            ad.after_optimizer_step(step)
        opt.zero_grad()
    names = {"A": "lora_A.default", "E": "lora_E.default", "B": "lora_B.default"}
    diff = 0.0
    for key, path in pair.hosts.items():
        layer = pm.get_base_model().get_submodule(path)
        for n, pn in names.items():
            diff = max(diff, float((getattr(ad.units[key], n) - layer.get_parameter(pn)).detach().abs().max()))
    return diff, pm, ad


def test_adalora_orthogonality_regulariser_matches_peft_after_training() -> None:
    assert adalora_parity()[0] <= 1e-5


def test_adalora_without_the_regulariser_departs_from_peft() -> None:
    """Not vacuous: the regulariser's weight is peft's default, and the same steps without it end elsewhere."""
    pair = parity_pair("tiny-llama", "adalora")
    assert pair.adapter.hyperparameters["orth_reg_weight"] == 0.5 == pair.peft_model.peft_config["default"].orth_reg_weight
    assert float(pair.adapter.aux_loss().detach()) > 0.1
    assert adalora_parity(aux=False)[0] > 1e-3


def _pruned(ad: Adapter) -> int:
    return sum(int((u.E == 0).sum()) for u in ad.units.values())


def test_adalora_budget_schedule_matches_peft_through_warmup_pruning_and_final_phase() -> None:
    """12 steps: warm-up, masking every deltaT steps in the window, the final mask at total_step - tfinal kept after it;
    P, E, Q (the masked singular values included) equal peft's, with peft's final budget reached."""
    diff, pm, ad = adalora_parity(steps=12, schedule=SCHEDULE)
    assert diff <= 1e-5
    units = len(ad.units)
    assert _pruned(ad) == units * (4 - SCHEDULE["target_r"])  # peft's target budget: target_r per update on average
    pattern = pm.peft_config["default"].rank_pattern
    assert sum(not k for v in pattern.values() for k in v) == _pruned(ad)
    kept = {int((u.E != 0).sum()) for u in ad.units.values()}
    assert len(kept) > 1  # the budget moved between updates (not the same rank everywhere)


@pytest.mark.parametrize(("steps", "pruned"), [(3, 0), (5, None)])
def test_adalora_schedule_phases(steps: int, pruned: int | None) -> None:
    """Nothing is masked in the warm-up (steps 0-2); masking starts in the window (step 4), equal to peft's."""
    diff, _pm, ad = adalora_parity(steps=steps, schedule=SCHEDULE)
    assert diff <= 1e-5
    assert (_pruned(ad) == 0) if pruned == 0 else (_pruned(ad) > 0)


def test_adalora_without_the_schedule_departs_from_peft() -> None:
    """Not vacuous: the same 12 steps without pefref's hooks (peft allocating) end elsewhere."""
    assert adalora_parity(steps=12, schedule=SCHEDULE, aux=False, hooks=False)[0] > 1e-3


# --- pefref run and the Trainer callback ------------------------------------------------------------------


def test_pefref_run_honours_the_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pefref.experiments.checkpoint import load_tensors
    from pefref.experiments.runner import run_experiment
    from pefref.runtime import training

    from .test_experiments import write_exp

    calls: list[str] = []
    for name in ("before_step", "after_step"):
        real = getattr(training.TrainingHooks, name)
        monkeypatch.setattr(training.TrainingHooks, name, lambda self, step, _r=real, _n=name: (calls.append(_n), _r(self, step))[1])
    p = write_exp(tmp_path, "  - technique: adalora\n    hyperparameters: {r: 2, orth_reg_weight: [0.0, 5.0]}")
    outcome = run_experiment(p, tmp_path / "out", progress=False)
    assert not outcome.failed and len(outcome.done) == 2
    assert calls.count("before_step") == calls.count("after_step") == 2 * 6
    from pefref.experiments.results import load_results

    runs = load_results(tmp_path / "out").runs
    a, b = (load_tensors(tmp_path / "out" / "runs" / r.id / "adapter.safetensors") for r in runs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.endswith(".A")) > 1e-4  # the regulariser's weight shows


def _hand_loop(model: torch.nn.Module, ad: Adapter, batch: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.SGD(ad.trainable_parameters(), lr=lr)
    for step in range(steps):
        (model(**batch).loss + ad.aux_loss()).backward()
        ad.before_optimizer_step(step)
        opt.step()
        ad.after_optimizer_step(step)
        opt.zero_grad()


def test_trainer_callback_gives_the_parameters_of_the_hand_written_loop(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from pefref.experiments.trainer import TrainingHooksCallback, with_aux_loss

    model, ad = _hooked(tmp_path)
    twin, twin_ad = _hooked(tmp_path)
    batch = _batch(model.config.vocab_size, n=4)
    # the first position's label is one the causal shift drops anyway; ignoring it gives the Trainer's loss the
    # mean over the same tokens on both ends of the transformers range (4.57's Trainer divides the summed loss by
    # the labels counted before the shift, 40 here instead of 36; 5.x counts them after it)
    batch["labels"][:, 0] = -100
    _hand_loop(model, ad, batch, steps=3, lr=0.5)

    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                             lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to=[], disable_tqdm=True,
                             save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    opt = torch.optim.SGD(twin_ad.trainable_parameters(), lr=0.5)
    trainer = Trainer(twin, args, train_dataset=rows, callbacks=[TrainingHooksCallback([twin_ad])],
                      optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)))
    with_aux_loss(trainer, [twin_ad]).train()
    diff = max(float((getattr(a, n) - getattr(b, n)).detach().abs().max()) for a, b in zip(_units(ad), twin_ad.units.values()) for n in ("A", "B", "M"))
    assert diff <= 1e-5
    assert max(float(u.B.abs().max()) for u in _units(ad)) > 1e-3  # trained


def test_the_trainer_callback_is_not_imported_by_import_pefref() -> None:
    import subprocess
    import sys

    code = "import sys, pefref; print('pefref.experiments.trainer' in sys.modules, 'pefref.runtime.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


def test_a_composition_member_runs_its_hooks(tmp_path: Path) -> None:
    from pefref.runtime.training import aux_loss_of, hooked

    _model, ad = _hooked(tmp_path)

    class Members:  # what a composition exposes: its adapters by name
        adapters = {"one": ad, "plain": apply(build_model("tiny-llama", seed=0), "lora")}

    assert hooked([Members()]) == [ad]
    with torch.no_grad():
        for u in _units(ad):
            u.B.fill_(0.5)
    assert float(aux_loss_of([Members()]).detach()) == pytest.approx(float(ad.aux_loss().detach())) and float(ad.aux_loss().detach()) > 0


def test_pefref_run_trains_adalora_with_its_schedule_on_minilm(tmp_path: Path) -> None:
    """The MiniLM experiment (catalog/experiments/minilm_rt_polarity.yaml) cut to one AdaLoRA run of 4 steps: the run
    finishes, and its adapter holds the final budget (target_r per update on average, unevenly spread)."""
    import yaml
    from typer.testing import CliRunner

    from pefref.cli.app import app
    from pefref.experiments.checkpoint import load_tensors
    from pefref.experiments.results import load_results

    from .test_experiments_calibration import MINILM

    exp = yaml.safe_load(MINILM.read_text())
    exp["data"] = {**{k: str(MINILM.parent / v) for k, v in exp["data"].items()}, "limit_train": 32, "limit_eval": 8}
    exp["grid"] = [{"technique": "adalora", "learning_rates": [5.0e-3],
                    "hyperparameters": {"r": 4, "target_r": 2, "tinit": 0, "tfinal": 1, "deltaT": 1, "total_step": 4}}]
    exp["seeds"] = [0]
    exp["training"] = {**exp["training"], "max_steps": 4, "eval_every": 4, "batch_size": 8, "threads": 1}
    exp["training"].pop("epochs", None)
    path = tmp_path / "minilm_adalora.yaml"
    path.write_text(yaml.safe_dump(exp))
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 0, r.output
    (row,) = load_results(tmp_path / "out").runs
    assert row.status == "done"
    tensors = load_tensors(tmp_path / "out" / "runs" / row.id / "adapter.safetensors")
    es = [v for k, v in tensors.items() if k.endswith(".E")]
    assert len(es) == 6 * 6  # the six projections of MiniLM's six layers
    assert sum(int((e == 0).sum()) for e in es) == len(es) * (4 - 2)
    assert len({int((e != 0).sum()) for e in es}) > 1


def test_an_interrupted_adalora_run_resumes_to_the_same_adapter(tmp_path: Path) -> None:
    """The hooks' states and masks are part of the resumable checkpoint: interrupted after step 3 (inside the pruning
    window, the EMAs and a mask held) and resumed, the run ends where the uninterrupted one does."""
    import os
    import signal

    from pefref.experiments.checkpoint import load_state, load_tensors
    from pefref.experiments.results import load_results
    from pefref.experiments.runner import run_experiment

    from .test_experiments import write_exp

    grid = "  - technique: adalora\n    hyperparameters: {r: 4, target_r: 2, tinit: 1, tfinal: 2, deltaT: 1, total_step: 6}"
    p = write_exp(tmp_path, grid, training=", checkpoint_every: 1")
    assert len(run_experiment(p, tmp_path / "a", progress=False).done) == 1

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert run_experiment(p, tmp_path / "b", progress=False, on_step=interrupt).interrupted is not None
    (row,) = load_results(tmp_path / "b").runs
    saved = load_state(tmp_path / "b" / "runs" / row.id / "state.pt")["hooks"]
    assert saved and any(k.startswith("state/") and float(v.abs().max()) > 0 for k, v in saved[0].items())
    assert any(k.startswith("mask/") for k in saved[0])
    assert len(run_experiment(p, tmp_path / "b", progress=False).done) == 1
    a, b = (load_tensors(tmp_path / d / "runs" / row.id / "adapter.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FREEZE = """training:
  - kind: mask
    tensor: lora.B
    effect: freeze
    score: "mean(abs(B), 0, keepdim=True)"
    keep: "min(active, total / 2 - 2 * phase)"
    also: {A: "t(kept)"}
    when: [{first: 1, last: 1}, {first: 3, last: 3}]
  - {kind: schedule, name: phase, value: "floor(step / 3)"}
"""


def test_a_freezing_mask_holds_its_entries_under_adamw_and_ranks_the_rest(tmp_path: Path) -> None:
    """A freezing mask of B's rank columns (one score per column, A's rows following through `also`): at step 1 the
    lower half over both units freezes; under AdamW with weight decay the frozen columns and rows keep their values to
    the last step (their gradient zeroed before each step) while the others move; at step 3 only the columns still
    training are ranked (`active`), and the hooks' checkpoint carries the frozen entries."""
    model = build_model("tiny-llama", seed=0)
    torch.manual_seed(3)
    ad = apply(model, _write(tmp_path, FREEZE))
    assert isinstance(ad, Adapter)
    with torch.no_grad():
        for u in _units(ad):
            u.B.normal_(std=0.1)
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    batch, at_freeze = _batch(model.config.vocab_size), {}
    for step in range(6):
        model(**batch).loss.backward()
        ad.before_optimizer_step(step)
        if step >= 2:  # frozen entries get no gradient
            assert all(not u.B.grad[:, at_freeze[i][2]].any() and not u.A.grad[at_freeze[i][2]].any() for i, u in enumerate(_units(ad)))
        opt.step()
        ad.after_optimizer_step(step)
        opt.zero_grad()
        if step == 1:
            scores = torch.cat([u.B.detach().abs().mean(0) for u in _units(ad)])
            low = set(torch.argsort(scores)[: scores.numel() // 2].tolist())
            for i, u in enumerate(_units(ad)):
                cols = [j for j in range(u.B.shape[1]) if i * u.B.shape[1] + j in low]
                at_freeze[i] = (u.B.detach().clone(), u.A.detach().clone(), cols)
            assert sum(len(c) for *_x, c in at_freeze.values()) == 8
            masks = ad._training_hooks().masks
            assert all(sorted(torch.nonzero(~masks[(0, k)].reshape(-1)).reshape(-1).tolist()) == at_freeze[i][2] for i, k in enumerate(ad.units))
        if step == 3:
            live = [(i, j) for i, u in enumerate(_units(ad)) for j in range(u.B.shape[1]) if j not in at_freeze[i][2]]
            kept = [m.reshape(-1) for (_h, _k), m in ad._training_hooks().masks.items()]
            assert sum(int(k.sum()) for k in kept) == 6  # min(active = 8, 16 / 2 - 2): two more, among the 8 still training
            assert all(not kept[i][j] for i, u in enumerate(_units(ad)) for j in at_freeze[i][2])  # frozen stay frozen
            assert len(live) == 8
    for i, u in enumerate(_units(ad)):
        b0, a0, cols = at_freeze[i]
        assert torch.equal(u.B.detach()[:, cols], b0[:, cols]) and torch.equal(u.A.detach()[cols], a0[cols])
    moved = [float((u.B.detach() - at_freeze[i][0]).abs().max()) for i, u in enumerate(_units(ad))]
    assert max(moved) > 1e-3
    saved = ad._training_hooks().state_dict()
    assert any(k.startswith("trains/") for k in saved) and any(k.startswith("frozen/") for k in saved)
    fresh = apply(build_model("tiny-llama", seed=0), _write(tmp_path, FREEZE))
    assert isinstance(fresh, Adapter)
    fresh._training_hooks().load_state_dict(saved)
    assert fresh._training_hooks().state_dict().keys() == saved.keys()
