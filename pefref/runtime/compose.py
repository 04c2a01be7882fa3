"""Compositions at run time: several adapters on one model, combined by blocks where they meet.

:func:`apply_composition` applies each technique of a checked composition as
one named :class:`~pefref.runtime.adapter.Adapter`, then realises its blocks at
every host (a site of one layer) the combined adapters share:

* ``stack``: the adapters' entries are put in the declared order at the host;
* ``parallel`` / ``average`` / ``fusion``: their entries share one *group*
  (:class:`Combiner`), which the host patch calls with each member's function
  of the same input (see :mod:`pefref.runtime.patches`).

The returned :class:`Composition` handle trains, activates and deactivates
adapters by name, selects adapters per example within one batch, merges
low-rank adapters into a new one (:mod:`pefref.runtime.merge_weighted`), and
removes everything exactly. Technique-agnostic: it reads forms and sites only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pefref.language.catalog import Catalog, default_catalog
from pefref.language.composition import (
    ResolvedComposition,
    _check_blocks,
    block_sites,
    load_composition,
    load_rules,
)
from pefref.language.errors import CatalogError, PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import BLOCKS, BlockKind, Combine, block_of
from pefref.language.schema import Block, TechniqueUse
from pefref.language.schema import Composition as CompositionSpec
from pefref.language.sizes import scalar_ops
from pefref.language.yamlsrc import Positions
from pefref.runtime.adapter import ADAPTERS_ATTR, Adapter
from pefref.runtime.applying import apply_technique
from pefref.runtime.patches import ROUTE, Entry

__all__ = ["Combiner", "Composition", "apply_composition", "compose", "BASE"]

BASE = "__base__"
"""The name that selects no adapter for an example (as peft's ``adapter_names``)."""


class Combiner(nn.Module):
    """The group of entries a parallel, average or fusion block combines at one host.

    ``combine(t, fns, members)`` gets the host's tensor ``t`` (its output, input
    or weight) and each running member's function of it.
    """

    def __init__(self, kind: BlockKind, names: Sequence[str], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.kind, self.names = kind, list(names)
        self.weights = dict(zip(self.names, weights if weights is not None else [1.0 / len(self.names)] * len(self.names)))

    def combine(self, t: torch.Tensor, fns: Sequence[Any], members: Sequence[Entry]) -> torch.Tensor:
        if self.kind.combine is Combine.SUM:  # h + Σ_i (f_i(h) − h)
            return t + sum(f(t) - t for f in fns)
        if self.kind.combine is Combine.MEAN:  # h + Σ_i w_i (f_i(h) − h)
            return t + sum(self.weights[m.owner.name] * (f(t) - t) for f, m in zip(fns, members))
        raise PefrefError(f"unknown block kind {self.kind!r}")


class FusionCombiner(Combiner):
    """AdapterFusion at one host (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247).

    With ``h`` [..., d] the host output and ``δ_i = f_i(h) − h`` each adapter's change,

    .. math:: q = h Q^T + b_Q,\\quad k_i = δ_i K^T + b_K,\\quad a = \\mathrm{softmax}_i(q·k_i / T),\\quad h' = h + Σ_i a_i\\, δ_i V^T

    Q and K start as normal(0, 0.02) matrices with zero biases (BERT's
    initialisation, as the paper's code), V as the identity.
    """

    def __init__(self, names: Sequence[str], d: int, temperature: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(next(b for b in BLOCKS.values() if b.combine is Combine.ATTENTION), names)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.T = float(temperature)
        self.Q = nn.Parameter(torch.randn(d, d, **kw) * 0.02)
        self.bQ = nn.Parameter(torch.zeros(d, **kw))
        self.K = nn.Parameter(torch.randn(d, d, **kw) * 0.02)
        self.bK = nn.Parameter(torch.zeros(d, **kw))
        self.V = nn.Parameter(torch.eye(d, **kw))

    def combine(self, t: torch.Tensor, fns: Sequence[Any], members: Sequence[Entry]) -> torch.Tensor:
        host = t.dtype  # computed in the fusion's dtype (fp32 adapters on a bf16 host), rounded once at the end
        t = t.to(self.Q.dtype)
        D = torch.stack([f(t) - t for f in fns], dim=-2)  # [..., n, d]
        q = torch.nn.functional.linear(t, self.Q, self.bQ)  # [..., d]
        k = torch.nn.functional.linear(D, self.K, self.bK)  # [..., n, d]
        a = torch.softmax((k * q.unsqueeze(-2)).sum(-1) / self.T, dim=-1)  # [..., n]
        v = torch.nn.functional.linear(D, self.V)  # [..., n, d]
        return (t + (a.unsqueeze(-1) * v).sum(-2)).to(host)


@dataclass(eq=False, repr=False)
class Composition:
    """Several adapters on one model and the blocks that combine them (a transaction: :meth:`remove` restores the model)."""

    model: nn.Module
    name: str
    adapters: dict[str, Adapter]
    spec: ResolvedComposition | None = None
    catalog: Catalog | None = None
    combiners: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    _order_backup: list[tuple[Any, list[Entry]]] = field(default_factory=list)
    _off: dict[str, contextlib.ExitStack] = field(default_factory=dict)
    _frozen: dict[int, bool] = field(default_factory=dict)
    merged: bool = False
    _removed: bool = False

    def __repr__(self) -> str:
        return f"Composition({self.name!r}, adapters={list(self.adapters)}, active={self.active_adapters}, trainable={self.num_trainable()})"

    # --- parameters -------------------------------------------------------------

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every trained tensor: each adapter's (prefixed by its name) and the blocks' own (fusion), each once."""
        out: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for an, ad in self.adapters.items():
            for n, p in ad.named_trainable_parameters().items():
                if id(p) not in seen:
                    seen.add(id(p))
                    out[f"{an}.{n}"] = p
        for n, p in self.combiners.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[f"{self.name}.{n}"] = p
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained tensors as a list a torch optimizer takes."""
        return list(self.named_trainable_parameters().values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter's state (prefixed by its name) and the blocks' tensors."""
        out = {f"{an}.{k}": v for an, ad in self.adapters.items() for k, v in ad.state_dict().items()}
        out.update({f"{self.name}.{k}": v.detach() for k, v in self.combiners.state_dict().items()})
        return out

    # --- activation ---------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return [n for n in self.adapters if n not in self._off]

    def deactivate(self, *names: str) -> None:
        """Take adapters out of the computation (host tensors they changed come back) until :meth:`activate`."""
        for n in names:
            ad = self._adapter(n)
            if n not in self._off:
                stack = contextlib.ExitStack()
                stack.enter_context(ad.disable())
                self._off[n] = stack

    def activate(self, *names: str) -> None:
        """Put deactivated adapters back."""
        for n in names:
            self._adapter(n)
            stack = self._off.pop(n, None)
            if stack is not None:
                stack.close()

    def set_active(self, names: Sequence[str]) -> None:
        """Exactly these adapters run (the others are deactivated)."""
        for n in names:
            self._adapter(n)
        self.activate(*[n for n in self.adapters if n in names])
        self.deactivate(*[n for n in self.adapters if n not in names])

    def _adapter(self, n: str) -> Adapter:
        if n not in self.adapters:
            from pefref.language.loader import suggest

            raise PefrefError(f"no adapter named {n!r}{suggest(n, self.adapters)} in composition {self.name!r} (adapters: {', '.join(self.adapters)})")
        return self.adapters[n]

    @contextlib.contextmanager
    def per_example(self, names: Sequence[str | Sequence[str] | None]) -> Iterator[None]:
        """Within the block, example ``i`` of a batch runs only the adapters named ``names[i]``.

        Each item is an adapter name, a list of names (run together, combined by
        their blocks), the composition's own name (all of its adapters), or
        ``"__base__"`` / None (no adapter), as peft's ``adapter_names=``. Hosts
        run once per distinct selection; prepended positions are not covered.
        """
        route: list[frozenset[Adapter]] = []
        for item in names:
            if item is None or item == BASE:
                route.append(frozenset())
            elif isinstance(item, str):
                route.append(frozenset(self.adapters.values()) if item == self.name else frozenset({self._adapter(item)}))
            else:
                route.append(frozenset(self._adapter(n) for n in item))
        prev, ROUTE.current = ROUTE.current, route
        try:
            yield
        finally:
            ROUTE.current = prev

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Within the block the model computes as the base model."""
        with contextlib.ExitStack() as stack:
            for n, ad in self.adapters.items():
                if n not in self._off:
                    stack.enter_context(ad.disable())
            yield

    # --- blocks ---------------------------------------------------------------------

    def combine(self, block: Block | Mapping[str, Any], index: int | None = None) -> list[str]:
        """Realise one block (a schema object or a plain dict) at every host its adapters share; returns the hosts.

        The block is first checked against the interaction rules (as ``pefref validate`` does). On a failure
        whatever this block changed is taken out again (groups, orders, combiners, frozen adapters)."""
        groups = {id(e): (e, e.group) for ad in self.adapters.values() for _p, e in ad.entries}
        n_order, names, frozen = len(self._order_backup), set(self.combiners), dict(self._frozen)
        try:
            return self._combine(block, index)
        except BaseException:
            for e, g in groups.values():
                e.group = g
            for patch, entries in reversed(self._order_backup[n_order:]):
                patch.entries[:] = [e for e in entries if e in patch.entries] + [e for e in patch.entries if e not in entries]
            del self._order_backup[n_order:]
            for k in [k for k in self.combiners if k not in names]:
                del self.combiners[k]
            for ad in self.adapters.values():
                for p in ad.units.parameters():
                    if id(p) in self._frozen and id(p) not in frozen:
                        p.requires_grad_(self._frozen.pop(id(p)))
            raise

    def _combine(self, block: Block | Mapping[str, Any], index: int | None) -> list[str]:
        from pydantic import TypeAdapter

        blk = block if not isinstance(block, Mapping) else TypeAdapter(Block).validate_python(dict(block))
        for an in blk.adapters:  # every name first: an absent one is a pefref error before anything is looked up
            self._adapter(an)
        b = len(self.combiners) if index is None else index
        spec = self.spec
        if spec is None or index is None:  # a block given from Python: checked here
            spec = _python_spec(self, blk)
            problems = _check_blocks(spec, Positions("<python>"), load_rules())
            if problems:
                raise CatalogError(problems)
        where = block_sites(spec, list(blk.adapters), blk.sites)
        hosts: list[str] = []
        for site in where:
            by_host: dict[tuple[int, int | None], tuple[Any, list[Entry]]] = {}
            for an in blk.adapters:
                for patch, e in self._adapter(an).entries:
                    if e.site == site:
                        by_host.setdefault((id(patch), e.layer), (patch, []))[1].append(e)
            for (_pid, layer), (patch, es) in by_host.items():
                if len({id(e.owner) for e in es}) < 2:
                    continue  # only one of the adapters is placed here: it runs alone
                if block_of(blk).combine is Combine.ORDER:
                    self._reorder(patch, es, list(blk.adapters))
                else:
                    grp = self._combiner(blk, es, site, patch)
                    self.combiners[f"b{b}__{site.replace('.', '_')}" + ("" if layer is None else f"__{layer}")] = grp
                    for e in es:
                        e.group = grp
                hosts.append(f"{site}[{layer}]" if layer is not None else site)
        if block_of(blk).combine is Combine.ATTENTION and not getattr(blk, "train_adapters", True):
            for an in blk.adapters:
                for p in self.adapters[an].trainable_parameters():
                    self._frozen.setdefault(id(p), p.requires_grad)
                    p.requires_grad_(False)
        if self.combiners and self.name not in getattr(self.model, ADAPTERS_ATTR):
            getattr(self.model, ADAPTERS_ATTR)[self.name] = self.combiners
        return hosts

    def _reorder(self, patch: Any, es: list[Entry], order: list[str]) -> None:
        self._order_backup.append((patch, list(patch.entries)))
        slots = sorted(patch.entries.index(e) for e in es)
        ranked = sorted(es, key=lambda e: order.index(e.owner.name))
        for i, e in zip(slots, ranked):
            patch.entries[i] = e

    def _combiner(self, blk: Any, es: list[Entry], site: str, patch: Any) -> Combiner:
        names = [a for a in blk.adapters if any(e.owner.name == a for e in es)]
        kind = block_of(blk)
        if kind.combine is Combine.ATTENTION:
            ad = cast(Adapter, es[0].owner)
            d = (0 if es[0].period else es[0].size) or int(evaluate(parse_expr((self.catalog or default_catalog()).reference.sites[site].out or "d"), dict(ad.sizes), scalar_ops()))
            ref = next(iter(es[0].unit.parameters()), None)
            return FusionCombiner(names, d, blk.temperature, ref.dtype if ref is not None else torch.float32, ref.device if ref is not None else "cpu")
        weights = None
        if kind.combine is Combine.MEAN and blk.weights is not None:
            weights = [blk.weights[blk.adapters.index(a)] for a in names]
        elif kind.combine is Combine.MEAN:
            weights = [1.0 / len(blk.adapters)] * len(names)
        return Combiner(kind, names, weights)

    # --- merging and removal -----------------------------------------------------------

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], name: str, combination_type: str = "svd", **kwargs: Any) -> Adapter:
        """Merge low-rank adapters of this composition into a new adapter (see :func:`pefref.runtime.merge_weighted.add_weighted_adapter`)."""
        from pefref.runtime.merge_weighted import add_weighted_adapter

        if name in self.adapters:
            raise PefrefError(f"an adapter named {name!r} is already in the composition")
        new = add_weighted_adapter(self.model, [self._adapter(a) for a in adapters], weights, name, combination_type, **kwargs)
        self.adapters[name] = new
        return new

    def merge(self) -> list[str]:
        """Fold every adapter into its hosts' weights as the blocks combine them (stack: composed maps; parallel:
        summed changes; average: weighted mean); returns the hosts. Refused, changing nothing, when an adapter or a
        block (a learned fusion) cannot fold (see :mod:`pefref.runtime.compose_merge`)."""
        from pefref.runtime.compose_merge import merge_composition

        return merge_composition(self)

    def unmerge(self) -> None:
        """Take the composition's merge out of the hosts' weights; the adapters run again."""
        from pefref.runtime.compose_merge import unmerge_composition

        unmerge_composition(self)

    def remove(self) -> nn.Module:
        """Undo the merge and the blocks and remove every adapter (in reverse order); the base model comes back exactly."""
        if self._removed:
            return self.model
        self.unmerge()
        for n in list(self._off):
            self.activate(n)
        self.undo_blocks()
        for ad in reversed(list(self.adapters.values())):
            ad.remove()
        self._removed = True
        return self.model


    def undo_blocks(self) -> None:
        """Take every block out (groups, stack orders, frozen adapters, combiners); the adapters stay applied."""
        for ad in self.adapters.values():
            for _patch, e in ad.entries:
                e.group = None
        for patch, entries in reversed(self._order_backup):
            patch.entries[:] = [e for e in entries if e in patch.entries] + [e for e in patch.entries if e not in entries]
        self._order_backup.clear()
        for ad in self.adapters.values():
            for p in ad.units.parameters():
                if id(p) in self._frozen:
                    p.requires_grad_(self._frozen[id(p)])
        self._frozen.clear()
        container = getattr(self.model, ADAPTERS_ATTR, None)
        if container is not None and self.name in container and container[self.name] is self.combiners:
            del container[self.name]
        self.combiners = nn.ModuleDict()


def _python_spec(comp: Composition, blk: Any = None) -> ResolvedComposition:
    """A :class:`ResolvedComposition` describing adapters applied from Python (for the rule checks)."""
    uses = [TechniqueUse(name=n, technique=ad.technique.id) for n, ad in comp.adapters.items()]  # type: ignore[call-arg]
    spec = CompositionSpec(id="python", name=comp.name, techniques=uses, blocks=[blk] if blk is not None else [])  # type: ignore[call-arg]
    techs = {n: ad.technique for n, ad in comp.adapters.items()}
    from pefref.language.check import expand_modules

    pool = default_catalog().techniques
    techs = {n: t.model_copy(update={"modules": expand_modules(t, {**pool, t.id: t})[0]}) for n, t in techs.items()}
    return ResolvedComposition(spec, techs, {n: dict(ad.hyperparameters) for n, ad in comp.adapters.items()}, {n: None for n in comp.adapters})


def compose(model: nn.Module, adapters: Sequence[Adapter] | Mapping[str, Adapter], blocks: Sequence[Block | Mapping[str, Any]] = (), name: str = "composition") -> Composition:
    """Combine adapters already applied to ``model`` (by :func:`pefref.apply`) with blocks, from Python."""
    ads = dict(adapters) if isinstance(adapters, Mapping) else {a.name: a for a in adapters}
    for n, a in ads.items():
        if a.name != n:
            raise PefrefError(f"adapter {a.name!r} is given under the name {n!r}; use its own name")
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is not None and name in container:
        raise PefrefError(f"an adapter or composition named {name!r} is already applied; pass name=")
    comp = Composition(model, name, ads)
    try:  # a transaction: a block that fails takes out the blocks before it
        for i, blk in enumerate(blocks):
            try:
                comp.combine(blk)
            except PefrefError:
                raise
            except Exception as e:  # a malformed block (pydantic's errors, a wrong type): located, as pefref's
                raise PefrefError(f"composition {name!r}, block {i + 1}: {type(e).__name__}: {e}") from None
    except BaseException:
        comp.undo_blocks()
        raise
    return comp


def apply_composition(model: nn.Module, composition: str | Path | ResolvedComposition, *, catalog: Catalog | None = None,
                      name: str | None = None, **apply_kwargs: Any) -> Composition:
    """Apply every technique of a composition (a YAML file or a checked one) and realise its blocks.

    A failure at any step removes what was applied: the model comes back exactly.
    """
    catalog = catalog or default_catalog()
    res = composition if isinstance(composition, ResolvedComposition) else load_composition(composition, catalog)
    name = name or res.composition.id
    if name in res.techniques:
        raise PefrefError(f"the composition's name {name!r} is also one of its adapters' names")
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is not None and name in container:
        raise PefrefError(f"an adapter or composition named {name!r} is already applied; pass name=")
    comp = Composition(model, name, {}, res, catalog)
    try:
        for use in res.composition.techniques:
            comp.adapters[use.name] = apply_technique(model, res.techniques[use.name], catalog, name=use.name, sites=res.sites[use.name],
                                                      hyperparameters=res.hyperparameters[use.name], **apply_kwargs)
        for b, blk in enumerate(res.composition.blocks):
            comp.combine(blk, index=b)
    except BaseException:
        comp.remove()
        raise
    return comp
