"""Started by ``tests/test_experiments_ddp.py`` under torchrun with 2 processes (gloo, CPU): one launch, three checks.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py EXPERIMENT OUT``

1. ``pefref run EXPERIMENT -o OUT/straight`` through the command line, uninterrupted;
2. the experiment's first run (LoRA) into ``OUT/resumed``, stopped by a Ctrl-C (SIGINT) in rank 0 after step 3 (its
   checkpoint is copied to ``OUT/interrupted-state.pt``), then the same call again, which resumes it;
3. with ``training.distributed: fsdp``, that run's model built and sharded again as training shards it: every rank's parameter bytes, and the
   logits of the sharded model with ``OUT/straight``'s adapter checkpoint loaded (rank 0 writes them to
   ``OUT/shards.pt``).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from pefref.experiments.checkpoint import load_tensors
from pefref.experiments.data import Examples, collate, load_examples, read_table
from pefref.experiments.distributed import exit_process
from pefref.experiments.grid import RunSpec, expand, load_experiment
from pefref.experiments.tasks import Prepared, build_task_model, prepare_run
from pefref.language.catalog import default_catalog

__all__ = ["eval_examples", "logits", "main", "run_model"]


def run_model(exp_path: Path) -> tuple[torch.nn.Module, Prepared, Any, RunSpec]:
    """The experiment's first run as training builds it (same seed, same adapter): model, Prepared, tokenizer, RunSpec."""
    exp, _ = load_experiment(exp_path)
    spec = expand(exp, exp_path)[0]
    cfg, catalog = spec.config, default_catalog()
    labels = len(set(map(str, read_table(exp_path.parent / exp.data.train)[exp.data.label])))
    torch.manual_seed(spec.seed)
    model, tok = build_task_model(cfg["model"], cfg["task"]["type"], labels, catalog)
    return model, prepare_run(model, cfg, exp_path.parent, catalog), tok, spec


def eval_examples(exp_path: Path, tok: Any, spec: RunSpec) -> Examples:
    exp, _ = load_experiment(exp_path)
    return load_examples(exp_path.parent / exp.data.eval, exp.data.text, exp.data.label, tok, spec.config["task"]["max_length"], exp.data.limit_eval)


@torch.no_grad()
def logits(model: torch.nn.Module, ex: Examples, pad_id: int) -> torch.Tensor:
    """The model's logits on every evaluation example, as one batch."""
    model.eval()
    b = collate(ex, list(range(len(ex))), pad_id, False)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach().clone()


def main(exp_path: Path, out: Path) -> None:
    import torch.distributed as dist

    from pefref.cli.app import app
    from pefref.experiments.distributed import init, parameter_bytes
    from pefref.experiments.runner import run_experiment
    from pefref.experiments.train import _shard

    app(["run", str(exp_path), "-o", str(out / "straight"), "--no-progress"], standalone_mode=False)
    rank = int(os.environ["RANK"])

    def interrupt(step: int) -> None:
        if step == 3 and rank == 0:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in one process only: every process stops after this step

    first = run_experiment(exp_path, out / "resumed", progress=False, on_step=interrupt, only="lora")
    assert first.interrupted is not None and not first.done, first
    if rank == 0:  # the checkpoint the Ctrl-C wrote (the resumed run overwrites it)
        shutil.copy(out / "resumed" / "runs" / first.interrupted / "state.pt", out / "interrupted-state.pt")
    second = run_experiment(exp_path, out / "resumed", progress=False, only="lora")
    assert len(second.done) == 1, second

    d = init("cpu")
    if load_experiment(exp_path)[0].training.distributed != "fsdp":
        dist.barrier()  # every process leaves together (the group is destroyed at exit)
        return
    model, prep, tok, spec = run_model(exp_path)
    _shard(model, prep, d)
    local, full = parameter_bytes(model)
    types = sorted({type(p).__name__ for p in model.parameters()})
    ranks: list[Any] = [None] * d.world
    dist.all_gather_object(ranks, local)
    prep.load_state(load_tensors(out / "straight" / "runs" / spec.id / "adapter.safetensors"))
    y = logits(model, eval_examples(exp_path, tok, spec), tok.pad_token_id)
    if d.main:
        torch.save({"local_bytes": ranks, "full_bytes": full, "types": types,
                    "logits": y}, out / "shards.pt")
    dist.barrier()


if __name__ == "__main__":
    faulthandler.enable()
    faulthandler.dump_traceback_later(int(os.environ.get("PEFREF_TEST_HANG_S", "1080")), exit=True)  # a hung collective: stacks, then exit
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except BaseException:
        traceback.print_exc()
        exit_process(1)
    exit_process(0)  # done: leave without the interpreter's teardown (as `torchrun -m pefref` does)
