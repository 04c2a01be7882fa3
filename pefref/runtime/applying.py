"""Applying one technique to a model, in three stages: plan → build → commit.

* :func:`plan` reads the model and the technique and returns an :class:`ApplyPlan`: the technique's
  concrete modules, hyperparameters, sizes, every placement with its site context, the shapes of
  shared tensors and the allocation budget (:func:`pefref.runtime.planning.plan_apply`). Nothing is
  allocated.
* :func:`build` compiles every placement's unit and host update from the plan and probes it
  (:class:`BuiltUnit`); the model is only read.
* :func:`commit` attaches the built units inside one :class:`~pefref.runtime.transaction.Transaction`
  and returns the :class:`~pefref.runtime.adapter.Adapter` handle; a failure undoes everything.

:func:`apply_technique` runs the three; :func:`pefref.runtime.api.apply` tells a technique from a
composition file and calls it (or :func:`pefref.runtime.compose.apply_composition`, which calls it
once per member).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from pefref.compiler.units import SharedStore, Unit, build_unit, resolve_hyperparameters
from pefref.language.catalog import Catalog, load_techniques, paused_gc
from pefref.language.check import MODEL_FLAGS, expand_modules
from pefref.language.errors import CatalogError, PefrefError, SiteError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.forms import Integration, form_of
from pefref.language.placement import retarget
from pefref.language.schema import ArchitectureMap, Technique
from pefref.language.sizes import scalar_ops
from pefref.language.templates import template
from pefref.ops.weight_space import forget_decompositions
from pefref.runtime.adapter import ADAPTERS_ATTR, Adapter
from pefref.runtime.calibration import declares_calibration, gather, meta_statistics, refuse_without
from pefref.runtime.connect import Wiring, hook_only_taps, with_taps
from pefref.runtime.first_pass import join_first_pass
from pefref.runtime.inject import Placement, model_config, model_sizes, output_form, parameters_outside, placements, resolve_family
from pefref.runtime.layer_batches import link_layer_batches
from pefref.runtime.ledger import Layer, check_not_selected, freeze, ledger_of
from pefref.runtime.param_slices import ParameterSlice, owner_patch
from pefref.runtime.patches import _PATCH, _ROOT, Entry, HostPatch, RootPatch, first_tensor, input_cell, patch_of, release_input_cell, root_patch_of
from pefref.runtime.planning import Plan, check_selectable, check_unit, host_update_of, plan_apply, where_of
from pefref.runtime.precision import AdapterDtype
from pefref.runtime.report import Report, ReportRow
from pefref.runtime.rotary import RotaryCell, keep_rotary
from pefref.runtime.rows import take as take_rows
from pefref.runtime.saved_modules import SAVED_MODULE, SavedModule, resolve_saved
from pefref.runtime.transaction import Transaction, located
from pefref.view.analysis import connected_modules, mergeable

__all__ = ["ApplyPlan", "BuiltUnit", "plan", "calibrate", "build", "commit", "apply_technique", "resolve_technique"]


def resolve_technique(technique: str | Path | Technique, catalog: Catalog) -> Technique:
    """A Technique from a catalog id, a Technique object or a YAML path."""
    if isinstance(technique, Technique):
        return technique
    p = Path(technique)
    if p.suffix in (".yaml", ".yml"):
        loaded, _src, _pos, problems = load_techniques([p], catalog.reference, catalog.techniques)
        if problems:
            raise CatalogError(problems)
        return next(iter(loaded.values()))
    try:
        return catalog.technique(str(technique))
    except KeyError as e:
        raise PefrefError(e.args[0]) from None


@dataclass
class ApplyPlan:
    """Everything :func:`build` and :func:`commit` need, worked out from the model and the technique
    before anything is allocated (printable: a test or a reader can look at it)."""

    technique: Technique
    name: str
    family: ArchitectureMap
    modules: list[Any]
    """The technique's concrete modules (``use:`` expanded, taps added for connections)."""
    hyperparameters: dict[str, Any]
    sizes: dict[str, int]
    places: list[Placement]
    saved: list[SavedModule]
    wiring: Wiring
    shapes: Plan
    """Site contexts of the placements, shapes of shared tensors, the bytes apply allocates."""
    mergeable: list[bool]
    """For each placement: whether ``merge()`` folds its unit into the host's weight (derived from the module's
    structure at the site's kind, with the host's bias, by :func:`pefref.view.analysis.mergeable`)."""
    stats: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)
    """For each placement: the calibration statistics its module declares, by name (filled by :func:`calibrate`)."""


