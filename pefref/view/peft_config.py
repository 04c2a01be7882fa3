"""The peft config a reader can copy for a technique on a model family, generated from the interop table.

Nothing here imports peft or torch: the config class, the fields and their
values come from ``catalog/interop/peft.yaml`` (the row :func:`method_for`
picks at the technique's default hyperparameters) and the module names from
the family's architecture map (the last part of each site's module path, the
names peft's ``target_modules`` matches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.hparams import resolve_hyperparameters
from pefref.language.schema import ArchitectureMap, InteropTable, PeftMethod, Technique

__all__ = ["PeftSnippet", "SiteModule", "peft_snippets", "site_modules", "module_name"]


@dataclass(frozen=True)
class PeftSnippet:
    """The peft config of a technique on one family: Python to copy, and what it leaves to the reader."""

    family: str
    code: str
    notes: list[str] = field(default_factory=list)  # what this family's config cannot say exactly
    method_note: str = ""  # the interop table's note on the peft method (the same on every family)


@dataclass(frozen=True)
class SiteModule:
    """Where one of a technique's sites lives in a family: the module path (``{i}``: each layer) and its name."""

    site: str
    path: str
    name: str
    note: str = ""


def module_name(path: str, fam: ArchitectureMap | None = None) -> str:
    """The name peft's ``target_modules`` matches: the shortest end of the module path that no other module of
    the family ends with (``q_proj`` of ``model.layers.{i}.self_attn.q_proj``; BERT's two ``dense`` need more)."""
    parts = path.split(".")
    others = {b.path for b in fam.sites.values() if b.path and b.path != path} if fam is not None else set()
    for k in range(1, len(parts) + 1):
        end = ".".join(parts[-k:])
        if "{i}" in end:
            break
        if not any(o == end or o.endswith("." + end) for o in others):
            return end
    return parts[-1]


def site_modules(t: Technique, fam: ArchitectureMap, catalog: Catalog) -> list[SiteModule]:
    """The technique's sites in the order its modules name them, with the family's module for each."""
    modules, _ = expand_modules(t, {**catalog.techniques, t.id: t})
    out: dict[str, SiteModule] = {}
    for m in modules:
        for site in m.sites:
            if site in out:
                continue
            b = fam.sites.get(site)
            if b is None:
                out[site] = SiteModule(site, "", "", f"{fam.family} binds no {site}")
            elif b.path is None:
                out[site] = SiteModule(site, "", "", "the model's key/value cache")
            else:
                note = "a slice of the fused module's output" if b.slice is not None else (
                    "the tensor entering the module" if b.side == "input" else "")
                out[site] = SiteModule(site, b.path, module_name(b.path, fam), note)
    return list(out.values())


def _literal(v: Any) -> str:
    """A value as Python source (``True``, ``"none"``, ``0.0``, ``["q_proj", "v_proj"]``)."""
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_literal(x) for x in v) + "]"
    return repr(v)


def _targets(method: PeftMethod, t: Technique, fam: ArchitectureMap, catalog: Catalog) -> tuple[dict[str, list[str]], list[str]]:
    """peft's target fields (``target_modules``, ...) with the family's module names, and notes on what they cannot say."""
    modules, _ = expand_modules(t, {**catalog.techniques, t.id: t})
    by_name = {m.name: m for m in modules}
    fields: dict[str, list[str]] = {}
    notes: list[str] = []
    for mm in method.modules:
        m = by_name.get(mm.module)
        if m is None or mm.computed is not None:
            continue
        names: list[str] = []
        for site in m.sites:
            b = fam.sites.get(site)
            if b is None or b.path is None:
                continue
            name = module_name(b.path, fam)
            if name == module_name(b.path) and any(o.path and o.path != b.path and o.path.endswith("." + name)
                                                 for o in fam.sites.values()):
                notes.append(f"{name} also names other modules of {fam.family}: narrow it (a regular expression as target_modules)")
            if b.slice is not None:
                notes.append(f"{site} is a slice of {name}: pefref's export writes the exact block form (rank_pattern); "
                             f"this config adapts all of {name}")
            if name not in names:
                names.append(name)
        if m.layers != "all":
            from pefref.view.summary import layers_text

            notes.append(f"{m.name} sits on layers {layers_text(m.layers)}: give peft's layers_to_transform for your model")
        for f in mm.targets:
            fields.setdefault(f, [])
            fields[f] += [n for n in names if n not in fields[f]]
    return fields, list(dict.fromkeys(notes))


def _snippet(method: PeftMethod, t: Technique, fam: ArchitectureMap, catalog: Catalog, table: InteropTable) -> PeftSnippet:
    _, decl = expand_modules(t, {**catalog.techniques, t.id: t})
    hps = resolve_hyperparameters(decl)
    args: dict[str, Any] = {}
    task = table.tasks.get(fam.task) if fam.task else None
    if task:
        args["task_type"] = task
    for peft_field, hp in method.hyperparameters.items():
        args[peft_field] = hps[hp]
    targets, notes = _targets(method, t, fam, catalog)
    args.update(targets)
    args.update({k: v[0] if isinstance(v, list) else v for k, v in method.config.items()})  # what export writes
    args.update(method.written)
    cls = table.config_classes.get(method.peft_type, f"PeftConfig  # peft_type {method.peft_type}")
    body = ", ".join(f"{k}={_literal(v)}" for k, v in args.items())
    name = cls.split()[0]
    return PeftSnippet(fam.family, f"from peft import {name}\n\nconfig = {name}({body})", notes, " ".join(method.notes.split()))


def peft_snippets(t: Technique, catalog: Catalog, table: InteropTable | None = None) -> list[PeftSnippet]:
    """The technique's peft config on every family that binds all its sites (empty: peft has no equivalent)."""
    from pefref.language.interop_table import interop_table, method_for

    table = table or interop_table()
    _, decl = expand_modules(t, {**catalog.techniques, t.id: t})
    method = method_for(t.id, table, resolve_hyperparameters(decl))
    if method is None:
        return []
    out = []
    for name in sorted(catalog.families):
        fam = catalog.families[name]
        if fam.model_type is None:  # pefref's own reference Transformer: peft does not know it
            continue
        if any(s.note and not s.path for s in site_modules(t, fam, catalog) if s.note != "the model's key/value cache"):
            continue
        out.append(_snippet(method, t, fam, catalog, table))
    return out
