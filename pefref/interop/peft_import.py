"""peft → pefref: a peft adapter folder read into its catalog technique (see :mod:`pefref.interop.peft_format`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pefref.compiler.parts import read, write
from pefref.interop.peft_common import (
    PROMPT,
    alpha_for,
    apart_keys,
    config_get,
    from_peft,
    group_pieces,
    host_order,
    indexed_number,
    pattern_value,
    refuse_bias,
    size_values,
    slice_rows,
    stored_apart,
    stored_at,
    unit_key,
)
from pefref.language.connections import is_tap
from pefref.language.errors import PefrefError
from pefref.language.forms import form_of
from pefref.language.schema import ArchitectureMap, InteropTable, PeftMethod, PeftModuleMap, Technique
from pefref.runtime.adapter import Adapter
from pefref.runtime.hosts import host_kind
from pefref.runtime.saved_modules import SAVED_MODULE

__all__ = ["choose", "Plan", "plan", "copy_in", "unmask_ranks"]


def _accepts(want: Any, have: Any) -> bool:
    if isinstance(want, dict):  # a sub-config: set, with the listed values
        return isinstance(have, Mapping) and all(have.get(k) == v for k, v in want.items())
    return any(have == w for w in want) if isinstance(want, list) else have == want


def choose(cfg: Mapping[str, Any], table: InteropTable) -> PeftMethod:
    """The catalog row that reads this peft config exactly."""
    rows = [m for m in table.methods if m.peft_type == cfg.get("peft_type") and not m.export_only]
    rows = [m for m in rows if m.refused] + [m for m in rows if not m.refused]  # a form known to be refused is never read as another
    if not rows:
        known = sorted({m.peft_type for m in table.methods if not m.export_only})
        raise PefrefError(f"peft type {cfg.get('peft_type')!r} has no exact catalog counterpart (readable: {', '.join(known)})")
    for m in rows:
        if all(_accepts(v, cfg.get(k)) for k, v in m.config.items() if k in cfg or isinstance(v, dict)):  # a sub-config must be set
            if m.refused:
                raise PefrefError(f"this {cfg['peft_type']} adapter is peft's form of {m.technique}, which is not converted: {m.refused}")
            return m
    diffs = "; ".join(f"{m.technique} needs " + ", ".join(f"{k}={v!r}" for k, v in m.config.items()) for m in rows if not m.refused)
    raise PefrefError(f"this {cfg['peft_type']} adapter matches no catalog technique exactly ({diffs})")


def unmask_ranks(method: PeftMethod, cfg: Mapping[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Put the ranks a saved rank mask pruned back as zeros (in place), so every module has the full rank."""
    masks = method.rank_masks
    pattern = cfg.get(masks.pattern) if masks else None
    if not masks or not pattern:
        return
    names = {pname: tname for mm in method.modules for pname, tname in mm.tensors.items()}
    for key, keep in pattern.items():
        host = key.rsplit(".", 1)[0]
        mask = torch.tensor([bool(k) for k in keep])
        for pname, dim in masks.dims.items():
            name = f"{host}.{names[pname]}"
            if name not in state:
                raise PefrefError(f"{masks.pattern} names {key!r}, but the adapter has no tensor {name!r}")
            t = state[name]
            if t.shape[dim] == mask.numel():
                continue
            if t.shape[dim] != int(mask.sum()):
                raise PefrefError(f"peft tensor {name!r}: {t.shape[dim]} ranks, but {masks.pattern} keeps {int(mask.sum())}")
            shape = list(t.shape)
            shape[dim] = mask.numel()
            full = t.new_zeros(shape)
            full.index_copy_(dim, mask.nonzero().flatten(), t)
            state[name] = full


@dataclass
class Plan:
    """Where peft's modules go: the placed technique, extra hyperparameters and the slices of fused hosts."""

    technique: Technique
    hyperparameters: dict[str, Any]
    saved: list[str]
    splits: dict[str, list[tuple[str, list[int], int]]] = field(default_factory=dict)  # host -> (site, its rows, rank block)


