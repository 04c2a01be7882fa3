"""Terminal rendering (rich) of the plain-data summaries of :mod:`pefref.summary`."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from pefref.cli.safe import SafeConsole
from pefref.view.words import layers_words

__all__ = ["render_summary", "kv_table"]


def kv_table(rows: dict[str, Any]) -> Table:
    """A borderless two-column table of keys and values (non-strings as JSON)."""
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
        con.print(kv_table(value))
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
    head = Text("module ", style="bold") + Text(m["name"], style="bold cyan") + Text(f": {m['form']} at {', '.join(m['sites'])}, layers {layers_words(m['layers'])}")
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
    con = con or SafeConsole()
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
