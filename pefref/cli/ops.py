"""``pefref ops``: every op and initialiser the expression language may call, with signature and doc."""

from __future__ import annotations

import json

import typer

from pefref.cli.app import app

__all__ = ["ops"]


@app.command()
def ops(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every registered op and initialiser with its signature and documentation."""
    from pefref.view.primitives import primitive_docs

    docs = primitive_docs()
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in docs], indent=2, sort_keys=True))
        return
    for kind, title in (("op", "Ops"), ("initialiser", "Initialisers")):
        typer.echo(f"{title}:")
        for d in (d for d in docs if d.kind == kind):
            first = " ".join(d.doc.split("\n\n")[0].split())
            typer.echo(f"  {d.signature}\n      {first}")
