"""Connections between modules (interactions), checked at validate time; shared with the runtime.

A module's ``inputs`` name values it reads during the forward pass: another
module's output (its ``compute`` result) in the same, previous or last layer, or
the hidden state at a site it does not attach to. A connection is sound when its
source exists and produces an output (a parallel or sequential module at the
named site), it exists in the layers it is read from (the previous layer of a
module's first layer needs a ``fallback``), and the source runs before the
reader: at an earlier site in the reference architecture's ``order``, or at the
same site and declared before it (so no two modules of one layer wait for each
other). Shapes are checked with the other expressions (:mod:`pefref.language.shapecheck`).
No torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from pefref.language.errors import Problem
from pefref.language.loader import dotted, suggest
from pefref.language.sizes import select_layers
from pefref.language.yamlsrc import Positions

__all__ = ["OUTPUT_FORMS", "check_connections", "source_site", "tap_name", "runs_before", "EXAMPLE_LAYERS"]

OUTPUT_FORMS = ("parallel", "sequential")
"""Forms whose output (``delta``) other modules may read, and which may read connections."""
EXAMPLE_LAYERS = 4


def tap_name(site: str, tensor: str) -> str:
    """Name of the tap that publishes the hidden state ``tensor`` at ``site`` (a generated module)."""
    return f"tap_{site.replace('.', '_')}_{tensor}"


SAME = "<the reader's site>"  # a source at several sites, read at the reader's own site


def source_site(src: Any, conn: Any, reader_site: str | None = None) -> str | None:
    """The site of the source module a connection reads (None when ambiguous): the named one, the source's only
    one, or, for a source at several sites, the reader's own site when the source attaches there too (a companion
    module at each site, e.g. a router its site's mixture reads)."""
    if conn.site is not None:
        return conn.site if conn.site in src.sites else None
    if len(src.sites) == 1:
        return src.sites[0]
    return reader_site if reader_site in src.sites else None


def runs_before(order: Sequence[str], a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether (site, declaration index) ``a`` runs before ``b`` within one layer."""
    ra = order.index(a[0]) if a[0] in order else len(order)
    rb = order.index(b[0]) if b[0] in order else len(order)
    return (ra, a[1]) < (rb, b[1])


def _layers(m: Any, site: str, ref: Any) -> list[int | None]:
    return cast(list[int | None], select_layers(m.layers, EXAMPLE_LAYERS)) if ref.sites[site].per_layer else [None]


def _err_at(err: Callable[[tuple[Any, ...], str], None], path: tuple[Any, ...], field: str, msg: str) -> None:
    err(path + (field,), msg)


def _module_sources(m: Any, conn: Any, by_name: Mapping[str, tuple[int, Any]], err: Callable[[str, str], None]) -> list[tuple[str, int, Any]]:
    """(site, declaration index, module) of a connection's source module and its fallback, each reported (by the
    field at fault) when it does not resolve; a source at several sites read without a site resolves to the
    reader's own site (:data:`SAME`) when the reader is placed only where the source is."""
    sources = []
    for key, nm in (("module", conn.module), ("fallback", conn.fallback)):
        if nm is None:
            continue
        if nm not in by_name:
            err(key, f"unknown module {nm!r}{suggest(nm, by_name)} (modules: {', '.join(by_name)})")
            continue
        j, src = by_name[nm]
        if src.form not in OUTPUT_FORMS:
            err(key, f"module {nm!r} is {src.form}; only {', '.join(OUTPUT_FORMS)} modules have an output to read")
            continue
        s = source_site(src, conn) if key == "module" else (src.sites[0] if len(src.sites) == 1 else None)
        if s is None and key == "module" and conn.site is None and set(m.sites) <= set(src.sites):
            s = SAME
        if s is None:
            err("site" if conn.site else key, f"module {nm!r} attaches to {', '.join(src.sites)}; name one of them with "
                f"site:, or place {m.name!r} only at sites {nm!r} attaches to (it then reads {nm!r} at its own site)")
            continue
        sources.append((s, j, src))
    return sources


