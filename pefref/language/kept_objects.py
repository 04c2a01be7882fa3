"""Validated schema objects kept across processes as tagged JSON, so an unchanged file is not validated again.

Validating a file against the schema first builds the model's validator (pydantic
generates its core schema: about 10 ms for :class:`~pefref.language.schema.Technique`),
which a fresh process pays on its first ``apply``. :func:`validated` keeps the result
of a validation that passed, in the derived-facts cache
(:func:`pefref.language.catalog_cache.memo`), and a later process rebuilds the same
objects from it with ``model_construct`` (no validator is built or run).

* The key is the schema class, the file's plain data (what the YAML parse gave),
  pydantic's and transformers' versions (validators read the installed transformers),
  the parsing limits and pefref's code (as every memo's): whatever validation depends
  on. Only a validation that passed is kept; a file with a problem is validated, and
  reports it, every time.
* An entry is JSON: a model is ``{"m": class, "f": fields, "s": fields set}``, a tuple
  ``{"t": [...]}``, a mapping ``{"d": {...}}``, lists and scalars as they are. Only
  classes of the schema (subclasses of :class:`~pefref.language.schema.common.Strict`)
  are built, with the values the validation produced; an entry naming anything else, or
  shaped otherwise, is ignored and the file validated again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from pefref.language.limits import current

__all__ = ["validated", "encode", "decode"]

M = TypeVar("M", bound=BaseModel)


class _Malformed(ValueError):
    """An entry that is not the encoding of schema objects."""


def encode(v: Any) -> Any:
    """Tagged JSON of a validated value (models, tuples, string-keyed mappings, lists, scalars); ValueError otherwise."""
    if isinstance(v, BaseModel):
        if v.__pydantic_private__ or v.__pydantic_extra__:
            raise ValueError("a model with private or extra values")
        return {"m": f"{type(v).__module__}:{type(v).__qualname__}", "f": {k: encode(x) for k, x in v.__dict__.items()},
                "s": sorted(v.model_fields_set)}
    if isinstance(v, tuple):
        return {"t": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise ValueError("a mapping with keys that are not strings")
        return {"d": {k: encode(x) for k, x in v.items()}}
    if v is None or type(v) in (str, int, float, bool):
        return v
    raise ValueError(f"a value of type {type(v).__name__}")


def _classes() -> dict[str, type[BaseModel]]:
    from pefref.language.schema.common import Strict

    out: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [Strict]
    while todo:
        c = todo.pop()
        out[f"{c.__module__}:{c.__qualname__}"] = c
        todo += c.__subclasses__()
    return out


def decode(v: Any, classes: dict[str, type[BaseModel]] | None = None) -> Any:
    """The value :func:`encode` gave ``v`` for; only schema classes are built; _Malformed otherwise."""
    classes = _classes() if classes is None else classes
    if isinstance(v, list):
        return [decode(x, classes) for x in v]
    if isinstance(v, dict):
        if v.keys() == {"t"} and isinstance(v["t"], list):
            return tuple(decode(x, classes) for x in v["t"])
        if v.keys() == {"d"} and isinstance(v["d"], dict):
            return {k: decode(x, classes) for k, x in v["d"].items()}
        if v.keys() == {"m", "f", "s"} and isinstance(v["f"], dict) and isinstance(v["s"], list):
            cls = classes.get(v["m"]) if isinstance(v["m"], str) else None
            if cls is None or set(v["f"]) != set(cls.model_fields) or not set(v["s"]) <= set(v["f"]):
                raise _Malformed("not a schema object")
            return cls.model_construct(_fields_set=set(v["s"]), **{k: decode(x, classes) for k, x in v["f"].items()})
        raise _Malformed("an untagged mapping")
    if v is None or type(v) in (str, int, float, bool):
        return v
    raise _Malformed(f"a value of type {type(v).__name__}")


def validated(cls: type[M], data: dict[str, Any], validate: Callable[[], M]) -> M:
    """``validate()`` (``cls`` validating the plain ``data``), or the objects a passed validation of the same
    data by this pefref, pydantic and transformers gave (see the module docstring)."""
    from pefref.language import catalog_cache
    from pefref.language.schema.family import installed_transformers

    if not catalog_cache.enabled():
        return validate()
    pydantic = sys.modules["pydantic"]
    key = {"class": f"{cls.__module__}:{cls.__qualname__}", "data": data, "pydantic": str(pydantic.VERSION),
           "transformers": list(installed_transformers() or ()), "limits": repr(current())}
    made: list[M] = []

    def compute() -> Any:
        made.append(validate())
        try:
            return encode(made[0])
        except ValueError:
            return None  # not kept as JSON: validated every time
    try:
        json.dumps(key)
    except (TypeError, ValueError):  # data that is not JSON: validated every time
        return validate()
    kept = catalog_cache.memo("validated", key, compute)
    if made:
        return made[0]
    try:
        obj = decode(kept)
    except (_Malformed, TypeError, ValueError, RecursionError):
        return validate()
    return obj if type(obj) is cls else validate()
