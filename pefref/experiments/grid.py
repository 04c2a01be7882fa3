"""Expand an experiment's grid into runs, each a resolved configuration with a stable hash as its id."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pefref.language.errors import PefrefError
from pefref.language.experiment_file import composition_file, load_experiment
from pefref.language.schema import Experiment
from pefref.language.schema.experiment import GridEntry

__all__ = ["RunSpec", "composition_file", "config_hash", "expand", "file_digest", "load_experiment"]


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: its id (the hash of ``config``), label (without the seed) and resolved configuration."""

    id: str
    label: str
    config: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def lr(self) -> float:
        return float(self.config["lr"])


def config_hash(config: dict[str, Any]) -> str:
    """A stable 16-hex-digit id of a configuration (canonical JSON, sha256)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (data and technique files are identified by content, not by where they lie)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _technique_ref(t: str, root: Path) -> dict[str, Any]:
    if t.endswith((".yaml", ".yml")):
        p = (root / t).resolve()
        return {"technique": str(p), "digest": file_digest(p)}
    return {"technique": t}


def _entry_variants(entry: GridEntry, root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, technique part of the config) for every hyperparameter combination of one grid entry."""
    if entry.baseline:
        return [(entry.name or entry.baseline, {"baseline": entry.baseline})]
    comp = composition_file(entry, root)
    if comp is not None:
        from pefref.language.yamlsrc import read_yaml

        data, _ = read_yaml(comp)
        cid = str(data.get("id", comp.stem))
        return [(entry.name or cid, {"composition": {"id": cid, "file": str(comp), "digest": file_digest(comp)}})]
    if entry.compose:
        uses = [{**_technique_ref(u.technique, root), "hyperparameters": dict(sorted(u.hyperparameters.items()))} for u in entry.compose]
        label = entry.name or "+".join(Path(u.technique).stem for u in entry.compose)
        return [(label, {"compose": uses})]
    assert entry.technique is not None
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in sorted(entry.hyperparameters.items())}
    base = entry.name or Path(entry.technique).stem
    out = []
    for combo in itertools.product(*axes.values()):
        hps = dict(zip(axes, combo))
        varying = [f"{k}={_fmt(v)}" for k, v in hps.items() if len(axes[k]) > 1]
        label = " ".join([base, *varying])
        out.append((label, {"compose": [{**_technique_ref(entry.technique, root), "hyperparameters": hps}]}))
    return out


def expand(exp: Experiment, path: str | Path) -> list[RunSpec]:
    """Every run of the experiment, in grid order (entry × hyperparameters × learning rate × seed).

    Data files enter the configuration by content digest, so a run's id does not
    depend on where the experiment lies; the model by shape name, package name or
    checkpoint digest.
    """
    root = Path(path).resolve().parent
    model: dict[str, Any] = exp.model.model_dump(exclude_none=True)
    if exp.model.path:
        folder = root / exp.model.path
        model = {**model, "path": str(folder.resolve()), "digest": file_digest(folder / "config.json")}
    data = {**exp.data.model_dump(exclude_none=True),
            "train": file_digest(root / exp.data.train), "eval": file_digest(root / exp.data.eval)}
    common = {"experiment": exp.id, "model": model, "task": exp.task.model_dump(), "data": data,
              "training": exp.training.model_dump(mode="json", exclude={"tensorboard", "threads", "log_every", "eval_batch_size", "distributed"})}
    if exp.calibration is not None:  # only where given: the ids of runs without it are unchanged
        common["calibration"] = exp.calibration.model_dump()
    runs: list[RunSpec] = []
    seen: dict[str, str] = {}
    for entry in exp.grid:
        lrs = entry.learning_rates or exp.learning_rates
        for label, part in _entry_variants(entry, root):
            for lr in lrs:
                full_label = label if len(lrs) == 1 else f"{label} lr={_fmt(lr)}"
                for seed in exp.seeds:
                    cfg = {**common, **part, "label": full_label, "lr": lr, "seed": seed}
                    rid = config_hash({k: v for k, v in cfg.items() if k != "label"})
                    if rid in seen:
                        raise PefrefError(f"grid entries {seen[rid]!r} and {full_label!r} describe the same run")
                    seen[rid] = full_label
                    runs.append(RunSpec(rid, full_label, cfg))
    return runs