def _hosts(method: PeftMethod, state: Mapping[str, torch.Tensor]) -> set[str]:
    hosts: set[str] = set()
    for mm in method.modules:
        for tname in mm.tensors.values():
            hosts |= {k[: -len(tname) - 1] for k in state if k.endswith("." + tname)}
    return hosts


def _listed(path: str, value: Any) -> bool:
    """Whether peft's ``target_modules``-style value (names or a regex) selects module ``path``."""
    if not value:
        return False
    if isinstance(value, str):
        return value == path or re.fullmatch(value, path) is not None
    return any(path == t or path.endswith("." + t) for t in value)


def _template_match(template: str, path: str) -> re.Match[str] | None:
    return re.match("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$", path)


def _site_of(path: str, kinds: set[str], fam: ArchitectureMap, kind_of: Mapping[str, str]) -> tuple[str, int | None]:
    for site, b in fam.sites.items():
        if not b.path or b.slice is not None or kind_of.get(site) not in kinds:
            continue
        m = _template_match(b.path, path)
        if m:
            return site, int(m.group(1)) if m.groups() else None
    raise PefrefError(f"module {path!r} is no site of family {fam.family!r} that this technique can take")


def _placed_at(host: str, mm: PeftModuleMap, module: Any, fam: ArchitectureMap, kinds: set[str], kind_of: Mapping[str, str]) -> list[tuple[str, int | None]]:
    """The (site, layer) placements peft's tensors under ``host`` stand for: the host's own site, or, for tensors peft
    keeps under the module at another site (``under``), the module's sites in that module's layer."""
    if mm.under is None:
        return [_site_of(host, kinds, fam, kind_of)]
    b = fam.sites.get(mm.under)
    m = _template_match(b.path, host) if b is not None and b.path else None
    if m is None:
        raise PefrefError(f"module {host!r} is not the {mm.under} of family {fam.family!r}, where peft keeps {mm.module}'s tensors")
    layer = int(m.group(1)) if m.groups() else None
    return [(s, layer) for s in module.sites]


