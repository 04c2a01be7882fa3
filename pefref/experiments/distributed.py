"""torch.distributed for experiments: data-parallel training started by ``torchrun``.

``torchrun --nproc_per_node N -m pefref run EXPERIMENT.yaml`` sets ``RANK``,
``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`init` joins the
process group (gloo on CPU, NCCL on CUDA). Each process takes an equal slice of
every global batch; :func:`wrap` wraps the model in DDP, which registers only
parameters that require gradients, so only the adapter's (and head's) gradients
are reduced; the frozen base model is never communicated after the initial
broadcast.

With ``training.distributed: fsdp``, :func:`shard` applies FSDP2
(``torch.distributed.fsdp.fully_shard``) to every transformer block (the
classes the model lists in Hugging Face's ``_no_split_modules``) and to the
root: each process keeps 1/N of every tensor, frozen base included, and
gathers a block's weights only while it runs. Gradients (only the trainable
tensors have any) are reduce-scattered; the result equals DDP's and one
process's with the same global batch (a test checks it with gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Dist", "all_sum", "any_true", "full_tensor", "init", "shard", "wrap"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    launched: bool = False
    """Started by torchrun: the process group exists (NCCL or gloo), even for a single process."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.launched


def init(device: str) -> Dist:
    """Join the process group when launched by torchrun (even with one process); a single-process Dist otherwise."""
    if not launched():
        return Dist(0, 1, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(rank, dist.get_world_size(), device, launched=True)


def launched() -> bool:
    """Whether torchrun started this process (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def shard(model: nn.Module, d: Dist) -> list[str]:
    """FSDP2 on ``model`` in place: each transformer block, then the root; returns the classes sharded as blocks.

    The parameters become DTensors sharded over the processes (moved to ``d.device``
    block by block, so the whole model never sits on one device).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pefref.language.errors import PefrefError

    mesh = init_device_mesh(d.device.split(":")[0], (d.world,))
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise PefrefError(f"training.distributed: fsdp needs the model's transformer blocks ({type(model).__name__} lists no _no_split_modules)")
    for b in blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sorted({type(b).__name__ for b in blocks})


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every process must call it), or ``t`` itself."""
    fn = getattr(t, "full_tensor", None)
    return fn() if callable(fn) else t


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
