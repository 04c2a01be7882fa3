"""The ``pefref`` command line: a thin layer over the library.

Each command loads what it needs lazily (the catalog imports torch through the
primitive registry), so ``pefref --help`` stays fast. User-facing errors
(:class:`~pefref.errors.PefrefError`, including located
:class:`~pefref.errors.CatalogError` problems) are printed as ``file:line:col:
field: message`` lines and exit with status 1, never with a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from .errors import CatalogError, Location, PefrefError, Problem

if TYPE_CHECKING:
    from .catalog import Catalog

__all__ = ["app", "UnknownName"]


class UnknownName(PefrefError):
    """A technique id, model name or family that the catalog does not hold (the message suggests one)."""


def _rel(file: str) -> str:
    """``file`` relative to the working folder when it lies below it."""
    try:
        rel = os.path.relpath(file)
    except ValueError:
        return file
    return file if rel.startswith("..") else rel


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _problem_text(p: Problem) -> str:
    return str(Problem(Location(_rel(p.location.file), p.location.line, p.location.column), p.field, p.message))


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": _rel(p.location.file), "line": p.location.line, "column": p.location.column, "field": p.field, "message": p.message}


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _print_problems(problems: list[Problem]) -> None:
    con = _err()
    for p in problems:
        con.print(Text(_problem_text(p)))
    files = len({p.location.file for p in problems})
    con.print(Text(f"{_plural(len(problems), 'problem')} in {_plural(files, 'file')}", style="bold red"))


class _Group(TyperGroup):
    """Prints pefref's user-facing errors cleanly (exit 1) for every command, present and future."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CatalogError as e:
            _print_problems(e.problems)
            raise typer.Exit(1) from None
        except PefrefError as e:
            _err().print(Text("error: ", style="bold red") + Text(str(e)))
            raise typer.Exit(1) from None


app = typer.Typer(
    name="pefref",
    cls=_Group,
    help="PEFT techniques as data: validate, list and show techniques described in YAML against a reference Transformer.",
    no_args_is_help=True,
    add_completion=False,
)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _catalog() -> Catalog:
    from .catalog import default_catalog

    return default_catalog()


def _lookup(fn: Any, key: str) -> Any:
    """Call a catalog lookup; its KeyError (whose message suggests a name) becomes :class:`UnknownName`."""
    try:
        return fn(key)
    except KeyError as e:
        raise UnknownName(str(e.args[0]) if e.args else repr(key)) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"pefref {version('pefref')}")
        except PackageNotFoundError:
            typer.echo("pefref (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """PEFT techniques as data: validate, list and show techniques described in YAML against a reference Transformer."""


# --- validate -----------------------------------------------------------------


def _validate(paths: list[Path]) -> tuple[list[Problem], dict[str, Any]]:
    """Validate the bundled catalog (no paths), or technique files, folders of them and catalog folders."""
    from .catalog import catalog_root, load_catalog, load_techniques

    problems: list[Problem] = []
    report: dict[str, Any] = {"techniques": [], "files": 0}
    if not paths:
        paths = [catalog_root()]
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            problems.append(Problem(Location(str(p)), "", "no such file or folder"))
        elif p.is_dir() and (p / "reference" / "transformer.yaml").is_file():
            try:
                cat = load_catalog(p)
            except CatalogError as e:
                problems += e.problems
                continue
            report["techniques"] += sorted(cat.techniques)
            report["files"] += 2 + len(cat.families) + len(cat.techniques)
            report.setdefault("families", []).extend(sorted(cat.families))
            report.setdefault("models", []).extend(cat.shapes)
        elif p.is_dir():
            found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
            if not found:
                problems.append(Problem(Location(str(p)), "", "no .yaml files in this folder"))
            files += found
        else:
            files.append(p)
    unique = list(dict.fromkeys(f.resolve() for f in files))
    if unique:
        try:
            base = _catalog()
        except CatalogError as e:
            return problems + e.problems, report
        loaded, _src, _pos, tproblems = load_techniques(unique, base.reference, base.techniques)
        problems += tproblems
        report["techniques"] += sorted(loaded)
        report["files"] += len(unique)
    return problems, report


@app.command()
def validate(
    paths: Optional[list[Path]] = typer.Argument(None, help="Technique files, folders of them, or catalog folders (default: the bundled catalog).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    """Validate the catalog, or technique YAML files against the bundled reference architecture."""
    problems, report = _validate(list(paths or []))
    if as_json:
        _echo_json({"ok": not problems, **report, "problems": [_problem_json(p) for p in problems]})
    elif not problems:
        what = [_plural(len(report["techniques"]), "technique")]
        if "families" in report:
            what += [_plural(len(report["families"]), "architecture map"), _plural(len(report["models"]), "model shape")]
        Console(highlight=False).print(Text("OK ", style="bold green") + Text(f"{_plural(report['files'], 'file')}: {', '.join(what)}"))
    if problems:
        if not as_json:
            _print_problems(problems)
        raise typer.Exit(1)


# --- list / show --------------------------------------------------------------


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")) -> None:
    """List the catalog's techniques with their year, forms and sites."""
    from .summary import technique_row

    cat = _catalog()
    rows = [technique_row(cat.techniques[k], cat.techniques) for k in sorted(cat.techniques)]
    if as_json:
        _echo_json(rows)
        return
    table = Table(title=f"{len(rows)} techniques")
    for col in ("id", "name", "year", "forms", "sites"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r["id"]), Text(r["name"]), str(r["year"]), Text(", ".join(r["forms"])), Text(", ".join(r["sites"])))
    Console().print(table)


