"""peft's adapter format both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_pretrained` writes an applied adapter so that
``peft.PeftModel.from_pretrained(base, DIR)`` computes the same outputs;
:func:`from_pretrained` reads such a folder (or pefref's own ``.safetensors``
file) into the matching catalog technique. Everything technique-specific comes
from the interop table (``catalog/interop/peft.yaml``): the peft type, fixed
config values, which config fields carry which hyperparameters, and each
tensor's name and layout. Only exact conversions are made; anything else (a
technique without a peft form, a placement on a slice of a fused projection,
a placement peft cannot express) raises :class:`PefrefError` and writes or
changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefref.interop.table import interop_table, method_for
from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, InteropTable, PeftMethod, PeftModuleMap, Technique
from pefref.runtime.adapter import Adapter
from pefref.runtime.saved_modules import SAVED_MODULE

__all__ = ["save_pretrained", "from_pretrained", "peft_state", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PROMPT = "prompt_embeddings"


def _unit_key(module: str, site: str, layer: int | None) -> str:
    return f"{module}__{site.replace('.', '_')}" + ("" if layer is None else f"__{layer}")


def _to_peft(t: torch.Tensor, layout: str | None) -> torch.Tensor:
    if layout == "column":
        return t.reshape(-1, 1)
    if layout == "row":
        return t.reshape(1, -1)
    if layout == "vector":
        return t.reshape(-1)
    return t


def _task(fam: ArchitectureMap, table: InteropTable) -> str | None:
    task = next(iter(fam.classes.values())).task if len(fam.classes) == 1 else fam.task
    return table.tasks.get(task)


# --- export ------------------------------------------------------------------------------------------


def peft_state(adapter: Adapter, table: InteropTable | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft's config and tensors for ``adapter`` (nothing written).

    Raises:
        PefrefError: the technique has no exact peft form, or a placement cannot be written in it.
    """
    table = table or interop_table()
    tech = adapter.technique
    method = method_for(tech.id, table)
    if method is None:
        known = ", ".join(m.technique for m in table.methods)
        raise PefrefError(f"{tech.id}: peft has no exact form of this technique (techniques with one: {known})")
    if adapter.merged:
        raise PefrefError(f"{adapter.name}: unmerge() before saving in peft's format")
    fam = adapter.family
    cfg: dict[str, Any] = {"peft_type": method.peft_type, "task_type": _task(fam, table), "inference_mode": True,
                           "base_model_name_or_path": None, **method.config}
    for field, hp in method.hyperparameters.items():
        cfg[field] = adapter.hyperparameters[hp]
    maps = {mm.module: mm for mm in method.modules}
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, set[str]] = {}
    conv1d = False
    saved: list[str] = []
    for row in adapter.report.rows if adapter.report else []:
        if row.module == SAVED_MODULE:
            saved += row.paths
            continue
        mm = maps.get(row.module)
        if mm is None:
            raise PefrefError(f"{tech.id}: module {row.module!r} has no counterpart in peft's {method.peft_type}")
        binding = fam.sites[row.site]
        if binding.slice is not None:
            raise PefrefError(f"{tech.id}.{row.module} sits on {row.site}, a slice of the fused {row.paths[0]!r}: "
                              f"peft adapts whole modules; place it on the fused site instead (sites=['attn.qkv'])")
        if mm.computed is not None:
            continue
        for path, layer in zip(row.paths, row.layers):
            unit = adapter.units[_unit_key(row.module, row.site, layer)]
            host = adapter.model.get_submodule(path)
            kind = "linear" if isinstance(host, nn.Linear) else "conv1d" if type(host).__name__ == "Conv1D" else type(host).__name__
            if kind not in method.hosts:
                raise PefrefError(f"{tech.id}.{row.module} on {path} ({type(host).__name__}): peft's {method.peft_type} "
                                  f"adapts only {' and '.join(method.hosts)} modules")
            conv1d |= kind == "conv1d"
            for pname, tname in mm.tensors.items():
                tensors[f"{_PREFIX}{path}.{tname}"] = _to_peft(getattr(unit, pname).detach(), mm.layout.get(pname))
            for field in mm.targets:
                targets.setdefault(field, set()).add(path)
    for mm in method.modules:
        if mm.computed is not None:
            tensors[_PROMPT] = _computed(adapter, mm, tech)
    for field, paths in targets.items():
        cfg[field] = sorted(paths)
    if method.conv1d_flag:
        cfg[method.conv1d_flag] = conv1d
    if saved:
        cfg["modules_to_save"] = sorted(saved)
        for name, p in adapter.selected.items():
            if any(name.startswith(s + ".") for s in saved):
                tensors[f"{_PREFIX}{name}"] = p.detach()
    if len(adapter.selected) > sum(1 for k in tensors if k.startswith(_PREFIX) and k[len(_PREFIX):] in adapter.selected):
        raise PefrefError(f"{tech.id}: host parameters selected outside modules_to_save have no place in peft's {method.peft_type}")
    return cfg, {k: v.contiguous() for k, v in tensors.items()}


