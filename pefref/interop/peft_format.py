"""peft's adapter format both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_pretrained` writes an applied adapter so that
``peft.PeftModel.from_pretrained(base, DIR)`` computes the same outputs;
:func:`from_pretrained` reads such a folder (or pefref's own ``.safetensors``
file) into the matching catalog technique. Everything technique-specific comes
from the interop table (``catalog/interop/peft.yaml``): the peft type, fixed
config values, which config fields carry which hyperparameters, each tensor's
name, layout and sign, tensors shared by all placements, hyperparameters read
off tensor shapes, the block-structured form of placements on slices of a
fused projection, rank masks, buffers peft keeps as constant zeros, the free
tensors a computed prefix concatenates, targets written by module name
(so that peft shares what the technique shares), and experts peft keeps as
adapters of their own in folders a config field names (read and written through
another row, see :mod:`pefref.interop.peft_experts`). Tensors a technique shares
across placements must come from peft with equal values. Only exact conversions are made; anything
else (a technique without a peft form, a placement peft cannot express, a
per-module setting the catalog technique cannot hold) raises
:class:`PefrefError` and writes or changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pefref.interop.peft_common import CONFIG_NAME, WEIGHTS_NAME, config_get, from_model, read_config, read_state, refuse_family, refuse_tied
from pefref.interop.peft_experts import expert_folders, read_experts
from pefref.interop.peft_export import PeftState, peft_state
from pefref.interop.peft_import import choose, copy_in, plan, unmask_ranks
from pefref.language.errors import PefrefError
from pefref.runtime.adapter import Adapter
from pefref.runtime.precision import AdapterDtype

__all__ = ["save_pretrained", "from_pretrained", "PeftState", "peft_state", "CONFIG_NAME", "WEIGHTS_NAME"]


def save_pretrained(adapter: Adapter, directory: str | Path) -> Path:
    """Write ``adapter`` in peft's format into ``directory`` (created); returns the folder.

    Both files are written atomically, after the whole conversion succeeded; adapters peft keeps in folders of their
    own (a row's experts) are written first, into subfolders, and named by absolute path.
    """
    from pefref.language.atomic import writable_folder

    state = peft_state(adapter)
    folder = writable_folder(directory)
    for rel, sub in state.folders.items():  # adapters peft keeps apart (experts), before the folder that names them
        save_state(sub, writable_folder(folder / rel))
    save_state(PeftState(expert_folders(state, folder), state.tensors), folder)
    return folder


def save_state(state: PeftState, folder: Path) -> None:
    """``state``'s two files in ``folder``, each written atomically."""
    from safetensors.torch import save as save_bytes

    from pefref.language.atomic import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(folder / WEIGHTS_NAME, save_bytes(state.tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(state.config, indent=2, sort_keys=True) + "\n")


def _own_file(model: nn.Module, p: Path, name: str | None, catalog: Any, family: Any, adapter_dtype: str = "auto") -> Adapter:
    from safetensors import safe_open

    from pefref.runtime.api import apply

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        hps = json.loads(meta.get("hyperparameters", "{}"))
    except Exception as e:  # truncated, not safetensors, or metadata that is not JSON
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PefrefError(f"{p}: not a readable pefref adapter file ({reason})") from None
    if "technique" not in meta or not isinstance(hps, dict):
        raise PefrefError(f"{p}: not a pefref adapter file (no technique in its metadata)")
    adapter = apply(model, meta["technique"], name=name, catalog=catalog, family=family, adapter_dtype=cast(AdapterDtype, adapter_dtype), **hps)
    try:
        adapter.load(p)
    except Exception:
        adapter.remove()
        raise
    return adapter


def from_pretrained(model: nn.Module, path: str | Path, *, name: str | None = None, catalog: Any = None,
                    family: Any = None, adapter_dtype: str = "auto") -> Adapter:
    """Load an adapter saved by peft (a folder with ``adapter_config.json``) or by pefref (``Adapter.save``).

    The peft method is matched to its catalog technique through the interop table; the
    technique is placed exactly where peft's modules were and its tensors are copied in.
    On any failure the model is left as it was. ``adapter_dtype`` as in :func:`pefref.apply` (peft's
    ``autocast_adapter_dtype``): on a bf16/fp16 model the adapter's tensors are fp32 by default.
    """
    from pefref.language.catalog import default_catalog

    catalog = catalog or default_catalog()
    p = Path(path)
    if p.is_file():  # pefref's own file: technique and hyperparameters in its metadata
        return _own_file(model, p, name, catalog, family, adapter_dtype)
    cfg_file = p / CONFIG_NAME
    if not cfg_file.is_file():
        raise PefrefError(f"{p}: no {CONFIG_NAME} (not a peft adapter folder) and not a pefref adapter file")
    cfg, state = read_config(cfg_file), read_state(p / WEIGHTS_NAME)
    try:
        return _import(model, p, cfg, state, name, catalog, family, adapter_dtype)
    except PefrefError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a config whose values are not peft's
        raise PefrefError(f"{cfg_file}: does not describe an adapter pefref can read ({type(e).__name__}: {e}); "
                          "check it against the peft version that saved it") from None


def _import(model: nn.Module, p: Path, cfg: dict[str, Any], state: dict[str, torch.Tensor], name: str | None, catalog: Any,
            family: Any, adapter_dtype: str) -> Adapter:
    """Place the technique where peft's modules were and copy the tensors in (the model unchanged on failure)."""
    from pefref.language.interop_table import interop_table
    from pefref.language.sizes import model_sizes
    from pefref.runtime.api import apply
    from pefref.runtime.inject import model_config, resolve_family

    method = choose(cfg, interop_table())
    experts = read_experts(method, interop_table(), cfg, p, state) if method.experts else None
    if experts is not None:
        state = {**state, **experts.tensors}
    refuse_tied(method, model)
    handled = {method.fused.rank_pattern, method.fused.alpha_pattern} if method.fused else set()
    handled |= {method.rank_masks.pattern} if method.rank_masks else set()
    for key, value in cfg.items():
        if key.endswith("_pattern") and value and key not in handled:
            raise PefrefError(f"{p}: per-module {key} has no exact catalog form in {method.technique}")
    tech = catalog.technique(method.technique)
    unmask_ranks(method, cfg, state)
    fam = resolve_family(model, catalog, family)
    refuse_family(method, fam.family)
    placed = plan(tech, method, cfg, state, fam, catalog, model_sizes(fam, model_config(model)))
    hps = {hp: config_get(cfg, field) for field, hp in method.hyperparameters.items() if config_get(cfg, field) is not None}
    hps.update(method.when)
    hps.update(experts.hyperparameters if experts else {})
    hps.update(placed.hyperparameters)
    hps.update(from_model(method, model_config(model)))  # what peft reads off the model it mirrors
    adapter = apply(model, placed.technique, name=name, catalog=catalog, family=family,
                    modules_to_save=placed.saved or None, adapter_dtype=cast(AdapterDtype, adapter_dtype), **hps)
    try:
        copy_in(adapter, method, state, placed.splits)
    except Exception:
        adapter.remove()
        raise
    return adapter
