"""The interop table (``catalog/interop/peft.yaml``): which peft method computes each technique."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pefref.language.catalog import catalog_root
from pefref.language.loader import load_file
from pefref.language.schema import InteropTable, PeftMethod

__all__ = ["interop_table", "table_path", "method_for"]


def table_path(root: Path | None = None) -> Path:
    """The table's file in the catalog folder ``root`` (default: the bundled catalog)."""
    return (root or catalog_root()) / "interop" / "peft.yaml"


@lru_cache(maxsize=4)
def _load(path: str) -> InteropTable:
    return load_file(InteropTable, Path(path))[0]


def interop_table(root: Path | None = None) -> InteropTable:
    """The validated table (loaded once per process)."""
    return _load(str(table_path(root)))


def method_for(technique_id: str, table: InteropTable | None = None) -> PeftMethod | None:
    """The table's row for a technique, or None when peft has no exact form of it."""
    table = table or interop_table()
    return next((m for m in table.methods if m.technique == technique_id), None)
