"""Shared pieces of the schema: the strict base model and expression fields."""

from __future__ import annotations

import ast
import inspect
import sys
from functools import cache
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from pefref.language.expr import ExprError, parse_expr

__all__ = ["Strict", "ExprStr", "Identifier", "SITE_PATTERN", "Int", "Float", "at_least"]


class Strict(BaseModel):
    """Frozen, extra keys forbidden: a typo in a YAML key fails loudly.

    A field's description is the docstring under it (what pydantic's
    ``use_attribute_docstrings`` does, read here from one parse of each schema
    module instead of a source search per class), and a model's validator is
    built on its first use (``defer_build``), so importing the schema builds
    nothing that a call does not use."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        docs = _attribute_docs(cls.__module__).get(cls.__qualname__, {})
        for name, info in cls.__pydantic_fields__.items():
            if info.description is None and name in docs:
                info.description = docs[name]


@cache
def _attribute_docs(module: str) -> dict[str, dict[str, str]]:
    """``{class qualname: {field: docstring}}`` for the classes of ``module``: a string statement right
    after an annotated assignment documents that field. Kept by :func:`~pefref.language.catalog_cache.memo`
    (a pure function of pefref's code): a process that finds it there parses no source."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return {}
    from pefref.language import catalog_cache

    return catalog_cache.memo("attribute-docs", {"module": module, "file": str(path)}, lambda: _parse_attribute_docs(str(path)))


def _parse_attribute_docs(path: str) -> dict[str, dict[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return {}
    out: dict[str, dict[str, str]] = {}

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                attrs: dict[str, str] = {}
                for prev, stmt in zip(node.body, node.body[1:]):
                    if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(stmt, ast.Expr)
                            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                        attrs[prev.target.id] = inspect.cleandoc(stmt.value.value)
                out[prefix + node.name] = attrs
                walk(node.body, prefix + node.name + ".")

    walk(tree.body, "")
    return out


def _check_expr(value: str | int | float) -> str:
    try:
        parse_expr(value)
    except ExprError as e:
        raise PydanticCustomError("expression", "{message}", {"message": e.message, "column": e.column}) from None
    return str(value)


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_number", "expected a number, found the boolean {value}", {"value": value})
    return value


def at_least(n: int | float, kind: type = int) -> object:
    """An ``int`` (or ``float``) of at least ``n``, booleans refused (the bound stays a JSON Schema ``minimum``)."""
    return Annotated[kind, Field(ge=n), BeforeValidator(_no_bool)]


Int = Annotated[int, BeforeValidator(_no_bool)]
"""An integer; a YAML boolean is refused (``true`` is not 1)."""
Float = Annotated[float, BeforeValidator(_no_bool)]
"""A finite real number (NaN and infinities are refused by :class:`Strict`); a YAML boolean is refused."""

ExprStr = Annotated[str, AfterValidator(_check_expr)]
"""An expression of the closed grammar (see :mod:`pefref.expr`)."""

Identifier = Annotated[str, AfterValidator(lambda s: _identifier(s))]
SITE_PATTERN = r"^[a-z_]+(\.[a-z_]+)*$"


def _identifier(s: str) -> str:
    if not s.isidentifier():
        raise PydanticCustomError("identifier", "{value!r} is not a valid name (letters, digits, underscores)", {"value": s})
    return s
