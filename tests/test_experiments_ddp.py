"""Distributed training: ``torchrun --nproc_per_node 2 -m pefref run`` (DDP, or FSDP2 with ``distributed: fsdp``;
gloo on CPU) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefref.experiments.checkpoint import load_tensors
from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment
from tests.test_experiments import write_exp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path: Path, kind: str) -> None:
    # no dropout: each process draws its own masks; accumulation on, so no_sync micro-batches are exercised
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}", training=f", grad_accum: 2, distributed: {kind}",
                  model="{shape: tiny-bert, config: {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}")
    single = run_experiment(p, tmp_path / "one", progress=False)
    assert len(single.done) == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pefref", "run", str(p), "-o", str(tmp_path / "two"), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = load_results(tmp_path / "one").runs, load_results(tmp_path / "two").runs
    assert len(two) == 1 and two[0].status == "done" and two[0].id == one[0].id
    con_two = __import__("sqlite3").connect(tmp_path / "two" / "results.sqlite")
    assert con_two.execute("SELECT world_size FROM runs").fetchone()[0] == 2
    a = load_tensors(tmp_path / "one" / "runs" / one[0].id / "adapter.safetensors")
    b = load_tensors(tmp_path / "two" / "runs" / two[0].id / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("adapter.") for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff
    assert [k for k in a if k.endswith(".B")] and all(float(a[k].abs().max()) > 0 for k in a if k.endswith(".B"))  # B starts at zero: training moved it
    for k in one[0].final:
        assert abs(one[0].final[k] - two[0].final[k]) <= 1e-5, k
    trains = [[m["loss"] for _, s, m in run.curve if s == "train"] for run in (one[0], two[0])]
    assert len(trains[0]) == 6 and max(abs(x - y) for x, y in zip(*trains)) <= 1e-5
