"""What peft's export and import share: file names, key prefixes, row selection, tensor layouts."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, InteropTable, PeftMethod, PeftModuleMap

__all__ = ["stored_at", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "PROMPT", "unit_key", "to_peft", "from_peft", "fixed_config", "config_get", "config_set",
           "alpha_for", "pattern_value", "task_type", "slice_rows", "host_order", "stored_apart", "refuse_tied", "refuse_family", "from_model"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT = "prompt_embeddings"


def unit_key(module: str, site: str, layer: int | None) -> str:
    """The key of a placement's unit in ``Adapter.units``."""
    return f"{module}__{site.replace('.', '_')}" + ("" if layer is None else f"__{layer}")


def to_peft(t: torch.Tensor, mm: PeftModuleMap, pname: str) -> torch.Tensor:
    """A technique tensor in peft's layout and sign."""
    layout = mm.layout.get(pname)
    if layout == "column":
        t = t.reshape(-1, 1)
    elif layout == "row":
        t = t.reshape(1, -1)
    elif layout == "vector":
        t = t.reshape(-1)
    elif layout == "batch":
        t = t.unsqueeze(0)
    return -t if pname in mm.negate else t


def host_order(model: torch.nn.Module, paths: Iterable[str]) -> dict[str, int]:
    """Each of ``paths``' position among them in the model's module order (peft's numbering of its target modules)."""
    order = {name: i for i, (name, _m) in enumerate(model.named_modules())}
    return {p: j for j, p in enumerate(sorted(set(paths), key=order.__getitem__))}


def stored_at(fam: ArchitectureMap, mm: PeftModuleMap, path: str, layer: int | None) -> str:
    """The module path peft keeps a placement's tensors under: its host's ``path``, or the module bound at the
    map's ``under`` site in the same layer."""
    if mm.under is None:
        return path
    b = fam.sites.get(mm.under)
    if b is None or not b.path:
        raise PefrefError(f"peft keeps {mm.module}'s tensors under site {mm.under!r}, which the {fam.family} map does not bind to a module")
    return b.path.replace("{i}", str(layer))


def stored_apart(mm: PeftModuleMap) -> bool:
    """Whether peft stores nothing of the module under its host modules (its tensors are shared or computed)."""
    return not (mm.tensors or mm.repeated or mm.indexed)


def from_peft(t: torch.Tensor, mm: PeftModuleMap, pname: str) -> torch.Tensor:
    """A peft tensor in the technique's sign (its shape is fitted on assignment)."""
    return -t if pname in mm.negate else t


def fixed_config(method: PeftMethod) -> dict[str, Any]:
    """The config values a row writes on export (the first of each list of accepted values; a sub-config copied)."""
    return {**{k: v[0] if isinstance(v, list) else dict(v) if isinstance(v, dict) else v for k, v in method.config.items()}, **method.written}


def config_get(cfg: Mapping[str, Any], field: str) -> Any:
    """A config value by its field name, or ``sub.field`` inside a sub-config (e.g. ``use_bdlora.nblocks``); None if unset."""
    value: Any = cfg
    for part in field.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def config_set(cfg: dict[str, Any], field: str, value: Any) -> None:
    """Sets a config value by its field name, or ``sub.field`` inside a sub-config (created when unset)."""
    *subs, last = field.split(".")
    for part in subs:
        if not isinstance(cfg.get(part), dict):
            cfg[part] = {}
        cfg = cfg[part]
    cfg[last] = value


def alpha_for(growth: str, alpha: float, k: int) -> float:
    """The alpha that keeps the scaling of a rank multiplied by k."""
    return alpha * k if growth == "linear" else alpha * math.sqrt(k)


def pattern_value(pattern: Mapping[str, Any] | None, path: str) -> Any:
    """peft's per-module pattern lookup (its keys match a module name's suffix, as regular expressions)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def task_type(fam: ArchitectureMap, table: InteropTable) -> str | None:
    """peft's task_type of the family's model class."""
    task = next(iter(fam.classes.values())).task if len(fam.classes) == 1 else fam.task
    return table.tasks.get(task)


def slice_rows(fam: ArchitectureMap, site: str, sizes: Mapping[str, int], width: int) -> list[int]:
    """The output features of the fused module (``width`` of them) that a slice site owns, in order."""
    from pefref.language.expr import evaluate, parse_expr
    from pefref.language.sizes import scalar_ops

    b = fam.sites[site]
    assert b.slice is not None

    def value(text: str) -> int:
        return int(evaluate(parse_expr(text), dict(sizes), scalar_ops()))

    start, size = value(b.slice.start), value(b.slice.size)
    period = value(b.slice.period) if b.slice.period is not None else width
    return [j * period + start + t for j in range(width // period) for t in range(size)]


def refuse_tied(method: PeftMethod, model: Any) -> None:
    """Raise where the row converts only untied models and ``model``'s output head shares its input embedding's weight."""
    from pefref.language.errors import PefrefError

    if not method.untied_only:
        return
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, head = (get_in() if callable(get_in) else None), (get_out() if callable(get_out) else None)
    if emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None):
        raise PefrefError(f"{method.technique}: this model ties its output head to the input embedding; peft's {method.peft_type} "
                          f"changes the head's rows too, which {method.technique} does not, so only untied models convert")


def refuse_family(method: PeftMethod, family: str) -> None:
    """Raise where the row converts only some families and ``family`` is not one of them."""
    from pefref.language.errors import PefrefError

    if method.families and family not in method.families:
        raise PefrefError(f"{method.technique}: peft's {method.peft_type} computes the same function as {method.technique} on "
                          f"{', '.join(method.families)} models only (see the row's notes in the interop table), not on {family}")


def from_model(method: PeftMethod, config: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters the row reads off the model's config (``config``: the config as a mapping), by the first key
    of each that is present (a dotted key reads into a mapping); refused where none is."""
    from pefref.language.errors import PefrefError

    out: dict[str, Any] = {}
    for hp, keys in method.from_model.items():
        for key in keys:
            v: Any = config
            for part in key.split("."):
                v = v.get(part) if isinstance(v, Mapping) else None
            if v is not None:
                out[hp] = v
                break
        else:
            raise PefrefError(f"{method.technique}: the model's config has none of {', '.join(keys)}, which set {hp!r}")
    return out
