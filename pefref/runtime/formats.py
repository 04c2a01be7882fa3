"""Adapter formats of other libraries: written by a higher layer, reached by the runtime through this hook.

The runtime writes pefref's own adapter file (:meth:`~pefref.runtime.adapter.Adapter.save`).
Another library's format (peft's ``adapter_config.json`` + ``adapter_model.safetensors``)
is converted by :mod:`pefref.interop`, a layer above the runtime; the runtime never
imports it. Instead the package's facade (:mod:`pefref`, imported before any of its
modules) registers that writer here, and
:meth:`~pefref.runtime.adapter.Adapter.save_pretrained` asks for it by name.
No torch here: the facade stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pefref.language.errors import PefrefError

if TYPE_CHECKING:
    from pefref.runtime.adapter import Adapter

__all__ = ["PRETRAINED", "AdapterFormat", "AdapterWriter", "adapter_format", "register_format"]

PRETRAINED = "peft"
"""The format :meth:`~pefref.runtime.adapter.Adapter.save_pretrained` writes (the ecosystem's ``save_pretrained``)."""


class AdapterWriter(Protocol):
    """Writes an applied adapter into a folder (created) and returns the folder; changes nothing on failure."""

    def __call__(self, adapter: Adapter, directory: str | Path) -> Path: ...


@dataclass(frozen=True)
class AdapterFormat:
    """A named adapter format and the function that writes it."""

    name: str
    description: str
    write: AdapterWriter


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(fmt: AdapterFormat) -> None:
    """Make ``fmt`` available under its name (registering the same name again replaces it)."""
    _FORMATS[fmt.name] = fmt


def adapter_format(name: str) -> AdapterFormat:
    """The format registered as ``name``.

    Raises:
        PefrefError: none is registered under that name (the message lists those that are).
    """
    if name not in _FORMATS:
        known = ", ".join(sorted(_FORMATS)) or "none"
        raise PefrefError(f"no adapter format {name!r} is registered (registered: {known})")
    return _FORMATS[name]

