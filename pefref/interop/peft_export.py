"""pefref → peft: an applied adapter as peft's config and tensors (see :mod:`pefref.interop.peft_format`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pefref.compiler.parts import read
from pefref.interop.peft_common import (
    PREFIX,
    PROMPT,
    alpha_for,
    config_get,
    config_set,
    fixed_config,
    from_model,
    group_pieces,
    host_order,
    indexed_number,
    refuse_bias,
    refuse_family,
    refuse_tied,
    size_values,
    slice_rows,
    stored_apart,
    stored_at,
    target_name,
    task_type,
    to_peft,
    unit_key,
)
from pefref.interop.peft_experts import PeftState, split_experts
from pefref.language.connections import is_tap
from pefref.language.errors import PefrefError
from pefref.language.forms import form_of
from pefref.language.interop_table import method_for, refusal_for, rows_for
from pefref.language.schema import InteropTable, PeftMethod, PeftModuleMap, Technique
from pefref.runtime.adapter import Adapter
from pefref.runtime.hosts import host_kind
from pefref.runtime.inject import model_config
from pefref.runtime.ledger import host_change
from pefref.runtime.param_slices import ParameterSlice
from pefref.runtime.report import ReportRow
from pefref.runtime.saved_modules import SAVED_MODULE

__all__ = ["PeftState", "peft_state"]

_Piece = tuple[list[int], nn.Module]  # (the fused module's output features it owns, unit) of one slice placement


def _row(adapter: Adapter, table: InteropTable) -> PeftMethod:
    tech = adapter.technique
    method = method_for(tech.id, table, adapter.hyperparameters)
    if method is not None:
        return method
    why = refusal_for(tech.id, table)
    if why is not None:
        raise PefrefError(f"{tech.id}: not converted to peft's format: {why}")
    rows = rows_for(tech.id, table)
    if rows:
        needs = "; ".join(", ".join(f"{k}={v!r}" for k, v in m.when.items()) for m in rows)
        raise PefrefError(f"{tech.id}: peft has an exact form only for {needs}")
    known = ", ".join(sorted({m.technique for m in table.methods if not m.import_only}))
    rewrites = sorted(str(m.name) for m in tech.modules if getattr(m, "host_update", None) and getattr(m, "calibration", None))
    why = (f"; its module(s) {', '.join(rewrites)} rewrite the host weights from calibration data at apply (host_update), "
           "which peft's adapter file does not hold and peft's loader cannot recompute without that data"
           if rewrites else "")
    raise PefrefError(f"{tech.id}: peft has no exact form of this technique{why} (techniques with one: {known})")


@dataclass
class _Export:
    """What :func:`peft_state` gathers while it walks the adapter's placements."""

    adapter: Adapter
    method: PeftMethod
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, set[str]] = field(default_factory=dict)  # config field -> module paths it lists
    pieces: dict[tuple[str, str], list[_Piece]] = field(default_factory=dict)  # (module, fused path) -> its slice placements
    conv1d: bool = False
    saved: list[str] = field(default_factory=list)  # modules to save whole
    selected: set[str] = field(default_factory=set)  # host parameters written
    indexed: dict[str, Any] = field(default_factory=dict)  # key of an indexed tensor -> the tensor written there
    table: InteropTable | None = None

    @property
    def tech(self) -> Technique:
        return self.adapter.technique

    def put(self, key: str, value: torch.Tensor, where: str) -> None:
        if key in self.tensors:
            raise PefrefError(f"{self.tech.id}: two placements on {where}; peft holds one {self.method.peft_type} module per host module")
        self.tensors[key] = value


