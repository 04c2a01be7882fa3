"""Shared pieces of the schema: the strict base model and expression fields."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from pefref.language.expr import ExprError, parse_expr

__all__ = ["Strict", "ExprStr", "Identifier", "SITE_PATTERN", "Int", "Float", "at_least"]


class Strict(BaseModel):
    """Frozen, extra keys forbidden: a typo in a YAML key fails loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


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
