"""Injection: resolve sites of the reference architecture to modules of a real model.

An architecture map (data) binds each site to module paths per layer; this
module finds the family of a model, reads its sizes from its config, selects
layers, and yields one :class:`Placement` per module × site × layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

from pefref.language.catalog import Catalog
from pefref.language.check import check_family
from pefref.language.errors import CatalogError, PefrefError, SiteError
from pefref.language.expr import evaluate, parse_expr
from pefref.language.loader import load_file, suggest
from pefref.language.model_classes import bind_class
from pefref.language.schema import ArchitectureMap, ReferenceArchitecture, SiteBinding, installed_transformers
from pefref.language.sizes import model_sizes, scalar_ops, select_layers
from pefref.language.stacks import expand_layers, layer_bindings, stacked
from pefref.language.templates import template
from pefref.language.yamlsrc import Positions
from pefref.runtime.hosts import HostKind, host_kind
from pefref.runtime.param_slices import slice_host
from pefref.runtime.rows import site_width

__all__ = ["Placement", "resolve_family", "model_config", "model_sizes", "select_layers", "placements", "check_host", "HOST_KINDS_FOR"]


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
    period: int = 0
    index: int | None = None  # the layer's index in its module paths (in its stack, for encoder-decoder maps)
    slice_index: int | None = None  # sliced sites (a raw parameter): the slice (expert) this placement adapts

    @property
    def scope(self) -> str:
        """The site as its tensors are keyed: a slice of a raw parameter has its own (one update per expert)."""
        return self.site if self.slice_index is None else f"{self.site}[{self.slice_index}]"


def resolve_family(model: nn.Module, catalog: Catalog, family: str | Path | ArchitectureMap | None = None) -> ArchitectureMap:
    """The architecture map for ``model`` (given by name, object or YAML path, else found by class
    name), with its paths bound to the model's class (base model or task-head wrapper); a map given
    as an object or a YAML path is checked like the catalog's."""
    cls = type(model).__name__
    if isinstance(family, ArchitectureMap):
        problems = check_family(family, Positions(f"<family {family.family}>"), catalog.reference)
        if problems:
            raise CatalogError(problems)
        return bind_class(family, cls)
    if isinstance(family, Path) or (isinstance(family, str) and family.endswith((".yaml", ".yml"))):
        fam, pos = load_file(ArchitectureMap, family)
        problems = check_family(fam, pos, catalog.reference)  # a user's map is checked like the catalog's
        if problems:
            raise CatalogError(problems)
        return bind_class(fam, cls)
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


def _cache_arg(fam: ArchitectureMap, model: nn.Module) -> str:
    """The name of the key/value cache argument of ``model``'s forward (the installed transformers chooses among the
    family's names), or a refusal: prefix keys and values reach no layer of a model whose forward takes none of them."""
    params = inspect.signature(model.forward).parameters
    name = fam.forward.cache_arg(params)
    if name is None:
        raise SiteError(f"family {fam.family!r}: the forward of {type(model).__name__} takes no key/value cache argument under any "
                        f"of the names the map gives ({', '.join(fam.forward.cache)}), so prefix keys and values (site attn.kv) "
                        "cannot reach its layers with the installed transformers")
    return name


def output_form(fam: ArchitectureMap, site: str, b: SiteBinding) -> str:
    """What the module bound to ``site`` returns with the installed transformers, or a refusal where the map gives
    no form for that version (the module's output would be read wrongly)."""
    form = b.output_form(installed_transformers())
    if form is None:
        v = ".".join(map(str, installed_transformers() or ()))
        raise SiteError(f"family {fam.family!r}: site {site!r}: the map says what its module returns only for other transformers "
                        f"versions than the installed {v} ({', '.join(o.model_dump_json(exclude_none=True) for o in b.output)})")  # type: ignore[union-attr]
    return form


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, read straight from the modules' child tables (about 5x faster; the same
    module, and torch's own lookup, with its error, where a name is not a child)."""
    mod = model
    for part in path.split(".") if path else ():
        child = mod._modules.get(part)
        if child is None:
            return model.get_submodule(path)
        mod = child
    return mod


