"""What peft's export and import share: file names, key prefixes, row selection, tensor layouts."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pefref.language.errors import PefrefError
from pefref.language.schema import ArchitectureMap, InteropTable, PeftMethod, PeftModuleMap

__all__ = ["stored_at", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "PROMPT", "unit_key", "to_peft", "from_peft", "fixed_config", "config_get", "config_set",
           "alpha_for", "pattern_value", "task_type", "slice_rows", "host_order", "stored_apart", "refuse_tied", "refuse_family", "from_model",
           "target_name", "apart_keys", "size_values", "group_pieces", "refuse_bias", "indexed_number", "read_config", "read_state"]

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


def target_name(path: str) -> str:
    """peft's name of the projection at module ``path``, by which it keys a tensor shared across layers: the last two
    components joined by '_' (``layers.0.self_attn.q_proj``: ``self_attn_q_proj``), the last alone after a layer index,
    and an attention block's output projection (``attention.output.dense``) ``attention_output``."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else name


def apart_keys(mm: PeftModuleMap, path: str, numbers: Mapping[str, int]) -> dict[str, str]:
    """The module's tensors peft stores outside the host at ``path``: shared by every placement, by projection
    (``by_target``) or by a number (``indexed``: ``numbers`` gives it per tensor, see :func:`indexed_number`), tensor -> full key."""
    return {**mm.shared, **{p: t.format(target=target_name(path)) for p, t in mm.by_target.items()},
            **{p: t.format(index=numbers[p]) for p, t in mm.indexed.items()}}


def indexed_number(technique: Any, hps: Mapping[str, Any], module: str, pname: str, order: Mapping[str, int], path: str) -> int:
    """The number peft keys an ``indexed`` tensor by at host ``path``: the host's position among the module's hosts
    (``order``), or, for a tensor shared by all placements in groups (``groups``), that position's group."""
    from pefref.language.hparams import placement_group

    spec = next((getattr(m, "params", {}).get(pname) for m in technique.modules if m.name == module), None)
    group = None if spec is None else placement_group(spec, order[path], len(order), hps)
    return order[path] if group is None else group


def size_values(mm: PeftModuleMap, path: str, d_in: int, d_out: int) -> dict[str, torch.Tensor]:
    """The integer tensors of sizes peft stores beside the module at ``path`` (the row's ``size_tensors``), by full key."""
    from pefref.language.expr import evaluate, parse_expr
    from pefref.language.sizes import scalar_ops

    names = {"d_in": d_in, "d_out": d_out}
    return {key.format(target=target_name(path)): torch.tensor(
        [d if isinstance(d, int) else int(evaluate(parse_expr(d), names, scalar_ops())) for d in dims], dtype=torch.int64)
        for key, dims in mm.size_tensors.items()}


def group_pieces(t: torch.Tensor, labels: torch.Tensor, by: str, rank_dim: int | None) -> list[tuple[int, tuple[Any, ...]]]:
    """Where each group's piece of ``t`` lies: (group, index into ``t``) for groups 0 .. the largest label; ``by``
    'index': the slice ``t[k]``, 'rows': the rows labelled k; the piece cut along ``rank_dim`` (a dimension of the
    piece, past its rows) to the group's size where the group is smaller."""
    out: list[tuple[int, tuple[Any, ...]]] = []
    for k in range(int(labels.max()) + 1 if labels.numel() else 0):
        rows = (labels == k).nonzero().flatten()
        idx: list[Any] = [k if by == "index" else rows] + [slice(None)] * (t.dim() - 1)
        if rank_dim is not None:
            d = rank_dim + (1 if by == "index" else 0)
            idx[d] = slice(0, min(int(rows.numel()), t.shape[d]))
        out.append((k, tuple(idx)))
    return out


def refuse_bias(method: PeftMethod, path: str, host: torch.nn.Module) -> None:
    """A placement on a host with a bias, where the row converts only bias-free hosts."""
    if method.bias_free and isinstance(getattr(host, "bias", None), torch.Tensor):
        raise PefrefError(f"{method.technique} on {path}: peft's {method.peft_type} decomposes the host's bias with its weight, which "
                          f"{method.technique} does not; only placements on hosts without a bias convert")


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


def read_config(cfg_file: Path) -> dict[str, Any]:
    """An adapter folder's config, refused when it is not a JSON object."""
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PefrefError(f"{cfg_file}: not a JSON adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise PefrefError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_state(weights: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors (peft's prefix taken off), refused when unreadable or not finite."""
    from safetensors.torch import load_file

    try:
        state = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights)).items()}
    except Exception as e:  # absent, truncated or not safetensors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PefrefError(f"{weights}: not a readable safetensors file ({reason})") from None
    for k, v in sorted(state.items()):  # refused before anything is applied: a NaN adapter would make every output NaN
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise PefrefError(f"{weights}: tensor {PREFIX}{k} holds NaN or infinite values")
    return state
