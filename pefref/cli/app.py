"""The ``pefref`` command line: a thin layer over the library.

Each command loads what it needs lazily (the catalog imports torch through the
primitive registry), so ``pefref --help`` stays fast. User-facing errors
(:class:`~pefref.language.errors.PefrefError`, including located
:class:`~pefref.language.errors.CatalogError` problems) are printed as ``file:line:col:
field: message`` lines and exit with status 1, never with a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from pefref.cli.safe import SafeConsole, safe_echo
from pefref.language.errors import CatalogError, Location, PefrefError, Problem
from pefref.language.printable import neutral_text

if TYPE_CHECKING:
    from pefref.language.catalog import Catalog

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
    return SafeConsole(stderr=True, soft_wrap=True, highlight=False)


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


def _wide() -> Console:
    """A console for wide tables: the terminal's width, or 160 columns when output is piped."""
    con = SafeConsole(highlight=False)
    return con if con.is_terminal else SafeConsole(highlight=False, width=160)


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it: NaN and infinities become null (``--json`` output stays parseable)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False))


def _catalog() -> Catalog:
    from pefref.language.catalog import default_catalog

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


@app.command()
def validate(
    paths: Optional[list[Path]] = typer.Argument(None, help="Technique files, folders of them, or catalog folders (default: the bundled catalog).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    """Validate the catalog, or technique YAML files against the bundled reference architecture."""
    from pefref.language.validate import validate_paths

    problems, report = validate_paths(list(paths or []))
    if as_json:
        _echo_json({"ok": not problems, **report, "problems": [_problem_json(p) for p in problems]})
    elif not problems:
        what = [_plural(len(report["techniques"]), "technique")]
        if report.get("compositions"):
            what.append(_plural(len(report["compositions"]), "composition"))
        if report.get("families") or report.get("models"):
            what += [_plural(len(report["families"]), "architecture map"), _plural(len(report["models"]), "model shape")]
        if report.get("experiments"):
            what.append(_plural(len(report["experiments"]), "experiment"))
        SafeConsole(highlight=False).print(Text("OK ", style="bold green") + Text(f"{_plural(report['files'], 'file')}: {', '.join(what)}"))
    if problems:
        if not as_json:
            _print_problems(problems)
        raise typer.Exit(1)


# --- list / show --------------------------------------------------------------


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")) -> None:
    """List the catalog's techniques with their year, forms and sites."""
    from pefref.language.catalog_memo import over_catalog

    def table_rows() -> list[dict[str, Any]]:
        from pefref.view.summary import technique_row

        cat = _catalog()
        return [technique_row(cat.techniques[k], cat.techniques) for k in sorted(cat.techniques)]

    rows = over_catalog("list", None, table_rows)
    if as_json:
        _echo_json(rows)
        return
    table = Table(title=f"{len(rows)} techniques")
    for col in ("id", "name", "year", "forms", "sites"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(Text(r["id"]), Text(r["name"]), str(r["year"]), Text(", ".join(r["forms"])), Text(", ".join(r["sites"])))
    SafeConsole().print(table)


def _over_catalog(kind: str, technique: str, args: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """What a command computes for a catalog technique, kept while the catalog is unchanged
    (:func:`pefref.language.catalog_memo.over_catalog`); a technique file is computed every time."""
    if technique.endswith((".yaml", ".yml")) or Path(technique).is_file():
        return compute()
    from pefref.language.catalog_memo import over_catalog

    return over_catalog(kind, {"technique": technique, **args}, compute)


def _resolve_technique(arg: str) -> tuple[Any, Catalog]:
    """A technique by catalog id (with the part of the catalog it needs: the reference, maps, shapes and the
    techniques it uses), or from a YAML file (checked against the whole catalog, which it joins)."""
    path = Path(arg)
    if not (arg.endswith((".yaml", ".yml")) or path.is_file()):
        from pefref.language.catalog import catalog_for

        part = catalog_for(arg)
        return _lookup(part.technique, arg), part
    cat = _catalog()
    from dataclasses import replace

    from pefref.language.catalog import load_techniques

    loaded, sources, positions, problems = load_techniques([path.resolve()], cat.reference, cat.techniques)
    if problems:
        raise CatalogError(problems)
    t = next(iter(loaded.values()))
    return t, replace(cat, techniques={**cat.techniques, **loaded}, sources={**cat.sources, **sources}, positions={**cat.positions, **positions})


SITES_HELP = ("Place the modules on these sites (repeatable or comma-separated): site names, patterns such as "
              "'attn.*', or selectors such as 'all-linear' (every linear projection).")


def _sites(items: Optional[list[str]]) -> list[str] | None:
    """--sites values split on commas (None when not given)."""
    if not items:
        return None
    return [s.strip() for item in items for s in item.split(",") if s.strip()]


def _composition_file(arg: str, sets: Optional[list[str]] = None, sites: Optional[list[str]] = None) -> bool:
    """Whether ``arg`` is a composition YAML file (then --set and --sites do not apply: it sets them per technique)."""
    if not (arg.endswith((".yaml", ".yml")) and Path(arg).is_file()):
        return False
    from pefref.language.composition import is_composition_file

    if not is_composition_file(Path(arg)):
        return False
    if sets or sites:
        raise PefrefError(f"{_rel(arg)}: --set and --sites apply to techniques; a composition gives each technique's hyperparameters and sites")
    return True


def _placed(t: Any, cat: Catalog, shape: Any, sites: Optional[list[str]]) -> Any:
    """``t`` placed on ``--sites`` for the family of ``shape`` (``t`` itself without --sites)."""
    chosen = _sites(sites)
    if chosen is None:
        return t
    from pefref.language.placement import retarget

    return retarget(t, chosen, cat.reference, cat.techniques, cat.family(shape.family))


@app.command()
def show(
    technique: str = typer.Argument(..., help="Technique id (see `pefref list`), a technique YAML file, or a composition YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    model: str = typer.Option("llama-2-7b", "--model", help="Model shape for the derived counts and costs."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override k=v (repeatable)."),
    sites: Optional[list[str]] = typer.Option(None, "--sites", help=SITES_HELP),
) -> None:
    """Show one technique (or a composition file): paper, modules, expressions, and its derived typology, parameters and costs."""
    if _composition_file(technique, sets, sites):
        from pefref.cli.compose import show_composition_cli

        show_composition_cli(technique, model, as_json, _echo_json, _rel)
        return
    from pefref.cli.textview import render_summary

    def compute() -> dict[str, Any]:
        from pefref.view import derived_facts
        from pefref.view.summary import technique_summary

        t, cat = _resolve_technique(technique)
        shape = _lookup(cat.shape, model)
        t = _placed(t, cat, shape, sites)
        out = technique_summary(t, cat)
        out.update(derived_facts(t, cat, shape, _overrides(sets)))
        return out

    summary = _over_catalog("show", technique, {"model": model, "sets": sets, "sites": sites}, compute)
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
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the schema files (default: the repository's schemas/; installed: the package's, for --check)."),
) -> None:
    """Regenerate the JSON Schema files in schemas/ from the models (--check: only compare)."""
    from pefref.language.bundled import bundled_data
    from pefref.language.schemagen import check_schemas, schemas_root, write_schemas

    if out is None and not check and bundled_data().checkout is None:
        raise PefrefError("pefref is installed, not run from its repository: give --out DIR to write the schema files (or --check the bundled ones)")
    root = out or schemas_root()
    con = SafeConsole(highlight=False)
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
    from pefref.view.summary import model_row

    cat = _catalog()
    if name is not None:
        row = model_row(_lookup(cat.shape, name))
        if as_json:
            _echo_json(row)
            return
        con = SafeConsole()
        con.print(Text(f"{row['name']} ({row['family']})", style="bold"))
        if row["description"]:
            con.print(Text(row["description"]))
        if row["source"]:
            con.print(Text(f"source: {row['source']}"))
        from pefref.cli.textview import kv_table

        con.print(kv_table(row["config"]))
        return
    rows = [model_row(s) for s in cat.shapes.values()]
    if as_json:
        _echo_json(rows)
        return
    table = Table("name", "family", "description", title=f"{len(rows)} model shapes")
    for r in rows:
        table.add_row(Text(r["name"]), Text(r["family"]), Text(r["description"]))
    SafeConsole().print(table)


# --- params / apply / typology / demo ---------------------------------------------


def _overrides(sets: Optional[list[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PefrefError(f"--set expects k=v, found {item!r}")
        out[key.strip()] = value.strip()
    return out


@app.command()
def params(
    technique: str = typer.Argument(..., help="Technique id, technique YAML file, or composition YAML file."),
    model: str = typer.Option(..., "--model", help="Model shape (see `pefref models`)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override k=v (repeatable)."),
    sites: Optional[list[str]] = typer.Option(None, "--sites", help=SITES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (key 'trainable')."),
) -> None:
    """Count a technique's (or a composition's, per member and in total) trainable parameters on a model shape, analytically."""
    if _composition_file(technique, sets, sites):
        from pefref.cli.compose import params_composition_cli

        params_composition_cli(technique, model, as_json, _echo_json)
        return
    def compute() -> dict[str, Any]:
        from pefref.view.params import count_params

        t, cat = _resolve_technique(technique)
        return count_params(t, _lookup(cat.shape, model), cat, _overrides(sets), _sites(sites)).as_dict()

    pc = _over_catalog("params", technique, {"model": model, "sets": sets, "sites": sites}, compute)
    if as_json:
        _echo_json(pc)
        return
    con = SafeConsole(highlight=False)
    trainable, base = pc["trainable"], pc["base_params"]
    if trainable == 0 and pc["dropped"]:  # nothing placed: not applicable, not "0 parameters"
        con.print(Text(f"{pc['technique']} on {model}: ", style="bold") + Text("n/a (it cannot be placed on this model)"))
    else:
        percent = 100.0 * trainable / base if base else 0.0
        con.print(Text(f"{pc['technique']} on {model}: ", style="bold") + Text(f"{trainable:,} trainable parameters ({percent:.4f}% of {base:,})"))
        con.print(Text("formula: ", style="bold") + Text(pc["formula"]))
    for why in pc["dropped"]:
        con.print(Text("not placed: ", style="bold") + Text(why))


@app.command("apply")
def apply_(
    technique: str = typer.Argument(..., help="Technique id, technique YAML file, or composition YAML file."),
    model: str = typer.Option("tiny-ref", "--model", help="Model shape to build (large ones on the meta device)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Hyperparameter override k=v (repeatable)."),
    sites: Optional[list[str]] = typer.Option(None, "--sites", "--site", help=SITES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the placement report as JSON (key 'trainable')."),
    calibration: int = typer.Option(4, "--calibration", min=0, help="Batches of random tokens a technique initialised from data "
                                    "(calibration statistics) gathers them on; 0: none (such a technique is then refused)."),
) -> None:
    """Build a model, apply a technique (or a composition file) and print the placement report (what went where)."""
    if technique.endswith((".yaml", ".yml")) and Path(technique).is_file():
        from pefref.language.composition import is_composition_file

        if is_composition_file(Path(technique)):
            from pefref.cli.compose import apply_composition_cli

            apply_composition_cli(technique, model, as_json, _echo_json, _wide)
            return
    from pefref.language.sizes import eval_scalar, model_sizes
    from pefref.models.build import build_model
    from pefref.runtime.api import apply as apply_technique

    t, cat = _resolve_technique(technique)
    shape = _lookup(cat.shape, model)
    fam = cat.family(shape.family)
    base = int(eval_scalar(fam.base_params, {**model_sizes(fam, dict(shape.config)), **shape.config}))
    device = "meta" if base > 200_000_000 else None
    m = build_model(shape, cat, device=device)
    from pefref.runtime.calibration import random_batches

    batches = random_batches(m, calibration) if calibration and device is None else None
    adapter = apply_technique(m, t, catalog=cat, sites=_sites(sites), overrides=_overrides(sets), calibration=batches)
    rep = adapter.report.as_dict()
    rep["model"] = model
    rep["device"] = device or "cpu"
    if as_json:
        _echo_json(rep)
        return
    from pefref.runtime.api import fold_paths

    table = Table("site", "module", "matched modules", "params each", "params", title=f"{t.id} on {model} ({fam.family}{', meta device' if device else ''})")
    for r in adapter.report.rows:
        table.add_row(Text(r.site), Text(r.module), Text("\n".join(fold_paths(r.paths))), f"{r.params_per_placement:,}", f"{r.params:,}")
    con = _wide()
    con.print(table)
    con.print(Text(f"trainable: {rep['trainable']:,} ({rep['percent']:.4f}% of {rep['base_params']:,})", style="bold"))


@app.command()
def typology(
    fmt: str = typer.Option("table", "--format", help="table, markdown, csv or json."),
) -> None:
    """Print the PEFT-Ref typology of every technique, derived from structure (declared values marked *)."""
    from pefref.language.schema import TYPOLOGY_PROPERTIES
    from pefref.view.typology import derive_typology

    cat = _catalog()
    rows = [derive_typology(cat.techniques[k], cat.reference, cat.techniques) for k in sorted(cat.techniques)]
    if fmt == "json":
        _echo_json([r.as_dict() for r in rows])
        return
    cols = ["id", *TYPOLOGY_PROPERTIES]

    def cell(r: Any, c: str) -> str:
        if c == "id":
            return r.id
        return r.values[c] + ("*" if c in r.declared else "")

    if fmt == "csv":
        import csv
        import sys

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([neutral_text(cell(r, c)) for c in cols])
    elif fmt == "markdown":
        typer.echo("| " + " | ".join(cols) + " |")
        typer.echo("|" + "---|" * len(cols))
        for r in rows:
            safe_echo("| " + " | ".join(cell(r, c) for c in cols) + " |")
        typer.echo("\n\\* declared in the technique's YAML rather than derived")
    elif fmt == "table":
        table = Table(*[c.replace("_", " ") for c in cols], title="PEFT-Ref typology (derived; * = declared)")
        for r in rows:
            table.add_row(*[Text(cell(r, c)) for c in cols])
        _wide().print(table)
    else:
        raise PefrefError(f"unknown format {fmt!r}; expected table, markdown, csv or json")


@app.command()
def demo(
    model: str = typer.Option("tiny-ref", "--model", help="A small model shape to run on."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows."),
) -> None:
    """Apply every catalog technique to a small model, run it, merge where derived mergeable, and report."""
    from pefref.cli.demo import run_demo

    rows = run_demo(_catalog(), model)
    if as_json:
        _echo_json(rows)
        return
    table = Table("technique", "trainable", "% of base", "identity at init", "init Δ", "adapted Δ", "mergeable", "merge Δ", "removed Δ",
                  title=f"every technique on {model} (Δ: max |logits - base logits|; merge Δ against the unmerged output)")
    for r in rows:
        table.add_row(Text(r["id"]), f"{r['trainable']:,}", f"{r['percent']:.3f}", str(r["identity_at_init"]), f"{r['init_diff']:.1e}", f"{r['adapted_diff']:.2e}",
                      str(r["mergeable"]), "-" if r["merge_diff"] is None else f"{r['merge_diff']:.1e}", f"{r['removed_diff']:.1e}")
    _wide().print(table)


import pefref.cli.experiments  # noqa: E402  (registers run, results)
import pefref.cli.render  # noqa: E402,F401  (registers diagram, graph)
from pefref.cli import ops as _ops  # noqa: E402,F401  (registers `pefref ops`)
from pefref.cli import site as _site  # noqa: E402,F401  (registers `pefref site`)

# --- --catalog on every command that reads the catalog ------------------------------

NO_CATALOG = frozenset({"schema", "ops", "results"})
"""The commands that read no catalog; every other one takes ``--catalog DIR`` (given below, in one place)."""

CATALOG_OPTION = typer.Option(None, "--catalog", metavar="DIR", show_default=False, help=(
    "A folder of your own catalog (techniques/, families/, models.yaml, compositions/) added to the bundled one "
    "(repeatable; $PEFREF_CATALOG and installed packages add theirs too)."))


def _with_catalog_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a ``--catalog`` option: the folders are added to the catalog for the duration of the command."""
    from pefref.language.sources import use_cli_catalogs

    sig = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter("catalog_folders", inspect.Parameter.KEYWORD_ONLY, default=CATALOG_OPTION, annotation=Optional[list[Path]])

    @functools.wraps(fn)
    def command(*args: Any, catalog_folders: Optional[list[Path]] = None, **kwargs: Any) -> Any:
        use_cli_catalogs(catalog_folders or [])
        try:
            return fn(*args, **kwargs)
        finally:
            use_cli_catalogs(())

    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    command.__annotations__ = {**fn.__annotations__, "catalog_folders": Optional[list[Path]]}
    return command


for _info in app.registered_commands:
    if _info.callback is not None and (_info.name or _info.callback.__name__.replace("_", "-")) not in NO_CATALOG:
        _info.callback = _with_catalog_option(_info.callback)

if __name__ == "__main__":  # pragma: no cover
    app()
