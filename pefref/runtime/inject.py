"""Injection: resolve sites of the reference architecture to modules of a real model.

An architecture map (data) binds each site to module paths per layer; this
module finds the family of a model, reads its sizes from its config, selects
layers, and yields one :class:`Placement` per module × site × layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pefref.language.catalog import Catalog
from pefref.language.errors import PefrefError, SiteError
from pefref.language.expr import evaluate, parse_expr
from pefref.runtime.hosts import HostKind, host_kind
from pefref.language.loader import load_file, suggest
from pefref.language.model_classes import bind_class
from pefref.language.schema import ArchitectureMap, SiteBinding
from pefref.language.sizes import model_sizes, scalar_ops, select_layers

__all__ = ["Placement", "resolve_family", "model_config", "model_sizes", "select_layers", "placements"]


@dataclass
class Placement:
    """One module of a technique at one site of one layer of a real model."""

    module: Any
    site: str
    layer: int | None
    path: str
    host: nn.Module
    kind: HostKind
    binding: SiteBinding
    d_in: int
    d_out: int
    start: int = 0
    size: int = 0


def resolve_family(model: nn.Module, catalog: Catalog, family: str | Path | ArchitectureMap | None = None) -> ArchitectureMap:
    """The architecture map for ``model`` (given by name, object or YAML path, else found by class
    name), with its paths bound to the model's class (base model or task-head wrapper)."""
    cls = type(model).__name__
    if isinstance(family, ArchitectureMap):
        return bind_class(family, cls)
    if isinstance(family, Path) or (isinstance(family, str) and family.endswith((".yaml", ".yml"))):
        return bind_class(load_file(ArchitectureMap, family)[0], cls)
    if isinstance(family, str):
        return bind_class(catalog.family(family), cls)
    for fam in catalog.families.values():
        if cls in fam.classes:
            return bind_class(fam, cls)
    raise PefrefError(f"no architecture map recognises {cls}; pass family= (known: {', '.join(sorted(catalog.families))}) or an ArchitectureMap YAML path")


def model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)  # type: ignore[arg-type]
    return dict(cfg) if isinstance(cfg, dict) else {}


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SiteError(f"the model has no module {path!r}{suggest(path, names)}") from None


def placements(model: nn.Module, fam: ArchitectureMap, sizes: dict[str, int], modules: Sequence[Any],
               sites: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> Iterator[Placement]:
    """Every placement of ``modules`` in ``model`` (optionally restricted to some sites / layers)."""
    scal = scalar_ops()
    L = sizes["L"]
    if sites is not None:
        used = {s for m in modules for s in m.sites}
        for s in sites:
            if s not in used:
                raise SiteError(f"site {s!r} is not used by this technique{suggest(s, used)} (its sites: {', '.join(sorted(used))})")
    for m in modules:
        for site in m.sites:
            if sites is not None and site not in sites:
                continue
            b = fam.sites.get(site)
            if b is None:
                raise SiteError(f"family {fam.family!r} has no site {site!r} (it binds: {', '.join(fam.sites)})")
            per_layer = b.cache or "{i}" in (b.path or "")
            chosen = select_layers(m.layers, L) if per_layer else [None]
            if layers is not None and per_layer:
                keep = set(select_layers(list(layers), L))
                chosen = [i for i in chosen if i in keep]
            for i in chosen:
                if b.cache:
                    d = sizes["kv_heads"] * sizes["d_head"]
                    yield Placement(m, site, i, f"<{fam.forward.cache}>[{i}]", model, host_kind(model), b, 0, d)
                    continue
                path = b.path.format(i=i)  # type: ignore[union-attr]
                host = _module(model, path)
                kind = host_kind(host)
                d_in, d_out = kind.widths(host)
                start = size = 0
                if b.slice is not None:
                    start = int(evaluate(parse_expr(b.slice.start), sizes, scal))
                    size = int(evaluate(parse_expr(b.slice.size), sizes, scal))
                    d_out = size
                if b.side == "input":
                    d_in = d_out = d_in if kind.has_weight else sizes["d"]
                if kind.name == "block" or b.input_path:  # a sublayer's input and output (bound through one of its projections)
                    d_in = d_out = sizes["d"]
                if kind.name == "embedding":
                    d_in, d_out = d_out, d_out
                yield Placement(m, site, i if per_layer else None, path, host, kind, b, d_in, d_out, start, size)