def _computed(adapter: Adapter, mm: PeftModuleMap, tech: Technique) -> torch.Tensor:
    """What a prepend module computes at inference: tokens [n, d], or keys and values of every layer [n, L*2*d_kv]."""
    rows = [r for r in adapter.report.rows if r.module == mm.module] if adapter.report else []
    if not rows:
        raise PefrefError(f"{tech.id}: module {mm.module!r} is not placed")
    (row,) = rows
    with torch.no_grad():
        if mm.computed == "tokens":
            return adapter.units[_unit_key(row.module, row.site, None)](None, None, None, False).detach()
        L = adapter.sizes["L"]
        if sorted(row.layers) != list(range(L)):  # type: ignore[type-var]
            raise PefrefError(f"{tech.id}: peft's prefixes cover every layer; this adapter has them on layers {row.layers}")
        parts = []
        for i in range(L):
            k, v = adapter.units[_unit_key(row.module, row.site, i)](None, None, None, False)
            parts += [k, v]
        return torch.cat(parts, dim=-1).detach()


def save_pretrained(adapter: Adapter, directory: str | Path) -> Path:
    """Write ``adapter`` in peft's format into ``directory`` (created); returns the folder.

    Both files are written atomically, after the whole conversion succeeded.
    """
    from safetensors.torch import save as save_bytes

    from pefref.language.atomic import atomic_write_bytes, atomic_write_text, writable_folder

    cfg, tensors = peft_state(adapter)
    folder = writable_folder(directory)
    atomic_write_bytes(folder / WEIGHTS_NAME, save_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


# --- import ------------------------------------------------------------------------------------------


def _listed(path: str, field: Any) -> bool:
    """Whether peft's ``target_modules``-style ``field`` (names or a regex) selects module ``path``."""
    if not field:
        return False
    if isinstance(field, str):
        return field == path or re.fullmatch(field, path) is not None
    return any(path == t or path.endswith("." + t) for t in field)


def _choose(cfg: Mapping[str, Any], table: InteropTable) -> PeftMethod:
    rows = [m for m in table.methods if m.peft_type == cfg.get("peft_type") and not m.export_only]
    if not rows:
        known = sorted({m.peft_type for m in table.methods if not m.export_only})
        raise PefrefError(f"peft type {cfg.get('peft_type')!r} has no exact catalog counterpart (readable: {', '.join(known)})")
    for m in rows:
        if all(k not in cfg or cfg[k] == v or (isinstance(v, float) and cfg[k] == v) for k, v in m.config.items()):
            return m
    diffs = "; ".join(f"{m.technique} needs " + ", ".join(f"{k}={v!r}" for k, v in m.config.items()) for m in rows)
    raise PefrefError(f"this {cfg['peft_type']} adapter matches no catalog technique exactly ({diffs})")


def _site_of(path: str, kinds: set[str], fam: ArchitectureMap, kind_of: Mapping[str, str]) -> tuple[str, int | None]:
    for site, b in fam.sites.items():
        if not b.path or b.slice is not None or kind_of.get(site) not in kinds:
            continue
        rx = "^" + re.escape(b.path).replace(re.escape("{i}"), r"(\d+)") + "$"
        m = re.match(rx, path)
        if m:
            return site, int(m.group(1)) if m.groups() else None
    raise PefrefError(f"module {path!r} is no site of family {fam.family!r} that this technique can take")


def from_pretrained(model: nn.Module, path: str | Path, *, name: str | None = None, catalog: Any = None,
                    family: Any = None) -> Adapter:
    """Load an adapter saved by peft (a folder with ``adapter_config.json``) or by pefref (``Adapter.save``).

    The peft method is matched to its catalog technique through the interop table; the
    technique is placed exactly where peft's modules were and its tensors are copied in.
    On any failure the model is left as it was.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pefref.language.catalog import default_catalog
    from pefref.runtime.api import apply
    from pefref.runtime.inject import resolve_family

    catalog = catalog or default_catalog()
    p = Path(path)
    if p.is_file():  # pefref's own file: technique and hyperparameters in its metadata
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "technique" not in meta:
            raise PefrefError(f"{p}: not a pefref adapter file (no technique in its metadata)")
        adapter = apply(model, meta["technique"], name=name, catalog=catalog, family=family,
                        **json.loads(meta.get("hyperparameters", "{}")))
        try:
            adapter.load(p)
        except Exception:
            adapter.remove()
            raise
        return adapter
    cfg_file = p / CONFIG_NAME
    if not cfg_file.is_file():
        raise PefrefError(f"{p}: no {CONFIG_NAME} (not a peft adapter folder) and not a pefref adapter file")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    for key, value in cfg.items():
        if key.endswith("_pattern") and value:
            raise PefrefError(f"{p}: per-module {key} has no exact catalog form")
    table = interop_table()
    method = _choose(cfg, table)
    tech = catalog.technique(method.technique)
    state = {k.removeprefix(_PREFIX): v for k, v in load_file(str(p / WEIGHTS_NAME)).items()}
    fam = resolve_family(model, catalog, family)
    placed, saved = _placement(tech, method, cfg, state, fam, catalog)
    hps = {hp: cfg[field] for field, hp in method.hyperparameters.items() if cfg.get(field) is not None}
    adapter = apply(model, placed, name=name, catalog=catalog, family=family, modules_to_save=saved or None, **hps)
    try:
        _copy_in(adapter, method, state)
    except Exception:
        adapter.remove()
        raise
    return adapter


def _placement(tech: Technique, method: PeftMethod, cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor],
               fam: ArchitectureMap, catalog: Any) -> tuple[Technique, list[str]]:
    """The technique placed where peft's tensors sit (sites and layers per module), and the saved modules."""
    from pefref.language.check import expand_modules

    modules, decl = expand_modules(tech, {**catalog.techniques, tech.id: tech})
    kind_of = {s: site.kind for s, site in catalog.reference.sites.items()}
    maps = {mm.module: mm for mm in method.modules}
    hosts: set[str] = set()
    for mm in method.modules:
        for tname in mm.tensors.values():
            hosts |= {k[: -len(tname) - 1] for k in state if k.endswith("." + tname)}
    where: dict[str, dict[str, set[int | None]]] = {m.name: {} for m in modules}
    for host in sorted(hosts):
        fields = {f for mm in method.modules for f in mm.targets if _listed(host, cfg.get(f))}
        owner = next((mm for mm in method.modules if set(mm.targets) == fields), None)
        if owner is None:
            raise PefrefError(f"peft module {host!r} is listed in {sorted(fields)}, which no module of {tech.id} matches")
        module = next(m for m in modules if m.name == owner.module)
        site, layer = _site_of(host, {kind_of[s] for s in module.sites}, fam, kind_of)
        where[module.name].setdefault(site, set()).add(layer)
    out = []
    for m in modules:
        pmap = maps.get(m.name)
        if pmap is not None and pmap.computed is not None:
            out.append(m)
            continue
        sites = where.get(m.name, {})
        if not sites:
            continue
        layer_sets = {frozenset(v) for v in sites.values()}
        if len(layer_sets) > 1:
            raise PefrefError(f"{tech.id}.{m.name}: peft adapts different layers at different sites; one module places on sites x layers")
        layers = sorted(x for x in next(iter(layer_sets)) if x is not None)
        out.append(m.model_copy(update={"sites": list(sites), "layers": layers if layers else "all"}))
    if not out:
        raise PefrefError(f"the peft adapter holds no tensors of {tech.id}")
    saved = [s for s in cfg.get("modules_to_save") or [] if any(k.startswith(s + ".") for k in state)]
    return tech.model_copy(update={"modules": out, "hyperparameters": decl}), saved


def _copy_in(adapter: Adapter, method: PeftMethod, state: Mapping[str, torch.Tensor]) -> None:
    used: set[str] = set()
    maps = {mm.module: mm for mm in method.modules}
    with torch.no_grad():
        for row in adapter.report.rows if adapter.report else []:
            if row.module == SAVED_MODULE:
                continue
            mm = maps[row.module]
            if mm.computed == "tokens":
                unit = adapter.units[_unit_key(row.module, row.site, None)]
                module = next(m for m in adapter.technique.modules if m.name == row.module)
                target = getattr(module, "tokens", None)
                if target not in module.params:
                    raise PefrefError(f"{adapter.technique.id}.{row.module}: its tokens are computed ({target}); peft's prompt reads only into free tokens")
                _assign(getattr(unit, target), state[_PROMPT], _PROMPT)
                used.add(_PROMPT)
                continue
            for path, layer in zip(row.paths, row.layers):
                unit = adapter.units[_unit_key(row.module, row.site, layer)]
                for pname, tname in mm.tensors.items():
                    key = f"{path}.{tname}"
                    if key not in state:
                        raise PefrefError(f"the peft adapter has no tensor {key!r}")
                    _assign(getattr(unit, pname), state[key], key)
                    used.add(key)
        for pname, p in adapter.selected.items():
            if pname in state:
                _assign(p, state[pname], pname)
                used.add(pname)
    left = sorted(set(state) - used)
    if left:
        raise PefrefError(f"the peft adapter holds tensors that {adapter.technique.id} has no place for: {', '.join(left[:4])}")


def _assign(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if src.numel() != dst.numel():
        raise PefrefError(f"peft tensor {key!r}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src.reshape(dst.shape).to(dst.dtype))
