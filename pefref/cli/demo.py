"""The main job on the embedded defaults: every technique applied to a small model and exercised."""

from __future__ import annotations

from typing import Any, cast

from pefref.language.catalog import Catalog

__all__ = ["run_demo"]


def run_demo(catalog: Catalog, shape: str = "tiny-ref") -> list[dict[str, Any]]:
    """Apply each technique to a fresh ``shape`` model: count, run, perturb (its trained tensors, and its frozen
    ones where those alone leave the output unchanged), merge (when derived mergeable) and remove, measuring
    each step against the base model's output. A hyperparameter that
    is a sequence of integers (token ids, e.g. an invocation) is given a token of the demo's input."""
    import torch

    fam = catalog.family(catalog.shape(shape).family)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = [_exercise(catalog, catalog.techniques[tid], shape, fam, ids) for tid in sorted(catalog.techniques)]
    return [r for r in rows if r is not None]


def _exercise(catalog: Catalog, t: Any, shape: str, fam: Any, ids: Any) -> dict[str, Any] | None:
    import torch

    from pefref.language.check import expand_modules
    from pefref.models.build import applicable, build_model
    from pefref.runtime.api import apply
    from pefref.runtime.calibration import random_batches
    from pefref.view.analysis import modules_mergeable

    modules, _ = expand_modules(t, catalog.techniques)
    if not applicable(modules, fam):
        return None
    model = build_model(shape, catalog)
    n = ids.shape[1]
    base = _logits(model(input_ids=ids))
    tokens: dict[str, Any] = {k: (int(ids[0, 3]),) for k, hp in t.hyperparameters.items() if hp.type == "ints"}
    a = apply(model, t, catalog=catalog, overrides=tokens, calibration=random_batches(model, 4))  # data-initialised techniques: random tokens
    at_init = _logits(model(input_ids=ids))[:, -n:]
    g = torch.Generator().manual_seed(1)
    for p in a.trainable_parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    adapted = _logits(model(input_ids=ids))[:, -n:]
    if torch.equal(adapted, at_init):  # it acts through frozen tensors (a technique that trains nothing; a router over experts starting at zero)
        for q in a.units.buffers():
            if q.is_floating_point():
                q.add_(torch.randn(q.shape, generator=g) * 0.02)
        adapted = _logits(model(input_ids=ids))[:, -n:]
    is_merge = modules_mergeable(modules, catalog.reference, fam)
    merge_diff = None
    if is_merge:
        a.merge()
        merge_diff = float((_logits(model(input_ids=ids))[:, -n:] - adapted).abs().max())
    rep = cast(Any, a.report)
    a.remove()
    return {
        "id": t.id,
        "trainable": rep.trainable,
        "percent": rep.percent,
        "identity_at_init": t.identity_at_init,
        "init_diff": float((at_init - base).abs().max()),
        "adapted_diff": float((adapted - base).abs().max()),
        "mergeable": is_merge,
        "merge_diff": merge_diff,
        "removed_diff": float((_logits(model(input_ids=ids)) - base).abs().max()),
    }


def _logits(out: Any) -> Any:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