@dataclass
class BuiltUnit:
    """One placement's compiled unit (None for a module that trains host parameters in place), its key in
    the adapter and the host weight its host update writes (None without one)."""

    placement: Placement
    unit: Unit | None
    key: str
    host_weight: torch.Tensor | None = field(default=None, repr=False)
    mergeable: bool = False


def _places(model: nn.Module, fam: ArchitectureMap, sizes: dict[str, int], modules: list[Any], optional: set[str],
            layers: Sequence[int | str] | None, ref: Any) -> list[Placement]:
    """Every module's placements; a tap only training hooks read (``optional``) is left out where the model offers no
    host for it (the hook's terms there read nothing and add nothing)."""
    out: list[Placement] = []
    for m in modules:
        try:
            got = list(placements(model, fam, sizes, [m], None, layers, ref))
        except SiteError:
            if m.name not in optional:
                raise
            continue
        out += got
    return out


def plan(model: nn.Module, technique: str | Path | Technique, catalog: Catalog, *, sites: Sequence[str] | None = None,
         layers: Sequence[int | str] | None = None, family: str | Path | ArchitectureMap | None = None, name: str | None = None,
         dtype: torch.dtype | None = None, device: torch.device | str | None = None, hyperparameters: Mapping[str, Any] | None = None,
         modules_to_save: Sequence[str] | None = None, adapter_dtype: AdapterDtype = "auto") -> ApplyPlan:
    """Placements, shapes, budget and everything else :func:`build` needs; the model is only read (``adapter_dtype``:
    :func:`~pefref.runtime.precision.adapter_dtype_for`)."""
    tech = resolve_technique(technique, catalog)
    fam = resolve_family(model, catalog, family)
    if sites is not None:  # placement anywhere: names, patterns (attn.*) and selectors (all-linear)
        tech = retarget(tech, sites, catalog.reference, catalog.techniques, fam)
    modules, decl = expand_modules(tech, ChainMap({tech.id: tech}, catalog.techniques))  # type: ignore[arg-type]
    readers = [h for h in tech.training if getattr(h, "inputs", None)]  # aux losses reading the last forward pass
    optional = hook_only_taps(modules, readers)
    modules = with_taps(modules, readers)  # connections that read a site's hidden state read a tap there
    hps = resolve_hyperparameters(decl, dict(hyperparameters or {}))
    sizes = model_sizes(fam, model_config(model))
    flags = {"causal": int(fam.causal)}
    assert set(flags) == set(MODEL_FLAGS)
    name = name or tech.id
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is not None and name in container:
        raise PefrefError(f"an adapter named {name!r} is already applied; pass name=")
    places = _places(model, fam, sizes, modules, optional, layers, catalog.reference)
    if not places:
        raise PefrefError(f"{tech.id}: nothing to place (check sites= and layers=)")
    saved = resolve_saved(model, fam, modules_to_save or [], sizes["L"])
    wiring = Wiring(modules, places, name, readers)
    shapes = plan_apply(tech, model, places, sizes, flags, hps, dtype, device, adapter_dtype)
    merges = _merges(places, modules, catalog)
    _check_slices(tech, places, merges)
    return ApplyPlan(tech, name, fam, modules, hps, sizes, places, saved, wiring, shapes, merges)


def _check_slices(tech: Technique, places: list[Placement], merges: list[bool]) -> None:
    """A slice of a raw parameter runs as the weight read off its adapted map: only modules that fold into a
    weight are placed there."""
    for pl, merges_ in zip(places, merges):
        if pl.slice_index is not None and not merges_:
            raise SiteError(f"{tech.id}: module {pl.module.name!r} cannot be placed on {pl.site!r}, a slice of the raw "
                            f"parameter {pl.path}.{pl.binding.parameter}: it does not fold into a weight (a {pl.module.form} "
                            "module there must be linear in the input, connected to nothing)")


