"""Computing in fp32 for models held in bf16 or fp16.

The adapter dtype policy (peft's ``autocast_adapter_dtype``): on a bf16/fp16 host an adapter's tensors are
fp32 and its units compute in fp32, the host's tensors cast up at the boundary and the result rounded
once back to the host's dtype (``adapter_dtype="auto"``, the default); ``adapter_dtype="host"`` keeps them
in the host's dtype. Merges are computed in fp32 and rounded once either way."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from pefref.language.errors import PefrefError

__all__ = ["ADAPTER_DTYPES", "LOW_PRECISION", "AdapterDtype", "adapter_dtype_for", "in_fp32", "loads_exactly"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
AdapterDtype = Literal["auto", "host"]
ADAPTER_DTYPES: tuple[str, ...] = ("auto", "host")


def adapter_dtype_for(host: torch.dtype, policy: str = "auto", explicit: torch.dtype | None = None) -> torch.dtype:
    """The dtype of an adapter's tensors on a host held in ``host``: ``explicit`` when given, else fp32 on a
    bf16/fp16 host under ``"auto"`` (peft's ``autocast_adapter_dtype=True``), else the host's own."""
    if policy not in ADAPTER_DTYPES:
        raise PefrefError(f"adapter_dtype={policy!r}: expected one of {', '.join(ADAPTER_DTYPES)}")
    if explicit is not None:
        return explicit
    return torch.float32 if policy == "auto" and host in LOW_PRECISION else host


def loads_exactly(stored: torch.dtype | None, own: torch.dtype) -> bool:
    """Whether a tensor stored in ``stored`` loads into one held in ``own`` without changing a value: the same
    dtype, or a bf16/fp16 tensor into fp32 (an adapter saved on a low-precision host in its dtype)."""
    return stored == own or (stored in LOW_PRECISION and own == torch.float32)


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
