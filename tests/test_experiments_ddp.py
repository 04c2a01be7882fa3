"""Distributed training: ``torchrun --nproc_per_node 2 -m pefref run`` (DDP, or FSDP2 with ``distributed: fsdp``;
gloo on CPU) equals one process with the same global batch; FSDP2 shards the base model, resumes exactly, and
its adapter checkpoint loads into a plain model."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from pefref.experiments.checkpoint import load_state, load_tensors
from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment
from pefref.experiments.train import evaluate
from tests.fsdp_worker import eval_examples, logits, run_model
from tests.test_experiments import write_exp

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = "{shape: tiny-bert, config: {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}"
"""No dropout: each process draws its own masks for its slice of the batch."""


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _same_run(one_dir: Path, two_dir: Path, *, world: int) -> float:
    """Assert the two folders hold the same finished run (final metrics, training curve, adapter within 1e-5); the largest tensor difference."""
    one, two = load_results(one_dir).runs, load_results(two_dir).runs
    assert len(one) == len(two) == 1 and two[0].status == "done" and two[0].id == one[0].id
    with contextlib.closing(__import__("sqlite3").connect(two_dir / "results.sqlite")) as con:
        assert con.execute("SELECT world_size FROM runs").fetchone()[0] == world
    a = load_tensors(one_dir / "runs" / one[0].id / "adapter.safetensors")
    b = load_tensors(two_dir / "runs" / two[0].id / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("adapter.") for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff
    assert [k for k in a if k.endswith(".B")] and all(float(a[k].abs().max()) > 0 for k in a if k.endswith(".B"))  # B starts at zero: training moved it
    for k in one[0].final:
        assert abs(one[0].final[k] - two[0].final[k]) <= 1e-5, k
    trains = [[m["loss"] for _, s, m in run.curve if s == "train"] for run in (one[0], two[0])]
    assert len(trains[0]) == 6 and max(abs(x - y) for x, y in zip(*trains)) <= 1e-5
    assert [s for s, _, _ in one[0].curve] == [s for s, _, _ in two[0].curve]  # no step recorded twice
    return diff


def test_two_processes_equal_one_ddp(tmp_path: Path) -> None:
    # accumulation on, so no_sync micro-batches are exercised
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}", training=", grad_accum: 2, distributed: ddp", model=NO_DROPOUT)
    assert len(run_experiment(p, tmp_path / "one", progress=False).done) == 1
    _torchrun("-m", "pefref", "run", str(p), "-o", str(tmp_path / "two"), "--no-progress")
    _same_run(tmp_path / "one", tmp_path / "two", world=2)


def test_fsdp_equals_one_resumes_and_shards(tmp_path: Path) -> None:
    """One torchrun launch (tests/fsdp_worker.py): the CLI run, an interrupted and resumed run, the sharded model."""
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}", training=", grad_accum: 2, distributed: fsdp", model=NO_DROPOUT)
    assert len(run_experiment(p, tmp_path / "one", progress=False).done) == 1
    _torchrun(str(ROOT / "tests" / "fsdp_worker.py"), str(p), str(tmp_path))

    # 2 FSDP2 processes (`pefref run` under torchrun) equal one process
    _same_run(tmp_path / "one", tmp_path / "straight", world=2)

    # interrupted after step 3 and resumed: equals the uninterrupted FSDP run (and so one process)
    saved = load_state(tmp_path / "interrupted-state.pt")
    assert saved["progress"]["step"] == 3  # the last checkpoint is the one the Ctrl-C wrote
    moments = saved["optimizer"]["state"]  # the optimizer's state, gathered by rank 0 and keyed by parameter name
    assert any(".lora_" in k for k in moments) and all(float(v["exp_avg_sq"].abs().max()) > 0 for v in moments.values())
    _same_run(tmp_path / "straight", tmp_path / "resumed", world=2)
    _same_run(tmp_path / "one", tmp_path / "resumed", world=2)

    # each process holds half of the model's parameter bytes, the frozen base included
    shards = torch.load(tmp_path / "shards.pt", weights_only=True)
    full, local = shards["full_bytes"], shards["local_bytes"]
    assert shards["types"] == ["DTensor"] and len(local) == 2
    assert all(b < full for b in local) and sum(local) >= full
    assert all(abs(b - full / 2) <= 0.01 * full for b in local), (local, full)

    # the checkpoint written under FSDP loads into a plain single-process model: same logits as the sharded model,
    # same evaluation metrics as the FSDP run recorded
    model, prep, tok, spec = run_model(p)
    assert not any(hasattr(q, "to_local") for q in model.parameters())
    prep.load_state(load_tensors(tmp_path / "straight" / "runs" / spec.id / "adapter.safetensors"))
    ex = eval_examples(p, tok, spec)
    assert float((logits(model, ex, tok.pad_token_id) - shards["logits"]).abs().max()) <= 1e-5
    m = evaluate(model, ex, tok.pad_token_id, False, 8, "cpu", contextlib.nullcontext)
    recorded = load_results(tmp_path / "straight").runs[0].final
    assert max(abs(m[k] - recorded[k]) for k in recorded) <= 1e-5
