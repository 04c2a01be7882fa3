"""Derived facts about a composition: what each member and each block adds, on a model shape.

Analytic, as :mod:`pefref.view.params`: each member's count is its technique's
count with the composition's hyperparameters, sites and layers; a fusion block
adds its attention (``Q``, ``b_Q``, ``K``, ``b_K``, ``V``: ``3·d² + 2·d`` per
host, ``d`` the site's output width) at every host where two or more of its
adapters meet; with ``train_adapters: false`` the fused adapters are frozen,
so they count as parameters but not as trainable. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pefref.language.catalog import Catalog
from pefref.language.composition import ResolvedComposition, block_sites
from pefref.language.forms import BLOCKS, Combine, block_of
from pefref.language.schema import ModelShape
from pefref.language.sizes import eval_scalar, model_sizes, select_layers
from pefref.view.analysis import connected_modules, mergeable_on
from pefref.view.params import count_params, host_widths
from pefref.view.summary import layers_text, paper_link

__all__ = ["MemberCount", "BlockCount", "CompositionCount", "count_composition", "composition_summary", "block_hosts",
           "frozen_adapters", "FOLDING_BLOCKS", "block_merge_problem", "member_merge_problem", "composition_merge_problems"]

FOLDING_BLOCKS = tuple(b.name for b in BLOCKS.values() if b.folds)
"""Block kinds whose combination is a linear function of the members' maps (so it folds into the weights)."""


@dataclass
class MemberCount:
    name: str
    technique: str
    params: int
    trainable: bool
    formula: str


@dataclass
class BlockCount:
    index: int
    kind: str
    adapters: list[str]
    sites: list[str]
    hosts: int
    params: int


@dataclass
class CompositionCount:
    composition: str
    model: str
    members: list[MemberCount]
    blocks: list[BlockCount]
    base: int
    total: int = 0
    trainable: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"composition": self.composition, "model": self.model,
                "members": [m.__dict__ for m in self.members], "blocks": [b.__dict__ for b in self.blocks],
                "parameters": self.total, "trainable": self.trainable, "base_params": self.base, "percent": round(self.percent, 6)}


def _layers_at(res: ResolvedComposition, name: str, site: str, L: int, per_layer: bool) -> set[int | None]:
    out: set[int | None] = set()
    for m in res.modules_at(name, site):
        out |= set(select_layers(m.layers, L)) if per_layer else {None}
    return out


def block_hosts(res: ResolvedComposition, b: int, shape: ModelShape, catalog: Catalog) -> list[tuple[str, int | None]]:
    """The hosts (site, layer) where block ``b`` combines two or more of its adapters on ``shape``."""
    blk = res.composition.blocks[b]
    fam = catalog.family(shape.family)
    L = model_sizes(fam, dict(shape.config))["L"]
    out: list[tuple[str, int | None]] = []
    for site in block_sites(res, list(blk.adapters), blk.sites):
        if site not in fam.sites:
            continue
        per_layer = catalog.reference.sites[site].per_layer
        seen: dict[int | None, int] = {}
        for a in blk.adapters:
            for i in _layers_at(res, a, site, L, per_layer):
                seen[i] = seen.get(i, 0) + 1
        out += [(site, i) for i, n in sorted(seen.items(), key=lambda kv: -1 if kv[0] is None else kv[0]) if n >= 2]
    return out


def frozen_adapters(res: ResolvedComposition) -> set[str]:
    """The adapters a fusion block freezes (``train_adapters: false``): parameters, but not trainable."""
    return {a for blk in res.composition.blocks if block_of(blk).combine is Combine.ATTENTION and not getattr(blk, "train_adapters", True) for a in blk.adapters}


