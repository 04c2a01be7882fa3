"""Where pefref's own data lies: the bundled catalog and the generated JSON Schemas.

The repository keeps one copy of each, at its root (``catalog/``, ``schemas/``).
A wheel carries them inside the package as ``pefref/catalog/`` and
``pefref/schemas/`` (the build hook in ``setup.py`` copies them there), so an
installed pefref finds them through :mod:`importlib.resources`; a checkout (on
``PYTHONPATH`` or installed in editable mode) has no such folders inside the
package and reads the repository's copy beside it. :func:`bundled_data` is the
only place that decides; nothing else computes a data path from a module's
location.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pefref.language.errors import PefrefError

__all__ = ["BundledData", "bundled_data"]


@dataclass(frozen=True)
class BundledData:
    """The folders of pefref's own data.

    Attributes:
        catalog: the bundled catalog (reference architecture, families, shapes, techniques, ...).
        schemas: the JSON Schema files generated from the models.
        checkout: the repository pefref runs from, or None when it is installed from a wheel
            (then there is no repository ``site/`` or ``schemas/`` to write to by default).
    """

    catalog: Path
    schemas: Path
    checkout: Path | None


@lru_cache(maxsize=1)
def bundled_data() -> BundledData:
    """The bundled catalog and schemas: inside the installed package, else in the checkout the package lies in.

    Raises:
        PefrefError: neither place holds a catalog (a broken installation), or the package is not on disk.
    """
    found = resources.files("pefref")
    if not isinstance(found, Path):  # a zip import: the catalog's located errors name files on disk
        raise PefrefError(f"pefref must be installed unpacked on disk to read its catalog (found {found})")
    package = found.resolve()
    inside = package / "catalog"
    if inside.is_dir():
        return BundledData(inside, package / "schemas", None)
    checkout = package.parent
    if not (checkout / "catalog").is_dir():
        raise PefrefError(f"pefref's catalog is missing: neither {inside} nor {checkout / 'catalog'} is a folder; reinstall pefref")
    return BundledData(checkout / "catalog", checkout / "schemas", checkout)
