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
Checkpoints gather the adapter's tensors (:func:`full_tensor`) and the
optimizer's state (:func:`optimizer_state`) to rank 0, which writes them; a
resumed run loads both back into every process's shards, so an interrupted
FSDP run resumes exactly (a test checks it too, and :func:`parameter_bytes`
shows each of 2 processes holding half of the model's parameter bytes).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from torch import nn

T = TypeVar("T")

__all__ = [
    "Dist", "all_sum", "any_true", "broadcast", "exit_process", "full_tensor", "init", "load_optimizer_state", "local_shard", "optimizer_state",
    "parameter_bytes", "shard", "transformer_blocks", "wrap",
]


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
        atexit.register(_leave)
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(rank, dist.get_world_size(), device, launched=True)


def _leave() -> None:
    """Destroy the process group this process joined, before the interpreter tears down: a group left to the
    interpreter's teardown may abort the process (gloo's connections closed while a peer is still leaving)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process torchrun started, once its work is done and written: leave the process group, flush, then exit
    without the interpreter's teardown (``os._exit``). Tearing down torch's and gloo's C++ state at exit aborts a
    worker now and then on a loaded machine ("terminate called without an active exception", SIGABRT) after a run
    finished, and torchrun then reports the whole launch failed; nothing is left to tear down that matters."""
    _leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched() -> bool:
    """Whether torchrun started this process (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def shard(model: nn.Module, d: Dist) -> list[str]:
    """FSDP2 on ``model`` in place: each transformer block (and an input embedding inside one), then the root;
    returns the classes sharded as blocks.

    The parameters become DTensors sharded over the processes (moved to ``d.device``
    block by block, so the whole model never sits on one device).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pefref.language.errors import PefrefError

    mesh = init_device_mesh(d.device.split(":")[0], (d.world,))
    blocks = transformer_blocks(model)
    if not blocks:
        raise PefrefError(f"training.distributed: fsdp needs the model's transformer blocks ({type(model).__name__} lists no _no_split_modules)")
    # prompts are prepended by calling the input embedding directly, outside its block's forward (BERT's
    # embeddings are a block): such an embedding is its own unit, so it gathers its weight when called
    embed = _input_embeddings(model)
    inner = [embed] if embed is not None and any(embed is not b and any(m is embed for m in b.modules()) for b in blocks) else []
    for b in inner + blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sorted({type(b).__name__ for b in blocks})


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``model`` whose classes it or one of its inner Hugging Face models lists in
    ``_no_split_modules``, in module order.

    transformers 4.x keeps the list on the inner model (BertModel, not BertForSequenceClassification) and some
    4.x classes list parts of a layer too (RoBERTa's self-attention); 5.x also copies the lists onto the outer
    model. A listed module inside another listed one is not a block of its own.
    """
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks: list[tuple[str, nn.Module]] = []
    for path, m in model.named_modules():
        if m is not model and type(m).__name__ in names and not any(path.startswith(f"{p}.") for p, _ in blocks):
            blocks.append((path, m))
    return [m for _, m in blocks]


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    fn = getattr(model, "get_input_embeddings", None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every process must call it), or ``t`` itself."""
    fn = getattr(t, "full_tensor", None)
    return fn() if callable(fn) else t


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state of a sharded model, keyed by parameter name (a collective: every process
    must call it; rank 0 gets the full tensors, on the CPU, the others an empty state).

    The model must be sharded (``model.reshard()`` after a forward without backward: FSDP2 leaves the
    root's tensors gathered then, as plain tensors that are not the optimizer's parameters).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return dict(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state made by :func:`optimizer_state` (every process passes the whole state and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded DTensor, or ``t`` itself."""
    fn = getattr(t, "to_local", None)
    return fn() if callable(fn) else t


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the parameters this process holds (a sharded DTensor's local shard) and of the whole model's.

    Under FSDP2 with N processes the first is about 1/N of the second (a tensor whose first
    dimension does not divide by N gives the processes shards that differ by at most one row).
    """
    local = full = 0
    for p in {id(p): p for p in model.parameters()}.values():
        own = local_shard(p)
        local += own.numel() * own.element_size()
        full += p.numel() * p.element_size()
    return local, full


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP around ``model`` when distributed (frozen parameters are not registered for reduction)."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[int(d.device.split(":")[1])] if d.device.startswith("cuda") else None,
               broadcast_buffers=False)


def broadcast(obj: T, d: Dist) -> T:
    """Rank 0's ``obj`` in every process (picklable objects; ``obj`` itself when not distributed)."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
