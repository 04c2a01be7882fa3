"""Efficiency facts derived per technique: mergeability, latency class, extra sequence
length and extra FLOPs per token.

FLOPs are counted, not estimated: each module is compiled at one placement per
site on the ``meta`` device (nothing allocated) and run under
torch's FlopCounterMode (the difference between two tokens and one, so
work done once per call, such as building a weight from factors, cancels), which counts matrix products and attention (2 FLOPs
per multiply-add; elementwise work is not counted). Prepended positions add
attention work: each token attends to ``n`` more keys in every layer,
``4·n·heads·d_head`` FLOPs per layer. A technique reading a first forward pass
(``pass: first``) is sequential: that pass, the base model's forward, runs before
the real one (its FLOPs, the model's own, are not in the extra FLOPs counted here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.forms import CONCURRENT, SERIAL, Integration, form_of
from pefref.language.hparams import resolve_hyperparameters
from pefref.language.schema import ModelShape, Technique
from pefref.language.shapecheck import stat_shapes
from pefref.language.sizes import eval_scalar, model_sizes, select_layers
from pefref.view.analysis import connected_modules, mergeable_on, technique_mergeability
from pefref.view.params import host_widths, unbound_reads

__all__ = ["Efficiency", "efficiency", "latency_class", "merge_map"]


@dataclass
class Efficiency:
    technique: str
    model: str
    mergeable: bool
    mergeability: str
    latency: str
    extra_tokens: int
    extra_kv_per_layer: int
    flops_per_token: int
    flops_per_token_merged: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge_map(modules: list[Any], catalog: Catalog, family: Any) -> dict[str, bool]:
    """Whether each module folds into its hosts on ``family`` (the derivation the runtime's merge uses)."""
    conn = connected_modules(modules)
    return {m.name: mergeable_on(m, catalog.reference, family, m.name in conn) for m in modules}


def latency_class(modules: list[Any], catalog: Catalog, family: Any) -> str:
    """'none once merged', 'sequential' (extra work on the critical path) or 'parallel', on a model of ``family``."""
    merge = merge_map(modules, catalog, family)
    if all(merge.values()):
        return "none once merged"
    if any(form_of(m).serial and not merge[m.name] for m in modules):
        return SERIAL
    if any(getattr(c, "first_pass", False) for m in modules for c in (getattr(m, "inputs", None) or {}).values()):
        return SERIAL  # a first forward pass of the whole model runs before the real one
    return CONCURRENT


def _count(unit: Any, tokens: int, d_in: int, d_out: int, W: Any, inputs: dict[str, tuple[int, ...]] | None = None,
           published: dict[str, tuple[int, ...]] | None = None, name: str = "", fixed: frozenset[str] = frozenset(),
           calls: dict[str, str] | None = None) -> int:
    """FLOPs of one unit call on ``tokens`` positions; ``inputs``: trailing shapes of its connections (``fixed``:
    those that are whole tensors, a neighbouring host's weight or bias, not sequences), ``calls``: its inputs of the
    model's call (connection -> task_ids or input_ids). A publishing unit's output width is recorded in
    ``published`` under ``name``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    seq = {k: torch.empty(*v, device="meta") if k in fixed else torch.empty(1, tokens, *v, device="meta") for k, v in (inputs or {}).items()}
    for k, what in (calls or {}).items():
        seq[k] = torch.zeros((1,) if what == "task_ids" else (1, tokens), dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = unit(torch.empty(1, tokens, d_in, device="meta"), torch.empty(1, tokens, d_out, device="meta"), W, False, None, seq)
    if published is not None and isinstance(out, tuple):
        published[name] = tuple(out[1].shape[2:])
    return int(counter.get_total_flops())


def _site_tensor(c: Any, fam: Any, catalog: Catalog, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape a connection reads at a site: a hidden state's width (per position), or its host's W [out, in] or b [out]."""
    w_in, w_out = host_widths(c.site, fam, catalog)
    out = int(eval_scalar(w_out, sizes))
    if c.tensor == "W":
        return (out, int(eval_scalar(w_in or w_out, sizes)))
    if c.tensor == "b":
        return (out,)
    return (int(eval_scalar(w_in or w_out, sizes)),) if c.tensor == "x" else (out,)


def _ordered(modules: list[Any]) -> list[Any]:
    """Modules with the modules whose output they read first (connections), else in declaration order."""
    names = {m.name for m in modules}
    done: list[Any] = []
    pending = list(modules)
    while pending:
        ready = [m for m in pending if all(c.module is None or c.module not in names or c.module in {d.name for d in done} or
                                           (c.fallback is not None and c.fallback in {d.name for d in done})
                                           for c in (getattr(m, "inputs", None) or {}).values())]
        ready = ready or pending[:1]
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def efficiency(t: Technique, shape: ModelShape, catalog: Catalog, overrides: dict[str, Any] | None = None) -> Efficiency:
    """Efficiency facts of ``t`` on ``shape`` (FLOPs counted on the meta device; the facts are kept across
    processes by :func:`~pefref.language.catalog_cache.memo`, keyed by everything they are derived from)."""
    from pefref.language.catalog_cache import memo

    fam = catalog.family(shape.family)
    key = [t.model_dump(mode="json"), shape.model_dump(mode="json"), fam.model_dump(mode="json"), catalog.reference.model_dump(mode="json"),
           {k: v.model_dump(mode="json") for k, v in sorted(catalog.techniques.items())}, repr(sorted((overrides or {}).items()))]
    return Efficiency(**memo("efficiency", key, lambda: _efficiency(t, shape, catalog, overrides).as_dict()))


def _efficiency(t: Technique, shape: ModelShape, catalog: Catalog, overrides: dict[str, Any] | None) -> Efficiency:
    import torch

    from pefref.compiler.units import SharedStore, SiteContext, build_unit

    fam = catalog.family(shape.family)
    modules, decl = expand_modules(t, {**catalog.techniques, t.id: t})
    hps = resolve_hyperparameters(decl, overrides)
    sizes = model_sizes(fam, dict(shape.config))
    flags = {"causal": int(fam.causal)}
    merge = merge_map(modules, catalog, fam)
    flops = merged_flops = 0
    extra_tok = extra_kv = 0
    published: dict[str, tuple[int, ...]] = {}  # output widths of modules others read
    for m in _ordered(modules):
        is_merge = merge[m.name]
        for site in m.sites:
            if site not in fam.sites:
                continue
            n_layers = len(select_layers(m.layers, sizes["L"])) if catalog.reference.sites[site].per_layer else 1
            how = form_of(m).integration
            if how is Integration.POSITIONS:
                n = int(eval_scalar(m.length, {**sizes, **hps}))
                if m.tokens is not None:
                    extra_tok += n
                else:
                    extra_kv = max(extra_kv, n)
                continue
            if how in (Integration.PARAMETERS, Integration.WEIGHT):
                continue  # no work per token (a new weight is computed once per step, not per token)
            d_in_e, d_out_e = host_widths(site, fam, catalog)
            d_in = int(eval_scalar(d_in_e, sizes)) if d_in_e else 0
            d_out = int(eval_scalar(d_out_e, sizes))
            ctx = SiteContext(site, 0, d_in, d_out, sizes, flags, torch.float32, "meta",
                              W=torch.empty(d_out, d_in, device="meta") if d_in else None,
                              stats={n: torch.empty(tuple(sh), device="meta") for n, sh in stat_shapes(m, d_in or d_out, d_out).items()})
            conns = getattr(m, "inputs", None) or {}
            if unbound_reads(m, fam):
                continue  # it reads a site this family does not bind: not placed here (apply refuses it), no work
            inputs = {}
            calls = {k: c.call for k, c in conns.items() if c.call is not None}
            for k, c in conns.items():
                src = c.module if c.module in published else c.fallback
                if c.call is not None:
                    continue
                if src in published:
                    inputs[k] = published[src]
                elif c.module is None:
                    inputs[k] = _site_tensor(c, fam, catalog, sizes)
            fixed = frozenset(k for k, c in conns.items() if c.module is None and c.tensor in ("W", "b"))
            unit = build_unit(m, ctx, hps, SharedStore(), publish=form_of(m).publishes)
            per = (_count(unit, 2, d_in or d_out, d_out, ctx.W, inputs, published, m.name, fixed, calls)
                   - _count(unit, 1, d_in or d_out, d_out, ctx.W, inputs, fixed=fixed, calls=calls))
            flops += per * n_layers
            if not is_merge:
                merged_flops += per * n_layers
    attn = 4 * (extra_tok + extra_kv) * sizes["heads"] * sizes["d_head"] * sizes["L"]
    return Efficiency(t.id, shape.name, all(merge.values()), technique_mergeability(modules, catalog.reference), latency_class(modules, catalog, fam),
                      extra_tok, extra_kv, flops + attn, merged_flops + attn)
