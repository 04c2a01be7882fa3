"""``pefref diagram`` and ``pefref graph``: architecture diagrams and typology graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pefref.cli.app import _resolve_technique, app
from pefref.language.errors import PefrefError

__all__ = ["diagram", "graph"]


def _write(data: bytes, out: Path | None) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    except OSError as e:
        raise PefrefError(f"cannot write {out}: {e.strerror or e}") from None
    typer.echo(f"wrote {out}", err=True)


def _format(fmt: str | None, out: Path | None, known: tuple[str, ...]) -> str:
    """The output format: ``--format`` if given, else the suffix of ``-o`` (``x.png`` → png), else svg.

    A ``--format`` that contradicts a known suffix is refused, so that ``-o x.png`` never holds SVG bytes."""
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    suffix = {"gv": "dot", "xml": "graphml"}.get(suffix, suffix)
    if fmt is None:
        fmt = suffix if suffix in known else "svg"
    if fmt not in known:
        raise PefrefError(f"unknown format {fmt!r}; expected {', '.join(known)}")
    if suffix in known and suffix != fmt:
        raise PefrefError(f"--format {fmt} does not match the output file {out} (a .{out.suffix.lstrip('.')} file); "  # type: ignore[union-attr]
                          f"drop --format or name the file .{fmt}")
    return fmt


def _binary_to_terminal(fmt: str, out: Path | None) -> None:
    if out is None and fmt in ("png", "pdf") and sys.stdout.isatty():
        raise PefrefError(f"--format {fmt} writes binary data; give -o PATH")


@app.command()
def diagram(
    techniques: list[str] = typer.Argument(..., help="Technique ids, technique or composition YAML files; several are composed on one model."),
    fmt: str | None = typer.Option(None, "--format", help="svg, png, pdf (through graphviz's dot) or dot; default: the suffix of -o, else svg."),
    out: Path | None = typer.Option(None, "-o", "--output", help="Output file (default: standard output)."),
    model: str | None = typer.Option(None, "--model", help="Model shape: numeric shapes and parameter counts."),
    family: str | None = typer.Option(None, "--family", help="Architecture map (name or YAML file): label real module paths."),
    layers: str | None = typer.Option(None, "--layers", help="Unroll N layers, or 'all' layers of --model (default: one layer drawn as × L)."),
) -> None:
    """Draw the architecture diagram of one or several techniques on the reference Transformer."""
    from dataclasses import replace

    from pefref.render.diagram import technique_graph, to_dot
    from pefref.render.dot import FORMATS, render_graph

    fmt = _format(fmt, out, (*FORMATS, "dot"))
    _binary_to_terminal(fmt, out)
    picked, cat, comps = [], None, []
    for arg in techniques:
        if arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
            from pefref.language.composition import is_composition_file, load_composition

            if is_composition_file(Path(arg)):  # a composition: each of its adapters, drawn on one model
                from pefref.language.catalog import default_catalog

                cat = cat or default_catalog()
                res = load_composition(arg, cat)
                comps.append(res)
                picked += res.drawable()
                continue
        t, c = _resolve_technique(arg)
        cat = c if cat is None else replace(cat, techniques={**cat.techniques, **c.techniques})
        picked.append(t)
    assert cat is not None
    lay: int | str | None = layers
    g = technique_graph(cat, picked, model=model, family=family, layers=lay, compositions=comps)
    _write(to_dot(g).encode("utf-8") if fmt == "dot" else render_graph(g, fmt), out)


@app.command()
def graph(
    kind: str = typer.Argument(..., help="typology, similarity or lineage."),
    fmt: str | None = typer.Option(None, "--format", help="svg, png, pdf, dot, json (networkx node-link) or graphml; default: the suffix of -o, else svg."),
    out: Path | None = typer.Option(None, "-o", "--output", help="Output file (default: standard output)."),
) -> None:
    """Draw or export a graph of the catalog: typology (bipartite), similarity (weighted) or lineage."""
    from pefref.cli.app import _catalog
    from pefref.render.dot import FORMATS, render_dot
    from pefref.render.graphs import build_graph, export_graph, graph_dot

    fmt = _format(fmt, out, (*FORMATS, "dot", "json", "graphml"))
    _binary_to_terminal(fmt, out)
    cat = _catalog()
    if fmt in ("json", "graphml"):
        data = export_graph(build_graph(kind, cat), fmt).encode("utf-8")
    else:
        text = graph_dot(kind, cat)
        data = text.encode("utf-8") if fmt == "dot" else render_dot(text, fmt)
    _write(data, out)
