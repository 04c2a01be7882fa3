"""Interoperability: peft's adapter format, both ways (see :mod:`pefref.interop.peft_format`)."""

from __future__ import annotations

from pefref.interop.peft_format import from_pretrained, save_pretrained
from pefref.language.interop_table import interop_table

__all__ = ["from_pretrained", "save_pretrained", "interop_table"]
