"""Plain-data summaries of catalog entries, for the CLI (tables, ``--json``) and the docs.

Each function returns JSON-ready dicts and lists (str, int, float, bool, None),
built from the schema objects only. :func:`technique_summary` is the one place
that decides what ``pefref show`` tells about a technique; derived facts
(typology, parameter counts, mergeability) are added to it as further keys.
"""

from __future__ import annotations

from typing import Any

from pefref.language.check import EXPR_FIELDS, expand_modules
from pefref.language.schema import LayerRange, ModelShape, ModuleUse, Technique
from pefref.view.words import layers_words

__all__ = ["technique_summary", "technique_row", "model_row", "layers_text", "paper_link"]

_MODULE_COMMON = {"name", "form", "sites", "layers", "params", "description"}


def paper_link(t: Technique) -> str:
    """The paper's URL (arXiv abstract page when an arXiv id is given)."""
    return f"https://arxiv.org/abs/{t.paper.arxiv}" if t.paper.arxiv else str(t.paper.url)


def _layers_data(layers: Any) -> Any:
    """A layer selection as JSON data: ``"all"``, a list of indices, or ``{first|last|every: n}``."""
    return layers.model_dump(exclude_none=True) if isinstance(layers, LayerRange) else layers


def layers_text(layers: Any) -> str:
    """A layer selection in words: ``all``, ``[0, 2]``, ``first 2``, ``last 4, every 2``."""
    return layers_words(_layers_data(layers) if isinstance(layers, LayerRange) else layers)


def _concrete(t: Technique, pool: dict[str, Technique]) -> tuple[list[Any], dict[str, Any]]:
    return expand_modules(t, {**pool, t.id: t})


def technique_row(t: Technique, pool: dict[str, Technique]) -> dict[str, Any]:
    """One line of ``pefref list``: id, name, year, sites and forms (sorted, unique), module and hyperparameter names."""
    modules, hps = _concrete(t, pool)
    return {
        "id": t.id,
        "name": t.name,
        "year": t.paper.year,
        "authors": t.paper.authors,
        "sites": sorted({s for m in modules for s in m.sites}),
        "forms": sorted({m.form for m in modules}),
        "modules": [m.name for m in modules],
        "hyperparameters": sorted(hps),
        "original": t.original,
    }


def _hyperparameter(hp: Any, source: str | None) -> dict[str, Any]:
    d = hp.model_dump(mode="json")
    out = {"type": d.pop("type"), "default": d.pop("default")}
    out.update({k: v for k, v in d.items() if v not in (None, "")})
    if source:
        out["from"] = source
    return out


def _module(m: Any, declared: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name, "form": m.form, "sites": list(m.sites), "layers": _layers_data(m.layers)}
    if isinstance(declared, ModuleUse):
        out["uses"] = declared.use
    if m.description:
        out["description"] = m.description
    out["params"] = {
        name: {
            "shape": list(p.shape),
            "init": p.init,
            "trainable": p.trainable,
            "shared": p.shared,
            **({"description": p.description} if p.description else {}),
            **({"lr_scale": p.lr_scale} if p.lr_scale != 1.0 else {}),
            **({"weight_decay": p.weight_decay} if p.weight_decay is not None else {}),
        }
        for name, p in m.params.items()
    }
    if getattr(m, "inputs", None):
        out["inputs"] = {k: c.model_dump(mode="json", exclude_defaults=True, by_alias=True) for k, c in m.inputs.items()}
    out["expressions"] = {f: getattr(m, f) for f in EXPR_FIELDS if getattr(m, f, None) is not None}
    options = m.model_dump(mode="json", exclude=_MODULE_COMMON | set(EXPR_FIELDS) | {"inputs"})
    if options:
        out["options"] = options
    return out


def technique_summary(t: Technique, catalog: Any) -> dict[str, Any]:
    """Everything ``pefref show`` prints about ``t``, as plain data.

    ``catalog`` is a :class:`pefref.language.catalog.Catalog` (for modules reused with
    ``use:`` and the file the technique came from). Keys, in display order: id,
    name, paper, summary, hyperparameters (effective: own and those that came
    with used modules, marked ``from``), modules (concrete, with sites, form,
    layers, params with symbolic shapes, expressions, options), identity_at_init,
    declared_typology, notes, file.
    """
    modules, hps = _concrete(t, catalog.techniques)
    sources: dict[str, str] = {}
    for m in t.modules:
        if isinstance(m, ModuleUse):
            tid = m.use.split(".")[0]
            src = catalog.techniques.get(tid)
            for k in _concrete(src, catalog.techniques)[1] if src else ():
                sources.setdefault(k, tid)
    paper = t.paper.model_dump(mode="json", exclude_none=True)
    paper["link"] = paper_link(t)
    out: dict[str, Any] = {
        "id": t.id,
        "name": t.name,
        "original": t.original,
        "paper": paper,
        "summary": t.summary,
        "hyperparameters": {
            **{k: _hyperparameter(v, None) for k, v in t.hyperparameters.items()},
            **{k: _hyperparameter(v, sources.get(k)) for k, v in hps.items() if k not in t.hyperparameters},
        },
        "modules": [_module(m, d) for m, d in zip(modules, t.modules)],
        "identity_at_init": t.identity_at_init,
        "declared_typology": dict(t.typology),
        "notes": t.notes,
    }
    src = getattr(catalog, "sources", {}).get(t.id)
    if src is not None:
        out["file"] = str(src)
    return out


def model_row(s: ModelShape) -> dict[str, Any]:
    """One line of ``pefref models``: name, family, description, source and config values."""
    return {"name": s.name, "family": s.family, "description": s.description, "source": s.source, "config": dict(s.config)}
