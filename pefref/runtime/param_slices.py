"""Raw parameter sites: one slice of a stacked weight (one expert of a mixture-of-experts layer) as a linear host.

A family binds a site to a raw parameter of a module (``{path: ...mlp.experts, parameter: gate_up_proj}``):
a tensor ``[slices, out, in]`` (layout ``out_in``, used as ``h = x W[e]^T``) or ``[slices, in, out]``
(layout ``in_out``) that the module reads directly, with no submodule per slice. Each slice becomes a
:class:`ParameterSlice`, a virtual linear host: units attach to it as to any linear host (one update per
slice). Nothing calls a virtual host, so the owner module's forward is wrapped (:class:`OwnerPatch`): while
any slice carries a running unit, it runs with the stack whose slices are the adapted weights, each read off
the slice's patched map on the identity (``W' = (f(I) - f(0))^T``; exact for the modules that fold into a
weight, the only ones placed here), the parameter itself untouched (shadowed for the call, never replaced).
Merging writes into the slice of the parameter; removing the last unit unwraps the owner.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ParameterSlice", "OwnerPatch", "slice_host", "owner_patch", "release_owner", "virtual_hosts"]

_OWNER = "_pefref_param_owner"
_SLICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int], ParameterSlice]] = weakref.WeakKeyDictionary()


class ParameterSlice(nn.Module):
    """Slice ``index`` of the raw parameter ``name`` of ``owner``, as a linear map ``h = x W^T`` (``W``: [out, in])."""

    def __init__(self, owner: nn.Module, name: str, index: int, layout: Literal["out_in", "in_out"]) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the model's modules and state stay as they are
        self.name, self.index, self.layout = name, index, layout
        w = self.weight
        self.out_features, self.in_features = w.shape

    @property
    def training(self) -> bool:
        """The owner's mode (a virtual host is no submodule, so model.train()/eval() reach it through its owner)."""
        return bool(cast(nn.Module, self.owner).training) if "owner" in self.__dict__ else True

    @training.setter
    def training(self, value: bool) -> None:
        pass

    def raw(self) -> torch.Tensor:
        """The owner's stored parameter (never the stack a running forward shadows it with)."""
        return cast(torch.Tensor, cast(nn.Module, self.owner)._parameters[self.name])

    @property
    def weight(self) -> torch.Tensor:
        w = self.raw()[self.index]
        return w if self.layout == "out_in" else w.t()

    def set_weight(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.raw()[self.index].copy_(value if self.layout == "out_in" else value.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def patch_released(self) -> None:
        """This slice's patch is gone: unwrap the owner if no other slice of it has one."""
        release_owner(self)

    def adapted(self) -> torch.Tensor:
        """This slice's weight as its units leave it ([out, in]), read off its patched map on the identity."""
        w = self.weight
        d_in = w.shape[1]
        probe = torch.cat([torch.zeros(1, d_in, dtype=w.dtype, device=w.device), torch.eye(d_in, dtype=w.dtype, device=w.device)])
        out = self(probe)
        return (out[1:] - out[0]).t()


def _patched(s: ParameterSlice) -> bool:
    """Whether some unit may change this slice now (its forward is patched: not merged, not suspended)."""
    return "forward" in s.__dict__


class OwnerPatch:
    """The replacement forward of a module holding sliced parameters: runs it with its adapted stacks."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.had_instance_forward = "forward" in owner.__dict__
        self.orig = owner.forward
        owner.__dict__["forward"] = self.forward
        owner.__dict__[_OWNER] = self

    def slices(self) -> dict[tuple[str, int], ParameterSlice]:
        return _SLICES.get(self.owner, {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [s for s in self.slices().values() if _patched(s)]
        names = sorted({s.name for s in live})
        if not names:
            return self.orig(*args, **kwargs)
        d = self.owner.__dict__
        try:
            for name in names:
                d[name] = self._stack(name)
            return self.orig(*args, **kwargs)
        finally:
            for name in names:
                d.pop(name, None)

    def _stack(self, name: str) -> torch.Tensor:
        raw = self.owner._parameters[name]
        assert raw is not None
        parts = []
        for e in range(raw.shape[0]):
            s = self.slices().get((name, e))
            if s is None or not _patched(s):
                parts.append(raw[e])
                continue
            w = s.adapted()
            parts.append(w if s.layout == "out_in" else w.t())
        return torch.stack(parts)

    def restore(self) -> None:
        d = self.owner.__dict__
        if self.had_instance_forward:
            d["forward"] = self.orig
        else:
            d.pop("forward", None)
        d.pop(_OWNER, None)


def slice_host(owner: nn.Module, name: str, index: int, layout: Literal["out_in", "in_out"]) -> ParameterSlice:
    """The virtual host of one slice (the same object for the same slice; the model is only read)."""
    table = _SLICES.setdefault(owner, {})
    s = table.get((name, index))
    if s is None or s.layout != layout:
        s = table[(name, index)] = ParameterSlice(owner, name, index, layout)
    return s


def virtual_hosts(owner: nn.Module) -> list[ParameterSlice]:
    """The slice hosts made for ``owner``'s raw parameters (none for most modules)."""
    return list(_SLICES.get(owner, {}).values())


def owner_patch(s: ParameterSlice) -> OwnerPatch:
    """The owner's patch, created on first use."""
    p = s.owner.__dict__.get(_OWNER)
    return p if p is not None else OwnerPatch(cast(nn.Module, s.owner))


def release_owner(s: ParameterSlice) -> None:
    """Unwrap the owner when none of its slices carries a unit any more."""
    p = s.owner.__dict__.get(_OWNER)
    if p is not None and not any(_PATCH_ATTR in x.__dict__ for x in p.slices().values()):
        p.restore()


_PATCH_ATTR = "_pefref_patch"
