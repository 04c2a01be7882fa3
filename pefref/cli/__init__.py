"""The ``pefref`` command line: a thin layer over the library (see :mod:`pefref.cli.app`)."""

from __future__ import annotations

from pefref.cli.app import app

__all__ = ["app"]
