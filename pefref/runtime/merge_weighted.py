"""Weighted merging of low-rank adapters into a new adapter (as peft's ``add_weighted_adapter``).

A *low-rank* unit is recognised from structure, whatever technique it belongs
to: a parallel module whose computation is ``linear(linear(x, A), B)`` (input
dropout allowed) and whose integration is ``h + c * delta`` with ``c`` a
constant of the hyperparameters, so that its update is ``ΔW = c · B A``
(:func:`pefref.view.analysis.low_rank_factors`). Given such adapters placed at
the same hosts and weights ``w_i``, the new adapter holds, at every host, a
plain low-rank update ``B' A'`` (scale 1) computed as:

* ``cat``: ``A' = [w_1 c_1 A_1; …]``, ``B' = [B_1, …]`` (rank Σ r_i; exact: ``B'A' = Σ w_i ΔW_i``);
* ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: ``A'`` and ``B'``
  merged separately from the factors, with weights ``±sqrt(|w_i c_i|)`` on A and
  ``sqrt(|w_i c_i|)`` on B (all ranks equal);
* ``svd`` and ``*_svd``: the merged ``ΔW`` (task arithmetic, TIES, DARE or
  magnitude pruning over ``ΔW_i`` weighted by ``w_i``) truncated to ``svd_rank``
  by an SVD, ``B' = U_r S_r``, ``A' = V_r^T``.

TIES: Yadav et al. 2023, https://arxiv.org/abs/2306.01708 (trim, elect sign,
disjoint mean); DARE: Yu et al. 2023, https://arxiv.org/abs/2311.03099 (drop at
random with probability ``1 - density``, rescale by ``1 / density``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pefref.compiler.parts import read
from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import DELTA_FORM
from pefref.language.schema import Technique
from pefref.language.sizes import scalar_ops
from pefref.runtime.adapter import Adapter
from pefref.view.analysis import low_rank_factors

__all__ = ["add_weighted_adapter", "COMBINATIONS", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")


def _weighted(ts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ts * w.view(w.shape + (1,) * (ts.dim() - w.dim()))


def task_arithmetic(tensors: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i T_i``."""
    return _weighted(torch.stack(list(tensors)), w).sum(0)


