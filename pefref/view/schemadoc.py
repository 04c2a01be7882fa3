"""A field reference of the catalog's file formats, generated from the pydantic models.

Each schema of :data:`pefref.language.schema.SCHEMAS` (technique, reference,
family, models) is walked through the JSON Schema pydantic generates from it,
the same one written to ``schemas/``: every object with its description and
its fields (type, required or default, constraints, description). Types that
name another object keep the link (a :class:`TypePart` with ``ref``), so a
reference page can point at it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TypePart", "FieldDoc", "ObjectDoc", "SchemaDoc", "schema_docs"]

_CONSTRAINTS = {
    "minimum": ">= {}", "maximum": "<= {}", "exclusiveMinimum": "> {}", "exclusiveMaximum": "< {}",
    "minItems": "at least {} items", "maxItems": "at most {} items", "minLength": "at least {} characters",
    "pattern": "matches {}",
}


@dataclass(frozen=True)
class TypePart:
    """A piece of a type's text; ``ref`` names the object it stands for, if any."""

    text: str
    ref: str | None = None


@dataclass(frozen=True)
class FieldDoc:
    """One field of an object: ``name: type`` with what the schema says about it."""

    name: str
    type: list[TypePart]
    required: bool
    default: str | None
    description: str
    constraints: list[str] = field(default_factory=list)

    @property
    def type_text(self) -> str:
        return "".join(p.text for p in self.type)


@dataclass(frozen=True)
class ObjectDoc:
    """An object of the schema (a pydantic model) and its fields, in declaration order."""

    name: str
    description: str
    fields: list[FieldDoc]


@dataclass(frozen=True)
class SchemaDoc:
    """One file format: its top object first, then the objects it refers to (sorted by name)."""

    key: str
    file: str
    objects: list[ObjectDoc]


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(s: dict[str, Any]) -> list[TypePart]:
    """The type of a JSON Schema node as text parts (``null`` alternatives are left out)."""
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return [TypePart(name, name)]
    for key in ("oneOf", "anyOf"):
        if key in s:
            alts = [a for a in s[key] if a.get("type") != "null"]
            out: list[TypePart] = []
            for i, a in enumerate(alts):
                if i:
                    out.append(TypePart(" | "))
                out += _type(a)
            return out or [TypePart("null")]
    if "const" in s:
        return [TypePart(json.dumps(s["const"]))]
    if "enum" in s:
        return [TypePart(" | ".join(json.dumps(v) for v in s["enum"]))]
    t = s.get("type")
    if t == "array":
        return [TypePart("list["), *_type(s.get("items", {})), TypePart("]")]
    if t == "object":
        values = s.get("additionalProperties")
        if isinstance(values, dict):
            names = s.get("propertyNames", {}).get("enum")
            key = " | ".join(json.dumps(v) for v in names) if names else "name"
            return [TypePart(f"map[{key} → "), *_type(values), TypePart("]")]
        return [TypePart("object")]
    return [TypePart({"integer": "int", "number": "float", "boolean": "bool", "string": "str"}.get(str(t), str(t or "any")))]


def _constraints(s: dict[str, Any]) -> list[str]:
    out = [fmt.format(s[k]) for k, fmt in _CONSTRAINTS.items() if k in s]
    items = s.get("items")
    if isinstance(items, dict):
        out += [f"each item {c}" for c in _constraints(items)]
    for key in ("anyOf", "oneOf"):
        for a in s.get(key, []):
            out += _constraints(a)
    return out


def _object(name: str, s: dict[str, Any]) -> ObjectDoc:
    required = set(s.get("required", []))
    fields = []
    for fname, fs in s.get("properties", {}).items():
        default = json.dumps(fs["default"], ensure_ascii=False) if "default" in fs else None
        fields.append(FieldDoc(fname, _type(fs), fname in required, default, fs.get("description", ""), _constraints(fs)))
    return ObjectDoc(name, s.get("description", ""), fields)


def schema_docs() -> list[SchemaDoc]:
    """The field reference of every schema, the technique schema first, then by name."""
    from pefref.language.schema import SCHEMAS

    keys = sorted(SCHEMAS, key=lambda k: (k != "technique", k))
    out = []
    for key in keys:
        s = SCHEMAS[key].model_json_schema(by_alias=True, mode="validation")
        defs = s.get("$defs", {})
        objects = [_object(s.get("title", key), s)] + [_object(n, defs[n]) for n in sorted(defs)]
        out.append(SchemaDoc(key, f"{key}.schema.json", objects))
    return out
