"""Experts peft keeps as adapters of their own, in folders a config field names (a row's ``experts``).

On import each folder is read through the row the table names for one expert; the experts must agree on the
hyperparameters and targets the row lists, and their tensors are joined into the technique's (along the rank, or
along a new first dimension). On export the technique's tensors are split back into one adapter per expert.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pefref.interop.peft_common import CONFIG_NAME, PREFIX, WEIGHTS_NAME, fixed_config, read_config, read_state
from pefref.language.errors import PefrefError
from pefref.language.schema import ExpertFolders, InteropTable, PeftMethod, PeftModuleMap

__all__ = ["PeftState", "Experts", "read_experts", "split_experts", "expert_folders"]


@dataclass(frozen=True)
class PeftState:
    """An adapter in peft's terms: ``adapter_config.json``'s content and ``adapter_model.safetensors``' tensors, and the
    adapters peft keeps in folders of their own (by folder, relative to the adapter's)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    folders: dict[str, PeftState] = field(default_factory=dict, repr=False)
    folder_field: str | None = None  # the config field naming ``folders`` ({name: folder}, relative until written)


@dataclass(frozen=True)
class Experts:
    """What the expert folders add to an import: the joined tensors (by key, peft's prefix off) and hyperparameters."""

    tensors: dict[str, torch.Tensor]
    hyperparameters: dict[str, Any]


def _spec(method: PeftMethod) -> tuple[ExpertFolders, PeftModuleMap]:
    spec = method.experts
    assert spec is not None
    return spec, next(mm for mm in method.modules if mm.module == spec.module)


def _folders(cfg: Mapping[str, Any], spec: ExpertFolders, folder: Path) -> list[Path]:
    names = cfg.get(spec.field)
    if not isinstance(names, Mapping) or not names:
        raise PefrefError(f"{folder / CONFIG_NAME}: field {spec.field!r} names no expert folders ({{name: folder}} expected)")
    out = []
    for name, where in names.items():
        p = Path(str(where))
        p = p if p.is_absolute() else folder / p
        if not (p / CONFIG_NAME).is_file():
            raise PefrefError(f"{folder / CONFIG_NAME}: {spec.field}[{name!r}] is {where!r}, which holds no {CONFIG_NAME} "
                              f"(looked in {p}); the experts are adapters of their own and must be there")
        out.append(p)
    return out


def read_experts(method: PeftMethod, table: InteropTable, cfg: Mapping[str, Any], folder: Path, state: Mapping[str, torch.Tensor]) -> Experts:
    """Each expert folder ``cfg`` names, read through the table's row for one expert and joined (nothing applied)."""
    from pefref.interop.peft_import import choose

    spec, mm = _spec(method)
    missing = sorted(k for k in mm.shared.values() if k not in state)
    if missing:
        raise PefrefError(f"{folder / WEIGHTS_NAME}: no tensor {missing[0]!r}; peft keeps it in this file (peft 0.21's own "
                          f"save_pretrained leaves it out: see the interop table's notes on {method.technique})")
    first: tuple[Path, dict[str, Any], set[str]] | None = None
    parts: dict[str, list[torch.Tensor]] = {}
    which: dict[str, str] = {}  # key -> the module's tensor it joins into
    for p in _folders(cfg, spec, folder):
        ecfg, estate = read_config(p / CONFIG_NAME), read_state(p / WEIGHTS_NAME)
        row = choose(ecfg, table)
        if row.technique != spec.row:
            raise PefrefError(f"{p}: an expert of {method.technique} must be a {spec.row} adapter; this one reads as {row.technique}")
        patterns = sorted(k for k, v in ecfg.items() if k.endswith("_pattern") and v)
        if patterns:
            raise PefrefError(f"{p}: per-module {patterns[0]} in an expert; {method.technique}'s experts share one of each")
        keyed = {f: ecfg.get(f) for f in [*spec.hyperparameters, spec.targets]}
        targets = keyed[spec.targets]
        keyed[spec.targets] = sorted(targets) if isinstance(targets, list) else targets
        if first is None:
            first = (p, keyed, set(estate))
        else:
            _same(first, (p, keyed, set(estate)), method.technique)
        for pname, tname in mm.tensors.items():
            for k in sorted(x for x in estate if x.endswith("." + tname)):
                parts.setdefault(k, []).append(estate[k])
                which[k] = pname
        left = sorted(k for k in estate if not any(k.endswith("." + t) for t in mm.tensors.values()))
        if left:
            raise PefrefError(f"{p}: expert tensors {', '.join(left[:3])} have no place in {method.technique}")
    assert first is not None
    joined = {k: _join(v, spec.join[which[k]]) for k, v in parts.items()}
    hps = {hp: first[1][f] for f, hp in spec.hyperparameters.items() if first[1][f] is not None}
    return Experts(joined, {**hps, spec.count: len(cfg[spec.field])})


def _same(a: tuple[Path, dict[str, Any], set[str]], b: tuple[Path, dict[str, Any], set[str]], technique: str) -> None:
    diff = [f"{f} {a[1][f]!r} vs {b[1][f]!r}" for f in a[1] if a[1][f] != b[1][f]]
    if a[2] != b[2]:
        diff.append(f"tensors {sorted(a[2] ^ b[2])[:2]}")
    if diff:
        raise PefrefError(f"experts {a[0]} and {b[0]} differ ({'; '.join(diff)}): {technique}'s experts share their rank, "
                          "scaling, dropout and placement, so this adapter has no exact catalog form")


def _join(values: list[torch.Tensor], how: str) -> torch.Tensor:
    return torch.cat(values, 0) if how == "rows" else torch.stack(values, 0)


def _split(t: torch.Tensor, how: str, n: int, i: int) -> torch.Tensor:
    return t.reshape(n, -1, *t.shape[1:])[i].clone() if how == "rows" else t[i].clone()


def split_experts(method: PeftMethod, table: InteropTable, hps: Mapping[str, Any], cfg: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> dict[str, PeftState]:
    """The experts' tensors taken out of ``tensors`` (in place) into one adapter each, by folder; ``cfg``'s field
    names the folders (relative: the writer makes them absolute)."""
    spec, mm = _spec(method)
    row = next((m for m in table.methods if m.technique == spec.row and not m.import_only), None)
    if row is None:
        raise PefrefError(f"{method.technique}: its experts are written through the {spec.row} row, which the interop table lacks")
    n = int(hps[spec.count])
    keys = {k: pname for k in list(tensors) for pname, t in mm.tensors.items() if k.endswith("." + t)}
    taken = {k: tensors.pop(k) for k in keys}
    hosts = sorted({k[len(PREFIX):].rsplit(".", 2)[0] for k in keys})
    out: dict[str, PeftState] = {}
    for i in range(n):
        ecfg: dict[str, Any] = {"peft_type": row.peft_type, "task_type": cfg.get("task_type"), "inference_mode": True,
                                "base_model_name_or_path": None, **fixed_config(row)}
        ecfg.update({f: hps[hp] for f, hp in spec.hyperparameters.items()})
        ecfg[spec.targets] = hosts
        if row.conv1d_flag:
            ecfg[row.conv1d_flag] = False
        out[spec.folder.format(index=i)] = PeftState(ecfg, {k: _split(v, spec.join[keys[k]], n, i) for k, v in taken.items()})
    cfg[spec.field] = {str(i): spec.folder.format(index=i) for i in range(n)}
    return out


def expert_folders(state: PeftState, folder: Path) -> dict[str, Any]:
    """``state``'s config with the field naming its folders made absolute under ``folder`` (peft opens them as given)."""
    cfg = json.loads(json.dumps(state.config))
    if state.folder_field is not None:
        cfg[state.folder_field] = {name: str((folder / rel).resolve()) for name, rel in cfg[state.folder_field].items()}
    return cfg
