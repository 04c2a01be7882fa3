"""Experiments: schema and located errors, the smoke experiment end to end, results, resume and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.experiments.checkpoint import load_tensors
from pefref.experiments.evaluation import classification_metrics
from pefref.experiments.grid import expand, load_experiment
from pefref.experiments.plots import pareto_front
from pefref.experiments.results import load_results
from pefref.experiments.runner import run_experiment
from pefref.language.errors import CatalogError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "catalog" / "experiments" / "smoke.yaml"
DATA = ROOT / "catalog" / "experiments" / "data" / "rt_polarity"


def write_exp(folder: Path, grid: str, *, task: str = "sequence_classification", training: str = "", name: str = "t.yaml",
              seeds: str = "[0]", model: str = "{shape: tiny-bert, config: {hidden_dropout_prob: 0.1}}") -> Path:
    text = f"""id: t
model: {model}
task: {{type: {task}, max_length: 32}}
data: {{train: {DATA / 'train.jsonl'}, eval: {DATA / 'test.jsonl'}, limit_train: 48, limit_eval: 16}}
grid:
{grid}
learning_rates: [1.0e-2]
seeds: {seeds}
training: {{batch_size: 8, max_steps: 6, eval_every: 2, threads: 1{training}}}
"""
    p = folder / name
    p.write_text(text)
    return p


# --- schema -----------------------------------------------------------------------------------


def test_experiment_errors_are_located(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(f"""id: bad
model: {{shape: tiny-bert, path: x}}
task: {{type: sequence_classification}}
data: {{train: {DATA / 'train.jsonl'}, eval: {DATA / 'test.jsonl'}}}
grid:
  - technique: lora
    baseline: full
learning_rate: [1.0e-3]
training: {{batch_size: 8}}
""")
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    text = str(e.value)
    assert f"{p}:2:" in text and "exactly one of shape, path, package" in text
    assert f"{p}:6:" in text and "exactly one of technique, composition, compose, baseline" in text
    assert f"{p}:8:1: learning_rate: unknown key 'learning_rate'; did you mean 'learning_rates'?" in text
    assert "give epochs or max_steps" in text


def test_missing_data_file_is_located(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only")
    p.write_text(p.read_text().replace(str(DATA / "test.jsonl"), "nowhere.jsonl"))
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert f"{p}:4:" in str(e.value) and "data.eval: no such file" in str(e.value)


def test_grid_references_are_checked_before_training(tmp_path: Path) -> None:
    """Unknown shapes, techniques, hyperparameter names and out-of-range values are located problems, found up front."""
    p = write_exp(tmp_path, """  - technique: lorra
  - technique: ia3
    hyperparameters: {rank: 3}
  - technique: lora
    hyperparameters: {r: [4, 0]}
  - compose:
      - {technique: lora}
      - {technique: bitfitt}""", model="{shape: tiny-bertt}")
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    text = str(e.value)
    assert f"{p}:2:" in text and "model.shape: no model shape 'tiny-bertt'; did you mean 'tiny-bert'?" in text
    assert f"{p}:6:" in text and "grid[0].technique: no technique 'lorra' in the catalog; did you mean 'lora'?" in text
    assert f"{p}:8:" in text and "grid[1].hyperparameters.rank: ia3: unknown hyperparameter 'rank'" in text
    assert f"{p}:10:" in text and "grid[2].hyperparameters.r: lora: hyperparameter 'r' = 0 is below its minimum 1" in text
    assert "grid[3].compose[1].technique: no technique 'bitfitt'" in text
    assert len(e.value.problems) == 5


def test_validate_checks_an_experiment_file_as_one(tmp_path: Path) -> None:
    """`pefref validate` reads an experiment with the experiment schema and run's checks, not as a technique."""
    from pefref.language.validate import validate_paths

    problems, report = validate_paths([SMOKE])
    assert problems == [] and report["experiments"] == ["smoke"] and report["techniques"] == []
    bad = write_exp(tmp_path, "  - technique: lorra")
    problems, _ = validate_paths([bad])
    assert [pr.field for pr in problems] == ["grid[0].technique"]


