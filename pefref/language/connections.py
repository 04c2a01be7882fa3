"""Connections between modules (interactions), checked at validate time; shared with the runtime.

A module's ``inputs`` name values it reads during the forward pass: another
module's output (its ``compute`` result) in the same, previous or last layer, or
the hidden state at a site it does not attach to. A connection is sound when its
source exists and produces an output (a parallel or sequential module at the
named site), it exists in the layers it is read from (the previous layer of a
module's first layer needs a ``fallback``), and the source runs before the
reader: at an earlier site in the reference architecture's ``order``, or at the
same site and declared before it (so no two modules of one layer wait for each
other). An input of the model's call (``call``: task ids, token ids) is there for
every module. A read of a site's hidden state with ``pass: first`` takes it from a first
forward pass of the model that runs to its end before the real one, so any site may be read
(no order); the technique's first-pass reads agree on how that pass runs. Shapes are checked with the other expressions (:mod:`pefref.language.shapecheck`).
No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pefref.language.errors import Problem
from pefref.language.forms import FORMS, Integration, form_of
from pefref.language.loader import dotted, suggest
from pefref.language.sizes import select_layers
from pefref.language.yamlsrc import Positions

__all__ = ["OUTPUT_FORMS", "check_connections", "check_hook_inputs", "sites_read", "is_tap", "source_site", "tap_name", "runs_before", "EXAMPLE_LAYERS"]

OUTPUT_FORMS = tuple(f.name for f in FORMS.values() if f.publishes)
"""Forms with an output other modules may read (and that may read connections themselves)."""
"""Forms whose output (``delta``) other modules may read, and which may read connections."""
EXAMPLE_LAYERS = 4


def tap_name(site: str, tensor: str) -> str:
    """Name of the tap that publishes the hidden state ``tensor`` at ``site`` (a generated module)."""
    return f"tap_{site.replace('.', '_')}_{tensor}"


def is_tap(module: str, site: str) -> bool:
    """Whether ``module`` placed at ``site`` is a generated tap (it holds no tensors), by :func:`tap_name`."""
    return module in {tap_name(site, t) for t in ("x", "h", "W", "b")}


def sites_read(m: Any) -> list[str]:
    """The sites a module needs a family to bind: those it attaches to, then those its connections read a tensor of."""
    read = [c.site for c in (getattr(m, "inputs", None) or {}).values() if c.module is None and c.site is not None]
    return [*m.sites, *(s for s in dict.fromkeys(read) if s not in m.sites)]


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


def _input_side(m: Any) -> bool:
    """Whether module ``m`` transforms its host's input (it runs before its host, and before anything inside it)."""
    return getattr(m, "side", "output") == "input"


def _layers(m: Any, site: str, ref: Any) -> list[int | None]:
    return cast(list[int | None], select_layers(m.layers, EXAMPLE_LAYERS)) if ref.sites[site].per_layer else [None]


@dataclass(frozen=True)
class _Source:
    """What a connection reads: a site, and the module there (its declaration index; -1 and None: the site's hidden state)."""

    site: str
    index: int = -1
    module: Any = None


@dataclass
class _Check:
    """The modules of one technique under check, and the problems found so far."""

    modules: list[Any]
    ref: Any
    pos: Positions
    out: list[Problem] = field(default_factory=list)

    @property
    def by_name(self) -> dict[str, tuple[int, Any]]:
        return {m.name: (i, m) for i, m in enumerate(self.modules)}

    def err(self, path: tuple[Any, ...], msg: str) -> None:
        self.out.append(Problem(self.pos.at(path), dotted(path), msg))


def check_connections(modules: list[Any], ref: Any, pos: Positions) -> list[Problem]:
    """Located problems of every module's connections (empty when all are sound)."""
    ck = _Check(modules, ref, pos)
    for i, m in enumerate(modules):
        for name, conn in getattr(m, "inputs", {}).items():
            _check_connection(ck, i, m, ("modules", i, "inputs", name), conn)
    _check_first_pass(ck)
    return ck.out


