"""From YAML files to validated schema objects, with every problem located.

pydantic validates structure; this module turns its errors into
:class:`~pefref.language.errors.Problem` s that name file:line:column, the field path,
what was found and what was expected (with a "did you mean" for unknown keys).
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pefref.language.errors import CatalogError, Location, Problem
from pefref.language.yamlsrc import Positions, read_yaml

__all__ = ["load_file", "validate_data", "dotted", "suggest"]

M = TypeVar("M", bound=BaseModel)


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists: among the closest by similarity, the fewest edits away
    (a swap of two neighbouring letters counts as one, so 'fomr' means 'form', not 'from')."""
    close = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {min(close, key=lambda c: _edits(word, c))!r}?"


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and swaps of neighbours."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _unwrap(t: Any) -> Any:
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    return t


def _members(t: Any) -> list[Any]:
    t = _unwrap(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(t) for m in _members(a)]
    return [t]


def _tag_of(t: Any) -> set[str]:
    """Names a union member is reported under in pydantic error locations."""
    out = set()
    for meta in getattr(t, "__metadata__", ()):
        tag = getattr(meta, "tag", None)
        if tag:
            out.add(tag)
    base = _unwrap(t)
    if isinstance(base, type) and issubclass(base, BaseModel):
        out.add(base.__name__)
        for fname in ("type", "form", "kind"):
            f = base.model_fields.get(fname)
            if f is not None and typing.get_origin(f.annotation) is typing.Literal:
                out.update(str(a) for a in typing.get_args(f.annotation))
    return out


def _fields_of(cls: Any, loc: tuple[Any, ...], data: Any) -> tuple[set[str], tuple[Any, ...]]:
    """Walk a pydantic error location: the allowed keys at its parent, and its data path (tags removed)."""
    t: Any = cls
    path: tuple[Any, ...] = ()
    for comp in loc[:-1]:
        members = _members(t)
        tagged = [m for m in members if comp in _tag_of(m)]
        if tagged and not (isinstance(data, dict) and comp in data and len(members) == 1):
            t = tagged[0]
            continue
        base = _unwrap(members[0]) if len(members) == 1 else None
        if base is None:
            models = [m for m in map(_unwrap, members) if isinstance(m, type) and issubclass(m, BaseModel)]
            base = models[0] if models else members[0]
        origin = typing.get_origin(base)
        if isinstance(base, type) and issubclass(base, BaseModel):
            f = base.model_fields.get(comp) or next((f for f in base.model_fields.values() if f.alias == comp), None)
            t = f.annotation if f else Any
        elif origin in (list, tuple):
            t = typing.get_args(base)[0]
        elif origin is dict:
            t = typing.get_args(base)[1]
        else:
            t = Any
        path += (comp,)
        data = data.get(comp) if isinstance(data, dict) else (data[comp] if isinstance(data, list) and isinstance(comp, int) and comp < len(data) else None)
    keys: set[str] = set()
    for m in map(_unwrap, _members(t)):
        if isinstance(m, type) and issubclass(m, BaseModel):
            keys |= {f.alias or n for n, f in m.model_fields.items()}
    if loc:
        path += (loc[-1],)
    return keys, path


def _found(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _problems(err: ValidationError, cls: type[BaseModel], data: Any, pos: Positions) -> list[Problem]:
    out: list[Problem] = []
    for e in err.errors():
        keys, path = _fields_of(cls, tuple(e["loc"]), data)
        typ = e["type"]
        ctx = e.get("ctx") or {}
        if typ == "extra_forbidden":
            key = str(path[-1])
            msg = f"unknown key {key!r}{suggest(key, keys)} (allowed: {', '.join(sorted(keys))})"
            out.append(Problem(pos.key_at(path), dotted(path), msg))
            continue
        loc = pos.at(path)
        if typ == "form":
            form = e["input"].get("form") if isinstance(e["input"], dict) else None
            if form is not None:
                from pefref.language.schema import FORMS

                out.append(Problem(pos.at(path + ("form",)), dotted(path + ("form",)), f"unknown form {form!r}{suggest(str(form), FORMS)} (expected one of {', '.join(FORMS)})"))
                continue
        if typ == "expression":
            col = int(ctx.get("column", 0)) + (1 if tuple(path) in pos.quoted else 0)
            loc = Location(loc.file, loc.line, loc.column + col)
            msg = f"invalid expression {_found(e['input'])}: {ctx.get('message', e['msg'])}"
        elif typ == "missing":
            msg = "required field is missing"
        else:
            text = e["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, "):]
            msg = f"{text}; found {_found(e['input'])}" if not isinstance(e["input"], dict) else text
        out.append(Problem(loc, dotted(path), msg))
    return out


def validate_data(cls: type[M], data: Any, pos: Positions) -> M:
    """Validate plain data against a schema model; raise CatalogError with located problems."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CatalogError(_problems(e, cls, data, pos)) from None


def load_file(cls: type[M], path: str | Path) -> tuple[M, Positions]:
    """Read a YAML file safely and validate it against ``cls``."""
    data, pos = read_yaml(path)
    if not isinstance(data, dict):
        raise CatalogError([Problem(pos.at(()), "", f"expected a mapping at the top level, found {type(data).__name__}")])
    from pefref.language.kept_objects import validated  # objects a passed validation of the same data gave

    return validated(cls, data, lambda: validate_data(cls, data, pos)), pos
