"""The static comparison site: view models gathered from the catalog, rendered with jinja2.

:func:`~pefref.render.site.build.build_site` writes it (``pefref site``);
:func:`~pefref.render.site.build.check_site` compares a folder with a fresh build.
"""

from __future__ import annotations

__all__ = ["build_site", "check_site", "site_files"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from pefref.render.site import build

        return getattr(build, name)
    raise AttributeError(name)