def _kv_table(rows: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(Text(str(k)), Text(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
    return t


def _render_value(con: Console, key: str, value: Any) -> None:
    """Generic rendering of a summary entry (used for entries without a dedicated layout)."""
    if value in (None, "", {}, []):
        return
    if isinstance(value, dict):
        con.print(Text(key.replace("_", " "), style="bold underline"))
        con.print(_kv_table(value))
    elif isinstance(value, list):
        con.print(Text(key.replace("_", " "), style="bold underline"))
        for item in value:
            con.print(Text(f"  - {item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)}"))
    else:
        con.print(Text(f"{key.replace('_', ' ')}: ", style="bold") + Text(str(value)))


def _render_hyperparameters(con: Console, hps: dict[str, Any]) -> None:
    if not hps:
        return
    t = Table("name", "type", "default", "bounds", "description", title="hyperparameters", title_justify="left")
    for name, hp in hps.items():
        if "choices" in hp:
            bounds = "one of " + ", ".join(map(str, hp["choices"]))
        elif "min" in hp or "max" in hp:
            bounds = f"[{hp.get('min', '-inf')}, {hp.get('max', 'inf')}]"
        else:
            bounds = ""
        desc = hp.get("description", "") + (f" (from {hp['from']})" if "from" in hp else "")
        t.add_row(Text(name), hp["type"], Text(str(hp["default"])), Text(bounds), Text(desc))
    con.print(t)


def _render_module(con: Console, m: dict[str, Any]) -> None:
    from .summary import layers_text

    head = Text("module ", style="bold") + Text(m["name"], style="bold cyan") + Text(f": {m['form']} at {', '.join(m['sites'])}, layers {layers_text(m['layers'])}")
    if "uses" in m:
        head += Text(f" (uses {m['uses']})")
    con.print(head)
    if m.get("description"):
        con.print(Padding(Text(m["description"]), (0, 0, 0, 2)))
    if m["params"]:
        t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 2))
        for col in ("param", "shape", "init", "trainable", "shared", "description"):
            t.add_column(col, overflow="fold")
        for name, p in m["params"].items():
            t.add_row(Text(name), Text("[" + ", ".join(map(str, p["shape"])) + "]"), Text(p["init"]), str(p["trainable"]).lower(), p["shared"], Text(p.get("description", "")))
        con.print(t)
    for k, v in {**m["expressions"], **m.get("options", {})}.items():
        con.print(Text(f"  {k}: ", style="bold") + Text(v if isinstance(v, str) else json.dumps(v)))
    for k, v in m.items():
        if k not in ("name", "form", "sites", "layers", "uses", "description", "params", "expressions", "options"):
            _render_value(con, f"  {k}", v)


def render_summary(summary: dict[str, Any], con: Console | None = None) -> None:
    """Print a :func:`pefref.summary.technique_summary` dict; entries without a dedicated layout are rendered generically."""
    con = con or Console()
    s = dict(summary)
    p = s.pop("paper")
    con.print(Text(s.pop("name"), style="bold") + Text(f"  ({s.pop('id')})" + ("  [original]" if s.pop("original", False) else "")))
    con.print(Text(f"{p['authors']} ({p['year']}). {p['title']}." + (f" {p['venue']}." if p.get("venue") else "") + f" {p['link']}"))
    if s.get("summary"):
        con.print(Text(s.pop("summary")))
    con.print()
    _render_hyperparameters(con, s.pop("hyperparameters", {}))
    for m in s.pop("modules", []):
        _render_module(con, m)
    con.print()
    for key, value in s.items():
        _render_value(con, key, value)


def _resolve_technique(arg: str) -> tuple[Any, Catalog]:
    """A technique by catalog id, or from a YAML file (checked against the bundled catalog, which it joins)."""
    cat = _catalog()
    path = Path(arg)
    if not (arg.endswith((".yaml", ".yml")) or path.is_file()):
        return _lookup(cat.technique, arg), cat
    from dataclasses import replace

    from .catalog import load_techniques

    loaded, sources, positions, problems = load_techniques([path.resolve()], cat.reference, cat.techniques)
    if problems:
        raise CatalogError(problems)
    t = next(iter(loaded.values()))
    return t, replace(cat, techniques={**cat.techniques, **loaded}, sources={**cat.sources, **sources}, positions={**cat.positions, **positions})


@app.command()
def show(
    technique: str = typer.Argument(..., help="Technique id (e.g. lora) or a technique YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show one technique: paper, hyperparameters, modules, shapes and expressions."""
    from .summary import technique_summary

    t, cat = _resolve_technique(technique)
    summary = technique_summary(t, cat)
    if "file" in summary:
        summary["file"] = _rel(summary["file"])
    if as_json:
        _echo_json(summary)
    else:
        render_summary(summary)


# --- schema / models ----------------------------------------------------------


@app.command()
def schema(
    check: bool = typer.Option(False, "--check", help="Exit 1 when the files differ from the models, instead of writing them."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the schema files (default: the repository's schemas/)."),
) -> None:
    """Regenerate the JSON Schema files in schemas/ from the models (--check: only compare)."""
    from .schemagen import check_schemas, schemas_root, write_schemas

    root = out or schemas_root()
    con = Console(highlight=False)
    if check:
        differ = check_schemas(root)
        if differ:
            err = _err()
            for p in differ:
                err.print(Text(f"{_rel(str(p))}: differs from the schema models"))
            err.print(Text(f"{len(differ)} schema file(s) out of date; run `pefref schema` to regenerate", style="bold red"))
            raise typer.Exit(1)
        con.print(Text(f"{_rel(str(root))}: up to date", style="green"))
        return
    changed = write_schemas(root)
    for p in changed:
        con.print(Text(f"wrote {_rel(str(p))}"))
    if not changed:
        con.print(Text(f"{_rel(str(root))}: up to date", style="green"))


@app.command()
def models(
    name: Optional[str] = typer.Argument(None, help="Show one model shape's config values."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects (one object with NAME)."),
) -> None:
    """List the named model shapes (public config values of real models, tiny ones for tests)."""
    from .summary import model_row

    cat = _catalog()
    if name is not None:
        row = model_row(_lookup(cat.shape, name))
        if as_json:
            _echo_json(row)
            return
        con = Console()
        con.print(Text(f"{row['name']} ({row['family']})", style="bold"))
        if row["description"]:
            con.print(Text(row["description"]))
        if row["source"]:
            con.print(Text(f"source: {row['source']}"))
        con.print(_kv_table(row["config"]))
        return
    rows = [model_row(s) for s in cat.shapes.values()]
    if as_json:
        _echo_json(rows)
        return
    table = Table("name", "family", "description", title=f"{len(rows)} model shapes")
    for r in rows:
        table.add_row(Text(r["name"]), Text(r["family"]), Text(r["description"]))
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
