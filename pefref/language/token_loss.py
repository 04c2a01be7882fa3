"""Checks of a technique's token loss (``loss:``): the names and ops its expressions read, and the shapes they give
on the reference sizes: one integer per prepended position for the prompt's labels and types, one value per token for
the others."""

from __future__ import annotations

from typing import Any

from pefref.language.errors import Problem
from pefref.language.expr import evaluate, parse_expr
from pefref.language.schema.technique import PrependModule, Technique
from pefref.language.shapecheck import _run
from pefref.language.training import _names, _problem
from pefref.language.yamlsrc import Positions
from pefref.ops import op_table
from pefref.ops.shapes import Shape

__all__ = ["check_loss"]

BATCH, SEQ = 2, 7
"""The example call the per-token expressions are shape-checked on."""


def _prepended(modules: list[Any], hps: dict[str, Any]) -> int | None:
    """The number of positions the modules prepend at the embeddings on the default hyperparameters (None: unknown)."""
    try:
        return sum(int(evaluate(parse_expr(m.length), hps, op_table())) for m in modules
                   if isinstance(m, PrependModule) and m.tokens is not None)
    except Exception:  # a length that does not evaluate is reported by the module's own checks
        return None


def check_loss(t: Technique, modules: list[Any], hps: dict[str, Any], pos: Positions) -> list[Problem]:
    """Located problems of ``t.loss`` (``hps``: the hyperparameters' defaults): the prompt's labels and types give one
    integer per prepended position, the per-token expressions one value per token (broadcast)."""
    loss = t.loss
    if loss is None:
        return []
    found_names = [p for fld, (text, extra) in loss.fields().items()
                   for p in _names(parse_expr(text), set(extra) | set(hps), pos, ("loss", fld), f"the loss's {fld}")]
    if found_names:
        return found_names
    env: dict[str, Any] = {k: Shape((len(v),)) if isinstance(v, (list, tuple)) else v for k, v in hps.items()}
    n = _prepended(modules, hps)
    out: list[Problem] = []
    if n and loss.prompt_types is None:
        out.append(_problem(pos, ("loss",), f"the technique prepends {n} position(s): give their prompt_types"))
    for field in ("prompt_labels", "prompt_types"):
        text = getattr(loss, field)
        if text is None:
            continue
        shape, found = _run(text, env, pos, ("loss", field))
        out += found
        if found or n is None:
            continue
        if not isinstance(shape, Shape) or len(shape) != 1 or shape[0] != n:
            out.append(_problem(pos, ("loss", field), f"gives {_what(shape)}; the technique prepends {n} position(s): give one integer each"))
    token = Shape((BATCH, SEQ))
    for field, extra in (("input_types", {"t": token}), ("keep", {"type": token}), ("weight", {"type": token, "keep": token})):
        shape, found = _run(getattr(loss, field), {**env, **extra}, pos, ("loss", field))
        out += found
        if not found and isinstance(shape, Shape) and len(shape) > 2:
            out.append(_problem(pos, ("loss", field), f"gives {_what(shape)}: one value per token is [batch, seq] at most"))
    return out


def _what(shape: Any) -> str:
    return f"shape {tuple(shape)}" if isinstance(shape, Shape) else "a number" if shape is not None else "no tensor"