def _split(method: PeftMethod, cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: str, fam: ArchitectureMap,
           sizes: Mapping[str, int], kinds: set[str], kind_of: Mapping[str, str]) -> tuple[list[tuple[str, list[int], int]], int | None] | None:
    """The slice placements a block-structured module on a fused host holds, when its blocks say so exactly."""
    fused = method.fused
    if fused is None or pattern_value(cfg.get(fused.rank_pattern), path) is None:
        return None
    block = next(t for mm in method.modules for p, t in mm.tensors.items() if fused.tensors.get(p) == "block")
    B = state[f"{path}.{block}"]
    slices = []
    for site, b in fam.sites.items():
        m = _template_match(b.path, path) if b.path and b.slice is not None and kind_of.get(site) in kinds else None
        if m:
            slices.append((site, slice_rows(fam, site, sizes, B.shape[0]), int(m.group(1)) if m.groups() else None))
    r0, a0 = cfg[fused.rank], cfg[fused.alpha]
    rank, alpha = _rank_alpha(method, cfg, path)
    if not slices or rank % r0 or not math.isclose(alpha, alpha_for(fused.alpha_growth, a0, rank // r0), rel_tol=1e-6):
        return None
    out: list[tuple[str, list[int], int]] = []
    for j in range(rank // r0):
        rows = set(B[:, j * r0:(j + 1) * r0].abs().sum(dim=1).nonzero().flatten().tolist())
        hit = next((s for s in slices if rows and rows <= set(s[1]) and s[0] not in {o[0] for o in out}), None)
        if hit is None:
            return None  # a block spans slices (or is zero): the module is a whole-module one
        out.append((hit[0], hit[1], j))
    return out, slices[0][2]


def _rank_alpha(method: PeftMethod, cfg: Mapping[str, Any], path: str) -> tuple[Any, Any]:
    fused = method.fused
    assert fused is not None
    r = pattern_value(cfg.get(fused.rank_pattern), path)
    a = pattern_value(cfg.get(fused.alpha_pattern), path)
    return (cfg[fused.rank] if r is None else r), (cfg[fused.alpha] if a is None else a)


def _owners(tech: Technique, method: PeftMethod, modules: list[Any], cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[tuple[str, Any]]:
    """(host, module) for each module placed on each peft host: the modules whose target fields list the host (the most
    specific set) and whose tensors sit under it (several modules may share a host, e.g. a router and the mixture that
    reads it)."""
    out: list[tuple[str, Any]] = []
    for host in sorted(_hosts(method, state)):
        fields = {f for mm in method.modules for f in mm.targets if _listed(host, config_get(cfg, f))}
        owners = [mm for mm in method.modules if set(mm.targets) == fields]
        if not owners:
            raise PefrefError(f"peft module {host!r} is listed in {sorted(fields)}, which no module of {tech.id} matches")
        held = [mm for mm in owners if mm.tensors and all(f"{host}.{t}" in state for t in mm.tensors.values())] or owners[:1]
        out += [(host, next(m for m in modules if m.name == mm.module)) for mm in held]
    return out


def plan(tech: Technique, method: PeftMethod, cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor],
         fam: ArchitectureMap, catalog: Any, sizes: Mapping[str, int]) -> Plan:
    """The technique placed where peft's tensors sit (sites and layers per module), and its hyperparameters."""
    from pefref.language.check import expand_modules

    modules, decl = expand_modules(tech, {**catalog.techniques, tech.id: tech})
    kind_of = {s: site.kind for s, site in catalog.reference.sites.items()}
    maps = {mm.module: mm for mm in method.modules}
    where: dict[str, dict[str, set[int | None]]] = {m.name: {} for m in modules}
    splits: dict[str, list[tuple[str, list[int], int]]] = {}
    whole: set[Any] = set()
    for host, module in _owners(tech, method, modules, cfg, state):
        kinds = {kind_of[s] for s in module.sites}
        split = _split(method, cfg, state, host, fam, sizes, kinds, kind_of)
        if split is not None:
            splits[host] = split[0]
            for site, *_ in split[0]:
                where[module.name].setdefault(site, set()).add(split[1])
            continue
        if method.fused is not None:
            whole.add(_rank_alpha(method, cfg, host))
        for site, layer in _placed_at(host, maps[module.name], module, fam, kinds, kind_of):
            where[module.name].setdefault(site, set()).add(layer)
    hps: dict[str, Any] = {}
    if method.fused is not None:
        pairs = whole or {(cfg[method.fused.rank], cfg[method.fused.alpha])}
        if len(pairs) > 1 or (splits and pairs != {(cfg[method.fused.rank], cfg[method.fused.alpha])}):
            raise PefrefError(f"this {method.peft_type} adapter has per-module ranks or alphas {sorted(pairs)}: "
                              f"{tech.id} has one rank and one alpha, so it has no exact catalog form")
        ((r, a),) = pairs
        hps = {method.hyperparameters[method.fused.rank]: r, method.hyperparameters[method.fused.alpha]: a}
    out = []
    for m in modules:
        pmap = maps.get(m.name)
        if pmap is not None and (pmap.computed is not None or stored_apart(pmap)):  # placed where the technique says
            out.append(m)
            continue
        sites = where.get(m.name, {})
        if not sites:
            continue
        layer_sets = {frozenset(v) for v in sites.values() if v != {None}} or {frozenset({None})}
        if len(layer_sets) > 1:
            raise PefrefError(f"{tech.id}.{m.name}: peft adapts different layers at different sites; one module places on sites x layers")
        layers = sorted(x for x in next(iter(layer_sets)) if x is not None)
        out.append(m.model_copy(update={"sites": list(sites), "layers": layers if layers else "all"}))
    if not out:
        raise PefrefError(f"the peft adapter holds no tensors of {tech.id}")
    saved = [s for s in cfg.get("modules_to_save") or [] if any(k.startswith(s + ".") for k in state)]
    for hp, ref in method.from_shapes.items():
        tname = maps[ref.module].tensors[ref.tensor]
        key = next((k for k in sorted(state) if k == tname or k.endswith("." + tname)), None)
        if key is not None:
            hps[hp] = int(state[key].shape[ref.dim])
    return Plan(tech.model_copy(update={"modules": out, "hyperparameters": decl}), hps, saved, splits)


def copy_in(adapter: Adapter, method: PeftMethod, state: Mapping[str, torch.Tensor], splits: Mapping[str, list[Any]]) -> None:
    """Copy peft's tensors into the applied adapter; every tensor must find its place."""
    used: set[str] = set()
    copied: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}  # a unit tensor's storage -> the peft tensor copied into it
    seen: dict[str, torch.Tensor] = {}  # the first copy of each repeated tensor
    maps = {mm.module: mm for mm in method.modules}
    in_place = {m.name for m in adapter.technique.modules if getattr(m, "form", None) is not None and not form_of(m).has_unit}  # train host tensors
    with torch.no_grad():
        rows = adapter.report.rows if adapter.report else []
        for row in rows:
            if row.module == SAVED_MODULE or is_tap(row.module, row.site):  # generated taps hold nothing
                continue
            mm = maps[row.module]
            module = next(m for m in adapter.technique.modules if m.name == row.module)
            if mm.computed is not None:
                used.add(_copy_computed(adapter, row, module, mm, state))
                continue
            if row.module in in_place:
                for path in row.paths:
                    for target, tname in mm.tensors.items():
                        key = f"{path}.{tname}"
                        if f"{path}.{target}" in adapter.selected and key in state:
                            _assign(adapter.selected[f"{path}.{target}"], state[key], key)
                            used.add(key)
                continue
            index = host_order(adapter.model, [p for r in rows if r.module == row.module for p in r.paths]) if mm.indexed else {}
            for path, layer in zip(row.paths, row.layers):
                unit = adapter.units[unit_key(row.module, row.site, layer)]
                used |= _copy_placement(_Into(adapter, method, mm, state, splits, copied, seen), row.site, path, layer, unit, index)
        for pname, p in adapter.selected.items():
            if pname in state:
                _assign(p, state[pname], pname)
                used.add(pname)
    left = sorted(set(state) - used)
    if left:
        raise PefrefError(f"the peft adapter holds tensors that {adapter.technique.id} has no place for: {', '.join(left[:4])}")


@dataclass
class _Into:
    """What copying one placement's peft tensors reads and keeps across placements."""

    adapter: Adapter
    method: PeftMethod
    mm: PeftModuleMap
    state: Mapping[str, torch.Tensor]
    splits: Mapping[str, list[Any]]
    copied: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]]  # a unit tensor's storage -> the peft tensor copied into it
    seen: dict[str, torch.Tensor]  # the first copy of each repeated tensor