def peft_state(adapter: Adapter, table: InteropTable | None = None) -> PeftState:
    """peft's config and tensors for ``adapter`` (nothing written).

    Raises:
        PefrefError: the technique has no exact peft form, or a placement cannot be written in it.
    """
    from pefref.language.interop_table import interop_table

    sliced = sorted({e.site for patch, e in adapter.entries if isinstance(getattr(patch, "host", None), ParameterSlice)})
    if sliced:  # peft's target_parameters layout (one lora_A/lora_B per stacked parameter) is not written yet
        raise PefrefError(f"adapter {adapter.name!r}: its units on raw parameter sites ({', '.join(sliced)}) have no "
                          "peft form written by pefref yet; save it with pefref's own format")
    table = table or interop_table()
    method = _row(adapter, table)
    if adapter.merged:
        raise PefrefError(f"{adapter.name}: unmerge() before saving in peft's format")
    refuse_tied(method, adapter.model)
    refuse_family(method, adapter.family.family)
    for hp, v in from_model(method, model_config(adapter.model)).items():
        if adapter.hyperparameters[hp] != v:
            raise PefrefError(f"{adapter.name}: {hp} is {adapter.hyperparameters[hp]!r}, the model's config says {v!r}; peft reads "
                              f"it off the model, so this adapter has no exact form in peft's {method.peft_type}")
    cfg: dict[str, Any] = {"peft_type": method.peft_type, "task_type": task_type(adapter.family, table), "inference_mode": True,
                           "base_model_name_or_path": None, **fixed_config(method)}
    for field_name, hp in method.hyperparameters.items():
        config_set(cfg, field_name, adapter.hyperparameters[hp])
    cfg.update({field_name: adapter.sizes[size] for field_name, size in method.sizes.items()})
    ex = _Export(adapter, method, cfg, table=table)
    maps = {mm.module: mm for mm in method.modules}
    in_place = {m.name for m in ex.tech.modules if getattr(m, "form", None) is not None and not form_of(m).has_unit}  # train host tensors
    for row in adapter.report.rows if adapter.report else []:
        if row.module == SAVED_MODULE:
            ex.saved += row.paths
            continue
        if is_tap(row.module, row.site):  # what a connection reads: no tensors
            continue
        mm = maps.get(row.module)
        if mm is None:
            raise PefrefError(f"{ex.tech.id}: module {row.module!r} has no counterpart in peft's {method.peft_type}")
        if mm.computed is not None:
            continue
        for field_name in mm.targets:
            ex.targets.setdefault(field_name, set()).update(_target_names(adapter, method, row) if method.targets_by_name else row.paths)
        if row.module in in_place:
            _export_selected(ex, row, mm)
        else:
            _export_units(ex, row, mm)
    for (module, path), parts in sorted(ex.pieces.items()):
        _fuse(adapter, method, maps[module], path, parts, cfg, ex.put)
    if method.top_layers is not None:
        cfg[method.top_layers] = _top_layers(adapter, method)
    if method.residual is not None:  # peft's converted LoRA: twice the rank and alpha, the same scaling
        for field_name in (method.residual.rank, method.residual.alpha):
            config_set(cfg, field_name, 2 * config_get(cfg, field_name))
    return _complete(ex)


def _top_layers(adapter: Adapter, method: PeftMethod) -> int:
    """How many layers, counted from the last, the technique's modules sit on (they must sit on those only)."""
    L = adapter.sizes["L"]
    held = sorted({li for r in (adapter.report.rows if adapter.report else []) if not is_tap(r.module, r.site) for li in r.layers if li is not None})
    if not held or held != list(range(L - len(held), L)):
        raise PefrefError(f"{adapter.technique.id} sits on layers {held}: peft's {method.peft_type} adapts the last "
                          f"{method.top_layers} layers, so only placements on the last layers of the model convert")
    return len(held)


def _export_selected(ex: _Export, row: ReportRow, mm: PeftModuleMap) -> None:
    """A select placement: the host parameters it unfroze, under peft's names."""
    for path in row.paths:
        for target, tname in mm.tensors.items():
            if f"{path}.{target}" in ex.adapter.selected:
                ex.put(f"{PREFIX}{path}.{tname}", ex.adapter.selected[f"{path}.{target}"].detach(), path)
                ex.selected.add(f"{path}.{target}")


