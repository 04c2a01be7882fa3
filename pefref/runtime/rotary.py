"""Sites after the rotary position embedding: queries and keys as attention reads them.

Rotary embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864) rotate each
head's query and key features by angles set by the position. No module returns
the rotated tensors, so a site bound with ``rotary:`` (see
:class:`pefref.language.schema.family.RotarySpec`) is read at its projection: a
pre-hook on the module the family calls with the embedding keeps its ``(cos,
sin)`` in a :class:`RotaryCell`, and the projection's patch gives the units at
the site :meth:`RotaryCell.rotate` of its output, leaving the output itself as
it is (nothing attaches to such a site; connections read it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pefref.language.errors import PefrefError

__all__ = ["RotaryCell", "keep_rotary"]


@dataclass(eq=False)
class RotaryCell:
    """The rotary embedding a layer's attention was last called with, and how to rotate by it."""

    d_head: int
    where: str  # the module called with the embedding (for errors)
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def rotate(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [batch, seq, heads * d_head] rotated per head: :math:`h \\cos + \\mathrm{rotate\\_half}(h) \\sin`
        (a partial rotary embedding, cos narrower than a head, rotates the head's first features only)."""
        if self.cos_sin is None:
            raise PefrefError(f"{self.where} has not been called with its rotary embedding in this forward pass")
        cos, sin = self.cos_sin  # [batch, seq, r]
        *lead, w = h.shape
        hh = h.reshape(*lead, w // self.d_head, self.d_head)  # [batch, seq, heads, d_head]
        r = cos.shape[-1]
        part, rest = hh[..., :r], hh[..., r:]
        rot = torch.cat((-part[..., r // 2:], part[..., : r // 2]), dim=-1)
        out = part * cos.unsqueeze(-2) + rot * sin.unsqueeze(-2)
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.reshape(*lead, w)


def keep_rotary(module: nn.Module, argument: str, cell: RotaryCell) -> Any:
    """A forward pre-hook on ``module`` that keeps its ``argument`` (cos, sin) in ``cell``; returns its handle."""
    sig = inspect.signature(module.forward)

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = kwargs.get(argument)
        if value is None and args:
            value = sig.bind_partial(*args, **kwargs).arguments.get(argument)
        if value is None:
            raise PefrefError(f"{cell.where} was called without its rotary embedding {argument!r}")
        cell.cos_sin = (value[0], value[1])

    return module.register_forward_pre_hook(hook, with_kwargs=True)