def _copy_placement(into: _Into, site: str, path: str, layer: int | None, unit: Any, index: Mapping[str, int]) -> set[str]:
    """One placement's tensors from peft's (under its host, apart from it, by group, sizes); the keys read."""
    adapter, mm, state, used = into.adapter, into.mm, into.state, set()
    refuse_bias(into.method, path, adapter.model.get_submodule(path))
    numbers = {p: indexed_number(adapter.technique, adapter.hyperparameters, mm.module, p, index, path) for p in mm.indexed}
    for pname, key in [*apart_keys(mm, path, numbers).items(), *((p, f"{path}.{t}") for p, t in mm.repeated.items())]:
        value = from_peft(_need(state, key), mm, pname)
        if pname in mm.repeated and pname in into.seen and not torch.equal(into.seen[pname], value):
            raise PefrefError(f"peft tensor {key!r} differs from the other placements' copies of {pname!r}, "
                              f"which {adapter.technique.id} shares: no exact catalog form")
        into.seen[pname] = value
        _assign_unit(unit, pname, value, key)
        used.add(key)
    at = stored_at(adapter.family, mm, path, layer)
    for pname, tname in mm.tensors.items():
        key = f"{at}.{tname}"
        value = _need(state, key)
        if path in into.splits:
            value = _block(into.method, pname, value, site, into.splits[path], adapter.hyperparameters)
        _assign_once(unit, pname, from_peft(value, mm, pname), key, into.copied)
        used.add(key)
    used |= _grouped_read(mm, at, unit, state)
    host = adapter.model.get_submodule(path)
    for key, want in size_values(mm, path, *host_kind(host).widths(host)).items():
        if not torch.equal(_need(state, key).to(torch.int64).reshape(-1), want):
            raise PefrefError(f"peft tensor {key!r} holds {state[key].tolist()}, the sizes {want.tolist()} at {path}")
        used.add(key)
    return used | _zeros_read(mm, path, state)


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise PefrefError(f"the peft adapter has no tensor {key!r}")
    return state[key]


