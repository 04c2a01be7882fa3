"""pefref: parameter-efficient fine-tuning techniques as data, after PEFT-Ref (Sabry & Belz 2023).

``pefref.apply(model, technique, **hyperparameters)`` compiles a catalog
technique (or a YAML file, or a :class:`~pefref.language.schema.Technique`) into torch
modules, places them in ``model`` and returns an :class:`~pefref.runtime.adapter.Adapter`.
The names below are imported on first use, so ``import pefref`` (and the CLI)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["apply", "from_pretrained", "Adapter", "Technique", "default_catalog", "load_catalog", "PefrefError", "CatalogError"]

_WHERE = {
    "apply": "runtime.api",
    "from_pretrained": "interop.peft_format",
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
