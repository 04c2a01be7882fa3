"""JSON Schema files generated from the pydantic models (the single source of truth).

Each entry of :data:`pefref.language.schema.SCHEMAS` becomes ``schemas/<name>.schema.json``.
Output is deterministic (sorted keys, indent 2, trailing newline), so the
committed files can be checked against the models: :func:`check_schemas` lists
the files that differ, and a test runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pefref.language.schema import SCHEMAS

__all__ = ["schemas_root", "schema_texts", "write_schemas", "check_schemas", "JSON_SCHEMA_DIALECT"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_SUFFIX = ".schema.json"


def schemas_root() -> Path:
    """The ``schemas/`` folder beside the bundled catalog."""
    return Path(__file__).resolve().parents[2] / "schemas"


def schema_texts() -> dict[str, str]:
    """File name → JSON text, for every model of :data:`SCHEMAS` (sorted by file name)."""
    out: dict[str, str] = {}
    for name in sorted(SCHEMAS):
        schema = SCHEMAS[name].model_json_schema(by_alias=True, mode="validation")
        schema["$schema"] = JSON_SCHEMA_DIALECT
        schema["$id"] = f"{name}{_SUFFIX}"
        out[f"{name}{_SUFFIX}"] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return out


def write_schemas(root: Path | None = None) -> list[Path]:
    """Write every schema file under ``root`` (default: :func:`schemas_root`); return the files changed.

    Stale ``*.schema.json`` files with no model behind them are removed (and listed).
    """
    root = root or schemas_root()
    root.mkdir(parents=True, exist_ok=True)
    texts = schema_texts()
    changed: list[Path] = []
    for fname, text in texts.items():
        p = root / fname
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
            changed.append(p)
    for p in sorted(root.glob(f"*{_SUFFIX}")):
        if p.name not in texts:
            p.unlink()
            changed.append(p)
    return changed


def check_schemas(root: Path | None = None) -> list[Path]:
    """Files under ``root`` that differ from what the models generate (missing, stale or extra); empty when in sync."""
    root = root or schemas_root()
    texts = schema_texts()
    differ: list[Path] = []
    for fname, text in texts.items():
        p = root / fname
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            differ.append(p)
    if root.is_dir():
        differ += [p for p in sorted(root.glob(f"*{_SUFFIX}")) if p.name not in texts]
    return differ
