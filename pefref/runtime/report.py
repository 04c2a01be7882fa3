"""The placement report: what an applied technique put where, and how many parameters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Report", "ReportRow", "fold_paths"]


@dataclass
class ReportRow:
    site: str
    module: str
    paths: list[str]
    layers: list[int | None]
    params_per_placement: int
    params: int


@dataclass
class Report:
    """What went where: per module and site, the matched paths and parameters."""

    technique: str
    family: str
    rows: list[ReportRow]
    trainable: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "family": self.family,
            "trainable": self.trainable,
            "base_params": self.base,
            "percent": round(self.percent, 6),
            "placements": [
                {"site": r.site, "module": r.module, "paths": fold_paths(r.paths), "count": len(r.paths), "layers": r.layers,
                 "params_per_placement": r.params_per_placement, "params": r.params}
                for r in self.rows
            ],
        }


def fold_paths(paths: Sequence[str]) -> list[str]:
    """Fold repeated layer paths: model.layers.{0..31}.self_attn.q_proj."""
    groups: dict[str, list[int]] = {}
    singles: list[str] = []
    for p in paths:
        m = re.search(r"\.(\d+)\.", p) or re.search(r"\[(\d+)\]", p)
        if not m:
            singles.append(p)
            continue
        key = p[: m.start(1)] + "{}" + p[m.end(1):]
        groups.setdefault(key, []).append(int(m.group(1)))
    out = list(singles)
    for key, idx in groups.items():
        idx = sorted(idx)
        if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
            out.append(key.replace("{}", "{" + f"{idx[0]}..{idx[-1]}" + "}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idx)) + "}") if len(idx) > 1 else key.replace("{}", str(idx[0])))
    return out