def test_grid_expansion_and_stable_ids(tmp_path: Path) -> None:
    exp, _ = load_experiment(SMOKE)
    runs = expand(exp, SMOKE)
    labels = sorted({r.label for r in runs})
    assert labels == ["full", "head_only", "ia3", "lora r=2", "lora r=4", "lora_ia3_stack", "prompt_tuning"]
    assert len(runs) == 2 * len(labels) and len({r.id for r in runs}) == len(runs)
    # ids depend on content, not on where the experiment lies
    copy = tmp_path / "smoke.yaml"
    copy.write_text(SMOKE.read_text().replace("data/rt_polarity", str(DATA)))
    assert [r.id for r in expand(load_experiment(copy)[0], copy)] == [r.id for r in runs]


def test_metrics_and_pareto() -> None:
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["accuracy"] == 0.75
    assert abs(m["f1"] - (2 / 3 + 0.8) / 2) < 1e-12
    pts = [(10.0, 0.5), (100.0, 0.7), (50.0, 0.4), (1000.0, 0.69), (5.0, 0.5)]
    assert pareto_front(pts) == [4, 1]
    assert pareto_front([(1.0, 3.0), (2.0, 1.0)], higher=False) == [0, 1]


# --- the smoke experiment -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    outcome = run_experiment(SMOKE, out, progress=False)
    assert not outcome.failed and outcome.interrupted is None
    assert len(outcome.done) == 14
    return out


def test_smoke_records_every_run(smoke: Path) -> None:
    con = sqlite3.connect(smoke / "results.sqlite")
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM runs")]
    assert len(rows) == 14 and {r["status"] for r in rows} == {"done"}
    exp, _ = load_experiment(SMOKE)
    by_id = {r.id: r for r in expand(exp, SMOKE)}
    for r in rows:
        cfg = json.loads(r["config"])
        assert cfg == by_id[r["id"]].config
        assert r["step"] == r["total_steps"] == 6
        assert 0 < r["trainable"] <= r["total_params"] and r["trainable_pct"] == pytest.approx(100 * r["trainable"] / r["total_params"])
        assert json.loads(r["final_metrics"]).keys() == {"accuracy", "f1", "loss"}
        assert r["step_time"] > 0 and r["peak_memory"] > 0 and r["wall_time"] > 0
        assert json.loads(r["versions"])["torch"] == torch.__version__
        evals = [s for s in con.execute("SELECT step FROM steps WHERE run_id = ? AND split = 'eval'", (r["id"],))]
        assert [s[0] for s in evals] == [3, 6]
    tech = {r["label"]: r for r in rows}
    assert tech["full"]["trainable_pct"] == 100.0
    assert tech["head_only"]["trainable"] == 32 * 2 + 2  # the classifier alone
    assert tech["lora r=4"]["trainable"] - tech["lora r=2"]["trainable"] == 2 * 2 * (2 * 32 + 2 * 32)  # 2 layers x q,v x (A + B) rows
    assert tech["lora_ia3_stack"]["technique"] == "lora_ia3_stack"
    assert [h["technique"] for h in json.loads(tech["lora_ia3_stack"]["hyperparameters"])] == ["lora", "ia3"]
    assert tech["head_only"]["peak_memory"] < tech["lora r=2"]["peak_memory"] < tech["full"]["peak_memory"]


