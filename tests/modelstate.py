"""A model's full observable state, to assert that a failed operation changed nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_state(model: nn.Module) -> dict[str, Any]:
    """Parameters and buffers (values, dtypes, requires_grad, identity), instance forwards, hooks and submodule names."""
    out: dict[str, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[f"param:{name}"] = (p.detach().clone(), p.requires_grad, id(p))
    for name, b in model.named_buffers(remove_duplicate=False):
        out[f"buffer:{name}"] = (b.detach().clone(), id(b))
    for name, m in model.named_modules(remove_duplicate=False):
        out[f"forward:{name}"] = m.__dict__.get("forward")
        out[f"hooks:{name}"] = (len(m._forward_hooks), len(m._forward_pre_hooks))
        out[f"extra:{name}"] = sorted(k for k in m.__dict__ if k.startswith("_pefref"))
    out["modules"] = [n for n, _ in model.named_modules(remove_duplicate=False)]
    return out


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-exact equality of two :func:`model_state` results (NaN compare equal to NaN)."""
    assert before.keys() == after.keys(), sorted(set(before) ^ set(after))[:10]
    for k, v in before.items():
        w = after[k]
        if isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            assert v[0].dtype == w[0].dtype and v[0].shape == w[0].shape, k
            assert torch.equal(v[0], w[0]) or (torch.equal(v[0].isnan(), w[0].isnan()) and torch.equal(v[0].nan_to_num(), w[0].nan_to_num())), k
            assert v[1:] == w[1:], k
        else:
            assert v == w, k
