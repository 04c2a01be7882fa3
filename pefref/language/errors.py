"""Located errors: every problem pefref reports names a file, a line, a column and a field."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Location", "Problem", "PefrefError", "CatalogError", "SiteError"]


@dataclass(frozen=True)
class Location:
    """A place in a source file (1-based line and column)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One finding: where, which field, what was found, what was expected."""

    location: Location
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location.file else ""
        fld = f"{self.field}: " if self.field else ""
        return f"{where}{fld}{self.message}"


class PefrefError(Exception):
    """Base class of pefref's user-facing errors."""


@dataclass
class CatalogError(PefrefError):
    """Invalid input: one or more located problems."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class SiteError(PefrefError):
    """A site, module or layer selector that matched nothing (lists what was available)."""
