"""``training.compile``: a compiled training run matches the eager one and does not recompile per batch length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.experiments import compiled as compiled_mod
from pefref.experiments import train as train_mod
from pefref.experiments.checkpoint import load_tensors
from pefref.experiments.compiled import use_compile
from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "catalog" / "experiments" / "data" / "rt_polarity"
STEPS = 6


def _experiment(folder: Path, compile_: str) -> Path:
    p = folder / f"c_{compile_}.yaml"
    p.write_text(f"""id: c
model: {{shape: tiny-bert, config: {{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0, max_position_embeddings: 256}}}}
task: {{type: sequence_classification, max_length: 256}}
data: {{train: {DATA / 'train.jsonl'}, eval: {DATA / 'test.jsonl'}, limit_train: 64, limit_eval: 16}}
grid:
  - technique: lora
    hyperparameters: {{r: 2}}
learning_rates: [1.0e-2]
seeds: [0]
training: {{batch_size: 8, max_steps: {STEPS}, eval_every: {STEPS}, group_by_length: true, threads: 1, compile: {compile_}}}
""")
    return p


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    (run,) = load_results(out).runs
    assert run.status == "done" and run.step == STEPS
    return load_tensors(out / "runs" / run.id / "adapter.safetensors")


def test_auto_is_on_for_cuda_and_measured_for_cpu() -> None:
    assert use_compile("auto", "cuda") and use_compile("auto", "cuda:1")
    assert use_compile("auto", "cpu") is compiled_mod.CPU_AUTO
    assert use_compile(True, "cpu") and not use_compile(False, "cuda")


def test_compiled_run_equals_eager_and_compiles_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.compile_fx import compile_fx

    graphs: list[int] = []
    lengths: set[int] = set()

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(lengths))  # how many batch lengths the run had seen when this graph was compiled
        return compile_fx(gm, example_inputs)

    real_mark = compiled_mod.mark_dynamic

    def mark(batch: dict) -> None:
        lengths.add(int(batch["input_ids"].shape[1]))
        real_mark(batch)

    monkeypatch.setattr(train_mod, "compile_model", lambda m: compiled_mod.compile_model(m, backend=counting))
    monkeypatch.setattr(train_mod, "mark_dynamic", mark)
    torch._dynamo.reset()
    eager = _tensors(_out(run_experiment(_experiment(tmp_path, "false"), tmp_path / "eager", progress=False), tmp_path / "eager"))
    assert graphs == []  # compile: false never reaches torch.compile
    comp = _tensors(_out(run_experiment(_experiment(tmp_path, "true"), tmp_path / "comp", progress=False), tmp_path / "comp"))
    assert len(lengths) >= 3, lengths  # length-grouped batches: several lengths
    assert graphs and max(graphs) <= 1, graphs  # every graph compiled at the first batch: no recompilation afterwards
    assert eager.keys() == comp.keys()
    diff = max(float((eager[k] - comp[k]).abs().max()) for k in eager)
    assert diff <= 1e-5, diff
    assert any(float((eager[k] - 0).abs().max()) > 0 for k in eager if "B" in k)  # training moved the adapter


def _out(outcome: object, out: Path) -> Path:
    assert len(outcome.done) == 1  # type: ignore[attr-defined]
    return out
