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
from pefref.runtime.precision import LOW_PRECISION, in_fp32
from pefref.runtime.patches import Entry, HostPatch
from pefref.runtime.report import Report
from pefref.language.schema import ArchitectureMap, Technique

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
    _frozen: dict[str, bool] = field(default_factory=dict)
    _host_backup: dict[str, torch.Tensor] = field(default_factory=dict)
    _merge_backup: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)
    _removed: bool = False

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
                ps = spec.params.get(pname) if spec is not None else None
                scale = 1.0 if ps is None else eval_scalar(ps.lr_scale, dict(self.hyperparameters)) if isinstance(ps.lr_scale, str) else ps.lr_scale
                add(f"{key}.{pname}", p, scale, None if ps is None else ps.weight_decay)
        for name, p in self.selected.items():
            add(f"host.{name}", p, 1.0, None)
        return list(groups.values())

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
        """Copy an adapter state into this adapter (keys must match exactly)."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PefrefError(f"adapter state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, t in own.items():
                if tuple(state[k].shape) != tuple(t.shape):
                    raise PefrefError(f"adapter state {k}: shape {tuple(state[k].shape)} != {tuple(t.shape)}")
                t.copy_(state[k])

    def save(self, path: str | Path) -> None:
        """Save the adapter state as safetensors (technique and hyperparameters as metadata), atomically."""
        import json

        from safetensors.torch import save

        from pefref.language.atomic import atomic_write_bytes

        meta = {"technique": self.technique.id, "hyperparameters": json.dumps(self.hyperparameters, sort_keys=True)}
        data = save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, metadata=meta)
        atomic_write_bytes(path, data)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``),
        so that ``peft.PeftModel.from_pretrained(base, directory)`` computes the same; see :mod:`pefref.interop`."""
        from pefref.interop.peft_format import save_pretrained  # the interop layer builds on this handle

        return save_pretrained(self, directory)

    def load(self, path: str | Path) -> None:
        """Load adapter state saved by :meth:`save`."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))

    # --- merge ----------------------------------------------------------------

    def merge(self) -> list[str]:
        """Fold every mergeable unit into its host's weight; returns the hosts merged.

        The adapted host is an affine map of its input when its modules are
        mergeable, so its merged weight and bias are read off by running it on
        the identity: ``W' = (f(I) - f(0))^T`` and ``b' = f(0)``.
        """
        if self.merged:
            return []
        merged: list[str] = []
        hosts: dict[int, tuple[Any, list[Entry]]] = {}
        for patch, e in self.entries:
            if isinstance(patch, HostPatch) and e.unit_key in self.mergeable_units:
                hosts.setdefault(id(patch), (patch, []))[1].append(e)
        unmergeable = [k for k in self.units if k not in self.mergeable_units]
        if unmergeable:
            raise PefrefError(f"{self.technique.id}: modules that cannot be merged: {', '.join(unmergeable[:4])}")
        with torch.no_grad():
            for patch, es in hosts.values():
                host, kind = patch.host, patch.kind
                W = kind.get_weight(host)
                d_in = W.shape[1]
                with in_fp32(host, *(e.unit for e in es)):  # bf16/fp16 hosts: computed in fp32, rounded once below
                    dt = torch.float32 if W.dtype in LOW_PRECISION else W.dtype
                    probe = torch.cat([torch.zeros(1, d_in, dtype=dt, device=W.device), torch.eye(d_in, dtype=dt, device=W.device)])
                    was = host.training
                    host.eval()
                    out = patch.run(es, (probe,), {})
                    host.train(was)
                    b_new = out[0]
                    W_new = (out[1:] - b_new).t().to(W.dtype)
                bias = getattr(host, "bias", None)
                self._merge_backup.append((patch, W.detach().clone(), None if bias is None else bias.detach().clone()))
                if bias is None and b_new.abs().max() > 0:
                    raise PefrefError(f"cannot merge into {type(host).__name__} without a bias: the adapted map has an offset")
                kind.set_weight(host, W_new)
                if bias is not None:
                    bias.copy_(b_new)
                merged.append(type(host).__name__)
        self.merged = True
        for patch, _es in hosts.values():  # merged means gone: a host whose entries are all merged runs its own forward
            patch.settle()
        return merged

    def unmerge(self) -> None:
        """Restore the host weights saved by :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            for patch, W, b in reversed(self._merge_backup):
                patch.resume()
                patch.kind.set_weight(patch.host, W)
                if b is not None:
                    patch.host.bias.copy_(b)
        self._merge_backup.clear()
        self.merged = False

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Within the block the model computes as the base model (merged weights are restored meanwhile)."""
        was_merged = self.merged
        self.unmerge()
        prev = self.enabled
        self.enabled = False
        saved = {}
        with torch.no_grad():
            for name, t in self._host_backup.items():
                p = self.model.get_parameter(name)
                saved[name] = p.detach().clone()
                p.copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in saved.items():
                    self.model.get_parameter(name).copy_(t)
            self.enabled = prev
            if was_merged:
                self.merge()

    # --- removal ----------------------------------------------------------------

    def remove(self) -> nn.Module:
        """Detach every unit, restore host forwards, weights and requires_grad flags; return the model."""
        if self._removed:
            return self.model
        self.unmerge()
        with torch.no_grad():
            for name, t in self._host_backup.items():
                self.model.get_parameter(name).copy_(t)
        for patch, e in self.entries:
            patch.entries.remove(e)
            if not patch.entries:
                patch.restore()
            elif isinstance(patch, HostPatch):
                patch.settle()
        for hk in self._hooks:
            hk.remove()
        container = getattr(self.model, ADAPTERS_ATTR, None)
        if container is not None and self.name in container:
            del container[self.name]
            if len(container) == 0:
                delattr(self.model, ADAPTERS_ATTR)
        for name, p in self.model.named_parameters():
            if name in self._frozen:
                p.requires_grad_(self._frozen[name])
        self._removed = True
        return self.model
