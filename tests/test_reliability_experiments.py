"""Experiments hold the adapter API's guarantees: validate reads what run reads (located errors), the results
database is checked to be pefref's and readable before anything is written, damaged checkpoints restart,
diverged runs give valid JSON."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from pefref.experiments.results import RunRow, load_results
from pefref.experiments.runner import run_experiment
from pefref.language.errors import CatalogError, PefrefError
from pefref.language.experiment_file import load_experiment
from pefref.language.limits import limits

from .test_experiments import DATA, write_exp


def _with_data(tmp_path: Path, train: str, name: str = "train.jsonl", **kw: str) -> Path:
    f = tmp_path / name
    f.write_bytes(train.encode("utf-8") if isinstance(train, str) else train)
    p = write_exp(tmp_path, "  - baseline: head_only", **kw)
    p.write_text(p.read_text().replace(str(DATA / "train.jsonl"), str(f)))
    return p


BAD_DATA = {
    "empty": ("", "no examples"),
    "not-utf8": ('{"text": "ok", "label": "a"}\n{"text": "\xff", "label": "b"}\n'.encode("latin-1"), ":2:"),
    "malformed": ('{"text": "ok", "label": "a"}\n{"text": "x", "label": \n', ":2:"),
    "no-label": ('{"text": "ok", "label": "a"}\n{"text": "no label"}\n{"text": "x", "label": "b"}\n', ":2:1: the row has no label"),
    "null-label": ('{"text": "ok", "label": "a"}\n{"text": "x", "label": null}\n', ":2:1: the row's label"),
    "mixed-types": ('{"text": "ok", "label": "a"}\n{"text": "x", "label": 1}\n', "labels of mixed types"),
    "one-class": ('{"text": "ok", "label": "a"}\n{"text": "x", "label": "a"}\n', "at least two classes"),
    "not-objects": ('[1, 2]\n', ":1:1: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_validate_reads_the_data_as_run_does(tmp_path: Path, case: str) -> None:
    """Each bad data file is a located problem at validate and the same error at run, with nothing recorded."""
    content, message = BAD_DATA[case]
    p = _with_data(tmp_path, content)  # type: ignore[arg-type]
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert "data.train" in str(e.value) and message in str(e.value), str(e.value)
    assert f"{p}:4:" in str(e.value)  # the data line of the experiment file
    with pytest.raises(PefrefError, match="data.train"):
        run_experiment(p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.sqlite").exists()


@pytest.mark.parametrize("training, message", [
    (", max_steps: 100000000000", "max_steps"),
    (", betas: [0.9, 1.5]", "betas"),
    (", weight_decay: -1", "weight_decay"),
    (", device: gpu7", "device"),
    (", batch_size: 0", "batch_size"),
])
def test_training_settings_out_of_range_are_located(tmp_path: Path, training: str, message: str) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only", training=training)
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert message in str(e.value) and f"{p}:9:" in str(e.value), str(e.value)


def test_absent_device_refused_before_recording(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: cuda:999 still tests the index")
    p = write_exp(tmp_path, "  - baseline: head_only", training=", device: cuda")
    load_experiment(p)  # the form is valid
    with pytest.raises(PefrefError, match="training.device"):
        run_experiment(p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_grid_size_is_bounded_before_expansion(tmp_path: Path) -> None:
    axis = "[" + ", ".join(str(i) for i in range(1, 201)) + "]"
    p = write_exp(tmp_path, f"  - technique: lora\n    hyperparameters: {{r: {axis}, alpha: {axis}}}")
    with pytest.raises(CatalogError, match="40,000 runs"):
        load_experiment(p)
    with limits(max_runs=50_000):
        load_experiment(p)


@pytest.mark.parametrize("config", ["{not json", "[1]", '{"hidden_size": 4}'])
def test_broken_model_config_is_located(tmp_path: Path, config: str) -> None:
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text(config)
    p = write_exp(tmp_path, "  - baseline: head_only", model=f"{{path: {ck}}}")
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert "model.path" in str(e.value) and "config.json" in str(e.value)


# --- the results database -----------------------------------------------------------------------


def _foreign(folder: Path) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(folder / "results.sqlite")
    con.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
    con.execute("INSERT INTO invoices VALUES (1, 9.5)")
    con.commit()
    con.close()
    return (folder / "results.sqlite").read_bytes()


def test_someone_elses_database_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _foreign(out)
    with pytest.raises(PefrefError, match="not a pefref results database"):
        load_results(out)
    p = write_exp(tmp_path, "  - baseline: head_only")
    with pytest.raises(PefrefError, match="not a pefref results database"):
        run_experiment(p, out, progress=False)
    assert (out / "results.sqlite").read_bytes() == before
    assert sorted(f.name for f in out.iterdir()) == ["results.sqlite"]  # no -wal, no -shm, no runs/


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_database_is_a_pefref_error(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "out"
    p = write_exp(tmp_path, "  - baseline: head_only")
    run_experiment(p, out, progress=False)
    db = out / "results.sqlite"
    for extra in ("results.sqlite-wal", "results.sqlite-shm"):
        (out / extra).unlink(missing_ok=True)
    raw = db.read_bytes()
    db.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else b"SQLite format 3\x00" + os.urandom(4096))
    for act in (lambda: load_results(out), lambda: run_experiment(p, out, progress=False)):
        with pytest.raises(PefrefError, match="damaged|not a pefref"):
            act()


@pytest.mark.parametrize("which", ["state.pt", "last.safetensors"])
def test_damaged_checkpoint_restarts_the_run(tmp_path: Path, which: str, capfd: pytest.CaptureFixture[str]) -> None:
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}\n  - baseline: head_only", training=", checkpoint_every: 1")

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "o"
    first = run_experiment(p, out, progress=False, on_step=interrupt)
    assert first.interrupted is not None
    run_dir = out / "runs" / first.interrupted
    (run_dir / which).write_bytes(b"torn")
    second = run_experiment(p, out, progress=False)
    assert not second.failed and len(second.done) == 2, second
    assert "damaged" in capfd.readouterr().err
    third = run_experiment(p, out, progress=False)  # every finished run is kept
    assert len(third.skipped) == 2


def test_diverged_run_gives_valid_json() -> None:
    row = RunRow("x", "e", "l", "t", 0, 1.0, "done", 3, 3, 1, 0.1, "loss", {"final": {"loss": math.nan}, "best": None, "best_step": None},
                 None, None, None, None, curve=[(1, "train", {"loss": math.inf})])
    assert row.diverged
    from pefref.cli.app import json_safe

    text = json.dumps(json_safe(row.as_dict()), allow_nan=False)
    assert json.loads(text)["metrics"]["final"]["loss"] is None and json.loads(text)["diverged"] is True


def test_garbled_json_in_the_database_is_a_pefref_error(tmp_path: Path) -> None:
    from pefref.experiments.records import Records

    rec = Records(tmp_path)
    rec.upsert("r1", experiment="e", label="l", technique="t", seed=0, lr=1e-3, config={"x": 1}, status="done")
    rec.log("r1", 1, "train", {"loss": 0.5})
    rec.conn.execute("UPDATE runs SET config = '{broken'")
    rec.conn.execute("UPDATE steps SET metrics = 'nan]'")
    rec.conn.commit()
    rec.close()
    with pytest.raises(PefrefError, match="not JSON"):
        load_results(tmp_path)
