"""mkdocs hooks: the reference pages generated from the code, MathML for math, the comparison site.

At every build (so the pages cannot drift from the code):

* ``reference/schema.md``: every field of every file format, from the pydantic
  models (:func:`pefref.view.schemadoc.schema_docs`, what the site's schema page shows);
* ``reference/primitives.md``: every op and initialiser an expression may call,
  from the registries (:func:`pefref.view.primitives.primitive_docs`), math included;
* ``reference/cli.md``: every ``pefref`` command with its arguments and options,
  walked from the typer application;
* math written ``$...$`` / ``$$...$$`` (pymdownx.arithmatex, generic mode) becomes
  MathML at build time (pefref's own converter, as on the comparison site): no script and no font from the network;
* the comparison site (``pefref site``) is built into ``site/`` of the docs, with a
  link back to the docs in its navigation.
"""

from __future__ import annotations

import html
import inspect
import re
from typing import Any

GENERATED = ("reference/schema.md", "reference/primitives.md", "reference/cli.md")
"""The pages made at build time (the tests that check links know them)."""
SITE_DIR = "site"
"""Where the comparison site goes inside the built docs."""


# ---------------------------------------------------------------- text helpers


_LITERAL = re.compile(r"(`[^`]*`|\$[^$]+\$)")


def escape_text(text: str) -> str:
    """``<``, ``>`` and ``&`` escaped outside code spans and math (descriptions say ``<id>.yaml``)."""
    parts = _LITERAL.split(text)
    return "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


_ROLE = re.compile(r"``(.+?)``|:math:`(.+?)`|:(?:func|class|data|meth|attr|mod):`~?(.+?)`", re.S)