def check_hook_inputs(modules: list[Any], training: list[Any], ref: Any, pos: Positions) -> list[Problem]:
    """Located problems of the inputs of the training hooks that read the last forward pass (an auxiliary loss's
    ``inputs``): their sources exist and run in the layers of the hook's module. Order within a layer does not matter:
    the hook runs after the forward pass."""
    ck = _Check(modules, ref, pos)
    by_name = ck.by_name
    for k, hook in enumerate(training):
        inputs = getattr(hook, "inputs", None) or {}
        if getattr(hook, "module", None) not in by_name:
            continue  # reported by the training checks
        m = by_name[hook.module][1]
        for name, conn in inputs.items():
            cp = ("training", k, "inputs", name)
            if conn.call is not None:
                continue
            found = _sources(ck, cp, conn, m)
            if found is None:
                continue
            if conn.fallback is not None and conn.layer != "previous":
                ck.err(cp + ("fallback",), "a fallback is read where the previous layer does not exist; use it with layer: previous")
                continue
            for site in (s for s in m.sites if s in ref.sites):
                sources = [_Source(site, src.index, src.module) if src.site == SAME else src for src in found]
                why = _layer_problem(ref, m, site, conn, sources[0])
                if why is not None:
                    ck.err(cp + ("layer",), why)
                    break
    return ck.out


def _check_first_pass(ck: _Check) -> None:
    """The technique's first-pass reads (``pass: first``) describe one first pass: they agree on how it runs."""
    first = [(("modules", i, "inputs", name), c) for i, m in enumerate(ck.modules)
             for name, c in getattr(m, "inputs", {}).items() if c.first_pass]
    for path, c in first[1:]:
        if (c.no_grad, c.during) != (first[0][1].no_grad, first[0][1].during):
            ck.err(path, f"one first pass runs per call: its no_grad and during must be those of {dotted(first[0][0])} "
                   f"({first[0][1].no_grad}, {first[0][1].during})")


def _check_connection(ck: _Check, i: int, m: Any, cp: tuple[Any, ...], conn: Any) -> None:
    """One input ``conn`` of module ``m`` (declared ``i``-th, the input at ``cp``): its sources, layers and order."""
    if conn.call is not None and form_of(m).integration is Integration.POSITIONS and getattr(m, "tokens", None) is not None:
        if conn.call != "task_ids":
            ck.err(cp + ("call",), "prepended tokens may read the call's task_ids (a prompt per example's task), not its input_ids")
        return
    if m.form not in OUTPUT_FORMS:
        ck.err(cp, f"a {m.form} module cannot read connections (only {', '.join(OUTPUT_FORMS)} modules; prepended tokens may read call: task_ids)")
        return
    if conn.call == "labels":
        ck.err(cp + ("call",), "the call's labels are read after the forward pass, by an auxiliary loss's inputs (training:), not by a module")
        return
    if conn.call is not None:
        return  # an input of the model's call: there from the start of every forward pass
    found = _sources(ck, cp, conn, m)
    if found is None:
        return
    if conn.fallback is not None and conn.layer != "previous":
        ck.err(cp + ("fallback",), "a fallback is read where the previous layer does not exist; use it with layer: previous")
        return
    for site in m.sites:
        if site not in ck.ref.sites:
            continue
        sources = [_Source(site, src.index, src.module) if src.site == SAME else src for src in found]
        why = _layer_problem(ck.ref, m, site, conn, sources[0])
        if why is not None:
            ck.err(cp + ("layer",), why)
            break
        why = None if conn.first_pass else _order_problem(ck, i, m, site, conn, sources)  # a first pass has run to its end
        if why is not None:
            ck.err(cp, why)
            break


def _sources(ck: _Check, cp: tuple[Any, ...], conn: Any, m: Any) -> list[_Source] | None:
    """The connection's source and its fallback, if any (None, with the problems reported, when one is unsound); a
    source at several sites read without a site resolves to the reader's own site (:data:`SAME`) when the reader
    ``m`` is placed only where the source is."""
    ref = ck.ref
    if conn.module is None:
        if conn.site not in ref.sites:
            ck.err(cp + ("site",), f"unknown site {conn.site!r}{suggest(conn.site or '', ref.sites)}")
            return None
        if conn.tensor not in ref.site_kinds[ref.sites[conn.site].kind].reads:
            ck.err(cp + ("tensor",), f"site {conn.site!r} offers no {conn.tensor!r} (a {ref.sites[conn.site].kind} site offers: {', '.join(ref.site_kinds[ref.sites[conn.site].kind].reads)})")
            return None
        return [_Source(conn.site)]  # a site's hidden state: available wherever the site has run
    by_name = ck.by_name
    sources: list[_Source] = []
    for key, nm in (("module", conn.module), ("fallback", conn.fallback)):
        if nm is None:
            continue
        if nm not in by_name:
            ck.err(cp + (key,), f"unknown module {nm!r}{suggest(nm, by_name)} (modules: {', '.join(by_name)})")
            continue
        j, src = by_name[nm]
        if src.form not in OUTPUT_FORMS:
            ck.err(cp + (key,), f"module {nm!r} is {src.form}; only {', '.join(OUTPUT_FORMS)} modules have an output to read")
            continue
        s = source_site(src, conn) if key == "module" else (src.sites[0] if len(src.sites) == 1 else None)
        if s is None and key == "module" and conn.site is None and set(m.sites) <= set(src.sites):
            s = SAME
        if s is None:
            ck.err(cp + ("site" if conn.site else key,), f"module {nm!r} attaches to {', '.join(src.sites)}; name one of them with "
                   f"site:, or place {m.name!r} only at sites {nm!r} attaches to (it then reads {nm!r} at its own site)")
            continue
        sources.append(_Source(s, j, src))
    return sources if len(sources) >= 1 + (conn.fallback is not None) else None


