"""What a run is measured by: each task's loss and metrics on the evaluation set.

Sequence classification: accuracy and macro-averaged F1; causal language
modelling: next-token loss and perplexity. Training uses the same loss
(:func:`loss_sum`, :func:`target_count`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefref.experiments.data import Examples, collate

__all__ = ["MAIN_METRIC", "classification_metrics", "evaluate", "loss_sum", "model_logits", "target_count"]

MAIN_METRIC = {"sequence_classification": ("accuracy", True), "causal_lm": ("loss", False)}
"""Each task's main metric and whether higher is better."""


def classification_metrics(preds: list[int], labels: list[int], n_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (a class absent from both predictions and labels is left out)."""
    acc = sum(p == t for p, t in zip(preds, labels)) / max(len(labels), 1)
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and t == c for p, t in zip(preds, labels))
        fp = sum(p == c and t != c for p, t in zip(preds, labels))
        fn = sum(p != c and t == c for p, t in zip(preds, labels))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1": sum(f1s) / max(len(f1s), 1)}


def model_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a collated batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Summed cross-entropy: over examples (classification) or over next-token targets, padding ignored (causal LM)."""
    if not causal:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    logits = logits[:, -labels.shape[1]:]  # modules that prepend positions leave them in front
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def target_count(labels: torch.Tensor, causal: bool) -> int:
    """How many targets :func:`loss_sum` sums over."""
    return int((labels[:, 1:] != -100).sum()) if causal else int(labels.shape[0])


def with_token_loss(batch: dict[str, torch.Tensor], token_loss: Any) -> dict[str, torch.Tensor]:
    """A causal batch with a technique's token loss (:class:`pefref.runtime.token_loss.LossHook`): its targets and
    weights over the whole sequence (prepended positions included) as ``targets`` and ``weight``; unchanged without one."""
    if token_loss is None:
        return batch
    targets, weight = token_loss.targets(batch["labels"], batch.get("input_type_mask"))
    return {**batch, "targets": targets, "weight": weight}


def batch_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    """The summed loss of a batch: the token loss's weighted sum where the batch carries its targets
    (:func:`with_token_loss`), else :func:`loss_sum`."""
    if "targets" in batch:
        from pefref.runtime.token_loss import weighted_loss

        return weighted_loss(logits[:, :-1], batch["targets"], batch["weight"], "sum")
    return loss_sum(logits, batch["labels"], causal)


def batch_count(batch: dict[str, torch.Tensor], causal: bool) -> int:
    """How many targets :func:`batch_loss` sums over."""
    return int((batch["targets"] != -100).sum()) if "targets" in batch else target_count(batch["labels"], causal)


@torch.no_grad()
def evaluate(model: nn.Module, ex: Examples, pad_id: int, causal: bool, batch_size: int, device: str, autocast: Any,
             token_loss: Any = None) -> dict[str, float]:
    """Metrics on the evaluation set (every process computes them on all of it); the loss is a technique's token loss
    where ``token_loss`` is given (causal LM)."""
    was = model.training
    model.eval()
    preds: list[int] = []
    total, count = 0.0, 0
    order = sorted(range(len(ex)), key=lambda j: (-len(ex.ids[j]), j))  # similar lengths share a batch: little padding
    for i in range(0, len(ex), batch_size):
        b = with_token_loss({k: v.to(device) for k, v in collate(ex, order[i:i + batch_size], pad_id, causal).items()}, token_loss)
        with autocast():
            logits = model_logits(model, b)
        total += float(batch_loss(logits, b, causal))
        count += batch_count(b, causal)
        if not causal:
            preds += logits.argmax(-1).tolist()
    model.train(was)
    loss = total / max(count, 1)
    if causal:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    assert ex.labels is not None
    labels = ex.labels
    return {"loss": loss, **classification_metrics(preds, [labels[j] for j in order], len(ex.label_names))}
