"""What apply checks before it touches a model: placements, shapes, budgets, units and host updates.

:func:`plan_apply` resolves every tensor's shape (bounded) and the allocation
it implies, and refuses an allocation over the budget of
:mod:`pefref.language.limits` before anything is allocated.
:func:`check_unit` runs each built unit once on a small probe input and checks
that what it returns fits its host (a ``compute`` whose width differs from the
host's output, a weight of another shape), and that its tensors are finite;
:func:`host_update_of` computes a new host weight without writing it. Errors
name the technique, module, site, layer and module path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pefref.compiler.units import SharedStore, SiteContext, Unit, recipe
from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import Integration, form_of
from pefref.language.hparams import share_run
from pefref.language.limits import current, format_bytes
from pefref.language.shapecheck import expression_cost
from pefref.runtime.hosts import bias_of
from pefref.runtime.inject import Placement
from pefref.runtime.ledger import all_ledgers
from pefref.runtime.precision import adapter_dtype_for
from pefref.runtime.rows import replace as replace_rows
from pefref.runtime.rows import take as take_rows
from pefref.runtime.transaction import located

__all__ = ["Plan", "plan_apply", "where_of", "check_unit", "host_update_of", "check_selectable"]


def where_of(tech: Any, pl: Placement) -> str:
    """``technique.module at path (site, layer i)``, for error messages."""
    layer = "" if pl.layer is None else f", layer {pl.layer}"
    return f"{tech.id}.{pl.module.name} at {pl.path} ({pl.site}{layer})"


@dataclass
class Plan:
    """The site contexts of every placement, the shapes of shared tensors and the bytes apply allocates."""

    contexts: list[SiteContext] = field(default_factory=list)
    shared_shapes: dict[tuple[Any, ...], tuple[int, ...]] = field(default_factory=dict)
    nbytes: int = 0
    peak: int = 0
    """Bytes at the peak: what apply keeps plus the largest transient (an initialiser's SVD, an intermediate)."""


def _itemsize(dtype: torch.dtype) -> int:
    return int(dtype.itemsize)


def _layer_positions(places: list[Placement]) -> dict[int, int]:
    """Each per-layer placement's position among the layers its module is placed at on its site (by ``id``)."""
    layers: dict[tuple[str, str], list[int]] = {}
    for pl in places:
        if pl.layer is not None:
            layers.setdefault((pl.module.name, pl.scope), []).append(pl.layer)
    return {id(pl): sorted(set(layers[(pl.module.name, pl.scope)])).index(pl.layer) for pl in places if pl.layer is not None}


def _model_positions(model: nn.Module, places: list[Placement]) -> dict[int, tuple[int, int]]:
    """Each placement's (position among its module's placements in the model's module order, their number), by ``id``."""
    order = {name: i for i, (name, _m) in enumerate(model.named_modules())}
    by_module: dict[str, list[Placement]] = {}
    for pl in places:
        by_module.setdefault(pl.module.name, []).append(pl)
    out: dict[int, tuple[int, int]] = {}
    for pls in by_module.values():
        ranked = sorted(pls, key=lambda p: (order.get(p.path, len(order)), p.slice_index or 0))
        out |= {id(p): (i, len(ranked)) for i, p in enumerate(ranked)}
    return out


def plan_apply(tech: Any, model: nn.Module, places: list[Placement], sizes: Mapping[str, int], flags: Mapping[str, int],
               hps: Mapping[str, Any], dtype: torch.dtype | None, device: torch.device | str | None, adapter_dtype: str = "auto") -> Plan:
    """Contexts and shapes of every placement, checked against the allocation budget (nothing allocated);
    the adapter's dtype follows :func:`~pefref.runtime.precision.adapter_dtype_for`."""
    plan = Plan()
    dtypes: dict[tuple[Any, ...], torch.dtype] = {}
    extra = 0
    transient, transient_at = 0, ""
    walked: set[tuple[Any, ...]] = set()
    positions = _layer_positions(places)
    order = _model_positions(model, places)
    for pl in places:
        with located(where_of(tech, pl)):
            W = pl.kind.get_weight(pl.host) if pl.kind.has_weight and pl.binding.side == "module" else None  # type: ignore[misc]
            ref_t = W if W is not None else next(pl.host.parameters(), None)
            host_dt = ref_t.dtype if ref_t is not None and ref_t.is_floating_point() else torch.float32
            ctx = SiteContext(pl.scope, pl.layer, pl.d_in, pl.d_out, sizes, flags,
                              dtype=adapter_dtype_for(host_dt, adapter_dtype, dtype), host_dtype=host_dt,
                              device=device or (ref_t.device if ref_t is not None else "cpu"), layer_pos=positions.get(id(pl)),
                              place_pos=order[id(pl)][0], place_count=order[id(pl)][1])
            names = ctx.names(hps)
            rec = recipe(pl.module, names)
            for tr in rec.tensors:
                pname, spec, shp = tr.name, tr.spec, tr.shape
                owner, tname = spec.owner(pl.module.name, pname)
                key = SharedStore.key(owner, tname, spec.shared, pl.scope, pl.layer, spec.stacked, share_run(spec, ctx.layer_pos, ctx.place_pos, ctx.place_count, names))
                if spec.stacked != "none":  # one slice per placement at this site
                    prev = plan.shared_shapes.get(key)
                    plan.shared_shapes[key] = (1, *shp) if prev is None else (prev[0] + 1, *(max(a, b) for a, b in zip(prev[1:], shp)))
                    dtypes.setdefault(key, ctx.dtype)
                    continue
                prev = plan.shared_shapes.get(key, shp)
                if len(prev) != len(shp):
                    raise PefrefError(f"{pname}: shared tensor has different ranks at different sites")
                plan.shared_shapes[key] = tuple(max(a, b) for a, b in zip(prev, shp))
                dtypes.setdefault(key, ctx.dtype)
            if pl.module.host_update is not None and W is not None:
                extra += 3 * W.numel() * W.element_size()  # the new weight, and the ledger's copies before and after
            w_shape = None if W is None else (pl.d_out, *W.shape[1:]) if pl.size else tuple(W.shape)  # a sliced site sees its rows
            key = (pl.module.name, pl.d_in, pl.d_out, w_shape)  # the other names are the same at every placement
            if str(ctx.device) != "meta" and key not in walked:  # nothing is computed on the meta device
                walked.add(key)
                shapes = {tr.name: tr.shape for tr in rec.tensors}
                for fld, tally in expression_cost(pl.module, names, pl.d_in, pl.d_out, w_shape, shapes):
                    nb = tally.total * max(_itemsize(ctx.dtype), 4)  # initialisers and SVDs work in fp32
                    if nb > transient:
                        transient, transient_at = nb, f"{fld} of {where_of(tech, pl)}, largest: {tally.what}"
        plan.contexts.append(ctx)
    total = extra + sum(math.prod(s) * _itemsize(dtypes[k]) for k, s in plan.shared_shapes.items())
    budget = current().alloc_budget()
    raise_it = "(raise it with pefref.language.limits.limits(max_alloc_bytes=...) or $PEFREF_MAX_ALLOC_BYTES)"
    if total > budget:
        raise PefrefError(f"{tech.id}: applying it would allocate about {format_bytes(total)}, over the allocation budget of "
                          f"{format_bytes(budget)} {raise_it}")
    if total + transient > budget:
        raise PefrefError(f"{tech.id}: applying it would need about {format_bytes(total + transient)} at its peak "
                          f"({format_bytes(total)} kept, {format_bytes(transient)} while evaluating {transient_at}), "
                          f"over the allocation budget of {format_bytes(budget)} {raise_it}")
    plan.nbytes, plan.peak = total, total + transient
    return plan


def _used_inputs(unit: nn.Module) -> frozenset[str]:
    return getattr(unit, "used_inputs", frozenset())


def _check_finite(unit: nn.Module) -> None:
    """The unit's initial tensors hold no NaN or infinite entries."""
    for name, _t in [*unit.named_parameters(), *unit.named_buffers()]:
        t = unit.own(name) if isinstance(unit, Unit) else _t  # a stacked tensor: this unit's slice (the later ones are not filled yet)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PefrefError(f"{name}: its initial value holds NaN or infinite entries")


def _call_probe(key: Any, device: Any) -> torch.Tensor | None:
    """The probe of an input of the model's call (task 0 of one example; two tokens of id 0), or None for another key."""
    if not (isinstance(key, tuple) and key and key[0] == "call"):
        return None
    return torch.zeros((1,) if key[1] == "task_ids" else (1, 2), dtype=torch.long, device=device)


def check_unit(unit: nn.Module, m: Any, pl: Placement, ctx: SiteContext, hps: Mapping[str, Any] | None = None,
               probes: dict[Any, torch.Tensor] | None = None, reads: Mapping[str, list[Any]] | None = None, publish: Any = None) -> None:
    """Run a built unit once on a small probe and check that its output fits the host; its tensors must be finite.

    The probe is a batch of one sequence of two positions. A unit reading the model's mask gets a mask of
    ones; a prepend unit must give ``[length, d]`` tokens or ``[length, kv_heads*d_head]`` keys and values;
    a unit reading connections gets the values its sources' probes published (``probes``, by published key;
    ``reads``: its connections' keys, first present wins, as :class:`~pefref.runtime.connect.Wiring` gives
    them; ``publish``: the key this unit's probe output goes under). Two kinds of unit are not probed,
    because their input cannot be made up here: one that reads ``x`` at an embedding site (token ids,
    whose valid range and meaning belong to the model), and one reading a connection whose source was
    not probed (for the same reason). The model's own forward runs them; a failure there raises a
    :class:`PefrefError` and changes nothing. Units on the meta device are not run."""
    if str(ctx.device) == "meta" or any(t.is_meta for t in [*unit.parameters(), *unit.buffers()]):
        return
    _check_finite(unit)
    used = _used_inputs(unit)
    g = torch.Generator().manual_seed(0)

    def probe(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype=ctx.dtype, device=ctx.device)

    mask = torch.ones(1, 2, dtype=torch.long, device=ctx.device) if "mask" in used else None
    inputs: dict[str, torch.Tensor] | None = None
    if reads:
        inputs = {}
        for cname, keys in reads.items():
            got = _call_probe(keys[0], ctx.device)
            keys = [k[1:] if k[0] == "first" else k for k in keys]  # a first-pass read: the probe of the tap it reads
            got = got if got is not None else next((probes[k] for k in keys if probes is not None and k in probes), None)
            if got is None:
                return  # its source was not probed: the model's forward checks it
            inputs[cname] = got
    form = form_of(m)
    how = form.integration
    fwd = unit.forward
    with torch.no_grad():
        if how is Integration.HIDDEN:
            if not (ctx.d_in and ctx.d_out) or (pl.kind.name == "embedding" and "x" in used):
                return  # x is token ids at an embedding
            if pl.binding.side == "input":  # the host's input is the unit's h, as the patch passes it
                x, h, w = None, probe(1, 2, ctx.d_in), ctx.W
            else:
                x, h, w = probe(1, 2, ctx.d_in), probe(1, 2, ctx.d_out), ctx.W
            b = bias_of(pl.kind, pl.host) if "b" in used else None  # zeros where the host has none
            if b is not None:
                b = take_rows(b, 0, pl.start, pl.size, pl.period)
            out = fwd(x, h, w, False, mask, inputs, b=b) if b is not None else fwd(x, h, w, False, mask, inputs)
            if getattr(getattr(unit, "program", None), "publish", False) and isinstance(out, tuple):
                out, delta = out  # a unit that publishes returns (output, delta)
                if probes is not None and publish is not None and isinstance(delta, torch.Tensor):
                    probes[publish] = delta
            _expect(out, tuple(h.shape), f"{form} integrate", "the host's output")
        elif how is Integration.WEIGHT and ctx.W is not None:
            out = fwd(None, None, ctx.W, False, mask, inputs)
            _expect(out, tuple(ctx.W.shape), "weight", "the host's weight")
        elif how is Integration.SCALE:
            width = ctx.d_in if getattr(m, "side", "output") == "input" else ctx.d_out
            out = fwd(None, None, None, False, mask, inputs)
            if not isinstance(out, torch.Tensor):
                raise PefrefError(f"scale gives {type(out).__name__}, expected a tensor")
            try:
                ok = torch.broadcast_shapes(tuple(out.shape), (1, 2, width)) == (1, 2, width)
            except RuntimeError:
                ok = False
            if not ok:
                raise PefrefError(f"scale gives shape {tuple(out.shape)}, which does not broadcast over the host's width {width}")
        elif how is Integration.POSITIONS and hps is not None:
            _check_positions(fwd(None, None, None, False, mask, inputs), m, ctx, hps)


def _check_positions(out: Any, m: Any, ctx: SiteContext, hps: Mapping[str, Any]) -> None:
    """A prepending unit's probe output: ``[length, d]`` tokens, or ``[length, kv_heads*d_head]`` keys and values, finite."""
    from pefref.language.sizes import scalar_ops

    n = int(evaluate(parse_expr(m.length), {**ctx.sizes, **hps}, scalar_ops()))
    if m.tokens is not None and isinstance(out, torch.Tensor) and out.dim() == 3:  # one prompt per example (its task's)
        _expect(out, (1, n, ctx.sizes["d"]), "tokens", "[batch, length, d]")
    elif m.tokens is not None:
        _expect(out, (n, ctx.sizes["d"]), "tokens", "[length, d]")
    else:
        kv = (n, ctx.sizes["kv_heads"] * ctx.sizes["d_head"])
        if not isinstance(out, tuple) or len(out) != 2:
            raise PefrefError(f"keys and values give {type(out).__name__}, expected two tensors of shape {kv}")
        _expect(out[0], kv, "keys", "[length, kv_heads*d_head]")
        _expect(out[1], kv, "values", "[length, kv_heads*d_head]")
    for t in out if isinstance(out, tuple) else (out,):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PefrefError("the prepended positions hold NaN or infinite values")


def _expect(out: Any, shape: tuple[int, ...], what: str, whose: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise PefrefError(f"{what} gives {type(out).__name__}, expected a tensor of shape {shape} ({whose})")
    if tuple(out.shape) != shape:
        raise PefrefError(f"{what} gives shape {tuple(out.shape)}, expected {shape} ({whose})")


def host_update_of(m: Any, unit: nn.Module, ctx: SiteContext, hps: Mapping[str, Any], W: torch.Tensor, start: int, size: int, period: int = 0) -> torch.Tensor:
    """The host's new weight ([out, in], the whole weight for a sliced site), computed and checked, not written."""
    from pefref.ops import op_table

    assert ctx.W is not None
    from pefref.compiler.parts import read

    env = {**ctx.names(hps), "W": ctx.W.detach().to(ctx.dtype), **ctx.stats, **{n: read(unit, n) for n in m.params}}  # in the adapter's dtype
    with torch.no_grad():
        new_w = evaluate(parse_expr(m.host_update), env, op_table())
    _expect(new_w, tuple(ctx.W.shape), "host_update", "the host's weight")
    if not new_w.is_meta and not bool(torch.isfinite(new_w).all()):
        raise PefrefError("host_update gives NaN or infinite values")
    new_w = new_w.detach().to(W.dtype)
    if size:  # a sliced site (a fused projection) updates its own rows only
        new_w = replace_rows(W.detach(), 0, start, size, period, lambda _old: new_w)
    return new_w.contiguous()


def check_selectable(model: nn.Module, selected: list[torch.Tensor], tid: str) -> None:
    """Refuse to train in place a host tensor that another adapter has folded a merge or update into."""
    if not selected:
        return
    ids = {id(t) for t in selected}
    for led in all_ledgers(model):
        for t in led.tensors(True):
            if id(t) in ids and led.layers:
                names = ", ".join(sorted({repr(getattr(o, "name", o)) for o in led.owners()}))
                raise PefrefError(f"{tid}: cannot train a host tensor in place that adapter {names} has written into (merged or updated); unmerge or remove it first")
