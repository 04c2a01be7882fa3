"""Computing in fp32 for models held in bf16 or fp16: merges are computed in fp32 and rounded once."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["LOW_PRECISION", "in_fp32"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def in_fp32(*modules: nn.Module) -> Iterator[bool]:
    """Within the block the modules' bf16/fp16 parameters and buffers hold fp32 copies of their values.

    Yields whether anything was converted. Afterwards every tensor gets back its own storage, so its
    values are bit-exactly what they were (write results after the block, in the tensors' own dtype).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            if id(t) in seen or t.dtype not in LOW_PRECISION:
                continue
            seen.add(id(t))
            saved.append((t, t.data))
            t.data = t.data.float()
    try:
        yield bool(saved)
    finally:
        for t, data in saved:
            t.data = data