def _export_units(ex: _Export, row: ReportRow, mm: PeftModuleMap) -> None:
    """A row's units, one per host module, as peft's tensors (slices of a fused module are kept to be fused)."""
    adapter, method, tech = ex.adapter, ex.method, ex.tech
    binding = adapter.family.sites[row.site]
    for path, layer in zip(row.paths, row.layers):
        unit = adapter.units[unit_key(row.module, row.site, layer)]
        host = adapter.model.get_submodule(path)
        ex.conv1d |= _host_kind(adapter, method, mm, row.module, path) == "conv1d"
        refuse_bias(method, path, host)
        _put_shared(ex, mm, path, unit)
        _put_apart(adapter, mm, row.module, path, unit, ex.put, ex.indexed)
        if binding.slice is not None:
            if method.fused is None:
                raise PefrefError(f"{tech.id}.{row.module} sits on {row.site}, a slice of the fused {path!r}: peft's "
                                  f"{method.peft_type} adapts whole modules and has no exact form of a slice; place it "
                                  f"on the fused site instead (sites=['attn.qkv'])")
            rows = slice_rows(adapter.family, row.site, adapter.sizes, host_kind(host).widths(host)[1])
            ex.pieces.setdefault((row.module, path), []).append((rows, unit))
            continue
        at = stored_at(adapter.family, mm, path, layer)
        values = {pname: read(unit, pname).detach() for pname in mm.tensors}
        if method.residual is not None:
            values = _with_initial(ex, host, path, values)
        for pname, tname in mm.tensors.items():
            ex.put(f"{PREFIX}{at}.{tname}", to_peft(values[pname], mm, pname), at)
        _put_grouped(ex, mm, at, unit)
        for tname, value in _zero_tensors(mm, host, unit).items():
            ex.put(f"{PREFIX}{path}.{tname}", value, path)


def _with_initial(ex: _Export, host: nn.Module, path: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A and B with the initial factors of the host's rewrite appended (peft's converted LoRA, rank 2r): the change
    :math:`W_0 - W_{res} = s B_0 A_0` factorised by its thin SVD (fp64) at the adapter's rank."""
    res = ex.method.residual
    assert res is not None
    change = host_change(host, ex.adapter)
    if change is None:
        raise PefrefError(f"{ex.tech.id} at {path}: no rewrite of the host weight is recorded for this adapter; "
                          "peft's converted low-rank form needs it")
    a, b = values[res.down], values[res.up]
    k, s = a.shape[0], float(config_get(ex.config, res.alpha)) / float(config_get(ex.config, res.rank))
    u, sv, vh = torch.linalg.svd(change.double() / s, full_matrices=False)
    a0, b0 = vh[:k].to(a.dtype), (u[:, :k] * sv[:k]).to(b.dtype)
    return {**values, res.down: torch.cat([a, a0], 0), res.up: torch.cat([b, -b0], 1)}


def _put_grouped(ex: _Export, mm: PeftModuleMap, at: str, unit: nn.Module) -> None:
    """The pieces peft keeps per group of rows (the row's ``grouped``); what lies past a group's cut must be zero."""
    for pname, g in mm.grouped.items():
        t = read(unit, pname).detach()
        held = torch.zeros_like(t, dtype=torch.bool)
        for k, idx in group_pieces(t, read(unit, g.labels), g.by, g.rank_dim):
            ex.put(f"{PREFIX}{at}.{g.name.format(group=k)}", to_peft(t[idx].clone(), mm, pname), at)
            held[idx] = True
        if t[~held].count_nonzero():
            raise PefrefError(f"{ex.tech.id}: {pname!r} at {at} is non-zero past the ranks of its smaller groups (a group of n rows has at "
                              f"most n ranks in peft's {ex.method.peft_type}), so peft's format cannot hold it")


