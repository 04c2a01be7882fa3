"""Facts for choosing a technique and comparing techniques at matched settings, derived from structure.

* :func:`size_hyperparameters`: the integer hyperparameters a technique's trainable
  tensors (or its prepended length) are sized by (LoRA's rank, an adapter's
  bottleneck, prompt tuning's number of tokens).
* :func:`family_facts`: whether the technique folds into the weights on a family
  and whether it then adds no latency (the derivations the runtime's merge uses).
* :func:`backbone_backward`: whether training has to back-propagate through the
  frozen backbone (False for side networks that leave the backbone's hidden
  states unchanged and change only the last layer's output).
* :func:`matched_counts`: trainable counts with the size hyperparameter set to
  each of a few values, and with the technique placed on other sites.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pefref.language.catalog import Catalog
from pefref.language.check import expand_modules
from pefref.language.errors import PefrefError
from pefref.language.schema import ModelShape, Technique
from pefref.language.sizes import select_layers

__all__ = ["FamilyFacts", "MatchedCount", "SIZE_VALUES", "SITE_SETS", "size_hyperparameters", "family_facts",
           "backbone_backward", "matched_counts"]

SIZE_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)
"""The values the compare page can set a technique's size hyperparameter to (counted at build time)."""

SITE_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "q, v": ("attn.q", "attn.v"),
    "q, k, v, o": ("attn.q", "attn.k", "attn.v", "attn.o"),
}
"""Placements the compare page can put every technique on (the empty set: the technique's own sites)."""

_NAME = re.compile(r"[A-Za-z_]\w*")
_AFTER_LAST_LAYER = ("final.norm", "head")  # sites after every layer: a change there needs no backward through a layer


@dataclass(frozen=True)
class FamilyFacts:
    """What a technique costs at inference on one family."""

    family: str
    mergeable: bool
    latency: str
    no_added_latency: bool


@dataclass(frozen=True)
class MatchedCount:
    """Trainable parameters with the size hyperparameter at ``value`` (None: the default) on ``sites``."""

    sites: str
    value: int | None
    trainable: int | None  # None: not applicable (the reason in ``why``)
    why: str = ""
    hyperparameters: dict[str, int] = field(default_factory=dict)


def size_hyperparameters(t: Technique, catalog: Catalog) -> list[str]:
    """Integer hyperparameters that appear in a trainable tensor's shape or in a prepended length, in declaration order."""
    modules, decl = expand_modules(t, {**catalog.techniques, t.id: t})
    used: set[str] = set()
    for m in modules:
        for spec in getattr(m, "params", {}).values():
            if spec.trainable:
                used |= {n for d in spec.shape if isinstance(d, str) for n in _NAME.findall(d)}
        length = getattr(m, "length", None)
        if isinstance(length, str):
            used |= set(_NAME.findall(length))
    return [k for k, hp in decl.items() if k in used and getattr(hp, "type", None) == "int"]


def family_facts(t: Technique, catalog: Catalog) -> list[FamilyFacts]:
    """Mergeability and latency class on every family (sorted by family)."""
    from pefref.view.costs import latency_class, merge_map

    modules, _ = expand_modules(t, {**catalog.techniques, t.id: t})
    out = []
    for name in sorted(catalog.families):
        fam = catalog.families[name]
        merge = merge_map(modules, catalog, fam)
        latency = latency_class(modules, catalog, fam)
        out.append(FamilyFacts(name, all(merge.values()), latency, latency == "none once merged"))
    return out


def backbone_backward(t: Technique, catalog: Catalog, L: int = 12) -> bool:
    """Whether training back-propagates through frozen backbone layers.

    A module whose result leaves the host unchanged (``integrate: h``: a side network
    reading the backbone) needs none; nor does one that changes only what follows the
    last layer. Any other module sits before a frozen layer, so the gradient crosses it.
    """
    modules, _ = expand_modules(t, {**catalog.techniques, t.id: t})
    for m in modules:
        if getattr(m, "integrate", None) == "h":
            continue
        for site in m.sites:
            if site in _AFTER_LAST_LAYER:
                continue
            if site == "layer" and select_layers(m.layers, L) == [L - 1]:
                continue
            return True
    return False


def matched_counts(t: Technique, shape: ModelShape, catalog: Catalog, values: Sequence[int] = SIZE_VALUES,
                   site_sets: dict[str, tuple[str, ...]] | None = None) -> list[MatchedCount]:
    """Counts on ``shape`` for each site set and each value of the first size hyperparameter (plus the default)."""
    from pefref.view.params import count_params

    knobs = size_hyperparameters(t, catalog)
    out = []
    for label, sites in (SITE_SETS if site_sets is None else site_sets).items():
        for value in (None, *values) if knobs else (None,):
            hps = {knobs[0]: value} if value is not None else {}
            try:
                pc = count_params(t, shape, catalog, overrides=hps or None, sites=list(sites) or None, formula=False)
            except PefrefError as e:
                out.append(MatchedCount(label, value, None, str(e).split("\n")[0], hps))
                continue
            if pc.trainable == 0 and pc.dropped:
                out.append(MatchedCount(label, value, None, "; ".join(pc.dropped), hps))
            else:
                out.append(MatchedCount(label, value, pc.trainable, "", hps))
    return out