def _grouped_read(mm: PeftModuleMap, at: str, unit: Any, state: Mapping[str, torch.Tensor]) -> set[str]:
    """The pieces peft keeps per group of rows (the row's ``grouped``) into the unit's tensors, the rest zero; every
    group's piece must be there and no other."""
    used: set[str] = set()
    for pname, g in mm.grouped.items():
        full = torch.zeros_like(read(unit, pname))
        for k, idx in group_pieces(full, read(unit, g.labels), g.by, g.rank_dim):
            key = f"{at}.{g.name.format(group=k)}"
            src = from_peft(_need(state, key), mm, pname)
            if tuple(src.shape) != tuple(full[idx].shape):
                raise PefrefError(f"peft tensor {key!r}: shape {tuple(src.shape)}, but group {k} of {pname!r} at {at} is {tuple(full[idx].shape)} "
                                  f"(the groups this model's weights give differ from the adapter's)")
            full[idx] = src.to(full.dtype)
            used.add(key)
        extra = sorted(k for k in state if k.startswith(f"{at}.{g.name.split('{group}')[0]}") and k not in used)
        if extra:
            raise PefrefError(f"peft tensors {', '.join(extra[:3])}: groups beyond those this model's weights give at {at}")
        _assign_unit(unit, pname, full, f"{at}.{g.name}")
    return used


def _assign_once(unit: Any, pname: str, src: torch.Tensor, key: str, copied: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]]) -> None:
    """:func:`_assign_unit`, refusing two different peft tensors for one tensor the technique shares across placements."""
    dst = read(unit, pname)
    where = (dst.data_ptr(), tuple(dst.shape))
    if where in copied:
        first, value = copied[where]
        if not torch.equal(value, src.reshape(value.shape)):
            raise PefrefError(f"peft tensors {first!r} and {key!r} differ, but {pname!r} is one tensor shared by their placements "
                              f"in this technique: the adapter has no exact catalog form")
        return
    _assign_unit(unit, pname, src, key)
    copied[where] = (key, src.reshape(dst.shape))


def _zeros_read(mm: PeftModuleMap, path: str, state: Mapping[str, torch.Tensor]) -> set[str]:
    """The constant-zero peft tensors (the row's ``zeros``) present under ``path``; any nonzero one is refused."""
    keys = {f"{path}.{tname}" for tname in mm.zeros} & set(state)
    for key in sorted(keys):
        if state[key].count_nonzero():
            raise PefrefError(f"peft tensor {key!r} is not zero: it is a path the technique does not have, so the adapter has no exact catalog form")
    return keys


