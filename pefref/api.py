"""The Python API: apply a technique to a model and get a handle with peft's operations.

>>> handle = pefref.apply(model, technique_id, r=16)      # doctest: +SKIP
>>> handle.report.total, handle.merge(), handle.remove()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .catalog import Catalog, default_catalog, load_techniques
from .check import MODEL_FLAGS, expand_modules
from .compile import SharedStore, SiteContext, build_unit, resolve_hyperparameters, shape_of
from .errors import CatalogError, PefrefError
from .expr import evaluate, parse_expr
from .inject import Placement, model_config, model_sizes, placements, resolve_family
from .patches import Entry, patch_of, root_patch_of
from .schema import ArchitectureMap, Technique
from .view.analysis import mergeable

__all__ = ["apply", "Adapter", "Report", "ReportRow", "resolve_technique", "ADAPTERS_ATTR"]

ADAPTERS_ATTR = "pefref_adapters"
"""Attribute of the model root holding every adapter's units (state-dict prefix)."""


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
class ReportRow:
    site: str
    module: str
    paths: list[str]
    layers: list[int | None]
    params_per_placement: int
    params: int


@dataclass
class Report:
    """What went where: per module and site, the matched paths and parameters."""

    technique: str
    family: str
    rows: list[ReportRow]
    trainable: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "family": self.family,
            "trainable": self.trainable,
            "base_params": self.base,
            "percent": round(self.percent, 6),
            "placements": [
                {"site": r.site, "module": r.module, "paths": fold_paths(r.paths), "count": len(r.paths), "layers": r.layers,
                 "params_per_placement": r.params_per_placement, "params": r.params}
                for r in self.rows
            ],
        }