def parameters_outside(model: nn.Module, skip: str) -> list[nn.Parameter]:
    """``model.parameters()`` (the same order, each once) without those of its child ``skip`` (one walk of the
    modules' tables, without building the dotted names ``named_parameters`` makes)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    seen_mod: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen_mod:
            continue
        seen_mod.add(id(m))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        stack.extend(reversed([c for n, c in m._modules.items() if c is not None and not (m is model and n == skip)]))
    return out


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return submodule(model, path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SiteError(f"the model has no module {path!r}{suggest(path, names)}") from None


HOST_KINDS_FOR: dict[str, frozenset[str]] = {
    "linear": frozenset({"linear", "conv1d"}),
    "embedding": frozenset({"embedding"}),
    "norm": frozenset({"norm"}),
    "parameter": frozenset({"parameter"}),
}
"""Host kinds a module found at a site of each reference site kind must be (kinds not listed take any module)."""


def check_host(fam: ArchitectureMap, site: str, path: str, host: nn.Module, kind: HostKind, ref: ReferenceArchitecture | None,
               sizes: dict[str, int], d_in: int, d_out: int, widths: dict[str, list[int | None]] | None = None) -> None:
    """The module found at ``path`` must be of a kind the site accepts, with the site's widths
    (``widths``: the sites' widths worked out by earlier calls with the same ``sizes``, by site; filled here)."""
    if ref is None or site not in ref.sites:
        return
    skind = ref.sites[site].kind
    allowed = HOST_KINDS_FOR.get(skind)
    if allowed is None or fam.sites[site].side == "input":
        return
    if kind.name not in allowed:
        raise SiteError(f"family {fam.family!r}: site {site!r} is bound to {path!r}, a {type(host).__name__} ({kind.name}); "
                        f"a {skind} site needs a {' or '.join(sorted(allowed))} module")
    if skind in ("linear", "parameter"):
        spec = ref.sites[site]
        want = widths.get(site) if widths is not None else None
        if want is None:
            want = [int(evaluate(parse_expr(e), sizes, scalar_ops())) if e is not None else None for e in (spec.in_, spec.out)]
            if widths is not None:
                widths[site] = want
        for what, got, exp in (("input", d_in, want[0]), ("output", d_out, want[1])):
            if exp is not None and got != exp:
                raise SiteError(f"family {fam.family!r}: site {site!r} is bound to {path!r}, whose {what} width is {got}; "
                                f"the site's is {exp} ({spec.in_ if what == 'input' else spec.out})")


def _slice_placements(fam: ArchitectureMap, m: Any, site: str, layer: int | None, index: int | None, path: str, owner: nn.Module,
                      b: SiteBinding, reference: ReferenceArchitecture | None, sizes: dict[str, int],
                      widths: dict[str, list[int | None]]) -> Iterator[Placement]:
    """One placement per slice of the raw parameter a sliced site binds (one expert each)."""
    name = cast(str, b.parameter)
    raw = owner._parameters.get(name)
    if raw is None or raw.dim() != 3:
        found = "no such parameter" if raw is None else f"a {raw.dim()}-D parameter"
        own = ", ".join(n for n, _ in owner.named_parameters(recurse=False)) or "none"
        raise SiteError(f"family {fam.family!r}: site {site!r} binds parameter {name!r} of {path!r}: {found}; "
                        f"a sliced site needs a 3-D stack [slices, out, in] (its parameters: {own})")
    spec = reference.sites[site].slices if reference is not None and site in reference.sites else None
    want = int(evaluate(parse_expr(spec), sizes, scalar_ops())) if spec is not None else raw.shape[0]
    if raw.shape[0] != want:
        raise SiteError(f"family {fam.family!r}: site {site!r} binds {path}.{name}, a stack of {raw.shape[0]}; the site has {want} ({spec})")
    for e in range(raw.shape[0]):
        host = slice_host(owner, name, e, b.layout)
        kind = host_kind(host)
        d_in, d_out = kind.widths(host)
        check_host(fam, site, f"{path}.{name}[{e}]", host, kind, reference, sizes, d_in, d_out, widths)
        yield Placement(m, site, layer, path, host, kind, b, d_in, d_out, index=index, slice_index=e)


def placements(model: nn.Module, fam: ArchitectureMap, sizes: dict[str, int], modules: Sequence[Any],
               sites: Sequence[str] | None = None, layers: Sequence[int | str] | None = None,
               reference: ReferenceArchitecture | None = None) -> Iterator[Placement]:
    """Every placement of ``modules`` in ``model`` (optionally restricted to some sites / layers).

    With ``reference``, each module found is checked against its site (kind and widths)."""
    scal = scalar_ops()
    L = sizes["L"]
    widths: dict[str, list[int | None]] = {}  # each site's widths, worked out once
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
            per_layer = b.cache or "{i}" in (b.path or "") or stacked(fam, site)
            where = {i: (j, bb) for i, j, bb in layer_bindings(fam, site, sizes)} if per_layer else {}
            chosen = [i for i in select_layers(m.layers, L) if i in where] if per_layer else [None]
            if layers is not None and per_layer:
                keep = set(select_layers(expand_layers(fam, sizes, layers), L))
                chosen = [i for i in chosen if i in keep]
            for i in chosen:
                if b.cache:
                    d = sizes["kv_heads"] * sizes["d_head"]
                    yield Placement(m, site, i, f"<{_cache_arg(fam, model)}>[{i}]", model, host_kind(model), b, 0, d)
                    continue
                j, b = where[i] if i is not None else (None, b)  # the layer's index in its stack, and its stack's binding
                path = template(b.path, j)  # type: ignore[arg-type]
                host = _module(model, path)
                if b.parameter is not None:
                    yield from _slice_placements(fam, m, site, i if per_layer else None, j, path, host, b, reference, sizes, widths)
                    continue
                kind = host_kind(host)
                d_in, d_out = kind.widths(host)
                start = size = period = 0
                if b.slice is not None:
                    start, size, period = (int(evaluate(parse_expr(e), sizes, scal)) if e is not None else 0
                                           for e in (b.slice.start, b.slice.size, b.slice.period))
                    try:
                        d_out = site_width(d_out, start, size, period)
                    except ValueError as ex:
                        raise SiteError(f"family {fam.family!r}: site {site!r} on {path!r}: {ex}") from None
                check_host(fam, site, path, host, kind, reference, sizes, d_in, d_out, widths)
                output_form(fam, site, b)
                if b.side == "input":
                    d_in = d_out = d_in if kind.has_weight else sizes["d"]
                if kind.name == "block" or b.input_path:  # a sublayer's input and output (bound through one of its projections)
                    d_in = d_out = sizes["d"]
                if kind.name == "embedding":
                    d_in, d_out = d_out, d_out
                yield Placement(m, site, i if per_layer else None, path, host, kind, b, d_in, d_out, start, size, period, j)