def check_connections(modules: list[Any], ref: Any, pos: Positions) -> list[Problem]:
    """Located problems of every module's connections (empty when all are sound)."""
    out: list[Problem] = []
    by_name = {m.name: (i, m) for i, m in enumerate(modules)}
    order = list(ref.order)

    def err(path: tuple[Any, ...], msg: str) -> None:
        out.append(Problem(pos.at(path), dotted(path), msg))

    for i, m in enumerate(modules):
        for name, conn in getattr(m, "inputs", {}).items():
            cp = ("modules", i, "inputs", name)
            if m.form not in OUTPUT_FORMS:
                err(cp, f"a {m.form} module cannot read connections (only {', '.join(OUTPUT_FORMS)} modules)")
                continue
            if conn.module is None:
                if conn.site not in ref.sites:
                    err(cp + ("site",), f"unknown site {conn.site!r}{suggest(conn.site or '', ref.sites)}")
                    continue
                if conn.tensor not in ref.site_kinds[ref.sites[conn.site].kind].reads:
                    err(cp + ("tensor",), f"site {conn.site!r} offers no {conn.tensor!r} (a {ref.sites[conn.site].kind} site offers: {', '.join(ref.site_kinds[ref.sites[conn.site].kind].reads)})")
                    continue
                sources = [(conn.site, -1, None)]  # a site's hidden state: available wherever the site has run
            else:
                sources = _module_sources(m, conn, by_name, functools.partial(_err_at, err, cp))
                if len(sources) < 1 + (conn.fallback is not None):
                    continue
            if conn.fallback is not None and conn.layer != "previous":
                err(cp + ("fallback",), "a fallback is read where the previous layer does not exist; use it with layer: previous")
                continue
            for site in m.sites:
                if site not in ref.sites:
                    continue
                reader_layers = _layers(m, site, ref)
                s0, j0, src0 = sources[0]
                s0 = site if s0 == SAME else s0
                src_per_layer = ref.sites[s0].per_layer
                src_layers = set(_layers(src0, s0, ref)) if src0 is not None else set(range(EXAMPLE_LAYERS)) if src_per_layer else {None}
                if conn.layer == "same" and src_per_layer and reader_layers == [None]:
                    err(cp + ("layer",), f"{m.name!r} at {site!r} is model-level; read a per-layer source with layer: last")
                    break
                if conn.layer in ("previous", "last") and not src_per_layer:
                    err(cp + ("layer",), f"the source at {s0!r} is model-level; it has no {conn.layer} layer (use layer: same)")
                    break
                if conn.layer == "previous" and reader_layers == [None]:
                    err(cp + ("layer",), f"{m.name!r} at {site!r} is model-level; it has no previous layer")
                    break
                if conn.layer == "same" and src_per_layer:
                    missing = [li for li in reader_layers if li not in src_layers]
                    if missing:
                        err(cp + ("layer",), f"the source does not run in layer {missing[0]} where {m.name!r} reads it (of {EXAMPLE_LAYERS} layers)")
                        break
                if conn.layer == "previous":
                    missing = [li for li in reader_layers if li is not None and li - 1 not in src_layers]
                    if missing and (missing != [0] or conn.fallback is None):
                        li = cast(int, missing[0])
                        what = "the first layer has no previous layer; add a fallback" if li == 0 else f"the source does not run in layer {li - 1}"
                        err(cp + ("layer",), f"{what} (read by {m.name!r} in layer {li})")
                        break
                checks = [(s0, j0, conn.layer)]
                if conn.fallback is not None:
                    checks.append((sources[1][0], sources[1][1], "same"))
                for s, j, layer in checks:
                    if layer != "same" and ref.sites[s].per_layer:
                        continue  # an earlier layer (or the last one, read by a model-level module after the layers) has run
                    if not ref.sites[s].per_layer and ref.sites[site].per_layer and runs_before(order, (s, j), (site, i)):
                        continue
                    if not runs_before(order, (s, j), (site, i)):
                        cyc = " (the two read each other: a cycle)" if j >= 0 and any(
                            c.module == m.name for c in getattr(modules[j], "inputs", {}).values()) else ""
                        who = f"module {modules[j].name!r} at {s!r}" if j >= 0 else f"site {s!r}"
                        err(cp, f"{who} runs after {m.name!r} at {site!r} in a layer, so its value is not there yet{cyc}; "
                                f"read an earlier site, declare the source first, or read the previous layer")
                        break
    return out
