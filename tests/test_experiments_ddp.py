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
from pefref.experiments.evaluation import evaluate
from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment
from tests.distributed_worker import eval_examples, logits, run_model
from tests.test_experiments import write_exp

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = "{shape: tiny-bert, config: {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}"
"""No dropout: each process draws its own masks for its slice of the batch."""


FAILURE_MARKS = ("Fatal Python error", "terminate called", "Traceback (most recent call last)")
"""Where a worker's own failure starts in torchrun's output (the agent's summary comes after it)."""


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, _first_failure(r.stdout + r.stderr)


def _first_failure(out: str) -> str:
    """The output from the first worker failure on (its stack), not only the agent's summary at the end."""
    starts = [i for i in (out.find(m) for m in FAILURE_MARKS) if i >= 0]
    return out[min(starts):][:8000] if starts else out[-6000:]


def _same_run(one_dir: Path, two_dir: Path, *, world: int) -> float:
    """Assert every run of ``two_dir`` is done and equals the same run in ``one_dir`` (final metrics, training curve,
    adapter tensors within 1e-5); returns the largest tensor difference."""
    one = {r.id: r for r in load_results(one_dir).runs}
    two = load_results(two_dir).runs
    assert two and all(r.status == "done" and r.id in one for r in two)
    with contextlib.closing(__import__("sqlite3").connect(two_dir / "results.sqlite")) as con:
        assert {w for (w,) in con.execute("SELECT world_size FROM runs")} == {world}
    worst = 0.0
    for run in two:
        a = load_tensors(one_dir / "runs" / run.id / "adapter.safetensors")
        b = load_tensors(two_dir / "runs" / run.id / "adapter.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("adapter.") for k in a)
        worst = max(worst, *(float((a[k] - b[k]).abs().max()) for k in a))
        assert worst <= 1e-5, (run.label, worst)
        assert all(float(a[k].abs().max()) > 0 for k in a if k.endswith(".B"))  # LoRA's B starts at zero: training moved it
        for k in one[run.id].final:
            assert abs(one[run.id].final[k] - run.final[k]) <= 1e-5, (run.label, k)
        trains = [[m["loss"] for _, s, m in r.curve if s == "train"] for r in (one[run.id], run)]
        assert len(trains[0]) == 6 and max(abs(x - y) for x, y in zip(*trains)) <= 1e-5
        assert [s for s, _, _ in one[run.id].curve] == [s for s, _, _ in run.curve]  # no step recorded twice
    return worst


def test_ddp_equals_one_and_resumes(tmp_path: Path) -> None:
    """One torchrun launch (tests/distributed_worker.py): `pefref run` with DDP, and a run interrupted and resumed."""
    # accumulation on, so no_sync micro-batches are exercised
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}", training=", grad_accum: 2, distributed: ddp", model=NO_DROPOUT)
    assert len(run_experiment(p, tmp_path / "one", progress=False).done) == 1
    _torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(p), str(tmp_path))
    _same_run(tmp_path / "one", tmp_path / "straight", world=2)
    assert load_state(tmp_path / "interrupted-state.pt")["progress"]["step"] == 3
    _same_run(tmp_path / "straight", tmp_path / "resumed", world=2)  # every process resumed (not only rank 0)


def test_fsdp_equals_one_resumes_and_shards(tmp_path: Path) -> None:
    """One torchrun launch (tests/distributed_worker.py): the CLI run, an interrupted and resumed run, the sharded model."""
    # prompt tuning calls the input embedding outside its block (BERT's embeddings are one): its own FSDP unit
    grid = "  - technique: lora\n    hyperparameters: {r: 2}\n  - technique: prompt_tuning\n    hyperparameters: {n: 2}"
    p = write_exp(tmp_path, grid, training=", grad_accum: 2, distributed: fsdp", model=NO_DROPOUT)
    assert len(run_experiment(p, tmp_path / "one", progress=False).done) == 2
    _torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(p), str(tmp_path))

    # 2 FSDP2 processes (`pefref run` under torchrun) equal one process
    assert len(load_results(tmp_path / "straight").runs) == 2
    _same_run(tmp_path / "one", tmp_path / "straight", world=2)

    # interrupted after step 3 and resumed: equals the uninterrupted FSDP run (and so one process)
    saved = load_state(tmp_path / "interrupted-state.pt")
    assert saved["progress"]["step"] == 3  # the last checkpoint is the one the Ctrl-C wrote
    moments = saved["optimizer"]["state"]  # the optimizer's state, gathered by rank 0 and keyed by parameter name
    assert any(".lora_" in k for k in moments) and all(float(v["exp_avg_sq"].abs().max()) > 0 for v in moments.values())
    assert [r.label for r in load_results(tmp_path / "resumed").runs] == ["lora"]
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