def _magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (TIES' trim step)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide by it."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _disjoint(ts: torch.Tensor, w: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' elect-sign and disjoint mean over stacked tensors ``ts`` weighted by ``w``."""
    sign = ts.sign()
    mass = ts.sum(0) if method == "total" else sign.sum(0)
    keep = sign == torch.where(mass >= 0, 1, -1)
    return (_weighted(ts, w) * keep).sum(0) / torch.clamp(keep.sum(0), min=1.0)


def magnitude_prune(tensors: Sequence[torch.Tensor], w: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([_magnitude(t, density) for t in tensors], w)


def ties(tensors: Sequence[torch.Tensor], w: torch.Tensor, density: float, method: str = "total") -> torch.Tensor:
    return _disjoint(torch.stack([_magnitude(t, density) for t in tensors]), w, method)


def dare_linear(tensors: Sequence[torch.Tensor], w: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([_random(t, density) for t in tensors], w)


def dare_ties(tensors: Sequence[torch.Tensor], w: torch.Tensor, density: float, method: str = "total") -> torch.Tensor:
    return _disjoint(torch.stack([_random(t, density) for t in tensors]), w, method)


def _merge(kind: str, tensors: list[torch.Tensor], w: torch.Tensor, density: float | None, method: str) -> torch.Tensor:
    if kind == "linear":
        return task_arithmetic(tensors, w)
    if density is None:
        raise PefrefError(f"combination {kind!r} needs density= (the fraction of entries kept)")
    if kind == "ties":
        return ties(tensors, w, density, method)
    if kind == "dare_linear":
        return dare_linear(tensors, w, density)
    if kind == "dare_ties":
        return dare_ties(tensors, w, density, method)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, w, density)
    raise PefrefError(f"unknown combination {kind!r}")


def _factors(ad: Adapter) -> dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor, float]]:
    """(site, layer) → (A, B, c) for every unit of a low-rank adapter."""
    out: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for _patch, e in ad.entries:
        m = ad.unit_modules.get(e.unit_key)
        lr = low_rank_factors(m) if m is not None else None
        if lr is None:
            raise PefrefError(f"adapter {ad.name!r}: module {getattr(m, 'name', e.unit_key)!r} is not a low-rank update "
                              "(a parallel module computing linear(linear(x, A), B), integrated as h + c * delta)")
        a, b, scale = lr
        c = float(evaluate(parse_expr(scale), {**ad.sizes, **ad.hyperparameters}, scalar_ops()))
        out[(e.site, e.layer)] = (read(e.unit, a).detach(), read(e.unit, b).detach(), c)
    if ad.selected:
        raise PefrefError(f"adapter {ad.name!r} also selects host tensors; only low-rank updates can be merged")
    return out


def _technique_for(name: str, hosts: dict[str, list[int | None]], template: Technique, rank: int) -> Technique:
    """A technique with one plain low-rank module per site (at the merged layers)."""
    modules = []
    for site, layers in hosts.items():
        modules.append({
            "name": "merged_" + site.replace(".", "_"), "sites": [site], "form": DELTA_FORM.name,
            "layers": "all" if layers == [None] else sorted(int(i) for i in layers if i is not None),
            "params": {"A": {"shape": ["r", "d_in"], "init": "zeros()"}, "B": {"shape": ["d_out", "r"], "init": "zeros()"}},
            "compute": "linear(linear(x, A), B)", "integrate": "h + delta",
        })
    tid = re.sub(r"[^a-z0-9_]", "_", name.lower())
    tid = tid if re.match(r"^[a-z]", tid) else f"merged_{tid}"
    return Technique.model_validate({
        "id": tid, "name": f"weighted merge {name}", "paper": template.paper.model_dump(exclude_none=True),
        "summary": "low-rank adapters merged by add_weighted_adapter", "hyperparameters": {"r": {"type": "int", "default": rank, "min": 1}},
        "modules": modules,
    })


def add_weighted_adapter(model: nn.Module, adapters: Sequence[Adapter], weights: Sequence[float], name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> Adapter:
    """Merge low-rank ``adapters`` with ``weights`` into a new adapter ``name`` (applied to ``model``, active).

    ``combination_type`` is one of :data:`COMBINATIONS` (peft's names and
    semantics). ``density``: fraction of entries kept by TIES, DARE and
    magnitude pruning; ``svd_rank``: rank of an SVD merge (default: the
    largest rank); ``svd_clamp``: a quantile at which the SVD factors are clamped.
    """
    from pefref.language.catalog import default_catalog
    from pefref.runtime.applying import apply_technique

    if combination_type not in COMBINATIONS:
        raise PefrefError(f"unknown combination_type {combination_type!r} (one of {', '.join(COMBINATIONS)})")
    if len(adapters) != len(weights) or not adapters:
        raise PefrefError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if majority_sign_method not in ("total", "frequency"):
        raise PefrefError(f"majority_sign_method must be 'total' or 'frequency', found {majority_sign_method!r}")
    facs = [_factors(ad) for ad in adapters]
    ranks = [max(a.shape[0] for a, _b, _c in f.values()) for f in facs]
    if combination_type == "cat":
        rank = sum(ranks)
    elif combination_type.endswith("svd"):
        rank = svd_rank or max(ranks)
    else:
        if len(set(ranks)) > 1:
            raise PefrefError(f"combination {combination_type!r} needs adapters of one rank (found {ranks}); use 'cat' or an svd combination")
        rank = ranks[0]
    # hosts in the model's module order (the order peft visits them: random pruning draws in this order)
    order = {id(m): k for k, m in enumerate(model.modules())}
    keys: dict[tuple[str, int | None], int] = {}
    for ad in adapters:
        for patch, e in ad.entries:
            key = (e.site, e.layer)
            keys[key] = min(keys.get(key, 1 << 60), order.get(id(patch.host), 0) * 4096 + e.start)
    hosts: dict[str, list[int | None]] = {}
    for site, layer in sorted(keys, key=keys.__getitem__):
        hosts.setdefault(site, []).append(layer)
    new = apply_technique(model, _technique_for(name, hosts, adapters[0].technique, rank), default_catalog(), name=name, family=adapters[0].family)
    units = {(e.site, e.layer): e.unit for _p, e in new.entries}
    with torch.no_grad():
        for key in sorted(keys, key=keys.__getitem__):
            here = [(f[key], w) for f, w in zip(facs, weights) if key in f]
            A_new, B_new = _combine(combination_type, here, rank, density, majority_sign_method, svd_clamp)
            unit: Any = units[key]
            unit.A.zero_()
            unit.B.zero_()
            unit.A[: A_new.shape[0]] = A_new.to(unit.A.dtype)
            unit.B[:, : B_new.shape[1]] = B_new.to(unit.B.dtype)
    return new


def _combine(kind: str, here: list[tuple[tuple[torch.Tensor, torch.Tensor, float], float]], rank: int, density: float | None,
             method: str, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "cat":
        return torch.cat([A * w * c for (A, _B, c), w in here], 0), torch.cat([B for (_A, B, _c), _w in here], 1)
    if kind.endswith("svd"):
        deltas = [c * B @ A for (A, B, c), _w in here]
        w = torch.tensor([w for _f, w in here], dtype=deltas[0].dtype)
        base = kind[: -len("_svd")] if kind != "svd" else "linear"
        dW = _merge(base, deltas, w, density, method)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=True)
        U = U[:, :rank] @ torch.diag(S[:rank])
        Vh = Vh[:rank, :]
        if clamp is not None:
            hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        return Vh, U
    wa = torch.tensor([math.sqrt(abs(w * c)) * (1 if w * c >= 0 else -1) for (_A, _B, c), w in here])
    wb = torch.tensor([math.sqrt(abs(w * c)) for (_A, _B, c), w in here])
    A = _merge(kind, [A for (A, _B, _c), _w in here], wa.to(here[0][0][0].dtype), density, method)
    B = _merge(kind, [B for (_A, B, _c), _w in here], wb.to(here[0][0][0].dtype), density, method)
    return A, B
