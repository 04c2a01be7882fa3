"""Compositions on the command line: ``pefref apply``, ``show`` and ``params`` with a COMPOSITION.yaml."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from pefref.cli.safe import SafeConsole

__all__ = ["apply_composition_cli", "show_composition_cli", "params_composition_cli"]


def apply_composition_cli(path: str, model: str, as_json: bool, echo_json: Any, wide: Any) -> None:
    """Apply the composition at ``path`` to the named model shape and print its adapters and blocks."""
    from rich.table import Table

    from pefref.language.catalog import default_catalog
    from pefref.language.sizes import eval_scalar, model_sizes
    from pefref.models.build import build_model
    from pefref.runtime.api import fold_paths
    from pefref.runtime.compose import apply_composition

    cat = default_catalog()
    try:
        shape = cat.shape(model)
    except KeyError as e:
        from pefref.cli.app import UnknownName

        raise UnknownName(str(e.args[0])) from None
    fam = cat.family(shape.family)
    base = int(eval_scalar(fam.base_params, {**model_sizes(fam, dict(shape.config)), **shape.config}))
    device = "meta" if base > 200_000_000 else None
    m = build_model(shape, cat, device=device)
    comp = apply_composition(m, path, catalog=cat)
    rows = []
    for name, ad in comp.adapters.items():
        rep = ad.report.as_dict()  # type: ignore[union-attr]
        rows.append({"adapter": name, "technique": ad.technique.id, "trainable": ad.num_trainable(), "placements": rep["placements"]})
    blocks: list[dict[str, Any]] = [{"kind": b.kind, "adapters": list(b.adapters), "sites": b.sites} for b in comp.spec.composition.blocks]  # type: ignore[union-attr]
    out: dict[str, Any] = {"composition": comp.name, "model": model, "family": fam.family, "device": device or "cpu", "adapters": rows, "blocks": blocks,
           "combiners": sorted(comp.combiners.keys()), "block_parameters": sum(p.numel() for p in comp.combiners.parameters()),
           "trainable": comp.num_trainable()}
    if as_json:
        echo_json(out)
        return
    table = Table("adapter", "technique", "site", "module", "matched modules", "params", title=f"{comp.name} on {model} ({fam.family})")
    for name, ad in comp.adapters.items():
        for r in ad.report.rows:  # type: ignore[union-attr]
            table.add_row(Text(name), Text(ad.technique.id), Text(r.site), Text(r.module), Text("\n".join(fold_paths(r.paths))), f"{r.params:,}")
    con = wide()
    con.print(table)
    for b in blocks:
        con.print(Text(f"{b['kind']} block over {', '.join(b['adapters'])}" + (f" at {', '.join(b['sites'])}" if b["sites"] else "")))
    if out["block_parameters"]:
        con.print(Text(f"block parameters: {out['block_parameters']:,} in {len(out['combiners'])} combiners"))
    con.print(Text(f"trainable: {out['trainable']:,}", style="bold"))


def _resolved(path: str) -> tuple[Any, Any]:
    from pefref.language.catalog import default_catalog
    from pefref.language.composition import load_composition

    cat = default_catalog()
    return load_composition(path, cat), cat


def _shape(cat: Any, model: str) -> Any:
    try:
        return cat.shape(model)
    except KeyError as e:
        from pefref.cli.app import UnknownName

        raise UnknownName(str(e.args[0])) from None


def _counts_table(counts: Any) -> Any:
    from rich.table import Table

    table = Table("part", "what", "params", "trained", title=f"parameters on {counts.model}", title_justify="left")
    for m in counts.members:
        table.add_row(Text(m.name), Text(f"{m.technique}: {m.formula}"), f"{m.params:,}", "yes" if m.trainable else "no (frozen by fusion)")
    for b in counts.blocks:
        what = f"{b.kind} block over {', '.join(b.adapters)}, {b.hosts} host{'s' * (b.hosts != 1)}"
        table.add_row(Text(f"blocks[{b.index}]"), Text(what), f"{b.params:,}", "yes" if b.params else "-")
    return table


def show_composition_cli(path: str, model: str, as_json: bool, echo_json: Any, rel: Any) -> None:
    """``pefref show COMPOSITION.yaml``: its techniques, blocks and counts per member and in total on ``model``."""

    from pefref.view.composition import composition_summary, count_composition

    res, cat = _resolved(path)
    summary = composition_summary(res)
    if "file" in summary:
        summary["file"] = rel(summary["file"])
    counts = count_composition(res, _shape(cat, model), cat)
    summary["parameters"] = counts.as_dict()
    if as_json:
        echo_json(summary)
        return
    con = SafeConsole(highlight=False)
    con.print(Text(summary["name"], style="bold") + Text(f"  ({summary['id']}, composition)"))
    for p in summary["papers"]:
        con.print(Text(f"{p['authors']} ({p['year']}). {p['title']}. {p['link']}"))
    if summary["summary"]:
        con.print(Text(summary["summary"]))
    con.print()
    for t in summary["techniques"]:
        hps = ", ".join(f"{k}={v}" for k, v in t["hyperparameters"].items())
        con.print(Text("adapter ", style="bold") + Text(t["name"], style="bold cyan")
                  + Text(f": {t['technique']} ({t['technique_name']}) at {', '.join(t['sites'])}, layers {t['layers']}" + (f"; {hps}" if hps else "")))
    for i, b in enumerate(summary["blocks"]):
        extra = {k: v for k, v in b.items() if k not in ("kind", "adapters", "sites", "description")}
        con.print(Text(f"blocks[{i}] ", style="bold") + Text(f"{b['kind']} over {', '.join(b['adapters'])} at {', '.join(b['sites'])}"
                                                             + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")))
        if b.get("description"):
            con.print(Text(f"  {b['description']}"))
    con.print()
    con.print(_counts_table(counts))
    con.print(Text(f"total: {counts.total:,} parameters, {counts.trainable:,} trainable ({counts.percent:.4f}% of {counts.base:,})", style="bold"))
    if summary["notes"]:
        con.print(Text("notes: ", style="bold") + Text(summary["notes"]))
    if "file" in summary:
        con.print(Text(f"file: {summary['file']}"))


def params_composition_cli(path: str, model: str, as_json: bool, echo_json: Any) -> None:
    """``pefref params COMPOSITION.yaml --model SHAPE``: per-member, per-block and total counts, analytically."""

    from pefref.view.composition import count_composition

    res, cat = _resolved(path)
    counts = count_composition(res, _shape(cat, model), cat)
    if as_json:
        echo_json(counts.as_dict())
        return
    con = SafeConsole(highlight=False)
    con.print(_counts_table(counts))
    con.print(Text(f"{counts.composition} on {model}: ", style="bold")
              + Text(f"{counts.total:,} parameters, {counts.trainable:,} trainable ({counts.percent:.4f}% of {counts.base:,})"))
