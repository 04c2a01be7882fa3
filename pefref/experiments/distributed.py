"""torch.distributed for experiments: data-parallel training started by ``torchrun``.

``torchrun --nproc_per_node N -m pefref run EXPERIMENT.yaml`` sets ``RANK``,
``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`init` joins the
process group (gloo on CPU, NCCL on CUDA). Each process takes an equal slice of
every global batch; :func:`wrap` wraps the model in DDP, which registers only
parameters that require gradients, so only the adapter's (and head's) gradients
are reduced; the frozen base model is never communicated after the initial
broadcast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Dist", "all_sum", "any_true", "init", "wrap"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a single-process Dist otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(rank, dist.get_world_size(), device)


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP around ``model`` when distributed (frozen parameters are not registered for reduction)."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[int(d.device.split(":")[1])] if d.device.startswith("cuda") else None,
               broadcast_buffers=False)


def all_sum(x: float, d: Dist) -> float:
    """Sum of a number over processes."""
    if not d.active:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item())


def any_true(flag: bool, d: Dist) -> bool:
    """Whether any process has ``flag`` set (every process gets the same answer)."""
    return all_sum(1.0 if flag else 0.0, d) > 0
