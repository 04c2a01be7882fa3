"""Analytic parameter counts: from a technique description and a model shape alone.

No weights are allocated: host widths come from the reference architecture's
site sizes (or the family's slices), evaluated on the shape's sizes. The same
sharing rule as the compiler (one tensor per sharing scope, at the largest
shape among its users) makes the count equal to what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache, reduce
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.expr import substitute
from pefref.language.forms import form_of
from pefref.language.hparams import layer_run, placement_group, shape_of
from pefref.language.schema import ArchitectureMap, ModelShape, Technique
from pefref.language.sizes import eval_scalar, model_sizes, select_layers
from pefref.language.stacks import layer_bindings

__all__ = ["ParamCount", "count_params", "host_widths"]


@dataclass
class ParamCount:
    technique: str
    model: str
    trainable: int
    base: int
    formula: str
    hyperparameters: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    """What could not be placed on this model: ``"module at site: why"`` (the family binds no such site, a
    selected host has no such tensor, no layer holds the site); empty when everything was placed."""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, "model": self.model, "trainable": self.trainable, "base_params": self.base,
                "percent": round(self.percent, 6), "formula": self.formula, "hyperparameters": self.hyperparameters,
                "dropped": list(self.dropped)}


def unbound_reads(m: Any, fam: ArchitectureMap) -> list[str]:
    """The sites module ``m`` reads through connections that ``fam`` does not bind (apply refuses it there)."""
    return sorted({c.site for c in (getattr(m, "inputs", None) or {}).values() if c.module is None and c.site is not None and c.site not in fam.sites})


def host_widths(site: str, fam: ArchitectureMap, catalog: Catalog) -> tuple[Any, Any]:
    """(d_in, d_out) of a site as expressions over the sizes (a one-block slice's size replaces d_out; an
    interleaved slice owns the site's width, which applying checks)."""
    ref = catalog.reference.sites[site]
    b = fam.sites[site]
    d_in = ref.in_ if ref.in_ is not None else ref.out
    d_out = b.slice.size if b.slice is not None and b.slice.period is None else ref.out
    return d_in, d_out


def _select_terms(m: Any, site: str, fam: ArchitectureMap, catalog: Catalog) -> list[str]:
    kind = catalog.reference.sites[site].kind
    d_in, d_out = host_widths(site, fam, catalog)
    terms = []
    for t in m.targets:
        if t == "weight":
            terms.append(f"({d_out})" if kind == "norm" else f"({d_out})*({d_in})")
        elif fam.sites[site].bias:
            terms.append(f"({d_out})")
    return terms


def count_params(t: Technique, shape: ModelShape, catalog: Catalog, overrides: dict[str, Any] | None = None,
                 sites: list[str] | None = None, formula: bool = True) -> ParamCount:
    """Trainable parameters of ``t`` on ``shape`` (placed on ``sites`` when given), with a formula in the model's sizes
    (``formula=False``: the number alone, without the symbolic sum, which is the slow part)."""
    from pefref.language.hparams import resolve_hyperparameters
    from pefref.language.placement import retarget

    fam = catalog.family(shape.family)
    if sites is not None:  # an empty list places nothing (as apply refuses it), not the default placement
        t = retarget(t, sites, catalog.reference, catalog.techniques, fam)
    modules, decl = expand_modules(t, {**catalog.techniques, t.id: t})
    hps = resolve_hyperparameters(decl, overrides)
    sizes = model_sizes(fam, dict(shape.config))
    L = sizes["L"]
    scopes: dict[tuple[Any, ...], tuple[tuple[int, ...], str, bool]] = {}
    sym_terms: dict[tuple[Any, ...], str] = {}
    select_total, select_terms = 0, []
    dropped: list[str] = []
    placed: dict[str, int] = {}  # placements per module
    site_mults: dict[str, list[str]] = {}  # per module, each site's number of placements (symbolic)
    grouped: dict[tuple[Any, ...], tuple[Any, dict[str, Any], str]] = {}  # tensors shared by all placements in groups
    for m in modules:
        unread = unbound_reads(m, fam)
        for site in m.sites:
            if site not in fam.sites:
                dropped.append(f"{m.name} at {site}: {fam.family} binds no {site}")
                continue
            if unread:  # it reads a site the family does not bind: apply refuses it there
                dropped.append(f"{m.name} at {site}: reads {', '.join(unread)}, which {fam.family} does not bind")
                continue
            ref_site = catalog.reference.sites[site]
            per_layer = ref_site.per_layer
            layers: list[int | None] = [None]
            if per_layer:
                has = {i for i, _j, _b in layer_bindings(fam, site, sizes)}  # an encoder-decoder site: the layers of its stacks
                layers = [i for i in select_layers(m.layers, L) if i in has]
                if not layers:
                    dropped.append(f"{m.name} at {site}: no layer of {shape.name} holds it")
            if not form_of(m).has_unit:
                terms = _select_terms(m, site, fam, catalog)
                n = sum(int(eval_scalar(x, sizes)) for x in terms)
                if n == 0:
                    dropped.append(f"{m.name} at {site}: {fam.family}'s host has no {', '.join(m.targets)}")
                select_total += n * len(layers)
                mult = _mult_text(len(layers), per_layer, m.layers, L)
                select_terms += [f"{mult}*{x}" for x in terms]
                continue
            d_in_e, d_out_e = host_widths(site, fam, catalog)
            names = {**sizes, "d_in": int(eval_scalar(d_in_e, sizes)) if d_in_e else 0, "d_out": int(eval_scalar(d_out_e, sizes)), "causal": int(fam.causal), **hps}
            site_shapes = {pname: shape_of(spec, names) for pname, spec in m.params.items()}  # the same in every layer
            slices = [f"{site}[{e}]" for e in range(int(eval_scalar(ref_site.slices, sizes)))] if ref_site.slices else [site]  # one update per slice
            site_mults.setdefault(m.name, []).append(f"{_mult_text(len(layers), per_layer, m.layers, L)}*{len(slices)}")
            for i, one in ((i, one) for i in layers for one in slices):
                placed[m.name] = placed.get(m.name, 0) + 1
                for pname, spec in m.params.items():
                    key = _scope_key(spec, m.name, pname, one, i, layers, names)
                    if getattr(spec, "groups", None) is not None and spec.shared == "all":
                        grouped[key] = (spec, names, m.name)
                    shp = site_shapes[pname]
                    prev = scopes.get(key)
                    if prev is not None:
                        shp = tuple(max(a, b) for a, b in zip(prev[0], shp))
                    scopes[key] = (shp, pname, spec.trainable)
                    # symbolic: the dims with host widths written in model sizes, once per scope without layer
                    sym_key = (*spec.owner(m.name, pname), spec.shared, *(() if spec.shared in ("sites", "all") else (site,)))
                    if formula and sym_key not in sym_terms and spec.trainable:
                        widths = {"d_in": d_in_e or 0, "d_out": d_out_e or 0}
                        text = "*".join(f"({substitute(d, widths)})" if isinstance(d, str) else str(d) for d in spec.shape)
                        mult = _sym_mult(spec, layers, per_layer, m.layers, L, names)
                        mult += f"*{ref_site.slices}" if ref_site.slices and spec.shared in ("none", "layers") else ""
                        sym_terms[sym_key] = f"{mult}*{text}"
    copies = _group_copies(grouped, placed)
    sym_terms |= {k: f"{_per_group(n, grouped[k][2], placed, site_mults)}*{sym_terms[k]}" for k, n in copies.items() if k in sym_terms}
    total = select_total + _scoped_total(scopes, copies)
    text = _formula(list(sym_terms.values()) + select_terms, sizes, hps) if formula else ""
    base = int(eval_scalar(fam.base_params, {**sizes, **shape.config}))
    return ParamCount(t.id, shape.name, total, base, text, hps, dropped)


def _scope_key(spec: Any, module: str, pname: str, one: str, i: int | None, layers: list[int | None], names: dict[str, Any]) -> tuple[Any, ...]:
    """The key of the copy of a tensor a placement (site or slice ``one``, layer ``i``) reads, by its sharing scope (a run of
    layers: its run; groups of placements: one key, multiplied by the number of groups when totalled)."""
    run = layer_run(spec, layers.index(i) if i is not None else None, names)
    scope = {"none": (one, i), "layers": (one,) if run is None else (one, run), "sites": (i,), "all": ()}[spec.shared]
    return (*spec.owner(module, pname), spec.shared, *scope)


def _group_copies(grouped: dict[tuple[Any, ...], tuple[Any, dict[str, Any], str]], placed: dict[str, int]) -> dict[tuple[Any, ...], int]:
    """How many copies each tensor shared by all placements in groups has: its number of groups among the placements."""
    out = {}
    for key, (spec, names, module) in grouped.items():
        n = placed.get(module, 0)
        out[key] = (placement_group(spec, n - 1, n, names) or 0) + 1 if n else 0
    return out


def _scoped_total(scopes: dict[tuple[Any, ...], tuple[tuple[int, ...], str, bool]], copies: dict[tuple[Any, ...], int]) -> int:
    """Trainable elements of the scoped tensors (a tensor shared in groups of placements once per group)."""
    return sum(math.prod(shp) * copies.get(key, 1) for key, (shp, _p, trainable) in scopes.items() if trainable)


def _per_group(n: int, module: str, placed: dict[str, int], site_mults: dict[str, list[str]]) -> str:
    """The multiplier of a tensor's term with ``n`` groups of placements: symbolic when every placement has its own."""
    return f"({' + '.join(site_mults.get(module, []))})" if n == placed.get(module) and site_mults.get(module) else str(n)


def _sym_mult(spec: Any, layers: list[int | None], per_layer: bool, sel: Any, L: int, names: dict[str, Any]) -> str:
    """How many copies of a tensor a site's term counts: one per layer (unshared, or shared across sites), one per run of
    layers (``every``), else one."""
    if spec.shared in ("none", "sites") and per_layer:
        return _mult_text(len(layers), per_layer, sel, L)
    last = layer_run(spec, len(layers) - 1, names) if spec.shared == "layers" and per_layer and layers else None
    if last is not None and last + 1 == len(layers):  # runs of one layer: one per layer
        return _mult_text(len(layers), per_layer, sel, L)
    return "1" if last is None else str(last + 1)


def _mult_text(n: int, per_layer: bool, sel: Any, L: int) -> str:
    """How many copies a per-layer term has: the symbol L for all layers, else the number."""
    return "L" if per_layer and sel == "all" and n == L else str(n)


def _formula(terms: list[str], sizes: dict[str, int], hps: dict[str, Any]) -> str:
    """Sum the terms symbolically (sympy) and print them factored, with '·' for products."""
    return _formula_of(tuple(terms), (*sizes, *hps))


@lru_cache(maxsize=4096)
def _formula_of(terms: tuple[str, ...], symbols: tuple[str, ...]) -> str:
    """:func:`_formula` on hashable arguments: many techniques and shapes share their terms (sympy is slow,
    and slow to import: the result is also kept across processes by :func:`~pefref.language.catalog_cache.memo`)."""
    from pefref.language.catalog_cache import memo

    return str(memo("formula", [list(terms), list(symbols)], lambda: _factored(terms, symbols)))


def _factored(terms: tuple[str, ...], symbols: tuple[str, ...]) -> str:
    import sympy

    names = {n: sympy.Symbol(n) for n in symbols}
    expr = sum((sympy.sympify(t.replace("//", "/"), locals=names) for t in terms), sympy.Integer(0))
    s = _printer_class()().doprint(_positive_lead(sympy.factor(sympy.expand(expr))))
    return s.replace("**", "^").replace("*", "·")


@lru_cache(maxsize=1)
def _printer_class() -> Any:
    """sympy's printer in the expression language's spelling: min/max of two arguments (nested), ceil."""
    from sympy.printing.str import StrPrinter

    class Printer(StrPrinter):
        def _pair(self, name: str, args: Any) -> str:
            *rest, last = (self._print(a) for a in args)
            return reduce(lambda acc, a: f"{name}({a}, {acc})", reversed(rest), last)

        def _print_Min(self, e: Any) -> str:
            return self._pair("min", e.args)

        def _print_Max(self, e: Any) -> str:
            return self._pair("max", e.args)

        def _print_ceiling(self, e: Any) -> str:
            return f"ceil({self._print(e.args[0])})"

    return Printer



def _positive_lead(f: Any) -> Any:
    """A factored count with its minus sign moved into a difference: 2·L·d·(d - r)/r, not -2·L·d·(-d + r)/r."""
    import sympy

    c, rest = f.as_coeff_Mul()
    if c >= 0:
        return f
    factors = list(sympy.Mul.make_args(rest))
    for i, a in enumerate(factors):
        if isinstance(a, sympy.Add):
            factors[i] = sympy.expand(-a)
            return sympy.Mul(*([] if -c == 1 else [-c]), *factors, evaluate=False)
    return f
