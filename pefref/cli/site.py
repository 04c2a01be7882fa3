"""``pefref site``: build the static comparison site (or check the committed one)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.text import Text

from pefref.cli.app import _catalog, _err, _rel, app
from pefref.cli.safe import SafeConsole

__all__ = ["site"]


@app.command()
def site(
    out: Path | None = typer.Option(None, "-o", "--out", help="Folder to write the site to (default: the repository's site/; installed: ./site)."),
    include: list[Path] | None = typer.Option(None, "--include", help="A folder of your own technique YAML files to add (repeatable); their pages are marked as not from the catalog."),
    model: list[str] | None = typer.Option(None, "--model", help="Model shape for the index's counts, the costs and the comparison (repeatable; default llama-2-7b)."),
    results: Path | None = typer.Option(None, "--results", help="A folder of experiment results to show (for sections that present them)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the folder differs from a fresh build, instead of writing it."),
) -> None:
    """Build the comparison site: every technique and composition, the typology, comparisons, model shapes, primitives and the schema."""
    from pefref.render.site.build import build_site, check_site, site_root

    root = out or site_root()
    view = None
    if results is not None:
        from pefref.experiments.site_view import results_view

        view = results_view(results)
    kwargs = {"catalog": _catalog(), "models": list(model or []), "include": list(include or []), "results": view}
    con = SafeConsole(highlight=False)
    if check:
        differ = check_site(root, **kwargs)
        if differ:
            err = _err()
            for rel in differ[:20]:
                err.print(Text(f"{_rel(str(root / rel))}: differs from a fresh build"))
            if len(differ) > 20:
                err.print(Text(f"... and {len(differ) - 20} more"))
            err.print(Text(f"{len(differ)} file(s) of {_rel(str(root))} out of date; run `pefref site` to rebuild", style="bold red"))
            raise typer.Exit(1)
        con.print(Text(f"{_rel(str(root))}: up to date", style="green"))
        return
    start = time.perf_counter()
    written, removed = build_site(root, **kwargs)
    took = time.perf_counter() - start
    for p in removed:
        con.print(Text(f"removed {_rel(str(p))}"))
    files = sum(1 for _ in root.rglob("*") if _.is_file())
    con.print(Text(f"{_rel(str(root))}{os.sep}: {len(written)} file(s) written, {len(removed)} removed, {files} in all ({took:.1f} s)"))
