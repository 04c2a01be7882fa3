"""Slices of fused projections checked on real sizes, at validate time (no torch).

A map may bind several sites to one module as slices of its output features
(GPT-2's ``c_attn`` stacks q, k and v; GPT-NeoX's ``query_key_value``
interleaves them per head: ``slice: {start, size, period}``). On the sizes of
each named model shape of the family, every slice must

* have ``start >= 0``, ``size > 0`` and, with a period, ``start + size <= period``;
* fit the module: when another site binds the same module whole (``attn.qkv``),
  its width is the module's, and a slice must lie inside it (one block) or the
  width must be a multiple of the period (interleaved);
* own as many features as its site is wide in the reference architecture
  (``attn.q``: ``heads * d_head``), and no feature another slice of the module owns.

Each problem is located at the slice's field and names the shape it fails on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pefref.language.errors import Problem
from pefref.language.schema import ArchitectureMap, ReferenceArchitecture, SiteBinding
from pefref.language.sizes import eval_scalar, model_sizes
from pefref.language.yamlsrc import Positions

__all__ = ["slice_problems", "slice_features"]


def slice_features(start: int, size: int, period: int, width: int) -> list[int]:
    """The output features a slice owns, in order, in a module of ``width`` features (``period`` 0: one block)."""
    if not period:
        return list(range(start, start + size))
    return [j * period + start + t for j in range(width // period) for t in range(size)]


def _ints(b: SiteBinding, sizes: Mapping[str, int]) -> tuple[int, int, int]:
    sl = b.slice
    assert sl is not None
    return tuple(int(eval_scalar(e, dict(sizes))) if e is not None else 0 for e in (sl.start, sl.size, sl.period))  # type: ignore[return-value]


def slice_problems(fam: ArchitectureMap, pos: Positions, ref: ReferenceArchitecture,
                   configs: Mapping[str, Mapping[str, Any]]) -> list[Problem]:
    """Problems of the map's slices on each named shape's config (``configs``: shape name -> config)."""
    sliced = {s: b for s, b in fam.sites.items() if b.slice is not None and b.path and s in ref.sites}
    if not sliced:
        return []
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()  # (site, message): one report per problem, not one per shape

    def report(site: str, fld: str, msg: str, shape: str) -> None:
        if (site, msg) not in seen:
            seen.add((site, msg))
            out.append(Problem(pos.at(("sites", site, "slice", fld)), f"sites.{site}.slice.{fld}", f"{msg} (on model shape {shape!r})"))

    for shape, config in configs.items():
        try:
            sizes = model_sizes(fam, dict(config))
        except Exception:  # the map's sizes are checked elsewhere; nothing to check slices on
            continue
        whole = {b.path: s for s, b in fam.sites.items() if b.slice is None and b.path and s in ref.sites}
        owners: dict[str, dict[int, str]] = {}
        for site, b in sliced.items():
            try:
                start, size, period = _ints(b, sizes)
            except Exception as ex:  # a division by zero, an unknown name
                report(site, "start", f"cannot evaluate the slice: {ex}", shape)
                continue
            if start < 0 or size <= 0:
                report(site, "start" if start < 0 else "size", f"start {start} must be >= 0 and size {size} > 0", shape)
                continue
            if period and start + size > period:
                report(site, "period", f"the block [{start}, {start + size}) does not fit in the period {period}", shape)
                continue
            path = b.path or ""
            host_site = whole.get(path)
            host_out = ref.sites[host_site].out if host_site else None
            if host_out is None:
                continue  # nothing tells the module's width before a model is built (applying checks it)
            width = int(eval_scalar(host_out, dict(sizes)))
            if period and width % period:
                report(site, "period", f"the module's {width} features ({host_site}) are not a whole number of periods of {period}", shape)
                continue
            if not period and start + size > width:
                report(site, "size", f"the slice [{start}, {start + size}) is outside the module's {width} features ({host_site})", shape)
                continue
            feats = slice_features(start, size, period, width)
            want = ref.sites[site].out
            if want is not None and len(feats) != int(eval_scalar(want, dict(sizes))):
                report(site, "size", f"the slice owns {len(feats)} features; site {site!r} is {want} = {int(eval_scalar(want, dict(sizes)))} wide", shape)
            taken = owners.setdefault(path, {})
            other = next((taken[f] for f in feats if f in taken), None)
            if other is not None:
                report(site, "start", f"the slice overlaps site {other!r}'s slice of {path!r}", shape)
            for f in feats:
                taken.setdefault(f, site)
    return out