def test_smoke_checkpoints_are_adapter_only_and_reload(smoke: Path) -> None:
    from pefref.experiments.tasks import build_task_model, prepare_run
    from pefref.language.catalog import default_catalog

    res = load_results(smoke)
    run = next(r for r in res.runs if r.label == "lora r=2" and r.seed == 1)
    tensors = load_tensors(smoke / "runs" / run.id / "adapter.safetensors")
    assert tensors and all(k.startswith(("adapter.a0.", "head.")) for k in tensors)
    assert {k for k in tensors if k.startswith("head.")} == {"head.classifier.weight", "head.classifier.bias"}
    full = next(r for r in res.runs if r.label == "full")
    assert any(k.startswith("model.bert.encoder") for k in load_tensors(smoke / "runs" / full.id / "adapter.safetensors"))
    # a fresh model with the saved adapter and head gives the recorded metrics
    from pefref.experiments.data import load_examples
    from pefref.experiments.evaluation import evaluate

    con = sqlite3.connect(smoke / "results.sqlite")
    cfg = json.loads(con.execute("SELECT config FROM runs WHERE id = ?", (run.id,)).fetchone()[0])
    cat = default_catalog()
    torch.manual_seed(run.seed)  # a named shape's random base is rebuilt from the run's seed
    model, tok = build_task_model(cfg["model"], cfg["task"]["type"], 2, cat)
    prep = prepare_run(model, cfg, SMOKE.parent, cat)
    prep.load_state(tensors)
    ev = load_examples(DATA / "test.jsonl", "text", "label", tok, cfg["task"]["max_length"], 32, ["negative", "positive"])
    m = evaluate(model, ev, tok.pad_token_id, False, 16, "cpu", __import__("contextlib").nullcontext)
    assert m["accuracy"] == run.final["accuracy"] and abs(m["loss"] - run.final["loss"]) < 1e-5


def test_smoke_rerun_skips_done_runs(smoke: Path) -> None:
    outcome = run_experiment(SMOKE, smoke, progress=False)
    assert outcome.done == [] and len(outcome.skipped) == 14


def test_results_cli_text_json_csv_plots(smoke: Path) -> None:
    r = CliRunner().invoke(app, ["results", str(smoke)])
    assert r.exit_code == 0, r.output
    assert "ranked by accuracy" in r.output and "head_only" in r.output and "lora_ia3_stack" in r.output
    r = CliRunner().invoke(app, ["results", str(smoke), "--json", "--no-plots"])
    data = json.loads(r.output)
    assert len(data["runs"]) == 14 and len(data["groups"]) == 7
    for run in data["runs"]:
        assert {"technique", "trainable", "metrics"} <= run.keys() and "accuracy" in run["metrics"]["final"]
    ranks = [g["metrics"]["accuracy"]["mean"] for g in data["groups"]]
    assert ranks == sorted(ranks, reverse=True) and [g["rank"] for g in data["groups"]] == list(range(1, 8))
    g = data["groups"][0]
    accs = [x["metrics"]["final"]["accuracy"] for x in data["runs"] if x["label"] == g["label"]]
    assert g["metrics"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2) and g["metrics"]["accuracy"]["n"] == 2
    r = CliRunner().invoke(app, ["results", str(smoke), "--csv", "--no-plots"])
    lines = r.output.splitlines()
    assert lines[0].startswith("experiment,label,technique,seed,lr,status") and len(lines) == 15
    for name in ("metric_vs_params.svg", "curves.svg", "cost.svg"):
        svg = (smoke / "plots" / name).read_bytes()
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg") and b"head_only" in svg
    assert b"Pareto front" in (smoke / "plots" / "metric_vs_params.svg").read_bytes()
    before = (smoke / "plots" / "curves.svg").read_bytes()
    CliRunner().invoke(app, ["results", str(smoke)])
    assert (smoke / "plots" / "curves.svg").read_bytes() == before  # deterministic


def test_results_of_a_folder_without_database(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["results", str(tmp_path)])
    assert r.exit_code == 1 and "no results.sqlite" in r.output