def _block(method: PeftMethod, pname: str, value: torch.Tensor, site: str, split: list[Any], hps: Mapping[str, Any]) -> torch.Tensor:
    """A slice placement's part of a block-structured tensor."""
    assert method.fused is not None
    r = hps[method.hyperparameters[method.fused.rank]]
    _site, rows, j = next(s for s in split if s[0] == site)
    if method.fused.tensors[pname] == "stack":
        return value[j * r:(j + 1) * r]
    return value[rows, j * r:(j + 1) * r]


def _copy_computed(adapter: Adapter, row: Any, module: Any, mm: PeftModuleMap, state: Mapping[str, torch.Tensor]) -> str:
    """peft's prompt (tokens, or every layer's keys and values) into a prepend module's free parameters
    (or, with the row's ``pieces``, split along the positions into the free tensors they concatenate)."""
    fields: tuple[Literal["tokens", "keys", "values"], ...] = ("tokens",) if mm.computed == "tokens" else ("keys", "values")
    names = {f: mm.pieces.get(f) or [getattr(module, f, None) or ""] for f in fields}
    if not all(n in module.params for f in fields for n in names[f]):
        raise PefrefError(f"{adapter.technique.id}.{row.module}: its {mm.computed} are computed ({', '.join(str(getattr(module, f)) for f in fields)}); "
                          f"peft's {PROMPT} reads only into free parameters (or the pieces the interop table names)")
    src = state[PROMPT]
    if mm.computed == "tokens":
        _assign_pieces(adapter.units[unit_key(row.module, row.site, None)], names["tokens"], [src])
        return PROMPT
    L = adapter.sizes["L"]
    d = src.shape[-1] // (2 * L)
    if src.shape[-1] != 2 * L * d or sorted(row.layers) != list(range(L)):
        raise PefrefError(f"peft's {PROMPT} {tuple(src.shape)} is not keys and values of all {L} layers")
    for i in range(L):
        unit = adapter.units[unit_key(row.module, row.site, i)]
        _assign_pieces(unit, names["keys"] + names["values"], [src[:, 2 * i * d:(2 * i + 1) * d], src[:, (2 * i + 1) * d:(2 * i + 2) * d]],
                       split=len(names["keys"]))
    return PROMPT


def _assign_pieces(unit: Any, names: list[str], parts: list[torch.Tensor], split: int | None = None) -> None:
    """Each part's rows, in order, into the unit's tensors ``names`` (the first ``split`` names take the first part);
    with more than one tensor per part, the unit must compute the parts back exactly."""
    groups = [names] if split is None else [names[:split], names[split:]]
    for group, src in zip(groups, parts):
        sizes = [read(unit, n).shape[0] for n in group]
        if sum(sizes) != src.shape[0]:
            raise PefrefError(f"peft's {PROMPT} has {src.shape[0]} positions; {' + '.join(group)} hold {sum(sizes)}")
        for n, piece in zip(group, src.split(sizes, dim=0)):
            _assign_unit(unit, n, piece, PROMPT)
    if any(len(g) > 1 for g in groups):
        out = unit(None, None, None, False)
        back = out if isinstance(out, tuple) else (out,)
        if not all(torch.equal(b.reshape(p.shape), p.to(b.dtype)) for b, p in zip(back, parts)):
            raise PefrefError(f"{', '.join(names)} do not concatenate into peft's {PROMPT}: the interop table's pieces do not match the technique")


def _assign(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if src.numel() != dst.numel():
        raise PefrefError(f"peft tensor {key!r}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def _assign_unit(unit: Any, pname: str, src: torch.Tensor, key: str) -> None:
    """:func:`_assign` into a unit's declared tensor (into a split one's pieces)."""
    dst = read(unit, pname)
    if src.numel() != dst.numel():
        raise PefrefError(f"peft tensor {key!r}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    write(unit, pname, src.reshape(dst.shape).to(dst.dtype))

