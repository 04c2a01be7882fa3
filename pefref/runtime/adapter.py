"""The handle of an applied technique: report, trainable parameters, merge, disable, remove, save."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, Technique
from pefref.runtime.patches import Entry
from pefref.runtime.report import Report

__all__ = ["Adapter", "ADAPTERS_ATTR"]

ADAPTERS_ATTR = "pefref_adapters"
"""Attribute of the model root holding every adapter's units (state-dict prefix)."""


@dataclass(eq=False, repr=False)
class Adapter:
    """A technique applied to a model: report, trainable parameters, merge, disable, remove, save."""

    model: nn.Module
    technique: Technique
    name: str
    hyperparameters: dict[str, Any]
    family: ArchitectureMap
    sizes: dict[str, int]
    units: nn.ModuleDict
    entries: list[tuple[Any, Entry]] = field(default_factory=list)
    selected: dict[str, nn.Parameter] = field(default_factory=dict)
    mergeable_units: set[str] = field(default_factory=set)
    unit_modules: dict[str, Any] = field(default_factory=dict)  # unit key -> its module description (training metadata)
    report: Report | None = None
    enabled: bool = True
    merged: bool = False
    merged_by: Any = None  # the composition whose merge folded this adapter (it alone can take it out)
    _host_backup: dict[str, torch.Tensor] = field(default_factory=dict)
    _hooks: list[Any] = field(default_factory=list)
    _removed: bool = False
    _training: Any = None  # TrainingHooks, when the technique declares training-time behaviour
    token_loss: Any = None  # the technique's token loss (runtime.token_loss.LossHook), where it declares one
    wiring: Any = None  # the connections' Wiring, kept where training hooks read the last forward pass (aux loss inputs)

    def __repr__(self) -> str:
        n = self.report.trainable if self.report else 0
        state = "merged" if self.merged else ("disabled" if not self.enabled else "active")
        return f"Adapter({self.name!r}, technique={self.technique.id!r}, family={self.family.family!r}, trainable={n}, {state})"

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged

    # --- parameters ---------------------------------------------------------

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter this adapter trains (its own and selected host ones), by name, each once."""
        out: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for name, p in self.units.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        for name, p in self.selected.items():
            out[f"host.{name}"] = p
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter this adapter trains, each once, as a list a torch optimizer takes as it is
        (``torch.optim.AdamW(adapter.trainable_parameters())``); names: :meth:`named_trainable_parameters`."""
        return list(self.named_trainable_parameters().values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Torch-optimizer parameter groups following each tensor's declared training metadata.

        A tensor declared with ``lr_scale: s`` trains at ``lr * s``; one with ``weight_decay: w`` uses
        ``w`` instead of ``weight_decay``. Tensors with equal settings share one group (in order of first
        appearance); each group also carries ``names``. Selected host parameters train at ``lr``.
        ``torch.optim.AdamW(adapter.param_groups(lr=1e-3))`` is ready to use.
        """
        from pefref.language.sizes import eval_scalar

        groups: dict[tuple[float, float], dict[str, Any]] = {}
        seen: set[int] = set()

        def add(name: str, p: nn.Parameter, scale: float, wd: float | None) -> None:
            if not p.requires_grad or id(p) in seen:
                return
            seen.add(id(p))
            key = (float(lr) * float(scale), float(weight_decay if wd is None else wd))
            g = groups.setdefault(key, {"params": [], "names": [], "lr": key[0], "weight_decay": key[1]})
            g["params"].append(p)
            g["names"].append(name)

        for key, unit in self.units.items():
            spec = self.unit_modules.get(key)
            for pname, p in unit.named_parameters():
                ps = spec.params.get(getattr(unit, "tensor_of", {}).get(pname, pname)) if spec is not None else None  # a split tensor's piece: its tensor's
                scale = 1.0 if ps is None else eval_scalar(ps.lr_scale, dict(self.hyperparameters)) if isinstance(ps.lr_scale, str) else ps.lr_scale
                add(f"{key}.{pname}", p, scale, None if ps is None else ps.weight_decay)
        for name, p in self.selected.items():
            add(f"host.{name}", p, 1.0, None)
        return list(groups.values())

    # --- training-time behaviour ------------------------------------------------

    def _training_hooks(self) -> Any:
        if self._training is None:
            from pefref.runtime.training import TrainingHooks

            self._training = TrainingHooks(self)
            if self.technique.training:
                self._training.start()
        return self._training

    def aux_loss(self) -> torch.Tensor:
        """The technique's auxiliary loss terms (``training: aux_loss``), to add to the task loss; a scalar 0 when it has none."""
        return self._training_hooks().aux_loss()

    def before_optimizer_step(self, step: int) -> None:
        """Call after the backward pass, before ``optimizer.step()``: sets the schedules at ``step`` (0-based optimiser
        step) and projects the gradients (``training: schedule, grad_projection``)."""
        self._training_hooks().before_step(step)

    def after_optimizer_step(self, step: int) -> None:
        """Call after ``optimizer.step()``: projects the tensors (``training: after_step``), without gradient."""
        self._training_hooks().after_step(step)

    # --- state --------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only state: units' tensors (shared ones once) and selected host parameters."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in list(self.units.named_parameters()) + list(self.units.named_buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t.detach()
        for name, p in self.selected.items():
            out[f"host.{name}"] = p.detach()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an adapter state into this adapter: names, shapes, dtypes and finiteness are checked first."""
        from pefref.runtime.operations import load_state

        load_state(self, state, "state")

    def save(self, path: str | Path) -> None:
        """Save the adapter state as safetensors (technique and hyperparameters as metadata), atomically."""
        from safetensors.torch import save

        from pefref.language.atomic import atomic_write_bytes
        from pefref.runtime.adapterfile import metadata_of

        meta = metadata_of(self)
        state = self.state_dict()
        on_meta = sorted(k for k, v in state.items() if v.is_meta)
        if on_meta:
            raise PefrefError(f"{self.name}: the adapter's tensors are on the meta device (no values: {', '.join(on_meta[:3])}"
                              f"{', ...' if len(on_meta) > 3 else ''}); load real weights (e.g. model.to_empty(device=...) and "
                              f"initialise, or apply to a model on a real device) before saving")
        data = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta)
        atomic_write_bytes(path, data)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``),
        so that ``peft.PeftModel.from_pretrained(base, directory)`` computes the same; see :mod:`pefref.interop`.

        The interop layer, above this one, writes it: :mod:`pefref` registers its writer with
        :mod:`pefref.runtime.formats`, where this method finds it (the runtime never imports interop)."""
        from pefref.runtime.formats import PRETRAINED, adapter_format

        return adapter_format(PRETRAINED).write(self, directory)

    def load(self, path: str | Path) -> None:
        """Load adapter state saved by :meth:`save`, after verifying technique, hyperparameters, family and tensors."""
        from pefref.runtime.operations import load_file

        load_file(self, path)

    # --- merge ----------------------------------------------------------------

    def merge(self) -> list[str]:
        """Fold every mergeable unit into its host's weight; returns the hosts merged (a transaction)."""
        from pefref.runtime.operations import merge

        return merge(self)

    def unmerge(self) -> None:
        """Take this adapter's merge out of its hosts' weights (adapters merged later stay merged)."""
        from pefref.runtime.operations import unmerge

        unmerge(self)

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Within the block the model computes without this adapter (its merges and host updates suspended)."""
        from pefref.runtime.operations import disabled

        with disabled(self):
            yield

    @contextlib.contextmanager
    def inputs(self, task_ids: Any = None) -> Iterator[None]:
        """Within the block the model's calls that pass no ``task_ids`` of their own use these (one task id per
        example, e.g. for ``generate()``); outside it they are as before. Refused when no module reads task ids."""
        from pefref.runtime.patches import _INPUTS

        cell = self.model.__dict__.get(_INPUTS)
        if task_ids is None:
            yield
            return
        if cell is None or not any(k[0] == "call" and k[1] == "task_ids" for _u, e in self.entries for ks in e.reads.values() for k in ks[:1]):
            raise PefrefError(f"adapter {self.name!r}: no module of {self.technique.id!r} reads task ids")
        before = cell.given.get("task_ids")
        cell.given["task_ids"] = torch.as_tensor(task_ids, dtype=torch.long)
        try:
            yield
        finally:
            if before is None:
                cell.given.pop("task_ids", None)
            else:
                cell.given["task_ids"] = before

    # --- removal ----------------------------------------------------------------

    def remove(self) -> nn.Module:
        """Detach every unit, restore host forwards, weights and requires_grad flags; return the model."""
        from pefref.runtime.operations import remove

        return remove(self, ADAPTERS_ATTR)
