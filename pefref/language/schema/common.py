"""Shared pieces of the schema: the strict base model and expression fields."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from pefref.language.expr import ExprError, parse_expr

__all__ = ["Strict", "ExprStr", "Identifier", "SITE_PATTERN"]


class Strict(BaseModel):
    """Frozen, extra keys forbidden: a typo in a YAML key fails loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _check_expr(value: str | int | float) -> str:
    try:
        parse_expr(value)
    except ExprError as e:
        raise PydanticCustomError("expression", "{message}", {"message": e.message, "column": e.column}) from None
    return str(value)


ExprStr = Annotated[str, AfterValidator(_check_expr)]
"""An expression of the closed grammar (see :mod:`pefref.expr`)."""

Identifier = Annotated[str, AfterValidator(lambda s: _identifier(s))]
SITE_PATTERN = r"^[a-z_]+(\.[a-z_]+)*$"


def _identifier(s: str) -> str:
    if not s.isidentifier():
        raise PydanticCustomError("identifier", "{value!r} is not a valid name (letters, digits, underscores)", {"value": s})
    return s
