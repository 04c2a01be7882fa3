"""What a technique does besides its forward pass, written as math: its training-time hooks (``training:``) and
the statistics its modules gather on calibration data (``calibration:``), with the host updates they feed.

Both the diagrams (an annotation on the module a hook acts on, a dashed input for a statistic) and the site's
technique pages (a "Training-time behaviour" and a "Calibration" section) read these; nothing here knows a
technique, only the hooks' and statistics' declared kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pefref.render.mathtext import Math, math_of
from pefref.view.typology import HOOK_LABELS

__all__ = ["HookView", "InputView", "LossView", "StatView", "hooks_of", "inputs_of", "loss_of", "stats_of", "STAT_MATH", "HOOK_KIND_TEXT"]

STAT_MATH = {"input_cov": "cov(x)", "output_cov": "cov(h)", "weight_grad": "Σ ∂L/∂W", "input_pca": "pca(x)", "input_ipca": "ipca(x)"}
"""A calibration statistic's kind as a paper writes it (x: the host's input, h: its output, W: its weight)."""

_STAT_TEXT = {"input_cov": "covariance of the host's inputs X, Xᵀ·X summed over the batches",
              "output_cov": "covariance of the host's outputs H, Hᵀ·H summed over the batches",
              "weight_grad": "gradient of the loss with respect to the host weight, ∂L/∂W summed over the batches",
              "input_pca": "principal axes of the host's centred inputs over all calibration tokens, largest variance first",
              "input_ipca": "leading principal axes of the host's inputs by an incremental PCA updated batch by batch (padding left out), "
                            "the batches cycled until consecutive estimates agree"}

_WHEN = {"schedule": "before each step", "grad_projection": "after backward", "after_step": "after each optimiser step",
         "aux_loss": "added to the task loss", "state": "updated at its steps", "mask": "over every unit, at its steps"}
HOOK_KIND_TEXT = {k: f"{label} ({_WHEN[k]})" for k, label in HOOK_LABELS.items()}
"""Each hook kind in words (the typology's label), with when it runs."""


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
    def label(self) -> str:
        """The kind in a few words, as the diagram's annotation writes it: ``training: gradient projection``."""
        return f"training: {HOOK_LABELS.get(self.kind, self.kind)}"

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
    if h.kind == "state":
        return mod, ten, f"{h.name} ← "
    if h.kind == "mask":
        what = ", ".join([ten, *h.also])
        act = "frozen" if getattr(h, "effect", "zero") == "freeze" else "← 0"
        return mod, ten, f"{what} {act} outside the {math_of(h.keep).plain()} highest scores of all units; score = "
    return mod, ten, (f"∇{ten} ← " if h.kind == "grad_projection" else f"{ten} ← ")


def _weight(w: object) -> str:
    """A hook's weight: a hyperparameter's name as written (``orth_reg_weight``), else the expression as math."""
    return str(w) if str(w).isidentifier() else math_of(w).plain()


def hooks_of(t: Any) -> list[HookView]:
    """The technique's ``training:`` hooks, in their order, as math (``grad`` written ``∇`` + the tensor's name)."""
    out = []
    hooks = list(getattr(t, "training", None) or [])
    for h in hooks:
        mod, ten, lhs = _lhs(h)
        if mod is None and h.kind == "schedule":
            mod = _reader_module(h.name, hooks)
        value = " ".join(str(h.score if h.kind == "mask" else h.value).split())
        math = math_of(value)
        if ten is not None:
            math = Math(tuple((s.replace("grad", f"∇{ten}") if k == "" else s, k) for s, k in math.segments), value)
        weight = None if h.kind != "aux_loss" else _weight(h.weight)
        out.append(HookView(h.kind, HOOK_KIND_TEXT.get(h.kind, h.kind), mod, ten, lhs, math, h.description, weight))
    return out


@dataclass(frozen=True)
class LossView:
    """A technique's token loss (``loss:``): the call input it reads, where labels count and each position's weight."""

    call: str
    default: int
    keep: Math
    weight: Math
    description: str


def loss_of(t: Any) -> LossView | None:
    """The technique's ``loss:`` as math, or None when it keeps the model's own loss."""
    loss = getattr(t, "loss", None)
    if loss is None:
        return None
    return LossView(loss.call, loss.default, math_of(" ".join(loss.keep.split())), math_of(" ".join(loss.weight.split())),
                    loss.description)


def _reader_module(name: str, hooks: list[Any]) -> str | None:
    """The module of the first hook whose expressions read the schedule ``name`` (where a schedule that writes no
    tensor is drawn), or None when only the loss weight or nothing reads it."""
    word = re.compile(rf"\b{re.escape(name)}\b")
    for h in hooks:
        mod = getattr(h, "module", None) or (getattr(h, "tensor", None) or "").partition(".")[0]
        texts = (getattr(h, f, None) for f in ("value", "score", "keep", "weight"))
        if mod and h.kind != "schedule" and any(word.search(str(x)) for x in texts if x is not None):
            return str(mod)
    return None


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


@dataclass(frozen=True)
class InputView:
    """One named input a module reads besides its site's own tensors: an input of the model's call (task ids, token
    ids), another site's hidden state or frozen weight, or another module's output."""

    module: str
    name: str
    source: str
    call: bool


def _source(c: Any) -> str:
    if c.call is not None:
        default = f", task {c.default} where the call gives none" if c.default is not None else ""
        return f"the model's call: {c.call}=" + ("[batch]" if c.call == "task_ids" else "[batch, seq]") + default
    layer = "" if c.layer == "same" else f" ({c.layer} layer)"
    if c.module is not None:
        return f"the output of module {c.module}" + (f" at {c.site}" if c.site else "") + layer
    what = {"x": "input x", "h": "output h", "W": "frozen weight W", "b": "bias b"}[c.tensor]
    return f"the {what} of site {c.site}" + layer


def inputs_of(modules: list[Any]) -> list[InputView]:
    """Every module's ``inputs:`` connections, in the modules' order, each with where it reads from."""
    return [InputView(str(m.name), str(name), _source(c), c.call is not None)
            for m in modules for name, c in (getattr(m, "inputs", None) or {}).items()]
