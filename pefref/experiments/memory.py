"""Training memory on CPU, from the tensors alive at a step's peak: weights, gradients, optimizer state, saved activations.

(On a GPU the allocator's peak is recorded instead.)
"""

from __future__ import annotations

import torch
from torch import nn

from pefref.experiments.distributed import local_shard

__all__ = ["SavedBytes", "tensor_memory"]


class SavedBytes:
    """Bytes of the activations autograd saves for backward (parameters excluded), counted once per storage."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.params and key not in self.seen:
                self.seen.add(key)
                self.bytes += s.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            pass
        return t


def _nbytes(t: torch.Tensor) -> int:
    t = local_shard(t)
    return t.numel() * t.element_size()


def tensor_memory(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, saved: int) -> int:
    """Training memory from the tensors that exist at a step's peak in this process: weights, gradients, optimizer state, saved activations."""
    weights = sum(_nbytes(p) for p in {id(p): p for p in model.parameters()}.values())
    grads = sum(_nbytes(p) for p in params)
    states = sum(_nbytes(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return weights + grads + states + saved
