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

from pefref.compiler.units import SharedStore, SiteContext, shape_of
from pefref.language.errors import PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.limits import current, format_bytes
from pefref.runtime.inject import Placement
from pefref.runtime.ledger import all_ledgers
from pefref.runtime.rows import replace as replace_rows
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_apply(tech: Any, model: nn.Module, places: list[Placement], sizes: Mapping[str, int], flags: Mapping[str, int],
               hps: Mapping[str, Any], dtype: torch.dtype | None, device: torch.device | str | None) -> Plan:
    """Contexts and shapes of every placement, checked against the allocation budget (nothing allocated)."""
    plan = Plan()
    dtypes: dict[tuple[Any, ...], torch.dtype] = {}
    extra = 0
    for pl in places:
        with located(where_of(tech, pl)):
            W = pl.kind.get_weight(pl.host) if pl.kind.has_weight and pl.binding.side == "module" else None  # type: ignore[misc]
            ref_t = W if W is not None else next(pl.host.parameters(), None)
            ctx = SiteContext(pl.site, pl.layer, pl.d_in, pl.d_out, sizes, flags,
                              dtype=dtype or (ref_t.dtype if ref_t is not None else torch.float32),
                              device=device or (ref_t.device if ref_t is not None else "cpu"))
            names = ctx.names(hps)
            for pname, spec in pl.module.params.items():
                key = SharedStore.key(pl.module.name, pname, spec.shared, pl.site, pl.layer)
                shp = shape_of(spec, names)
                prev = plan.shared_shapes.get(key, shp)
                if len(prev) != len(shp):
                    raise PefrefError(f"{pname}: shared tensor has different ranks at different sites")
                plan.shared_shapes[key] = tuple(max(a, b) for a, b in zip(prev, shp))
                dtypes.setdefault(key, ctx.dtype)
            if pl.module.host_update is not None and W is not None:
                extra += 3 * W.numel() * W.element_size()  # the new weight, and the ledger's copies before and after
        plan.contexts.append(ctx)
    total = extra + sum(math.prod(s) * _itemsize(dtypes[k]) for k, s in plan.shared_shapes.items())
    budget = current().alloc_budget()
    if total > budget:
        raise PefrefError(f"{tech.id}: applying it would allocate about {format_bytes(total)}, over the allocation budget of "
                          f"{format_bytes(budget)} (raise it with pefref.language.limits.limits(max_alloc_bytes=...) or $PEFREF_MAX_ALLOC_BYTES)")
    plan.nbytes = total
    return plan


def _used_inputs(unit: nn.Module) -> set[str]:
    graph = getattr(unit, "graph", None)
    if graph is None:
        return set()
    return {n.target for n in graph.nodes if n.op == "placeholder" and n.users}


def check_unit(unit: nn.Module, m: Any, pl: Placement, ctx: SiteContext) -> None:
    """Run a built unit once on a small probe and check that its output fits the host; its tensors must be finite.

    Units on the meta device (models built without weights) are not run."""
    if any(t.is_meta for t in [*unit.parameters(), *unit.buffers()]) or str(ctx.device) == "meta":
        return
    for name, t in [*unit.named_parameters(), *unit.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PefrefError(f"{name}: its initial value holds NaN or infinite entries")
    if {"mask", "inputs"} & _used_inputs(unit):
        return  # needs the model's mask or other units' outputs (connections): checked by the model's own forward
    g = torch.Generator().manual_seed(0)

    def probe(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype=ctx.dtype, device=ctx.device)

    form = m.form
    fwd = unit.forward
    with torch.no_grad():
        if form in ("parallel", "sequential") and pl.kind.name in ("linear", "conv1d") and pl.binding.side == "module" and not pl.binding.input_path:
            x, h = probe(1, 2, ctx.d_in), probe(1, 2, ctx.d_out)
            out = fwd(x, h, ctx.W, False)
            if isinstance(out, tuple):
                out = out[0]  # a unit that publishes returns (output, delta)
            _expect(out, tuple(h.shape), f"{form} integrate", "the host's output")
        elif form == "reparameterise" and ctx.W is not None:
            out = fwd(None, None, ctx.W, False)
            _expect(out, tuple(ctx.W.shape), "weight", "the host's weight")
        elif form == "rescale":
            width = ctx.d_in if getattr(m, "side", "output") == "input" else ctx.d_out
            out = fwd(None, None, None, False)
            if not isinstance(out, torch.Tensor):
                raise PefrefError(f"scale gives {type(out).__name__}, expected a tensor")
            try:
                ok = torch.broadcast_shapes(tuple(out.shape), (1, 2, width)) == (1, 2, width)
            except RuntimeError:
                ok = False
            if not ok:
                raise PefrefError(f"scale gives shape {tuple(out.shape)}, which does not broadcast over the host's width {width}")


def _expect(out: Any, shape: tuple[int, ...], what: str, whose: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise PefrefError(f"{what} gives {type(out).__name__}, expected a tensor of shape {shape} ({whose})")
    if tuple(out.shape) != shape:
        raise PefrefError(f"{what} gives shape {tuple(out.shape)}, expected {shape} ({whose})")


def host_update_of(m: Any, unit: nn.Module, ctx: SiteContext, hps: Mapping[str, Any], W: torch.Tensor, start: int, size: int, period: int = 0) -> torch.Tensor:
    """The host's new weight ([out, in], the whole weight for a sliced site), computed and checked, not written."""
    from pefref.ops import op_table

    assert ctx.W is not None
    env = {**ctx.names(hps), "W": ctx.W.detach(), **{n: getattr(unit, n) for n in m.params}}
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
    ids = {id(t) for t in selected}
    for led in all_ledgers(model):
        for t in led.tensors(True):
            if id(t) in ids and led.layers:
                names = ", ".join(sorted({repr(getattr(o, "name", o)) for o in led.owners()}))
                raise PefrefError(f"{tid}: cannot train a host tensor in place that adapter {names} has written into (merged or updated); unmerge or remove it first")
