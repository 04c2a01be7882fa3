"""Experiments with a technique initialised from data: ``pefref run`` gathers the statistics on the experiment's
``calibration:`` batches (the real MiniLM of catalog/experiments/minilm_rt_polarity.yaml, CorDA, EVA and LoRA-GA, a few steps)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.experiments.grid import expand, load_experiment
from pefref.language.errors import CatalogError

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / "catalog" / "experiments" / "minilm_rt_polarity.yaml"


def _minilm(folder: Path, calibration: dict | None, technique: str = "corda") -> Path:
    """The MiniLM experiment cut to one run of ``technique`` of two steps on a few examples (data paths made absolute)."""
    exp = yaml.safe_load(MINILM.read_text())
    exp["data"] = {**{k: str(MINILM.parent / v) for k, v in exp["data"].items()}, "limit_train": 16, "limit_eval": 8}
    exp["grid"] = [{"technique": technique, "hyperparameters": {"r": 2}, "learning_rates": [5.0e-3]}]
    exp["seeds"] = [0]
    exp["training"] = {**exp["training"], "max_steps": 2, "eval_every": 2, "batch_size": 8, "threads": 1}
    exp["training"].pop("epochs", None)
    if calibration is not None:
        exp["calibration"] = calibration
    p = folder / f"minilm_{technique}.yaml"
    p.write_text(yaml.safe_dump(exp))
    return p


@pytest.mark.given_calibration
@pytest.mark.parametrize("technique", ["corda", "eva", "lora_ga"])
def test_pefref_run_trains_on_minilm_from_calibration_batches(tmp_path: Path, technique: str) -> None:
    path = _minilm(tmp_path, {"batches": 2, "batch_size": 2}, technique)
    exp, _pos = load_experiment(path)
    (spec,) = expand(exp, path)
    assert spec.config["calibration"] == {"split": "train", "batches": 2, "batch_size": 2}  # part of the run's identity
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    status, trainable, error = con.execute("select status, trainable, error from runs").fetchone()
    assert status == "done" and error is None
    assert trainable > 2 * 6 * 2 * (384 + 384)  # A and B at the six projections of six layers, plus the head
    steps = con.execute("select count(*) from steps").fetchone()[0]
    assert steps >= 2


def test_an_experiment_without_calibration_batches_is_refused_at_validate(tmp_path: Path) -> None:
    path = _minilm(tmp_path, None)
    with pytest.raises(CatalogError, match=r"corda initialises from calibration statistics: give the experiment a calibration: section"):
        load_experiment(path)
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code != 0 and "calibration: section" in r.output, r.output
