"""The Python API: apply a technique to a model and get a handle with peft's operations.

>>> handle = pefref.apply(model, technique_id, r=16)      # doctest: +SKIP
>>> handle.report.trainable, handle.merge(), handle.remove()  # doctest: +SKIP
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pefref.compiler.units import SharedStore, Unit, build_unit, resolve_hyperparameters
from pefref.language.catalog import Catalog, catalog_for, default_catalog, load_techniques
from pefref.language.check import MODEL_FLAGS, expand_modules
from pefref.language.composition import is_composition_file
from pefref.language.errors import CatalogError, PefrefError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.placement import retarget
from pefref.language.schema import ArchitectureMap, Technique
from pefref.language.sizes import scalar_ops
from pefref.language.templates import template
from pefref.runtime.adapter import ADAPTERS_ATTR, Adapter
from pefref.runtime.connect import Wiring, with_taps
from pefref.runtime.inject import Placement, model_config, model_sizes, placements, resolve_family
from pefref.runtime.layer_batches import link_layer_batches
from pefref.runtime.ledger import Layer, check_not_selected, freeze, ledger_of
from pefref.runtime.patches import _PATCH, _ROOT, Entry, HostPatch, first_tensor, input_cell, patch_of, release_input_cell, root_patch_of
from pefref.runtime.planning import check_selectable, check_unit, host_update_of, plan_apply, where_of
from pefref.runtime.precision import AdapterDtype
from pefref.runtime.report import Report, ReportRow, fold_paths
from pefref.runtime.rows import take as take_rows
from pefref.runtime.saved_modules import SAVED_MODULE, resolve_saved
from pefref.runtime.transaction import Transaction, located
from pefref.view.analysis import connected_modules, mergeable

__all__ = ["apply", "resolve_technique", "Adapter", "Report", "ReportRow", "fold_paths", "ADAPTERS_ATTR"]


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


def _base_param_count(base: list[torch.Tensor]) -> int:
    """Elements of the base model's parameters (``base``: each once, no adapter's)."""
    return sum(p.numel() for p in base)


def apply(
    model: nn.Module,
    technique: str | Path | Technique,
    *,
    sites: Sequence[str] | None = None,
    layers: Sequence[int | str] | None = None,
    family: str | Path | ArchitectureMap | None = None,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    catalog: Catalog | None = None,
    overrides: Mapping[str, Any] | None = None,
    modules_to_save: Sequence[str] | None = None,
    adapter_dtype: AdapterDtype = "auto",
    **hyperparameters: Any,
) -> Adapter:
    """Apply a technique to ``model`` and return its :class:`Adapter` handle.

    Args:
        model: a torch model of a family with an architecture map (or pass ``family``).
        technique: a catalog id, a :class:`Technique`, or a YAML path; a composition file
            (``catalog/compositions/``) gives a :class:`~pefref.runtime.compose.Composition` instead.
        sites: where the modules go: the technique's own sites narrow it; other sites, patterns
            (``attn.*``) and selectors (``all-linear``) place its modules on every compatible site
            (see :mod:`pefref.language.placement`).
        layers: restrict to some layers (indices, negative from the end; in encoder-decoder maps also stack names, e.g. 'decoder').
        family: architecture map name, object or YAML path (default: found from the model's class).
        name: adapter name (default: the technique id); several adapters may coexist.
        dtype, device: for the adapter's tensors (default: the host's device; the dtype by ``adapter_dtype``).
        adapter_dtype: ``"auto"`` (default, peft's ``autocast_adapter_dtype=True``): on a bf16/fp16 host the
            adapter's tensors are fp32 and it computes in fp32, rounding its result once to the host's dtype;
            ``"host"``: the adapter's tensors in the host's dtype.
        overrides / **hyperparameters: hyperparameter values, e.g. ``r=16``.
        modules_to_save: whole modules trained and saved with the adapter (peft's
            ``modules_to_save``): sites such as ``head`` (the class's task head) or module paths.
    """
    if catalog is None:  # a catalog id loads only what it needs
        catalog = catalog_for(technique) if isinstance(technique, str) and not technique.endswith((".yaml", ".yml")) else default_catalog()
    if not isinstance(technique, Technique) and Path(technique).suffix in (".yaml", ".yml") and is_composition_file(Path(technique)):
        from pefref.runtime.compose import apply_composition  # a composition file: several adapters and their blocks

        return apply_composition(model, technique, catalog=catalog, name=name, family=family, dtype=dtype, device=device,  # type: ignore[return-value]
                                 adapter_dtype=adapter_dtype)
    tech = resolve_technique(technique, catalog)
    fam = resolve_family(model, catalog, family)
    if sites is not None:  # placement anywhere: names, patterns (attn.*) and selectors (all-linear)
        tech = retarget(tech, sites, catalog.reference, catalog.techniques, fam)
    modules, decl = expand_modules(tech, ChainMap({tech.id: tech}, catalog.techniques))  # type: ignore[arg-type]
    modules = with_taps(modules)  # connections that read a site's hidden state read a tap there
    hps = resolve_hyperparameters(decl, {**(overrides or {}), **hyperparameters})
    config = model_config(model)
    sizes = model_sizes(fam, config)
    flags = {"causal": int(fam.causal)}
    assert set(flags) == set(MODEL_FLAGS)
    name = name or tech.id
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is not None and name in container:
        raise PefrefError(f"an adapter named {name!r} is already applied; pass name=")
    places = list(placements(model, fam, sizes, modules, None, layers, catalog.reference))
    if not places:
        raise PefrefError(f"{tech.id}: nothing to place (check sites= and layers=)")
    saved = resolve_saved(model, fam, modules_to_save or [], sizes["L"])
    wiring = Wiring(modules, places, name)
    plan = plan_apply(tech, model, places, sizes, flags, hps, dtype, device, adapter_dtype)
    site_kinds = {s: catalog.reference.sites[s].kind for s in catalog.reference.sites}
    connected = connected_modules(modules)  # modules in a connection never fold into a weight
    host_by_path: dict[int, str] = {}  # filled on first use (select modules only)

    # build every unit and host update first: the model is only read until all of them exist
    store = SharedStore()
    built: list[tuple[Placement, Unit | None, str, torch.Tensor | None]] = []
    pending: dict[int, torch.Tensor] = {}  # host weights as this apply's host updates leave them
    probes: dict[Any, torch.Tensor] = {}  # what publishing units' probes gave, for the probes of the units reading them
    for pl, ctx in zip(places, plan.contexts):
        m = pl.module
        with located(where_of(tech, pl)):
            W = None
            if pl.kind.has_weight and pl.binding.side == "module":
                W = pending.get(id(pl.host), pl.kind.get_weight(pl.host))  # type: ignore[misc]
                ctx.W = take_rows(W, 0, pl.start, pl.size, pl.period)
            unit = build_unit(m, ctx, hps, store, plan.shared_shapes, publish=wiring.publishes(m))
            key = f"{m.name}__{pl.site.replace('.', '_')}" + ("" if pl.layer is None else f"__{pl.layer}")
            new_w = None
            if unit is not None:
                check_unit(unit, m, pl, ctx, hps, probes, wiring.reads(m, pl.layer), wiring.key(m.name, pl.site, pl.layer) if wiring.publishes(m) else None)
                if m.host_update is not None and W is not None:
                    new_w = host_update_of(m, unit, ctx, hps, W, pl.start, pl.size, pl.period)
                    pending[id(pl.host)] = new_w
        built.append((pl, unit, key, new_w))

    units = nn.ModuleDict()
    adapter = Adapter(model, tech, name, hps, fam, sizes, units)
    rows: dict[tuple[str, str], ReportRow] = {}
    merge_ok: dict[tuple[str, str, bool], bool] = {}  # (module, site kind, host has a bias): derived once, not per layer
    with Transaction(f"apply {tech.id} as adapter {name!r}") as txn:
        selected: list[torch.Tensor] = []
        for pl, unit, _key, _w in built:
            if unit is None:  # select: these host parameters train in place
                for tname in pl.module.targets:
                    p = getattr(pl.host, tname, None)
                    if isinstance(p, nn.Parameter):
                        if not host_by_path:
                            host_by_path.update((id(mod), n) for n, mod in model.named_modules())
                        full = f"{host_by_path[id(pl.host)]}.{tname}"
                        adapter.selected[full] = p
                        adapter._host_backup.setdefault(full, p.detach().clone())  # disable()/remove() give the base values
                        selected.append(p)
        saved_rows: dict[str, tuple[list[str], int]] = {}
        for s in saved:  # modules_to_save: whole modules train in place with the adapter
            paths, n_saved = saved_rows.get(s.label, ([], 0))
            for pname, p in s.module.named_parameters():
                full = f"{s.path}.{pname}"
                if full in adapter.selected:
                    continue
                adapter.selected[full] = p
                adapter._host_backup.setdefault(full, p.detach().clone())
                selected.append(p)
                n_saved += p.numel()
            saved_rows[s.label] = ([*paths, s.path], n_saved)
        check_selectable(model, selected, tech.id)
        base: list[torch.Tensor] = [p for n, p in model.named_parameters() if not n.startswith(ADAPTERS_ATTR + ".")]
        freeze(txn, model, adapter, base, selected)  # the base model is frozen (adapters applied earlier keep training)
        for pl, unit, key, new_w in built:
            m = pl.module
            if unit is None:
                n_params = sum(p.numel() for t in m.targets if isinstance(p := getattr(pl.host, t, None), nn.Parameter))
            else:
                units[key] = unit
                adapter.unit_modules[key] = m
                n_params = unit.own_numel()
                if new_w is not None:
                    check_not_selected(model, [cast(torch.Tensor, pl.host.weight)], f"{where_of(tech, pl)}: host_update")
                    led = ledger_of(txn, pl.host, pl.kind)
                    bias = getattr(pl.host, "bias", None)
                    led.push(txn, Layer(adapter, "update", _no_recompute), (new_w, None if bias is None else bias.detach().clone()))  # type: ignore[union-attr]
                _attach(model, pl, unit, key, adapter, fam, sizes, txn, wiring)
                mk = (m.name, site_kinds[pl.site], isinstance(getattr(pl.host, "bias", None), torch.Tensor))
                if mk not in merge_ok:
                    merge_ok[mk] = mergeable(m, [mk[1]], mk[2], m.name in connected)
                if merge_ok[mk] and pl.kind.name in ("linear", "conv1d"):
                    adapter.mergeable_units.add(key)
            row = rows.setdefault((m.name, pl.site), ReportRow(pl.site, m.name, [], [], n_params, 0))
            row.paths.append(pl.path)
            row.layers.append(pl.layer)
            row.params += n_params
        root = getattr(model, _ROOT, None)
        if root is not None:  # prefixes: every layer gets as many positions (the extended mask is shared)
            with located(f"apply {tech.id}"):
                root.kv_length([e for e in root.entries if e.form == "prepend" and e.layer is not None])
            link_layer_batches([e for _p, e in adapter.entries if _p is root])  # prefixes of every layer computed at once
        container = getattr(model, ADAPTERS_ATTR, None)
        if len(units):
            if container is None:
                container = nn.ModuleDict()
                model.add_module(ADAPTERS_ATTR, container)
                txn.on_undo(lambda: delattr(model, ADAPTERS_ATTR))
            container[name] = units
            txn.on_undo(lambda: container.__delitem__(name))
        for label, (paths, n) in saved_rows.items():
            rows[(SAVED_MODULE, label)] = ReportRow(label, SAVED_MODULE, paths, [None] * len(paths), n // len(paths), n)
        n_trainable = adapter.num_trainable()
        if n_trainable == 0:
            raise PefrefError(f"{tech.id}: nothing to train on this model (e.g. selected biases that its {fam.family} modules do not have)")
        adapter.report = Report(tech.id, fam.family, list(rows.values()), n_trainable, _base_param_count(base))
    return adapter


def _no_recompute() -> Any:
    raise AssertionError("an update layer is re-applied by its delta")


def _attach(model: nn.Module, pl: Placement, unit: nn.Module, key: str, adapter: Adapter, fam: ArchitectureMap,
            sizes: dict[str, int], txn: Transaction, wiring: Wiring | None = None) -> Entry:
    """Attach one unit at its host (or the model's root), recording in ``txn`` how to detach it."""
    m = pl.module
    if m.form == "prepend":
        length = int(evaluate(parse_expr(m.length), {**sizes, **adapter.hyperparameters}, scalar_ops()))
        embed = None
        eb = fam.sites.get("embed.output")
        if eb is not None and eb.path:
            embed = model.get_submodule(eb.path)
        existed = getattr(model, _ROOT, None)
        old_embed = existed.embed if existed is not None else None
        patch: Any = root_patch_of(model, fam.forward, sizes, embed)
        if existed is not None:
            txn.on_undo(lambda: setattr(patch, "embed", old_embed))
        entry = Entry(unit, "prepend", adapter, layer=pl.layer if pl.binding.cache else None, length=length, unit_key=key, site=pl.site)
        if getattr(m, "gate", None) is not None:  # a gated prefix: rescaled when its layer's attention runs
            _gate_hook(model, fam, pl, patch, entry, adapter, txn)
    else:
        existed = pl.host.__dict__.get(_PATCH)
        patch = patch_of(pl.host, pl.kind, pl.binding.output == "first")
        side = "input" if pl.binding.side == "input" or getattr(m, "side", "output") == "input" else "output"
        entry = Entry(unit, m.form, adapter, side=side, start=pl.start, size=pl.size, period=pl.period, layer=pl.layer, unit_key=key, site=pl.site)
        if wiring is not None:  # connections: what the unit reads, and where its output goes
            entry.reads = wiring.reads(m, pl.layer)
            entry.publish = wiring.key(m.name, pl.site, pl.layer) if wiring.publishes(m) else None
        if entry.reads_mask or entry.reads or entry.publish is not None:
            entry.inputs = input_cell(model, fam.forward.mask)
            release = _Release(model)
            adapter._hooks.append(release)
            txn.on_undo(lambda: (adapter._hooks.remove(release), release.remove()))  # type: ignore[func-returns-value]
        if pl.binding.input_path and not patch.stash_hooks:
            patch.stash_input_of(model.get_submodule(template(pl.binding.input_path, pl.index if pl.index is not None else pl.layer)))
            txn.on_undo(lambda: [hk.remove() for hk in patch.stash_hooks] and patch.stash_hooks.clear())
    if existed is None:
        txn.on_undo(lambda: patch.restore() if not patch.entries else None)
    patch.entries.append(entry)
    adapter.entries.append((patch, entry))
    txn.on_undo(lambda: (patch.entries.remove(entry), adapter.entries.remove((patch, entry)),  # type: ignore[func-returns-value]
                         patch.settle() if patch.entries and isinstance(patch, HostPatch) else None))  # type: ignore[func-returns-value]
    return entry


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


class _Release:
    """A removable handle (like a hook's) that gives back one use of the model's input cell."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def remove(self) -> None:
        release_input_cell(self.model)