def _merges(places: list[Placement], modules: list[Any], catalog: Catalog) -> list[bool]:
    """Whether each placement's unit folds into its host's weight (derived once per module, site kind and host bias)."""
    connected = connected_modules(modules)  # modules in a connection never fold into a weight
    memo: dict[tuple[str, str, bool], bool] = {}
    out = []
    for pl in places:
        m = pl.module
        mk = (m.name, catalog.reference.sites[pl.site].kind, isinstance(getattr(pl.host, "bias", None), torch.Tensor))
        if mk not in memo:
            memo[mk] = mergeable(m, [mk[1]], mk[2], m.name in connected)
        out.append(memo[mk] and pl.kind.name in ("linear", "conv1d", "parameter"))
    return out


def _layer_weights(places: list[Placement], pl: Placement, pending: Mapping[int, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``W_layers`` at ``pl``: the host weights (as this apply's host updates leave them so far) of every placement of the
    same module at the same site, by layer, stacked [L, out, in]; computed when an initialiser reads it."""

    def stack() -> torch.Tensor:
        same = sorted((q for q in places if q.module.name == pl.module.name and q.site == pl.site and q.kind.has_weight and q.binding.side == "module"),
                      key=lambda q: -1 if q.layer is None else q.layer)
        ws = [take_rows(pending.get(id(q.host), q.kind.get_weight(q.host)), 0, q.start, q.size, q.period) for q in same]  # type: ignore[misc]
        if len({tuple(w.shape) for w in ws}) > 1:
            raise PefrefError(f"{pl.module.name} at {pl.site}: W_layers stacks the host weights of every layer, which differ in shape "
                              f"({sorted({tuple(w.shape) for w in ws})})")
        return torch.stack([w.detach() for w in ws])

    return stack


def build(p: ApplyPlan) -> list[BuiltUnit]:
    """Every placement's unit and host update, compiled and probed; the model is only read."""
    store = SharedStore()
    built: list[BuiltUnit] = []
    pending: dict[int, torch.Tensor] = {}  # host weights as this apply's host updates leave them
    probes: dict[Any, torch.Tensor] = {}  # what publishing units' probes gave, for the probes of the units reading them
    try:
        for i, (pl, ctx, merges) in enumerate(zip(p.places, p.shapes.contexts, p.mergeable)):
            if p.stats:
                ctx.stats = p.stats[i]  # the calibration statistics gathered at this placement
            built.append(_build_one(p, pl, ctx, merges, store, pending, probes))
    finally:
        forget_decompositions()  # memoised SVDs and inverses of this apply's matrices
    return built


def _build_one(p: ApplyPlan, pl: Placement, ctx: Any, merges: bool, store: SharedStore, pending: dict[int, torch.Tensor],
               probes: dict[Any, torch.Tensor]) -> BuiltUnit:
    """One placement's unit, probed, and its host update (``pending``: host weights as earlier updates leave them)."""
    wiring, hps, m = p.wiring, p.hyperparameters, pl.module
    with located(where_of(p.technique, pl)):
        W = None
        if pl.kind.has_weight and pl.binding.side == "module":
            W = pending.get(id(pl.host), pl.kind.get_weight(pl.host))  # type: ignore[misc]
            ctx.W = take_rows(W, 0, pl.start, pl.size, pl.period)
            ctx.layer_weights = _layer_weights(p.places, pl, pending)
        unit = build_unit(m, ctx, hps, store, p.shapes.shared_shapes, publish=wiring.publishes(m))
        key = (f"{m.name}__{pl.site.replace('.', '_')}" + ("" if pl.layer is None else f"__{pl.layer}")
               + ("" if pl.slice_index is None else f"__s{pl.slice_index}"))
        new_w = None
        if unit is not None:
            check_unit(unit, m, pl, ctx, hps, probes, wiring.reads(m, pl.layer, pl.site), wiring.key(m.name, pl.site, pl.layer) if wiring.publishes(m) else None)
            if m.host_update is not None and W is not None:
                new_w = host_update_of(m, unit, ctx, hps, W, pl.start, pl.size, pl.period)
                pending[id(pl.host)] = new_w
    return BuiltUnit(pl, unit, key, new_w, merges)


def commit(model: nn.Module, p: ApplyPlan, built: list[BuiltUnit]) -> Adapter:
    """Attach the built units inside one transaction and return the adapter (a failure changes nothing)."""
    units = nn.ModuleDict()
    tech = p.technique
    adapter = Adapter(model, tech, p.name, p.hyperparameters, p.family, p.sizes, units)
    with Transaction(f"apply {tech.id} as adapter {p.name!r}") as txn:
        selected = _select_hosts(model, built, adapter)
        saved_rows = _select_saved(p.saved, adapter, selected)
        check_selectable(model, selected, tech.id)
        base: list[torch.Tensor] = list(parameters_outside(model, ADAPTERS_ATTR))
        freeze(txn, model, adapter, base, selected)  # the base model is frozen (adapters applied earlier keep training)
        rows = _attach_units(model, p, built, adapter, units, txn)
        root = getattr(model, _ROOT, None)
        if root is not None:  # prefixes: every layer gets as many positions (the extended mask is shared)
            with located(f"apply {tech.id}"):
                root.kv_length([e for e in root.entries if e.form.integration is Integration.POSITIONS and e.layer is not None])
            link_layer_batches([e for _p, e in adapter.entries if _p is root])  # prefixes of every layer computed at once
        container = getattr(model, ADAPTERS_ATTR, None)
        if len(units):
            if container is None:
                container = nn.ModuleDict()
                model.add_module(ADAPTERS_ATTR, container)
                txn.on_undo(lambda: delattr(model, ADAPTERS_ATTR))
            container[p.name] = units
            txn.on_undo(lambda: container.__delitem__(p.name))
        for label, (paths, n) in saved_rows.items():
            rows[(SAVED_MODULE, label)] = ReportRow(label, SAVED_MODULE, paths, [None] * len(paths), n // len(paths), n)
        n_trainable = adapter.num_trainable()
        if n_trainable == 0 and not tech.frozen:
            raise PefrefError(f"{tech.id}: nothing to train on this model (e.g. selected biases that its {p.family.family} modules do not have)")
        adapter.report = Report(tech.id, p.family.family, list(rows.values()), n_trainable, sum(q.numel() for q in base))
        if any(getattr(h, "inputs", None) for h in tech.training):  # hooks read the last forward pass from the input cell
            adapter.wiring = p.wiring
            input_cell(model, p.family.forward.mask, p.family.forward.ids)
            release = _Release(model)
            adapter._hooks.append(release)
            txn.on_undo(lambda: (adapter._hooks.remove(release), release.remove()))  # type: ignore[func-returns-value]
        if tech.loss is not None:  # the model's loss replaced (outputs.loss), reading the call from the input cell
            _add_token_loss(model, adapter, tech, p, txn)
        if tech.training:  # training-time behaviour: initial values snapshot, the unused-hooks watch (undone on failure)
            txn.on_undo(adapter._training_hooks().handle.remove)
    return adapter


def calibrate(model: nn.Module, p: ApplyPlan, calibration: Iterable[Mapping[str, Any]] | None) -> None:
    """Gather the calibration statistics the plan's modules declare (:func:`pefref.runtime.calibration.gather`)
    into ``p.stats``, in one pass over ``calibration``; refused without batches where some are declared. The
    model is only read (on the meta device the statistics are empty meta tensors of their shapes)."""
    if not declares_calibration(p.modules):
        return
    names = {**p.sizes, **p.hyperparameters}
    meta = meta_statistics(p.places, names)
    if meta is not None:  # a model without weights: statistics of the right shapes, no values
        p.stats = meta
        return
    if calibration is None:
        refuse_without(p.technique.id, p.modules)
    with located(f"calibrate {p.technique.id}"):
        p.stats = gather(model, p.places, cast(Iterable[Mapping[str, Any]], calibration), names)


def apply_technique(model: nn.Module, technique: str | Path | Technique, catalog: Catalog, *,
                    calibration: Iterable[Mapping[str, Any]] | None = None, **options: Any) -> Adapter:
    """:func:`plan`, :func:`calibrate`, :func:`build` and :func:`commit` one technique (``options``: :func:`plan`'s
    keywords; ``calibration``: batches for the statistics its modules declare). The collector is paused while the
    adapter is planned and built, not while calibration batches run through the model."""
    with paused_gc():
        p = plan(model, technique, catalog, **options)
    calibrate(model, p, calibration)
    with paused_gc():
        return commit(model, p, build(p))


def _select_hosts(model: nn.Module, built: list[BuiltUnit], adapter: Adapter) -> list[torch.Tensor]:
    """Host parameters that modules without a unit train in place, recorded in ``adapter`` with their base values."""
    selected: list[torch.Tensor] = []
    host_by_path: dict[int, str] = {}  # filled on first use
    for b in built:
        if b.unit is not None:
            continue
        pl = b.placement
        for tname in pl.module.targets:
            q = getattr(pl.host, tname, None)
            if isinstance(q, nn.Parameter):
                if not host_by_path:
                    host_by_path.update((id(mod), n) for n, mod in model.named_modules())
                full = f"{host_by_path[id(pl.host)]}.{tname}"
                adapter.selected[full] = q
                adapter._host_backup.setdefault(full, q.detach().clone())  # disable()/remove() give the base values
                selected.append(q)
    return selected


def _select_saved(saved: list[SavedModule], adapter: Adapter, selected: list[torch.Tensor]) -> dict[str, tuple[list[str], int]]:
    """modules_to_save: whole modules train in place with the adapter; their report rows (paths, elements) by label."""
    saved_rows: dict[str, tuple[list[str], int]] = {}
    for s in saved:
        paths, n_saved = saved_rows.get(s.label, ([], 0))
        for pname, q in s.module.named_parameters():
            full = f"{s.path}.{pname}"
            if full in adapter.selected:
                continue
            adapter.selected[full] = q
            adapter._host_backup.setdefault(full, q.detach().clone())
            selected.append(q)
            n_saved += q.numel()
        saved_rows[s.label] = ([*paths, s.path], n_saved)
    return saved_rows


def _attach_units(model: nn.Module, p: ApplyPlan, built: list[BuiltUnit], adapter: Adapter, units: nn.ModuleDict,
                  txn: Transaction) -> dict[tuple[str, str], ReportRow]:
    """Attach every built unit (its host update first), mark the mergeable ones; the report's rows."""
    rows: dict[tuple[str, str], ReportRow] = {}
    for b in built:
        pl, unit, key, m = b.placement, b.unit, b.key, b.placement.module
        if unit is None:
            n_params = sum(q.numel() for t in m.targets if isinstance(q := getattr(pl.host, t, None), nn.Parameter))
        else:
            units[key] = unit
            adapter.unit_modules[key] = m
            n_params = unit.own_numel()
            if b.host_weight is not None:
                check_not_selected(model, [cast(torch.Tensor, pl.host.weight)], f"{where_of(p.technique, pl)}: host_update")
                led = ledger_of(txn, pl.host, pl.kind)
                bias = getattr(pl.host, "bias", None)
                led.push(txn, Layer(adapter, "update", _no_recompute), (b.host_weight, None if bias is None else bias.detach().clone()))  # type: ignore[union-attr]
            _attach(model, pl, unit, key, adapter, p.family, p.sizes, txn, p.wiring)
            if b.mergeable:
                adapter.mergeable_units.add(key)
        row = rows.setdefault((m.name, pl.site), ReportRow(pl.site, m.name, [], [], n_params, 0))
        row.paths.append(pl.path)
        row.layers.append(pl.layer)
        row.params += n_params
    return rows


def _no_recompute() -> Any:
    raise AssertionError("an update layer is re-applied by its delta")


def _attach(model: nn.Module, pl: Placement, unit: nn.Module, key: str, adapter: Adapter, fam: ArchitectureMap,
            sizes: dict[str, int], txn: Transaction, wiring: Wiring | None = None) -> Entry:
    """Attach one unit at its host (or the model's root, for prepended positions), recording in ``txn`` how to detach it."""
    m = pl.module
    form = form_of(m)
    patch: HostPatch | RootPatch
    if form.integration is Integration.POSITIONS:
        patch, existed, entry = _root_entry(model, pl, unit, key, adapter, fam, sizes, txn, wiring)
    else:
        existed = pl.host.__dict__.get(_PATCH)
        patch = patch_of(pl.host, pl.kind, output_form(fam, pl.site, pl.binding) == "first")
        side: Literal["output", "input"] = "input" if pl.binding.side == "input" or getattr(m, "side", "output") == "input" else "output"
        entry = Entry(unit, form, adapter, side=side, start=pl.start, size=pl.size, period=pl.period, layer=pl.layer, unit_key=key, site=pl.site)
        if wiring is not None:  # connections: what the unit reads, and where its output goes
            entry.reads = wiring.reads(m, pl.layer, pl.site)
            entry.publish = wiring.key(m.name, pl.site, pl.layer) if wiring.publishes(m) else None
        if entry.reads_mask or entry.reads or entry.publish is not None:
            entry.inputs = input_cell(model, fam.forward.mask, fam.forward.ids, tuple(fam.forward.cache))
            release = _Release(model)
            adapter._hooks.append(release)
            txn.on_undo(lambda: (adapter._hooks.remove(release), release.remove()))  # type: ignore[func-returns-value]
        if pl.binding.rotary is not None:
            _rotary_hook(model, pl, entry, adapter, sizes, txn)
        if pl.binding.input_path and not patch.stash_hooks:
            host_patch = patch
            host_patch.stash_input_of(model.get_submodule(template(pl.binding.input_path, pl.index if pl.index is not None else pl.layer)))

            def unstash() -> None:
                for hk in host_patch.stash_hooks:
                    hk.remove()
                host_patch.stash_hooks.clear()

            txn.on_undo(unstash)
    if wiring is not None and wiring.passes(m) != "both":
        _join_first_pass(model, fam, entry, wiring.passes(m), wiring.first_no_grad, adapter, txn)
    if existed is None:
        txn.on_undo(lambda: patch.restore() if not patch.entries else None)
    if isinstance(pl.host, ParameterSlice):  # a slice of a raw parameter: its owner runs with the adapted stack
        owner_patch(pl.host)  # released with the last slice's patch (ParameterSlice.patch_released)
    patch.entries.append(entry)
    adapter.entries.append((patch, entry))
    txn.on_undo(lambda: (patch.entries.remove(entry), adapter.entries.remove((patch, entry)),  # type: ignore[func-returns-value]
                         patch.settle() if patch.entries and isinstance(patch, HostPatch) else None))  # type: ignore[func-returns-value]
    return entry


def _join_first_pass(model: nn.Module, fam: ArchitectureMap, entry: Entry, passes: Any, no_grad: bool, adapter: Adapter,
                     txn: Transaction) -> None:
    """``entry`` runs in one pass of each call only (``passes``: its technique reads a first forward pass): it joins
    the first pass of the model's input cell (:mod:`pefref.runtime.first_pass`)."""
    entry.passes, entry.first_no_grad = passes, no_grad
    if entry.inputs is None:
        entry.inputs = input_cell(model, fam.forward.mask, fam.forward.ids, tuple(fam.forward.cache))
        release = _Release(model)
        adapter._hooks.append(release)
        txn.on_undo(lambda: (adapter._hooks.remove(release), release.remove()))  # type: ignore[func-returns-value]
    handle = join_first_pass(model, entry.inputs, entry)
    adapter._hooks.insert(0, handle)  # before the cell's release: the entry leaves the first pass, then the cell may go
    txn.on_undo(lambda: (adapter._hooks.remove(handle), handle.remove()))  # type: ignore[func-returns-value]


def _root_entry(model: nn.Module, pl: Placement, unit: nn.Module, key: str, adapter: Adapter, fam: ArchitectureMap,
                sizes: dict[str, int], txn: Transaction, wiring: Wiring | None = None) -> tuple[RootPatch, Any, Entry]:
    """The model's root patch (its previous state), and the entry of a unit that prepends positions."""
    m = pl.module
    length = int(evaluate(parse_expr(m.length), {**sizes, **adapter.hyperparameters}, scalar_ops()))
    embed = None
    eb = fam.sites.get("embed.output")
    if eb is not None and eb.path:
        embed = model.get_submodule(eb.path)
    existed = getattr(model, _ROOT, None)
    old_embed = existed.embed if existed is not None else None
    patch = root_patch_of(model, fam.forward, sizes, embed)
    if existed is not None:
        txn.on_undo(lambda: setattr(patch, "embed", old_embed))
    entry = Entry(unit, form_of(m), adapter, layer=pl.layer if pl.binding.cache else None, length=length, unit_key=key, site=pl.site)
    if wiring is not None and getattr(m, "inputs", None):  # prepended tokens reading the call's task ids
        entry.reads = wiring.reads(m, pl.layer, pl.site)
        entry.inputs = input_cell(model, fam.forward.mask, fam.forward.ids, tuple(fam.forward.cache))
        release = _Release(model)
        adapter._hooks.append(release)
        txn.on_undo(lambda: (adapter._hooks.remove(release), release.remove()))  # type: ignore[func-returns-value]
    for fld in form_of(m).side_rules:  # a gated prefix: rescaled when its layer's attention runs
        if getattr(m, fld, None) is not None:
            _gate_hook(model, fam, pl, patch, entry, adapter, txn)
    return patch, existed, entry


def _gate_hook(model: nn.Module, fam: ArchitectureMap, pl: Placement, root: Any, entry: Entry, adapter: Adapter, txn: Transaction) -> None:
    """A pre-hook on the layer's attention (site attn.block) that gates ``entry``'s keys and values by its input."""
    blk = fam.sites.get("attn.block")
    if blk is None or not blk.path or pl.layer is None:
        raise PefrefError(f"{where_of(adapter.technique, pl)}: a prefix gate reads the input of the layer's attention (site attn.block), "
                          f"which the {fam.family} map does not bind")
    attn = model.get_submodule(template(blk.input_path or blk.path, pl.layer))  # the module whose input is the site's x
    handle = attn.register_forward_pre_hook(lambda _m, args, kwargs: root.gate_layer(entry, first_tensor(args, kwargs)), with_kwargs=True)
    adapter._hooks.append(handle)
    txn.on_undo(lambda: (adapter._hooks.remove(handle), handle.remove()))  # type: ignore[func-returns-value]


def _rotary_hook(model: nn.Module, pl: Placement, entry: Entry, adapter: Adapter, sizes: dict[str, int], txn: Transaction) -> None:
    """A pre-hook on the module the layer calls with its rotary embedding, from which ``entry`` at a site after
    the embedding rotates its host's output (:mod:`pefref.runtime.rotary`)."""
    spec = pl.binding.rotary
    assert spec is not None
    path = template(spec.of, pl.index if pl.index is not None else pl.layer)
    cell = RotaryCell(sizes["d_head"], path)
    entry.rotary = cell
    handle = keep_rotary(model.get_submodule(path), spec.argument, cell)
    adapter._hooks.append(handle)
    txn.on_undo(lambda: (adapter._hooks.remove(handle), handle.remove()))  # type: ignore[func-returns-value]


def _add_token_loss(model: nn.Module, adapter: Adapter, tech: Technique, p: ApplyPlan, txn: Transaction) -> None:
    """The technique's token loss as a forward hook of the model, after the checks that its prepended positions are
    the technique's own (their number)."""
    from pefref.runtime.token_loss import token_loss_of

    assert tech.loss is not None
    with located(f"apply {tech.id}: loss"):
        hook = token_loss_of(tech.loss, dict(adapter.hyperparameters), lambda: adapter.active)
        own = sum(e.length for _p, e in adapter.entries if isinstance(_p, RootPatch) and e.form.integration is Integration.POSITIONS and e.layer is None)
        if own != hook.prepended:
            raise PefrefError(f"loss.prompt_types gives {hook.prepended} position(s); the technique prepends {own}")
    input_cell(model, p.family.forward.mask, p.family.forward.ids)
    release = _Release(model)
    handle = model.register_forward_hook(hook)
    adapter._hooks.extend([release, handle])
    adapter.token_loss = hook
    txn.on_undo(lambda: (adapter._hooks.remove(release), adapter._hooks.remove(handle), handle.remove(), release.remove()))  # type: ignore[func-returns-value]


class _Release:
    """A removable handle (like a hook's) that gives back one use of the model's input cell."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def remove(self) -> None:
        release_input_cell(self.model)
