"""The interop table (``catalog/interop/peft.yaml``): which peft method computes each technique."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pefref.language.catalog import catalog_root
from pefref.language.loader import load_file
from pefref.language.schema import InteropTable, PeftMethod

__all__ = ["interop_table", "table_path", "method_for", "rows_for", "refusal_for"]


def table_path(root: Path | None = None) -> Path:
    """The table's file in the catalog folder ``root`` (default: the bundled catalog)."""
    return (root or catalog_root()) / "interop" / "peft.yaml"


@lru_cache(maxsize=4)
def _load(path: str) -> InteropTable:
    return load_file(InteropTable, Path(path))[0]


def interop_table(root: Path | None = None) -> InteropTable:
    """The validated table (loaded once per process)."""
    return _load(str(table_path(root)))


def rows_for(technique_id: str, table: InteropTable | None = None) -> list[PeftMethod]:
    """The table's export rows for a technique (empty when peft has no exact form of it)."""
    table = table or interop_table()
    return [m for m in table.methods if m.technique == technique_id and not m.import_only and not m.refused]


def refusal_for(technique_id: str, table: InteropTable | None = None) -> str | None:
    """Why peft's form of a technique is not converted (its row's ``refused``), or None when no row refuses it."""
    table = table or interop_table()
    return next((m.refused for m in table.methods if m.technique == technique_id and m.refused), None)


def method_for(technique_id: str, table: InteropTable | None = None,
               hyperparameters: Mapping[str, Any] | None = None) -> PeftMethod | None:
    """The export row for a technique with these hyperparameters (None when peft has no exact form of it).

    Without hyperparameters, the technique's first row.
    """
    rows = rows_for(technique_id, table)
    if hyperparameters is None:
        return rows[0] if rows else None
    return next((m for m in rows if all(hyperparameters.get(k) == v for k, v in m.when.items())), None)
