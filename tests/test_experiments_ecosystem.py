"""Ecosystem: an adapted model trains with ``transformers.Trainer``; TensorBoard logging when it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