# --- resume and Ctrl-C -----------------------------------------------------------------------------


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    res = load_results(out)
    assert all(r.status == "done" for r in res.runs)
    return {f"{r.label}/{k}": v for r in res.runs for k, v in load_tensors(out / "runs" / r.id / "adapter.safetensors").items()}


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    # dropout on: the restored RNG state matters; accumulation on: micro-batches
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 2}", training=", grad_accum: 2, checkpoint_every: 1")
    straight = run_experiment(p, tmp_path / "a", progress=False)
    assert len(straight.done) == 1

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the handler asks the loop to stop at the step boundary

    first = run_experiment(p, tmp_path / "b", progress=False, on_step=interrupt)
    assert first.interrupted is not None and first.done == []
    row = load_results(tmp_path / "b").runs[0]
    assert row.status == "interrupted" and row.step == 3
    second = run_experiment(p, tmp_path / "b", progress=False)
    assert len(second.done) == 1
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = load_results(tmp_path / "a").runs[0], load_results(tmp_path / "b").runs[0]
    assert ra.final == rb.final
    assert [s for s, _, _ in rb.curve] == [s for s, _, _ in ra.curve]  # no step recorded twice


def test_ctrl_c_keeps_finished_runs(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only\n  - technique: ia3", seeds="[0, 1]")
    seen: list[int] = []

    def interrupt(step: int) -> None:
        seen.append(step)
        if len(seen) == 6 + 6 + 2:  # third run (ia3 seed 0), second step
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the shell started the tests in the background
    out = run_experiment(p, tmp_path / "o", progress=False, on_step=interrupt)
    assert len(out.done) == 2 and out.interrupted is not None
    runs = {(r.label, r.seed): r.status for r in load_results(tmp_path / "o").runs}
    assert runs == {("head_only", 0): "done", ("head_only", 1): "done", ("ia3", 0): "interrupted"}
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    again = run_experiment(p, tmp_path / "o", progress=False)
    assert len(again.skipped) == 2 and len(again.done) == 2


def test_cli_run_exit_status_and_message(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only")
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 runs trained, 0 already done, 0 failed" in r.output
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "o"), "--no-progress"])
    assert "0 runs trained, 1 already done" in r.output


def test_failed_run_is_recorded_and_others_go_on(tmp_path: Path) -> None:
    # a valid technique whose only site (cross-attention) BERT does not have: it passes the checks and fails to apply
    lora = (ROOT / "catalog" / "techniques" / "lora.yaml").read_text()
    (tmp_path / "xlora.yaml").write_text(lora.replace("id: lora", "id: xlora").replace("sites: [attn.q, attn.v]", "sites: [xattn.q]"))
    p = write_exp(tmp_path, "  - technique: xlora.yaml\n  - baseline: head_only")
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.failed) == 1 and "xattn" in out.failed[0][1] and len(out.done) == 1, out.failed
    assert {r.status for r in load_results(tmp_path / "o").runs} == {"failed", "done"}


# --- causal LM --------------------------------------------------------------------------------------


def test_causal_lm_learns(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - technique: lora\n    hyperparameters: {r: 4}", task="causal_lm", model="{shape: tiny-llama}",
                  training=", schedule: constant, warmup: 0")
    p.write_text(p.read_text().replace("max_steps: 6", "max_steps: 12").replace("learning_rates: [1.0e-2]", "learning_rates: [3.0e-2]"))
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.done) == 1, out.failed
    run = load_results(tmp_path / "o").runs[0]
    assert run.main_metric == "loss" and run.final["perplexity"] == pytest.approx(__import__("math").exp(run.final["loss"]))
    evals = [m["loss"] for _, s, m in run.curve if s == "eval"]
    assert len(evals) == 6 and evals[-1] < evals[0] - 0.05


# --- parallel workers, task heads --------------------------------------------------------------------


