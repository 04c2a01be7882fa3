"""A technique's token loss (``loss:``): the model's causal LM loss replaced by a per-token weighting.

A forward hook on the model reads the call's labels and per-token input (taken out of the call by the model's
input cell, :func:`pefref.runtime.patches.input_cell`), builds the whole sequence's types and labels (the
prepended positions' from the hyperparameters, the input's from the call), and sets ``outputs.loss`` to the
weighted mean of the predicted positions' cross-entropies over those with a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.schema.technique import TokenLoss
from pefref.ops import op_table
from pefref.runtime.patches import _INPUTS

__all__ = ["LossHook", "token_loss_of", "token_loss_in", "weighted_loss"]

IGNORE = -100
"""The label of a position that does not count."""


@dataclass(eq=False)
class LossHook:
    """One adapter's token loss on its model: the declaration, the hyperparameters (ints as int64 tensors), the
    prepended positions' labels and types (None where the technique declares none), and whether it applies now."""

    spec: TokenLoss
    env: dict[str, Any]
    prompt_labels: torch.Tensor | None
    prompt_types: torch.Tensor | None
    active: Any  # () -> bool: the adapter is active (not disabled, not merged)

    def __call__(self, model: nn.Module, _args: Any, output: Any) -> Any:
        cell = model.__dict__.get(_INPUTS)
        labels = None if cell is None else cell.call.get("labels")
        logits = getattr(output, "logits", None)
        if cell is None or labels is None or logits is None or not self.active() or labels.dim() != 2:
            return output
        output.loss = self.loss(logits, labels, cell.call.get(self.spec.call))
        return output

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted mean loss of the model's logits [b, n_pre + n, V] on the call's labels and ``t`` [b, n]."""
        n_pre = logits.shape[1] - labels.shape[1]
        if n_pre != self.prepended:
            raise PefrefError(f"the token loss knows {self.prepended} prepended position(s) but the model's output has {n_pre} more "
                              "than the labels: another adapter prepends positions too")
        targets, weight = self.targets(labels, t)
        return weighted_loss(logits[:, :-1], targets, weight.to(logits.dtype))

    @property
    def prepended(self) -> int:
        return 0 if self.prompt_types is None else self.prompt_types.numel()

    def targets(self, labels: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted positions' labels (-100 where none counts) and weights, [b, n_pre + n - 1] each, of the call's
        labels [b, n] and per-token input ``t`` (the declared default where None)."""
        b, n_in = labels.shape
        n_own, dev = self.prepended, labels.device
        t = torch.full_like(labels, self.spec.default) if t is None else t.to(dev)
        itypes = torch.as_tensor(self._eval("input_types", t=t), device=dev).expand(b, n_in)
        pre_t = (self.prompt_types if self.prompt_types is not None else itypes.new_zeros(0)).to(dev)
        types = torch.cat([pre_t.to(itypes.dtype).expand(b, n_own), itypes], dim=1)
        pre_l = self.prompt_labels if self.prompt_labels is not None else torch.full((n_own,), IGNORE)
        full = torch.cat([pre_l.to(device=dev, dtype=labels.dtype).expand(b, n_own), labels], dim=1)
        keep = torch.as_tensor(self._eval("keep", type=types), device=dev).expand_as(full)
        full = full.masked_fill(keep == 0, IGNORE)
        st, sk = types[:, 1:], keep[:, 1:]  # the predicted positions
        weight = torch.as_tensor(self._eval("weight", type=st, keep=sk), device=dev).to(torch.float32).expand_as(st)
        return full[:, 1:], weight

    def _eval(self, field: str, **tensors: torch.Tensor) -> Any:
        return evaluate(parse_expr(getattr(self.spec, field)), {**self.env, **tensors}, op_table())


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The mean (or sum) over the targets other than -100 of cross-entropy times weight (logits [b, n, V], targets and
    weight [b, n])."""
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none", ignore_index=IGNORE)
    has = targets.reshape(-1) != IGNORE
    terms = ce[has] * weight.reshape(-1)[has]
    return terms.mean() if reduction == "mean" else terms.sum()


def token_loss_of(spec: TokenLoss, hyperparameters: dict[str, Any], active: Any) -> LossHook:
    """The hook of a technique's ``loss:`` with its hyperparameters; the prepended positions' labels and types
    computed now (refused where they are not one integer per position or differ in number)."""
    env = {k: torch.as_tensor(v, dtype=torch.long) if isinstance(v, (list, tuple)) else v for k, v in hyperparameters.items()}
    out: dict[str, torch.Tensor | None] = {}
    for field in ("prompt_labels", "prompt_types"):
        text = getattr(spec, field)
        v = None if text is None else torch.as_tensor(evaluate(parse_expr(text), env, op_table()))
        if v is not None and (v.dim() != 1 or v.is_floating_point()):
            raise PefrefError(f"loss.{field} must give one integer per prepended position, got {tuple(v.shape)} {v.dtype}")
        out[field] = v
    pl, pt = out["prompt_labels"], out["prompt_types"]
    if pl is not None and (pt is None or pl.numel() != pt.numel()):
        raise PefrefError("loss.prompt_labels needs prompt_types with as many positions")
    return LossHook(spec, env, pl, pt, active)


def token_loss_in(adapters: list[Any]) -> LossHook | None:
    """The token loss of the one adapter among ``adapters`` that declares one (None where none does; refused where
    several do: each replaces the model's loss)."""
    hooks = [a.token_loss for a in adapters if getattr(a, "token_loss", None) is not None]
    if len(hooks) > 1:
        raise PefrefError(f"{len(hooks)} adapters declare a token loss (loss:); each replaces the model's loss: apply one")
    return hooks[0] if hooks else None
