"""What a technique does besides its forward pass, written as math: its training-time hooks (``training:``) and
the statistics its modules gather on calibration data (``calibration:``), with the host updates they feed.

Both the diagrams (an annotation on the module a hook acts on, a dashed input for a statistic) and the site's
technique pages (a "Training-time behaviour" and a "Calibration" section) read these; nothing here knows a
technique, only the hooks' and statistics' declared kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pefref.render.mathtext import Math, math_of

__all__ = ["HookView", "StatView", "hooks_of", "stats_of", "STAT_MATH", "HOOK_KIND_TEXT"]

STAT_MATH = {"input_cov": "cov(x)", "output_cov": "cov(h)", "weight_grad": "Σ ∂L/∂W"}
"""A calibration statistic's kind as a paper writes it (x: the host's input, h: its output, W: its weight)."""

_STAT_TEXT = {"input_cov": "covariance of the host's inputs, Σ_b X_bᵀ·X_b",
              "output_cov": "covariance of the host's outputs, Σ_b H_bᵀ·H_b",
              "weight_grad": "gradient of the loss with respect to the host weight, Σ_b ∂L_b/∂W"}

HOOK_KIND_TEXT = {"schedule": "schedule (before each step)", "grad_projection": "gradient projection (after backward)",
                  "after_step": "projection after each optimiser step", "aux_loss": "auxiliary loss (added to the task loss)"}
"""Each hook kind in words, with when it runs."""


@dataclass(frozen=True)
class HookView:
    """One training-time hook: its kind, the module (and tensor) it acts on, and its value as math."""

    kind: str
    kind_text: str
    module: str | None
    tensor: str | None
    lhs: str
    math: Math
    description: str
    weight: str | None = None

    @property
    def short(self) -> Math:
        """``lhs`` and the value as one math line (``∇U ← ∇U − U_h·U_hᵀ·∇U``)."""
        return Math(((self.lhs, ""), *self.math.segments), self.math.source)


@dataclass(frozen=True)
class StatView:
    """One calibration statistic of a module: its name, kind as math and in words, and how it is normalised."""

    module: str
    name: str
    kind: str
    math: str
    text: str
    how: str
    description: str

    @property
    def line(self) -> str:
        """The statistic as the diagram's dashed input writes it: ``C = cov(x) on calibration data``."""
        return f"{self.name} = {self.math} on calibration data"


def _lhs(h: Any) -> tuple[str | None, str | None, str]:
    """The hook's module and tensor, and the left-hand side its value is written with."""
    if h.kind == "schedule":
        mod, _, ten = (h.tensor or "").partition(".")
        return (mod or None), (ten or None), f"{h.name}(step) = "
    if h.kind == "aux_loss":
        return h.module, None, "L += " if h.weight == 1.0 else f"L += {_weight(h.weight)}·{h.reduce} of "
    mod, _, ten = h.tensor.partition(".")
    return mod, ten, (f"∇{ten} ← " if h.kind == "grad_projection" else f"{ten} ← ")


def _weight(w: object) -> str:
    """A hook's weight: a hyperparameter's name as written (``orth_reg_weight``), else the expression as math."""
    return str(w) if str(w).isidentifier() else math_of(w).plain()


def hooks_of(t: Any) -> list[HookView]:
    """The technique's ``training:`` hooks, in their order, as math (``grad`` written ``∇`` + the tensor's name)."""
    out = []
    for h in getattr(t, "training", None) or []:
        mod, ten, lhs = _lhs(h)
        value = " ".join(str(h.value).split())
        math = math_of(value)
        if ten is not None:
            math = Math(tuple((s.replace("grad", f"∇{ten}") if k == "" else s, k) for s, k in math.segments), value)
        weight = None if h.kind != "aux_loss" else _weight(h.weight)
        out.append(HookView(h.kind, HOOK_KIND_TEXT.get(h.kind, h.kind), mod, ten, lhs, math, h.description, weight))
    return out


def stats_of(modules: list[Any]) -> list[StatView]:
    """Every module's calibration statistics, in the modules' order."""
    out = []
    for m in modules:
        for name, s in (getattr(m, "calibration", None) or {}).items():
            how = ", ".join(x for x in (
                "each batch divided by its largest value" if s.normalise == "batch_max" else "",
                {"batches": "averaged over batches", "tokens": "averaged over tokens", "none": "summed"}[s.average]) if x)
            out.append(StatView(str(m.name), str(name), s.kind, STAT_MATH.get(s.kind, s.kind), _STAT_TEXT.get(s.kind, s.kind),
                                how, s.description))
    return out