def test_parallel_jobs_give_the_sequential_results(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only\n  - technique: ia3", seeds="[0, 1]")
    par = run_experiment(p, tmp_path / "par", progress=False, jobs=2)
    assert len(par.done) == 4 and not par.failed and par.interrupted is None
    assert len(run_experiment(p, tmp_path / "seq", progress=False).done) == 4
    a = {r.id: r.final for r in load_results(tmp_path / "par").runs}
    b = {r.id: r.final for r in load_results(tmp_path / "seq").runs}
    assert a == b and len(a) == 4
    assert len(run_experiment(p, tmp_path / "par", progress=False, jobs=2).skipped) == 4


def test_task_head_modules_and_head_lr(tmp_path: Path) -> None:
    p = write_exp(tmp_path, "  - baseline: head_only", training=", head_lr: 1.0e-3")
    p.write_text(p.read_text().replace("max_length: 32}", "max_length: 32, head: [bert.pooler, classifier]}"))
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.done) == 1
    run = load_results(tmp_path / "o").runs[0]
    assert run.trainable == (32 * 32 + 32) + (32 * 2 + 2)  # pooler + classifier
    keys = set(load_tensors(tmp_path / "o" / "runs" / run.id / "adapter.safetensors"))
    assert {"head.bert.pooler.dense.weight", "head.classifier.weight"} <= keys
    p.write_text(p.read_text().replace("bert.pooler,", "bert.poler,"))
    bad = run_experiment(p, tmp_path / "bad", progress=False)
    assert "task.head: the model has no module 'bert.poler'; did you mean 'bert.pooler'?" in bad.failed[0][1]


# --- compositions in the grid, batches grouped by length ---------------------------------------------------------


def test_composition_files_and_ids_in_the_grid(tmp_path: Path) -> None:
    comp = ROOT / "catalog" / "compositions" / "lora_ia3_stack.yaml"
    grid = (f"  - composition: lora_ia3_stack\n  - technique: {comp}\n    name: as file\n    learning_rates: [2.0e-2]\n"
            "  - compose: [{technique: lora, hyperparameters: {r: 2}}, {technique: ia3}]")
    p = write_exp(tmp_path, grid, training=", max_steps: 2")
    p.write_text(p.read_text().replace("max_steps: 6, ", ""))
    runs = expand(load_experiment(p)[0], p)
    assert [r.label for r in runs] == ["lora_ia3_stack", "as file", "lora+ia3"]
    assert runs[0].config["composition"] == runs[1].config["composition"]  # an id and the file are the same composition
    assert runs[0].id != runs[1].id  # (they differ by learning rate: the same run twice is refused)
    out = run_experiment(p, tmp_path / "o", progress=False)
    assert len(out.done) == 3, out.failed
    rows = {r.label: r for r in load_results(tmp_path / "o").runs}
    assert rows["lora_ia3_stack"].technique == "lora_ia3_stack" and rows["lora+ia3"].technique == "lora+ia3"
    keys = set(load_tensors(tmp_path / "o" / "runs" / runs[0].id / "adapter.safetensors"))
    assert any(k.startswith("adapter.lora_ia3_stack.lora.") for k in keys) and any(k.startswith("adapter.lora_ia3_stack.ia3.") for k in keys)
    p.write_text(p.read_text().replace("composition: lora_ia3_stack", "composition: lora_ia3_stak"))
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert f"{p}:6:18:" in str(e.value) and "no composition 'lora_ia3_stak' in the catalog; did you mean 'lora_ia3_stack'?" in str(e.value)
    p.write_text(p.read_text().replace("stak", "stack").replace("name: as file", "hyperparameters: {r: 4}"))
    with pytest.raises(CatalogError) as e:
        load_experiment(p)
    assert "takes its hyperparameters from its file" in str(e.value)


def test_grouped_order_is_a_seeded_permutation_with_less_padding() -> None:
    from pefref.experiments.data import epoch_order, grouped_order

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (203,), generator=g).tolist()
    order = grouped_order(lengths, 8, seed=1, epoch=0)
    assert sorted(order) == list(range(203)) and order == grouped_order(lengths, 8, seed=1, epoch=0)
    assert order != grouped_order(lengths, 8, seed=1, epoch=1) and order != grouped_order(lengths, 8, seed=2, epoch=0)

    def padded(o: list[int]) -> int:
        return sum(8 * max(lengths[i] for i in o[b:b + 8]) for b in range(0, 200, 8))
    assert padded(order) < 0.75 * padded(epoch_order(203, 1, 0))
    assert order[200:] == [i for i in order[200:]] and len({lengths[i] for i in order[:8]}) <= 8
