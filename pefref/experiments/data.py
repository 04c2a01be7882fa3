"""Local data (jsonl, json, csv) read with Hugging Face ``datasets``, tokenised once, batched deterministically.

The order of the training examples in epoch ``e`` is a permutation drawn from
``(seed, e)`` alone (and, when batches are grouped by length, the examples'
lengths), so a resumed run sees exactly the batches it would have seen, and
every process of a distributed run knows the whole global batch (it pads to the
global batch's longest example and takes its own rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pefref.language.datafile import check_data
from pefref.language.errors import PefrefError

__all__ = ["Examples", "collate", "epoch_order", "grouped_order", "load_examples", "read_table"]

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass
class Examples:
    """Tokenised examples: token ids per example, integer labels (classification) and label names."""

    ids: list[list[int]]
    labels: list[int] | None
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def read_table(path: Path) -> Any:
    """A ``datasets.Dataset`` from a local jsonl/json/csv file (nothing is downloaded)."""
    import datasets

    datasets.disable_progress_bars()
    kind = "csv" if path.suffix == ".csv" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)


def load_examples(path: Path, text: str, label: str | None, tokenizer: Any, max_length: int, limit: int | None = None,
                  label_names: list[str] | None = None) -> Examples:
    """Read, check columns, tokenise; labels map to ``label_names`` (default: the sorted distinct labels).

    The file is first checked as ``pefref validate`` checks it (:func:`pefref.language.datafile.check_data`)."""
    check_data(path, text, label, limit, training=label_names is None)
    table = read_table(path)
    cols = set(table.column_names)
    for col in [text] + ([label] if label else []):
        if col not in cols:
            raise PefrefError(f"{path}: no column {col!r} (columns: {', '.join(sorted(cols))})")
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    texts = [str(t) for t in table[text]]
    labels: list[int] | None = None
    names: list[str] = list(label_names or [])
    if label:
        raw = [str(v) for v in table[label]]
        if not names:
            names = sorted(set(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise PefrefError(f"{path}: labels {unknown[:5]} do not occur in the training data ({', '.join(names)})")
        index = {n: i for i, n in enumerate(names)}
        labels = [index[v] for v in raw]
    return Examples(tokenizer.encode(texts, max_length), labels, names)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation that depends on ``(seed, epoch)`` only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """An epoch's order whose consecutive batches hold examples of similar length (less padding).

    Like Hugging Face's ``group_by_length``: the epoch's permutation
    (:func:`epoch_order`) is cut into mega-batches of up to 50 batches, each is
    sorted by length (longest first, ties by position) and cut into batches, and
    the full batches are shuffled (a partial last batch stays last). Every
    example still appears once per epoch; only which examples share a batch and
    the batch order change, both drawn from ``(seed, epoch)``.
    """
    n = len(lengths)
    perm = epoch_order(n, seed, epoch)
    mega = batch_size * max(1, min(50, n // (4 * batch_size)))
    flat: list[int] = []
    for i in range(0, n, mega):
        flat += sorted(perm[i:i + mega], key=lambda j: (-lengths[j], j))
    full = [flat[i:i + batch_size] for i in range(0, n - n % batch_size, batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    order = [x for b in torch.randperm(len(full), generator=g).tolist() for x in full[b]]
    return order + flat[len(order):]


def collate(ex: Examples, idx: list[int], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors for the examples ``idx``: input_ids, attention_mask and labels.

    Causal LM labels are the input ids with padding set to -100 (ignored).
    """
    seqs = [ex.ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    if causal:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        assert ex.labels is not None
        labels = torch.tensor([ex.labels[i] for i in idx], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def calibration_batches(ex: Examples, batches: int, batch_size: int, pad_id: int, keep: set[str]) -> list[dict[str, torch.Tensor]]:
    """The first ``batches`` × ``batch_size`` examples of ``ex`` in order, as model inputs restricted to ``keep``
    (input_ids and attention_mask; labels where the model computes a loss): calibration for techniques initialised
    from data."""
    n = min(len(ex), batches * batch_size)
    if n == 0:
        raise PefrefError("calibration: the split has no examples")
    out = []
    for i in range(0, n, batch_size):
        b = collate(ex, list(range(i, min(i + batch_size, n))), pad_id, ex.labels is None)
        out.append({k: v for k, v in b.items() if k in keep})
    return out
