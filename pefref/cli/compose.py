"""``pefref apply COMPOSITION.yaml``: build a model, apply a composition, print what went where."""

from __future__ import annotations

from typing import Any

from rich.text import Text

__all__ = ["apply_composition_cli"]


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
