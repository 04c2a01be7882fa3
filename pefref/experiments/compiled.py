"""``training.compile``: the training forward (and, through AOT autograd, its backward) under torch.compile.

:func:`use_compile` decides (``auto``: on for CUDA; on CPU only where it was
measured to pay, see :data:`CPU_AUTO`); :func:`compile_model` wraps the model
once; :func:`mark_dynamic` marks a batch's sequence dimension dynamic before each
call, so length-grouped batches (every batch padded to its own length) run one
graph with a symbolic length instead of recompiling for every new length.
Evaluation stays eager (forward only, run rarely).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CPU_AUTO", "use_compile", "compile_model", "mark_dynamic"]

CPU_AUTO = False
"""Whether ``compile: auto`` compiles on CPU: no. Measured (``benchmarks/bench_compile.py``, the MiniLM
experiment's first run, 2 shared cores, paired rounds): the compiled step takes about 0.94 of the eager
one, but compiling the forward and backward graphs takes about 32 s, which the faster steps earn back
only after some 670 steps, nine times the experiment's 75; ``compile: true`` is for long CPU runs."""


def use_compile(setting: str | bool, device: str) -> bool:
    """``training.compile`` resolved on ``device``: ``true``/``false`` as given; ``auto``: CUDA yes,
    CPU :data:`CPU_AUTO`, anything else no."""
    if isinstance(setting, bool):
        return setting
    if device.startswith("cuda"):
        return True
    return CPU_AUTO if device == "cpu" else False


def compile_model(model: nn.Module, backend: Any = "inductor") -> nn.Module:
    """``model`` under torch.compile (parameters and buffers stay the model's own, so the optimizer,
    checkpoints and the adapter see the same tensors)."""
    return torch.compile(model, backend=backend, dynamic=None)  # type: ignore[return-value]


def mark_dynamic(batch: dict[str, Any]) -> None:
    """Mark dimension 1 (the sequence) of every batch tensor of two or more dimensions dynamic."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] > 1:
            torch._dynamo.mark_dynamic(v, 1)