def rst_to_md(doc: str) -> str:
    """A docstring's reST roles as markdown: ````code```` and ``:func:`x``` as code, ``:math:`x``` as ``$x$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return f"`{m.group(1)}`"
        if m.group(2) is not None:
            return "$" + " ".join(m.group(2).split()) + "$"
        return f"`{m.group(3)}`"

    return escape_text(_ROLE.sub(sub, doc))


# ---------------------------------------------------------------- generated pages


def schema_page() -> str:
    """The field reference of every file format (technique, composition, experiment, ...)."""
    from pefref.view.schemadoc import schema_docs

    out = [
        "# File formats: every field",
        "",
        "Generated from the pydantic models in `pefref/language/schema/` at every docs build "
        "(the JSON Schema files in `schemas/` come from the same models: `pefref schema`). "
        "[The YAML language](language.md) explains how the fields work together.",
        "",
    ]
    docs = schema_docs()
    out += ["Formats: " + ", ".join(f"[{d.key}](#{d.key})" for d in docs) + ".", ""]
    for d in docs:
        out += [f"## {d.key} {{#{d.key}}}", "", f"JSON Schema: `schemas/{d.file}`.", ""]
        for o in d.objects:
            out += [f"### {o.name} {{#{d.key}-{o.name.lower()}}}", ""]
            if o.description:
                out += [rst_to_md(inspect.cleandoc(o.description)), ""]
            if not o.fields:
                continue
            out += ["| field | type | required / default | description |", "|---|---|---|---|"]
            for f in o.fields:
                typ = "".join(f"[{p.text}](#{d.key}-{p.ref.lower()})" if p.ref else p.text for p in f.type)
                need = "required" if f.required else (f"`{f.default}`" if f.default is not None else "optional")
                cons = [re.sub(r"matches (\S+)", r"matches `\1`", c) for c in f.constraints]
                desc = f.description + ("" if not cons else f" ({'; '.join(cons)})")
                out.append(f"| `{f.name}` | {_cell(typ)} | {_cell(need)} | {_cell(rst_to_md(desc))} |")
            out.append("")
    return "\n".join(out)


def primitives_page() -> str:
    """Every op and initialiser with its signature, its documentation and its math."""
    from pefref.view.primitives import primitive_docs

    docs = primitive_docs()
    ops = [d for d in docs if d.kind == "op"]
    inits = [d for d in docs if d.kind == "initialiser"]
    out = [
        "# Ops and initialisers",
        "",
        f"Every function an expression may call: {len(ops)} ops and {len(inits)} initialisers, "
        "generated from the registries (`pefref/ops/`) at every docs build, as `pefref ops` lists them. "
        "Expressions call nothing else ([the expression language](language.md#expressions)); "
        "[Add a primitive](../how-to/new-primitive.md) says how a new one is registered.",
        "",
        "## Ops",
        "",
        " ".join(f"[`{d.name}`](#op-{d.name})" for d in ops),
        "",
    ]
    for d in ops:
        out += [f"### `{d.name}` {{#op-{d.name}}}", "", f"`{d.signature}`", "", rst_to_md(d.doc), ""]
        facts = _op_facts(d.facts)
        if facts:
            out += [f"*{facts}*", ""]
    out += ["## Initialisers", "", "Written in a parameter's `init:`; the shape, dtype and device are the parameter's.", "",
            " ".join(f"[`{d.name}`](#init-{d.name})" for d in inits), ""]
    for d in inits:
        out += [f"### `{d.name}` {{#init-{d.name}}}", "", f"`{d.signature}`", "", rst_to_md(d.doc), ""]
    return "\n".join(out)


def _op_facts(f: dict[str, Any]) -> str:
    """The registry facts the view derives from (typology, mergeability), in words."""
    words = []
    if f.get("intra"):
        words.append(f"intra-connectivity: {f['intra']}")
    if f.get("nonlinear"):
        words.append("nonlinear")
    if f.get("linear_in"):
        words.append("linear in argument " + ", ".join(str(i) for i in f["linear_in"]))
    if f.get("dynamic"):
        words.append("input-dependent mixing")
    if f.get("parts"):
        words.append("reads split parameters as their parts")
    return "; ".join(words)


def _param_row(p: Any) -> str:
    is_arg = type(p).__name__.endswith("Argument")
    names = p.name.upper() if is_arg else ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    if is_arg:
        names = f"`{names}`"
    kind = "argument" if is_arg else ("flag" if getattr(p, "is_flag", False) else "option")
    if getattr(p, "multiple", False) or getattr(p, "nargs", 1) == -1:
        kind += ", repeatable"
    if p.required:
        default = "required"
    elif p.default in (None, False, (), []):
        default = ""
    else:
        default = f"`{p.default}`"
    return f"| {names} | {kind} | {_cell(default)} | {_cell(rst_to_md(getattr(p, 'help', None) or ''))} |"


def cli_page() -> str:
    """Every command of the ``pefref`` application with its arguments and options."""
    import typer.main

    from pefref.cli.app import app

    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    out = [
        "# Command line",
        "",
        "Generated from the `pefref` application (typer) at every docs build; `pefref COMMAND --help` prints the same. "
        "Input errors are printed as `file:line:col: field: message` lines and the command exits with status 1.",
        "",
        "| command | what |",
        "|---|---|",
    ]
    for name, cmd in commands.items():
        first = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
        out.append(f"| [`pefref {name}`](#{name}) | {_cell(rst_to_md(first))} |")
    out.append("")
    for name, cmd in commands.items():
        out += [f"## pefref {name} {{#{name}}}", "", rst_to_md(inspect.cleandoc(cmd.help or "")), ""]
        params = [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]
        if params:
            out += ["| name | kind | default | description |", "|---|---|---|---|"]
            out += [_param_row(p) for p in params]
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- math


_MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


def _mathml(m: re.Match[str]) -> str:
    """One ``$...$`` / ``$$...$$`` as MathML, by the converter the comparison site uses (one converter for both)."""
    from pefref.render.texmath import tex_to_mathml

    tag, body = m.group(1), html.unescape(m.group(2)).strip()
    for open_, close in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if body.startswith(open_) and body.endswith(close):
            body = body[len(open_):len(body) - len(close)]
            break
    return tex_to_mathml(body.strip(), display=tag == "div")


# ---------------------------------------------------------------- mkdocs events


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages and the comparison site to the build."""
    from mkdocs.structure.files import File

    pages = dict(zip(GENERATED, (schema_page, primitives_page, cli_page)))
    for uri, make in pages.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=make()))
    for path, content in _comparison_site().items():
        if not path.startswith("."):
            files.append(File.generated(config, f"{SITE_DIR}/{path}", content=content))
    return files


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    """Math as MathML (rendered by the browser: no script, no web font)."""
    return _MATH.sub(_mathml, html_text)


def _comparison_site() -> dict[str, bytes]:
    """The comparison site of the bundled catalog, its navigation linking back to the docs (``docs_href``)."""
    from pefref.render.site import build

    make_env = build._environment

    def env_with_docs_link() -> Any:
        env = make_env()
        env.globals["docs_href"] = "../index.html"
        return env

    build._environment = env_with_docs_link
    try:
        return build.site_files()
    finally:
        build._environment = make_env
