"""Results derived from the catalog, kept across processes while the catalog is unchanged.

:func:`over_catalog` returns ``compute()``, a pure function of the default catalog
(the bundled one and the user's), of pefref's code and of plain JSON ``args``.
When the catalog's files are those of a catalog checked clean before (its
checked-catalog key, :func:`pefref.language.catalog_cache.checked_key`, has a
marker), the result is kept by :func:`pefref.language.catalog_cache.memo` under
that key and ``args``, so a later process with the same files and the same
pefref reads it without loading, validating or even importing the schema. Any
edited, added or removed file of any catalog changes the key: the catalog is
loaded and checked again. ``compute`` returns plain JSON data (what a
``--json`` option prints); its errors are raised, never kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["over_catalog"]

T = TypeVar("T")


def over_catalog(kind: str, args: Any, compute: Callable[[], T]) -> T:
    """``compute()``, kept while the catalog's files and pefref are unchanged (see the module docstring)."""
    from pefref.language.catalog_cache import memo, was_checked
    from pefref.language.errors import CatalogError
    from pefref.language.sources import catalog_files, catalog_sources

    found, problems = catalog_sources()
    key = None if problems else catalog_files(found).key()
    if key is not None and not was_checked(key):
        from pefref.language.catalog import default_catalog

        try:
            default_catalog()  # checked once (its marker makes the key trusted from now on)
        except CatalogError:
            key = None  # a broken file elsewhere: nothing is kept; compute reports what concerns it
    if key is None or not was_checked(key):
        return compute()
    return memo(f"catalog:{kind}", {"catalog": key, "args": args}, compute)
