"""pefref: parameter-efficient fine-tuning techniques as data, after PEFT-Ref (Sabry & Belz 2023).

``pefref.apply(model, technique, **hyperparameters)`` compiles a catalog
technique (or a YAML file, or a :class:`~pefref.language.schema.Technique`) into torch
modules, places them in ``model`` and returns an :class:`~pefref.runtime.adapter.Adapter`.
``pefref.save_pretrained(adapter, DIR)`` (or ``adapter.save_pretrained(DIR)``) writes
it in peft's format and ``pefref.from_pretrained(model, DIR)`` reads one back.
The names below are imported on first use, so ``import pefref`` (and the CLI)
does not import torch.

This module is the facade over the layers and the one place that composes them:
it registers the interop layer's writer of peft's format with the runtime
(:mod:`pefref.runtime.formats`), where ``Adapter.save_pretrained`` finds it; the
runtime never imports the layer above it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefref.runtime.formats import PRETRAINED, AdapterFormat, register_format

if TYPE_CHECKING:
    from pefref.runtime.adapter import Adapter

__all__ = ["apply", "from_pretrained", "save_pretrained", "Adapter", "Technique", "default_catalog", "load_catalog", "PefrefError", "CatalogError"]

_WHERE = {
    "apply": "runtime.api",
    "from_pretrained": "interop.peft_format",
    "save_pretrained": "interop.peft_format",
    "Adapter": "runtime.adapter",
    "Technique": "language.schema",
    "default_catalog": "language.catalog",
    "load_catalog": "language.catalog",
    "PefrefError": "language.errors",
    "CatalogError": "language.errors",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'pefref' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (tab completion lists these, not the facade's own imports)."""
    return sorted(__all__)


def _write_peft(adapter: Adapter, directory: str | Path) -> Path:
    from pefref.interop.peft_format import save_pretrained

    return save_pretrained(adapter, directory)


register_format(AdapterFormat(PRETRAINED, "peft's adapter_config.json + adapter_model.safetensors (pefref.interop)", _write_peft))
