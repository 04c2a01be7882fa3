"""Placement anywhere: put a technique's modules on sites it does not name itself.

``sites=`` (and ``--sites`` on the command line) takes site names, glob patterns
over them (``attn.*``, ``ffn.*``) and the reference architecture's named
selectors (``all-linear``: every linear projection of every layer, as peft's
``target_modules="all-linear"``). :func:`retarget` turns a technique and such a
request into a technique whose modules sit there, so every consumer (counts,
typology, costs, injection) sees one ordinary technique.

The rule, per requested site ``s``:

* if some module of the technique already names ``s``, only those modules keep
  it (narrowing, as before);
* otherwise every module whose own sites have the kind of ``s`` (linear, norm,
  block, ...), or a kind that the kind of ``s`` takes (a raw parameter slice
  takes linear modules), moves there, provided that kind accepts the module's
  form: a module only ever reads what its own kind of site offers.

A site named explicitly that no module can take is an error naming the site and
what would fit; a pattern or selector silently skips the sites that do not fit
but must fit somewhere. Where a family fuses projections (GPT-2's ``c_attn``
binds ``attn.qkv`` whole and ``attn.q/k/v`` as its slices), a pattern that
selects the fused site drops its slices, so nothing is adapted twice.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from pefref.language.check import expand_modules
from pefref.language.errors import SiteError
from pefref.language.loader import suggest
from pefref.language.schema import ArchitectureMap, ReferenceArchitecture, Technique

__all__ = ["expand_sites", "retarget"]


def _selected(reference: ReferenceArchitecture, name: str) -> list[str]:
    sel = reference.selectors[name]
    return [s for s, site in reference.sites.items()
            if (sel.kinds is None or site.kind in sel.kinds)
            and (sel.workspaces is None or site.workspace in sel.workspaces)
            and (sel.per_layer is None or site.per_layer == sel.per_layer)]


def expand_sites(requested: Sequence[str], reference: ReferenceArchitecture,
                 fam: ArchitectureMap | None = None) -> list[tuple[str, str]]:
    """Each concrete site of a request, with the request item it came from (the site itself when named).

    Raises:
        SiteError: an item that is neither a site, a pattern matching one, nor a selector.
    """
    out: dict[str, str] = {}
    for item in requested:
        item = item.strip()
        if item in reference.sites:
            out.setdefault(item, item)
            continue
        if item in reference.selectors:
            found = _selected(reference, item)
        elif any(c in item for c in "*?["):  # sites a module can attach to (not those only read, as the rotary ones)
            found = [s for s in reference.sites if fnmatch.fnmatchcase(s, item) and reference.site_kinds[reference.sites[s].kind].forms]
        else:
            names = [*reference.sites, *reference.selectors]
            raise SiteError(f"sites: {item!r} is no site, pattern or selector{suggest(item, names)} "
                            f"(sites: {', '.join(reference.sites)}; selectors: {', '.join(reference.selectors) or 'none'})")
        if fam is not None:
            found = [s for s in found if s in fam.sites]
            whole = {fam.sites[s].path for s in found if fam.sites[s].slice is None and fam.sites[s].path}
            found = [s for s in found if fam.sites[s].slice is None or fam.sites[s].path not in whole]
        if not found:
            where = f" that family {fam.family!r} binds" if fam is not None else ""
            raise SiteError(f"sites: {item!r} matches no site{where}")
        for s in found:
            out.setdefault(s, item)
    return list(out.items())


def retarget(t: Technique, sites: Sequence[str], reference: ReferenceArchitecture,
             pool: Mapping[str, Technique], fam: ArchitectureMap | None = None) -> Technique:
    """``t`` with its modules placed on ``sites`` (names, patterns, selectors); see the module docstring.

    The result has the same id, concrete modules (``use:`` entries resolved) and the
    effective hyperparameters; modules left without a site are dropped.

    Raises:
        SiteError: a site that no module can take (named explicitly), a pattern that
            fits nothing, or a request that leaves no module anywhere.
    """
    modules, decl = expand_modules(t, {**pool, t.id: t})
    chosen = expand_sites(sites, reference, fam)
    kind_of = {s: site.kind for s, site in reference.sites.items()}
    new_sites: dict[str, list[str]] = {m.name: [] for m in modules}
    fits_by_item: dict[str, int] = {}
    for site, item in chosen:
        owners = [m for m in modules if site in m.sites]
        sk = reference.site_kinds[kind_of[site]]
        fits = {kind_of[site], *sk.takes}
        takers = owners or [m for m in modules if fits & {kind_of[s] for s in m.sites} and m.form in sk.forms]
        for m in takers:
            new_sites[m.name].append(site)
        fits_by_item[item] = fits_by_item.get(item, 0) + len(takers)
        if not takers and item == site:
            own = "; ".join(f"{m.name} ({m.form}) on {', '.join(sorted({kind_of[s] for s in m.sites}))} sites" for m in modules)
            raise SiteError(f"sites: {t.id} cannot be placed on {site!r} (a {kind_of[site]} site): "
                            f"its modules are {own}")
    for item, n in fits_by_item.items():
        if n == 0:
            raise SiteError(f"sites: no module of {t.id} fits any site of {item!r}")
    placed: list[Any] = [m.model_copy(update={"sites": new_sites[m.name]}) for m in modules if new_sites[m.name]]
    if not placed:  # pragma: no cover - every request item places something or raised above
        raise SiteError(f"sites: nothing of {t.id} is placed on {', '.join(sites)}")
    return t.model_copy(update={"modules": placed, "hyperparameters": decl})