def _put_shared(ex: _Export, mm: PeftModuleMap, path: str, unit: nn.Module) -> None:
    """The placement's tensors peft stores once for several placements (for all, or per projection) and the sizes it
    keeps beside them; one key per projection must not stand for two different tensors."""
    d_in, d_out = host_kind(ex.adapter.model.get_submodule(path)).widths(ex.adapter.model.get_submodule(path))
    for pname, key in mm.shared.items():  # as it was read last (a placement may read a leading part of it)
        ex.tensors[key] = to_peft(read(unit, pname).detach(), mm, pname)
    values = {t.format(target=target_name(path)): to_peft(read(unit, p).detach(), mm, p) for p, t in mm.by_target.items()}
    for key, value in {**values, **size_values(mm, path, d_in, d_out)}.items():
        if key in ex.tensors and not torch.equal(ex.tensors[key], value):
            raise PefrefError(f"{ex.tech.id}: peft keeps one tensor {key!r} where this adapter has different ones (at {path})")
        ex.tensors[key] = value


def _complete(ex: _Export) -> PeftState:
    """Computed prompts, target lists, the Conv1D flag and modules to save; every selected host parameter must be written."""
    adapter, method, cfg, tensors = ex.adapter, ex.method, ex.config, ex.tensors
    for mm in method.modules:
        if mm.computed is not None:
            tensors[PROMPT] = _computed(adapter, mm, ex.tech)
    for field_name, paths in ex.targets.items():
        config_set(cfg, field_name, sorted(paths))
    if method.conv1d_flag:
        cfg[method.conv1d_flag] = ex.conv1d
    if ex.saved:
        cfg["modules_to_save"] = sorted(ex.saved)
        for name, p in adapter.selected.items():
            if any(name.startswith(s + ".") for s in ex.saved):
                tensors[f"{PREFIX}{name}"] = p.detach()
    selected = ex.selected | {k[len(PREFIX):] for k in tensors if k.startswith(PREFIX)}
    left = sorted(set(adapter.selected) - selected)
    if left:
        raise PefrefError(f"{ex.tech.id}: host parameters {', '.join(left[:3])} are selected where peft's {method.peft_type} has no place for them")
    folders = split_experts(method, ex.table, adapter.hyperparameters, cfg, tensors) if method.experts and ex.table else {}
    return PeftState(cfg, _own_storage(tensors), folders, method.experts.field if method.experts else None)


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, a tensor shared by several placements copied once per key (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _zero_tensors(mm: PeftModuleMap, host: nn.Module, unit: nn.Module) -> dict[str, torch.Tensor]:
    """The constant-zero tensors peft keeps under ``host`` for this module (the row's ``zeros``), in the unit's dtype."""
    from pefref.language.expr import evaluate, parse_expr
    from pefref.language.sizes import scalar_ops

    if not mm.zeros:
        return {}
    d_in, d_out = host_kind(host).widths(host)
    names = {"d_in": d_in, "d_out": d_out}
    dtype = next((p.dtype for p in unit.parameters()), torch.float32)
    return {tname: torch.zeros([d if isinstance(d, int) else int(evaluate(parse_expr(d), names, scalar_ops())) for d in shape], dtype=dtype)
            for tname, shape in mm.zeros.items()}


def _target_names(adapter: Adapter, method: PeftMethod, row: ReportRow) -> list[str]:
    """A placement row's targets as module names within a layer (one per site), for rows that write ``targets_by_name``."""
    binding = adapter.family.sites[row.site]
    if binding.slice is not None or binding.path is None or "{i}." not in binding.path:
        return list(row.paths)
    if sorted(row.layers) != list(range(adapter.sizes["L"])):  # type: ignore[type-var]
        raise PefrefError(f"{adapter.technique.id}.{row.module} on {row.site} covers layers {row.layers}: peft's {method.peft_type} "
                          f"targets a module name in every layer (it shares tensors by target), so only placements on all layers convert")
    return [binding.path.split("{i}.", 1)[1]]


def _host_kind(adapter: Adapter, method: PeftMethod, mm: PeftModuleMap, module: str, path: str) -> str:
    """'linear', 'conv1d' or the class name of the host at ``path``; refused where peft stores the module's
    tensors under a host module it does not adapt."""
    host = adapter.model.get_submodule(path)
    kind = "linear" if isinstance(host, nn.Linear) else "conv1d" if type(host).__name__ == "Conv1D" else \
        "embedding" if isinstance(host, nn.Embedding) else "block"
    if kind not in method.hosts and not stored_apart(mm):
        raise PefrefError(f"{adapter.technique.id}.{module} on {path} ({type(host).__name__}): peft's {method.peft_type} "
                          f"adapts only {' and '.join(method.hosts)} modules")
    return kind


def _put_apart(adapter: Adapter, mm: PeftModuleMap, module: str, path: str, unit: nn.Module, put: Any, written: dict[str, Any]) -> None:
    """A placement's tensors that peft keys by host and name (``repeated``: a shared tensor whole under every host)
    or by the host's position among the module's hosts (``indexed``)."""
    for pname, tname in mm.repeated.items():  # a copy per host (safetensors refuses tensors sharing memory)
        put(f"{PREFIX}{path}.{tname}", to_peft(read(unit, pname).detach(), mm, pname).clone(), path)
    if mm.indexed:
        order = host_order(adapter.model, _paths(adapter, module))
        for pname, template in mm.indexed.items():
            value = to_peft(read(unit, pname).detach(), mm, pname)
            key = template.format(index=indexed_number(adapter.technique, adapter.hyperparameters, module, pname, order, path))
            if key not in written or written[key] is not read(unit, pname):  # a tensor of a group of placements: written once
                put(key, value, path)
                written[key] = read(unit, pname)


def _paths(adapter: Adapter, module: str) -> list[str]:
    """Every host path of a module's placements."""
    return [p for r in (adapter.report.rows if adapter.report else []) if r.module == module for p in r.paths]


def _fuse(adapter: Adapter, method: PeftMethod, mm: PeftModuleMap, path: str, parts: list[_Piece], cfg: dict[str, Any],
          put: Any) -> None:
    """Placements on k slices of one fused module as one block-structured module of rank k·r."""
    fused = method.fused
    assert fused is not None
    parts = sorted(parts, key=lambda p: p[0][0])
    d_out = host_kind(adapter.model.get_submodule(path)).widths(adapter.model.get_submodule(path))[1]
    for pname, tname in mm.tensors.items():
        how = fused.tensors.get(pname)
        if how is None:
            raise PefrefError(f"{adapter.technique.id}: tensor {pname!r} has no block-structured form on the fused {path!r}")
        values = [read(u, pname).detach() for _rows, u in parts]
        if how == "stack":
            out = torch.cat(values, dim=0)
        else:
            out = values[0].new_zeros(d_out, sum(v.shape[1] for v in values))
            col = 0
            for (rows, _u), v in zip(parts, values):
                out[rows, col:col + v.shape[1]] = v
                col += v.shape[1]
        put(f"{PREFIX}{path}.{tname}", to_peft(out, mm, pname), path)
    k = len(parts)
    cfg.setdefault(fused.rank_pattern, {})[path] = cfg[fused.rank] * k
    cfg.setdefault(fused.alpha_pattern, {})[path] = alpha_for(fused.alpha_growth, cfg[fused.alpha], k)


def _computed(adapter: Adapter, mm: PeftModuleMap, tech: Technique) -> torch.Tensor:
    """What a prepend module computes at inference: tokens [n, d], or keys and values of every layer [n, L*2*d_kv]."""
    rows = [r for r in adapter.report.rows if r.module == mm.module] if adapter.report else []
    if not rows:
        raise PefrefError(f"{tech.id}: module {mm.module!r} is not placed")
    (row,) = rows
    with torch.no_grad():
        if mm.computed == "tokens":
            return adapter.units[unit_key(row.module, row.site, None)](None, None, None, False).detach()
        L = adapter.sizes["L"]
        if sorted(row.layers) != list(range(L)):  # type: ignore[type-var]
            raise PefrefError(f"{tech.id}: peft's prefixes cover every layer; this adapter has them on layers {row.layers}")
        parts = []
        for i in range(L):
            k, v = adapter.units[unit_key(row.module, row.site, i)](None, None, None, False)
            parts += [k, v]
        return torch.cat(parts, dim=-1).detach()