def count_composition(res: ResolvedComposition, shape: ModelShape, catalog: Catalog) -> CompositionCount:
    """Per-member and per-block parameter counts of ``res`` on ``shape``, and the totals."""
    fam = catalog.family(shape.family)
    sizes = model_sizes(fam, dict(shape.config))
    frozen = frozen_adapters(res)
    members = []
    for name, t in zip(res.techniques, res.drawable()):  # drawable(): one technique per adapter, in order
        pc = count_params(t, shape, catalog)
        members.append(MemberCount(name, res.techniques[name].id, pc.trainable, name not in frozen, pc.formula))
    blocks = []
    for b, blk in enumerate(res.composition.blocks):
        hosts = block_hosts(res, b, shape, catalog)
        n = 0
        if block_of(blk).combine is Combine.ATTENTION:  # Q, K [d, d] with biases and V [d, d] per host
            for site, _i in hosts:
                d = int(eval_scalar(host_widths(site, fam, catalog)[1], sizes))
                n += 3 * d * d + 2 * d
        blocks.append(BlockCount(b, blk.kind, list(blk.adapters), sorted({s for s, _i in hosts}), len(hosts), n))
    out = CompositionCount(res.composition.id, shape.name, members, blocks, int(eval_scalar(fam.base_params, {**sizes, **shape.config})))
    out.total = sum(m.params for m in members) + sum(b.params for b in blocks)
    out.trainable = sum(m.params for m in members if m.trainable) + sum(b.params for b in blocks)
    return out


def composition_summary(res: ResolvedComposition) -> dict[str, Any]:
    """Everything ``pefref show COMPOSITION.yaml`` prints about it, as plain data (counts added by the caller)."""
    comp = res.composition
    papers = []
    for p in comp.papers:
        d = p.model_dump(mode="json", exclude_none=True)
        d["link"] = f"https://arxiv.org/abs/{p.arxiv}" if p.arxiv else str(p.url)
        papers.append(d)
    techniques = []
    for use in comp.techniques:
        t = res.techniques[use.name]
        techniques.append({
            "name": use.name, "technique": t.id, "technique_name": t.name, "paper": paper_link(t),
            "hyperparameters": dict(res.hyperparameters[use.name]),
            "sites": res.sites[use.name] or sorted({s for m in t.modules for s in m.sites}),  # type: ignore[union-attr]
            "layers": layers_text(use.layers) if use.layers is not None else "as the technique",
        })
    blocks = []
    for blk in comp.blocks:
        d = blk.model_dump(mode="json", exclude_none=True, exclude={"sites"})
        d["sites"] = block_sites(res, list(blk.adapters), blk.sites)
        blocks.append(d)
    out: dict[str, Any] = {"id": comp.id, "name": comp.name, "kind": "composition", "summary": comp.summary, "papers": papers,
                           "techniques": techniques, "blocks": blocks, "notes": comp.notes}
    if res.source is not None:
        out["file"] = str(res.source)
    return out


def block_merge_problem(index: int | str, kind: str, adapters: list[str]) -> str:
    """Why block ``index`` (of a kind not in :data:`FOLDING_BLOCKS`) keeps a composition from merging."""
    return (f"blocks[{index}] ({kind} over {', '.join(adapters)}) cannot be merged: "
            "a learned attention over the adapters' outputs is not a linear map of the host's input")


def member_merge_problem(name: str, technique: str, modules: list[str]) -> str:
    """Why adapter ``name`` keeps a composition from merging: its ``modules`` do not fold into their hosts."""
    return f"adapter {name!r} ({technique}): module{'s' * (len(modules) != 1)} {', '.join(modules)} cannot be merged"


def composition_merge_problems(res: ResolvedComposition, shape: ModelShape, catalog: Catalog) -> list[str]:
    """Why ``Composition.merge()`` refuses ``res`` on a model of ``shape`` (empty: it merges), without building it.

    The runtime's checks on structure alone: every block that meets at a host
    folds (:data:`FOLDING_BLOCKS`), and every member's modules fold at their
    hosts on the shape's family (:func:`pefref.view.analysis.mergeable_on`, the
    derivation the runtime's merge uses).
    """
    fam = catalog.family(shape.family)
    out = [block_merge_problem(b, blk.kind, list(blk.adapters)) for b, blk in enumerate(res.composition.blocks)
           if blk.kind not in FOLDING_BLOCKS and block_hosts(res, b, shape, catalog)]
    for name, drawn in zip(res.techniques, res.drawable()):
        conn = connected_modules(res.techniques[name].modules)
        bad = sorted({str(m.name) for m in drawn.modules if any(s in fam.sites for s in m.sites)  # type: ignore[union-attr]
                      and not mergeable_on(m, catalog.reference, fam, m.name in conn)})
        if bad:
            out.append(member_merge_problem(name, res.techniques[name].id, bad))
    return out