def fold_paths(paths: Sequence[str]) -> list[str]:
    """Fold repeated layer paths: model.layers.{0..31}.self_attn.q_proj."""
    import re

    groups: dict[str, list[int]] = {}
    singles: list[str] = []
    for p in paths:
        m = re.search(r"\.(\d+)\.", p) or re.search(r"\[(\d+)\]", p)
        if not m:
            singles.append(p)
            continue
        key = p[: m.start(1)] + "{}" + p[m.end(1):]
        groups.setdefault(key, []).append(int(m.group(1)))
    out = list(singles)
    for key, idx in groups.items():
        idx = sorted(idx)
        if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
            out.append(key.replace("{}", "{" + f"{idx[0]}..{idx[-1]}" + "}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idx)) + "}") if len(idx) > 1 else key.replace("{}", str(idx[0])))
    return out


@dataclass(eq=False, repr=False)
class Adapter:
    """A technique applied to a model: report, trainable parameters, merge, disable, remove, save."""

    model: nn.Module
    technique: Technique
    name: str
    hyperparameters: dict[str, Any]
    family: ArchitectureMap
    sizes: dict[str, int]
    units: nn.ModuleDict
    entries: list[tuple[Any, Entry]] = field(default_factory=list)
    selected: dict[str, nn.Parameter] = field(default_factory=dict)
    mergeable_units: set[str] = field(default_factory=set)
    report: Report | None = None
    enabled: bool = True
    merged: bool = False
    _frozen: dict[str, bool] = field(default_factory=dict)
    _host_backup: dict[str, torch.Tensor] = field(default_factory=dict)
    _merge_backup: list[tuple[Any, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)
    _removed: bool = False

    def __repr__(self) -> str:
        n = self.report.trainable if self.report else 0
        state = "merged" if self.merged else ("disabled" if not self.enabled else "active")
        return f"Adapter({self.name!r}, technique={self.technique.id!r}, family={self.family.family!r}, trainable={n}, {state})"

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged

    # --- parameters ---------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter this adapter trains (its own and selected host ones), by name, each once."""
        out: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for name, p in self.units.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        for name, p in self.selected.items():
            out[f"host.{name}"] = p
        return out

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    # --- state --------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only state: units' tensors (shared ones once) and selected host parameters."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in list(self.units.named_parameters()) + list(self.units.named_buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t.detach()
        for name, p in self.selected.items():
            out[f"host.{name}"] = p.detach()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an adapter state into this adapter (keys must match exactly)."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PefrefError(f"adapter state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, t in own.items():
                if tuple(state[k].shape) != tuple(t.shape):
                    raise PefrefError(f"adapter state {k}: shape {tuple(state[k].shape)} != {tuple(t.shape)}")
                t.copy_(state[k])

    def save(self, path: str | Path) -> None:
        """Save the adapter state as safetensors (with the technique and hyperparameters as metadata)."""
        import json

        from safetensors.torch import save_file

        meta = {"technique": self.technique.id, "hyperparameters": json.dumps(self.hyperparameters, sort_keys=True)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Load adapter state saved by :meth:`save`."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))

    # --- merge ----------------------------------------------------------------

    def merge(self) -> list[str]:
        """Fold every mergeable unit into its host's weight; returns the hosts merged.

        The adapted host is an affine map of its input when its modules are
        mergeable, so its merged weight and bias are read off by running it on
        the identity: ``W' = (f(I) - f(0))^T`` and ``b' = f(0)``.
        """
        if self.merged:
            return []
        merged: list[str] = []
        hosts: dict[int, tuple[Any, list[Entry]]] = {}
        for patch, e in self.entries:
            if patch.__class__.__name__ == "HostPatch" and e.unit is not None and getattr(e, "unit_key", None) in self.mergeable_units:
                hosts.setdefault(id(patch), (patch, []))[1].append(e)
        unmergeable = [k for k in self._unit_keys() if k not in self.mergeable_units]
        if unmergeable:
            raise PefrefError(f"{self.technique.id}: modules that cannot be merged: {', '.join(unmergeable[:4])}")
        with torch.no_grad():
            for patch, es in hosts.values():
                host, kind = patch.host, patch.kind
                W = kind.get_weight(host)
                d_in = W.shape[1]
                probe = torch.cat([torch.zeros(1, d_in, dtype=W.dtype, device=W.device), torch.eye(d_in, dtype=W.dtype, device=W.device)])
                was = host.training
                host.eval()
                out = patch.run(es, (probe,), {})
                host.train(was)
                b_new = out[0]
                W_new = (out[1:] - b_new).t()
                bias = getattr(host, "bias", None)
                self._merge_backup.append((patch, W.detach().clone(), None if bias is None else bias.detach().clone()))
                if bias is None and b_new.abs().max() > 0:
                    raise PefrefError(f"cannot merge into {type(host).__name__} without a bias: the adapted map has an offset")
                kind.set_weight(host, W_new)
                if bias is not None:
                    bias.copy_(b_new)
                merged.append(type(host).__name__)
        self.merged = True
        return merged

    def unmerge(self) -> None:
        """Restore the host weights saved by :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            for patch, W, b in reversed(self._merge_backup):
                patch.kind.set_weight(patch.host, W)
                if b is not None:
                    patch.host.bias.copy_(b)
        self._merge_backup.clear()
        self.merged = False

    def _unit_keys(self) -> list[str]:
        return list(self.units.keys())

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Within the block the model computes as the base model (merged weights are restored meanwhile)."""
        was_merged = self.merged
        self.unmerge()
        prev = self.enabled
        self.enabled = False
        saved = {}
        with torch.no_grad():
            for name, t in self._host_backup.items():
                p = self.model.get_parameter(name)
                saved[name] = p.detach().clone()
                p.copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in saved.items():
                    self.model.get_parameter(name).copy_(t)
            self.enabled = prev
            if was_merged:
                self.merge()

    # --- removal ----------------------------------------------------------------

    def remove(self) -> nn.Module:
        """Detach every unit, restore host forwards, weights and requires_grad flags; return the model."""
        if self._removed:
            return self.model
        self.unmerge()
        with torch.no_grad():
            for name, t in self._host_backup.items():
                self.model.get_parameter(name).copy_(t)
        for patch, e in self.entries:
            patch.entries.remove(e)
            if not patch.entries:
                patch.restore()
        for hk in self._hooks:
            hk.remove()
        container = getattr(self.model, ADAPTERS_ATTR, None)
        if container is not None and self.name in container:
            del container[self.name]
            if len(container) == 0:
                delattr(self.model, ADAPTERS_ATTR)
        for name, p in self.model.named_parameters():
            if name in self._frozen:
                p.requires_grad_(self._frozen[name])
        self._removed = True
        return self.model


def _base_param_count(model: nn.Module, adapters: nn.Module | None) -> int:
    own = {id(p) for p in adapters.parameters()} if adapters is not None else set()
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in own and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def apply(
    model: nn.Module,
    technique: str | Path | Technique,
    *,
    sites: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    family: str | Path | ArchitectureMap | None = None,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    catalog: Catalog | None = None,
    overrides: Mapping[str, Any] | None = None,
    **hyperparameters: Any,
) -> Adapter:
    """Apply a technique to ``model`` and return its :class:`Adapter` handle.

    Args:
        model: a torch model of a family with an architecture map (or pass ``family``).
        technique: a catalog id, a :class:`Technique`, or a YAML path.
        sites: restrict to some of the technique's sites.
        layers: restrict to some layers (indices, negative from the end).
        family: architecture map name, object or YAML path (default: found from the model's class).
        name: adapter name (default: the technique id); several adapters may coexist.
        dtype, device: for the adapter's tensors (default: the host's).
        overrides / **hyperparameters: hyperparameter values, e.g. ``r=16``.
    """
    catalog = catalog or default_catalog()
    tech = resolve_technique(technique, catalog)
    fam = resolve_family(model, catalog, family)
    modules, decl = expand_modules(tech, {**catalog.techniques, tech.id: tech})
    hps = resolve_hyperparameters(decl, {**(overrides or {}), **hyperparameters})
    config = model_config(model)
    sizes = model_sizes(fam, config)
    flags = {"causal": int(fam.causal)}
    assert set(flags) == set(MODEL_FLAGS)
    name = name or tech.id
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is not None and name in container:
        raise PefrefError(f"an adapter named {name!r} is already applied; pass name=")
    places = list(placements(model, fam, sizes, modules, sites, layers))
    if not places:
        raise PefrefError(f"{tech.id}: nothing to place (check sites= and layers=)")

    # freeze the base model (adapters applied earlier keep training)
    frozen = {n: p.requires_grad for n, p in model.named_parameters() if not n.startswith(ADAPTERS_ATTR + ".")}
    for n in frozen:
        model.get_parameter(n).requires_grad_(False)

    # shared tensors take the largest shape among their users (each user sees a leading slice)
    store = SharedStore()
    shared_shapes: dict[tuple[Any, ...], tuple[int, ...]] = {}
    for pl in places:
        names = SiteContext(pl.site, pl.layer, pl.d_in, pl.d_out, sizes, flags).names(hps)
        for pname, spec in pl.module.params.items():
            key = SharedStore.key(pl.module.name, pname, spec.shared, pl.site, pl.layer)
            shp = shape_of(spec, names)
            prev = shared_shapes.get(key, shp)
            if len(prev) != len(shp):
                raise PefrefError(f"{tech.id}.{pl.module.name}.{pname}: shared tensor has different ranks at different sites")
            shared_shapes[key] = tuple(max(a, b) for a, b in zip(prev, shp))

    units = nn.ModuleDict()
    adapter = Adapter(model, tech, name, hps, fam, sizes, units, _frozen=frozen)
    site_kinds = {s: catalog.reference.sites[s].kind for s in catalog.reference.sites}
    rows: dict[tuple[str, str], ReportRow] = {}
    host_by_path = {id(m): n for n, m in model.named_modules()}
    for pl in places:
        m = pl.module
        W = pl.kind.get_weight(pl.host) if pl.kind.has_weight and pl.binding.side == "module" else None
        ref_t = W if W is not None else next(pl.host.parameters(), None)
        ctx = SiteContext(pl.site, pl.layer, pl.d_in, pl.d_out, sizes, flags,
                          dtype=dtype or (ref_t.dtype if ref_t is not None else torch.float32),
                          device=device or (ref_t.device if ref_t is not None else "cpu"),
                          W=W[pl.start:pl.start + pl.size] if (W is not None and pl.size) else W)
        unit = build_unit(m, ctx, hps, store, shared_shapes)
        key = f"{m.name}__{pl.site.replace('.', '_')}" + ("" if pl.layer is None else f"__{pl.layer}")
        n_params = 0
        if unit is None:  # select: unfreeze host parameters
            for tname in m.targets:
                p = getattr(pl.host, tname, None)
                if isinstance(p, nn.Parameter):
                    full = f"{host_by_path[id(pl.host)]}.{tname}"
                    p.requires_grad_(True)
                    adapter.selected[full] = p
                    adapter._host_backup.setdefault(full, p.detach().clone())  # disable()/remove() give the base values
                    n_params += p.numel()
        else:
            units[key] = unit
            n_params = sum(p.numel() for n, p in unit.named_parameters() if p.requires_grad)
            if m.host_update is not None and W is not None:
                env = {**ctx.names(hps), "W": ctx.W.detach(), **{n: getattr(unit, n) for n in m.params}}
                from .ops import op_table

                new_w = evaluate(parse_expr(m.host_update), env, op_table())
                if pl.size:  # a sliced site (a fused projection) updates its own rows only
                    new_w = torch.cat([W[:pl.start], new_w, W[pl.start + pl.size:]])
                full = f"{host_by_path[id(pl.host)]}.{'weight'}"
                adapter._host_backup.setdefault(full, pl.host.weight.detach().clone())
                pl.kind.set_weight(pl.host, new_w.detach())
            entry = _attach(model, pl, unit, adapter, fam, sizes, catalog)
            entry.unit_key = key  # type: ignore[attr-defined]
            if mergeable(m, [site_kinds[pl.site]]) and pl.kind.name in ("linear", "conv1d"):
                adapter.mergeable_units.add(key)
        row = rows.setdefault((m.name, pl.site), ReportRow(pl.site, m.name, [], [], n_params, 0))
        row.paths.append(pl.path)
        row.layers.append(pl.layer)
        row.params += n_params
    if len(units):
        if container is None:
            container = nn.ModuleDict()
            model.add_module(ADAPTERS_ATTR, container)
        container[name] = units
    base = _base_param_count(model, container)
    if adapter.num_trainable() == 0:
        adapter.remove()
        raise PefrefError(f"{tech.id}: nothing to train on this model (e.g. selected biases that its {fam.family} modules do not have)")
    adapter.report = Report(tech.id, fam.family, list(rows.values()), adapter.num_trainable(), base)
    return adapter


def _attach(model: nn.Module, pl: Placement, unit: nn.Module, adapter: Adapter, fam: ArchitectureMap, sizes: dict[str, int], catalog: Catalog) -> Entry:
    m = pl.module
    if m.form == "prepend":
        length = int(evaluate(parse_expr(m.length), {**sizes, **adapter.hyperparameters}, {}))
        embed = None
        eb = fam.sites.get("embed.output")
        if eb is not None and eb.path:
            embed = model.get_submodule(eb.path)
        patch = root_patch_of(model, fam.forward, sizes, embed)
        entry = Entry(unit, "prepend", adapter, layer=pl.layer if pl.binding.cache else None, length=length)
    else:
        patch = patch_of(pl.host, pl.kind, pl.binding.output == "first")
        side = "input" if pl.binding.side == "input" or getattr(m, "side", "output") == "input" else "output"
        entry = Entry(unit, m.form, adapter, side=side, start=pl.start, size=pl.size, layer=pl.layer)
        if pl.binding.input_path and not patch.stash_hooks:
            patch.stash_input_of(model.get_submodule(pl.binding.input_path.format(i=pl.layer)))
    patch.entries.append(entry)
    adapter.entries.append((patch, entry))
    return entry