def _layer_problem(ref: Any, m: Any, site: str, conn: Any, src: _Source) -> str | None:
    """Why the source does not exist in a layer where ``m`` at ``site`` reads it (None: it does)."""
    reader_layers = _layers(m, site, ref)
    src_per_layer = ref.sites[src.site].per_layer
    src_layers = set(_layers(src.module, src.site, ref)) if src.module is not None else set(range(EXAMPLE_LAYERS)) if src_per_layer else {None}
    if conn.layer == "same" and src_per_layer and reader_layers == [None]:
        return f"{m.name!r} at {site!r} is model-level; read a per-layer source with layer: last"
    if conn.layer in ("previous", "last") and not src_per_layer:
        return f"the source at {src.site!r} is model-level; it has no {conn.layer} layer (use layer: same)"
    if conn.layer == "previous" and reader_layers == [None]:
        return f"{m.name!r} at {site!r} is model-level; it has no previous layer"
    if conn.layer == "same" and src_per_layer:
        missing = [li for li in reader_layers if li not in src_layers]
        if missing:
            return f"the source does not run in layer {missing[0]} where {m.name!r} reads it (of {EXAMPLE_LAYERS} layers)"
    if conn.layer == "previous":
        missing = [li for li in reader_layers if li is not None and li - 1 not in src_layers]
        if missing and (missing != [0] or conn.fallback is None):
            li = cast(int, missing[0])
            what = "the first layer has no previous layer; add a fallback" if li == 0 else f"the source does not run in layer {li - 1}"
            return f"{what} (read by {m.name!r} in layer {li})"
    return None


def _order_problem(ck: _Check, i: int, m: Any, site: str, conn: Any, sources: list[_Source]) -> str | None:
    """Why a source (or the fallback) has not run yet when ``m`` at ``site`` reads it within a layer (None: it has)."""
    ref, order = ck.ref, list(ck.ref.order)
    checks = [(sources[0], conn.layer)]
    if conn.fallback is not None:
        checks.append((sources[1], "same"))
    for src, layer in checks:
        s, j = src.site, src.index
        if layer != "same" and ref.sites[s].per_layer:
            continue  # an earlier layer (or the last one, read by a model-level module after the layers) has run
        if not ref.sites[s].per_layer and ref.sites[site].per_layer and runs_before(order, (s, j), (site, i)):
            continue
        if _input_side(m) and ref.sites[site].per_layer and ref.sites[s].per_layer and not (
                s == site and 0 <= j < i and _input_side(ck.modules[j])):
            return (f"{m.name!r} transforms the input of {site!r}, before anything of its layer runs; it reads "
                    f"{repr(ck.modules[j].name) if j >= 0 else repr(s)} of the same layer: read the previous layer, a model-level "
                    f"site, or an input-side module declared before it at {site!r}")
        if not runs_before(order, (s, j), (site, i)):
            cyc = " (the two read each other: a cycle)" if j >= 0 and any(
                c.module == m.name for c in getattr(ck.modules[j], "inputs", {}).values()) else ""
            who = f"module {ck.modules[j].name!r} at {s!r}" if j >= 0 else f"site {s!r}"
            return (f"{who} runs after {m.name!r} at {site!r} in a layer, so its value is not there yet{cyc}; "
                    f"read an earlier site, declare the source first, or read the previous layer")
    return None
