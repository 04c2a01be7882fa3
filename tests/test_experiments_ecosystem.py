"""Ecosystem: an adapted model trains with ``transformers.Trainer``; TensorBoard logging when it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import pefref
from pefref.experiments.runner import run_experiment
from pefref.experiments.tasks import build_task_model
from tests.test_experiments import write_exp


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 120, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 60).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def test_adapted_model_trains_with_transformers_trainer(tmp_path: Path, catalog) -> None:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model, _ = build_task_model({"shape": "tiny-bert"}, "sequence_classification", 2, catalog)
    adapter = pefref.apply(model.base_model, "lora", r=4, catalog=catalog)
    for p in model.classifier.parameters():  # the task head trains with the adapter (peft's modules_to_save)
        p.requires_grad_(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("pefref_adapters" in n or n.startswith("classifier.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=2e-2,
                             logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Batches(32))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():  # the base model did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert adapter.num_trainable() > 0


def test_tensorboard_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only", training=", tensorboard: true")
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.done) == 1
    events = list((tmp_path / "o").rglob("events.out.tfevents.*"))
    if importlib.util.find_spec("tensorboard") is not None:
        assert events  # one event file per run under DIR/tensorboard
    else:  # the optional extra is missing: the run still finishes, with one clear warning
        assert not events
        assert "tensorboard is not installed" in capsys.readouterr().err


ADALORA_RUN = ("  - technique: adalora\n"
               "    hyperparameters: {r: 4, target_r: 2, tinit: 1, tfinal: 2, deltaT: 1, total_step: 6}")
"""AdaLoRA with its budget schedule over a 6-step run: warm-up (steps 0-1), masking at 2 and 3, the final mask at 4, held at 5."""
NO_DROPOUT = "{shape: tiny-bert, config: {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}"


def _pefref_run_batches(run: Any) -> list[dict[str, torch.Tensor]]:
    """The batches ``pefref run`` trains on, in its order (one epoch's permutation, collated as it does)."""
    from pefref.experiments.data import collate, epoch_order

    B = run.cfg.training.batch_size
    out = []
    for step in range(run.total):
        epoch, pos = divmod(step, run.steps_per_epoch)
        order = epoch_order(len(run.train_ex), run.cfg.seed, epoch)
        out.append(collate(run.train_ex, order[pos * B:(pos + 1) * B], run.tok.pad_token_id, run.cfg.causal))
    return out


def test_trainer_with_the_callback_gives_the_parameters_of_pefref_run_for_adalora(tmp_path: Path) -> None:
    """``pefref run`` and ``transformers.Trainer`` (pefref's callback and aux loss, the run's model, optimizer, schedule and
    batches) train AdaLoRA with its rank budget schedule to the same adapter and head, with the final budget reached."""
    from transformers import Trainer, TrainingArguments

    from pefref.experiments.checkpoint import load_tensors
    from pefref.experiments.grid import expand, load_experiment
    from pefref.experiments.results import load_results
    from pefref.experiments.train import RunConfig, RunEnv, _setup
    from pefref.experiments.trainer import TrainingHooksCallback, with_aux_loss
    from pefref.language.catalog import default_catalog

    p = write_exp(tmp_path, ADALORA_RUN, model=NO_DROPOUT)
    outcome = run_experiment(p, tmp_path / "out", progress=False)
    assert not outcome.failed and len(outcome.done) == 1
    (row,) = load_results(tmp_path / "out").runs
    ran = load_tensors(tmp_path / "out" / "runs" / row.id / "adapter.safetensors")

    exp, _pos = load_experiment(p)
    (spec,) = expand(exp, p)
    env = RunEnv(p.parent, tmp_path / "trainer", exp.data, exp.training, default_catalog(), None)
    run = _setup(RunConfig.of(spec, env.training), env)
    batches = _pefref_run_batches(run)
    init = {k: v.detach().clone() for k, v in run.prep.state().items()}
    args = TrainingArguments(str(tmp_path / "t"), per_device_train_batch_size=1, max_steps=run.total, report_to=[], disable_tqdm=True,
                             save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                             max_grad_norm=run.cfg.training.max_grad_norm or 0.0)
    trainer = Trainer(run.model, args, train_dataset=batches, data_collator=lambda rows: rows[0],
                      callbacks=[TrainingHooksCallback(run.prep.adapters)], optimizers=(run.opt, run.sched))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)  # pefref run's order
    with_aux_loss(trainer, run.prep.adapters).train()
    mine = {k: v.detach() for k, v in run.prep.state().items()}
    assert set(mine) == set(ran)
    assert max(float((mine[k] - ran[k]).abs().max()) for k in ran) <= 1e-5
    assert max(float((init[k] - ran[k]).abs().max()) for k in ran) > 1e-3  # trained
    es = [v for k, v in ran.items() if k.endswith(".E")]
    assert es and sum(int((e == 0).sum()) for e in es) == len(es) * (4 - 2)  # the final budget: target_r per update on average
