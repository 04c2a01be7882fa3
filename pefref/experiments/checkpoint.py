"""Checkpoints of a run, written atomically: adapter (+ head) tensors as safetensors, and the training state.

Each file goes through :func:`pefref.language.atomic.atomic_write_bytes` (temporary
file, fsync, rename), so a crash leaves either the old or the new file, never a torn one.
The training state (optimizer, scheduler, RNG, step, best metric) lets an
interrupted run continue exactly where it stopped.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from pefref.language.atomic import atomic_write_bytes

__all__ = ["load_state", "load_tensors", "rng_state", "save_state", "save_tensors", "set_rng_state"]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Adapter-only safetensors (metadata values JSON-encoded when not strings)."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    # shared tensors (tied weights) are stored once per name: safetensors refuses aliases
    data = save({k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(tensors.items())}, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def rng_state() -> dict[str, Any]:
    """Every random state training draws from (torch CPU and CUDA)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The resumable training state (torch.save of plain containers), written atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)
