"""Derived facts about techniques: typology, parameter counts, efficiency (no torch at import)."""

from __future__ import annotations

from typing import Any

__all__ = ["derived_facts"]


def derived_facts(t: Any, catalog: Any, shape: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything pefref derives about ``t``: its typology row (declared values marked),
    its parameter formula and count on ``shape``, and its efficiency facts there."""
    from pefref.view.costs import efficiency
    from pefref.view.params import count_params
    from pefref.view.typology import derive_typology

    typ = derive_typology(t, catalog.reference, catalog.techniques)
    pc = count_params(t, shape, catalog, overrides)
    eff = efficiency(t, shape, catalog, overrides)
    return {
        "typology": {k: v for k, v in typ.as_dict().items() if k != "id"},
        "parameters": {"formula": pc.formula, "model": shape.name, "trainable": pc.trainable, "base_params": pc.base, "percent": round(pc.percent, 6)},
        "efficiency": {
            "mergeable": eff.mergeable,
            "mergeability": eff.mergeability,
            "latency_class": eff.latency,
            "extra_tokens": eff.extra_tokens,
            "extra_kv_per_layer": eff.extra_kv_per_layer,
            "extra_flops_per_token": eff.flops_per_token,
            "extra_flops_per_token_merged": eff.flops_per_token_merged,
        },
    }
