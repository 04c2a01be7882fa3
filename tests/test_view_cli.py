"""Derived counts, costs and the model-facing commands (params, apply, typology, show, demo)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.view.costs import efficiency
from pefref.view.params import count_params

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _json(args: list[str]) -> object:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_params_json_and_formula(catalog) -> None:
    out = _json(["params", "lora", "--model", "llama-2-7b", "--json"])
    # LoRA r=8 on q and v of Llama-2-7B: 32 layers x 2 sites x 8 x (4096 + 4096)
    assert out["trainable"] == 32 * 2 * 8 * (4096 + 4096)
    assert out["formula"] == "L·r·(2·d + d_head·heads + d_head·kv_heads)"
    out = _json(["params", "lora", "--model", "llama-2-7b", "--set", "r=16", "--json"])
    assert out["trainable"] == 2 * 32 * 2 * 8 * (4096 + 4096)
    assert out["base_params"] == 6738415616


def test_params_on_70b_are_counted_analytically(catalog) -> None:
    """No 70B model is built (its time against a tiny model's: benchmarks/bench_budgets.py)."""
    pc = count_params(catalog.technique("lora"), catalog.shape("llama-3-70b"), catalog)
    assert pc.trainable == 80 * 8 * ((8192 + 8192) + (8192 + 1024))


def test_params_cli_in_a_fresh_process() -> None:
    cmd = [sys.executable, "-c", "from pefref.cli.app import app; app()", "params", "lora", "--model", "llama-3-70b", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["trainable"] == 16384000


def test_bad_override_is_a_clean_error() -> None:
    res = runner.invoke(app, ["params", "lora", "--model", "gpt2", "--set", "rank=4"])
    assert res.exit_code == 1
    assert "unknown hyperparameter 'rank'" in res.output and "declared: r, alpha" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["params", "lora", "--model", "gpt2", "--set", "r=0"])
    assert res.exit_code == 1 and "below its minimum 1" in res.output


def test_apply_report_folds_layers() -> None:
    out = _json(["apply", "lora", "--model", "tiny-llama", "--json"])
    assert out["trainable"] == 1792
    paths = {p["site"]: p["paths"] for p in out["placements"]}
    assert paths["attn.q"] == ["model.layers.{0..1}.self_attn.q_proj"]


def test_apply_large_model_on_meta() -> None:
    out = _json(["apply", "lora", "--model", "llama-2-7b", "--json"])
    assert out["device"] == "meta" and out["trainable"] == 4194304
    assert out["base_params"] == 6738415616


def test_typology_json_keys(catalog) -> None:
    rows = _json(["typology", "--format", "json"])
    keys = {"id", "workspace", "insertion_form", "integration_form", "parameter_adaptation", "intra_connectivity",
            "inter_connectivity", "parameter_sharing", "input_type", "insertions"}
    assert {r["id"] for r in rows} == set(catalog.techniques)
    assert all(keys <= set(r) for r in rows)


@pytest.mark.parametrize("fmt", ["markdown", "csv", "table"])
def test_typology_formats(fmt: str, catalog) -> None:
    res = runner.invoke(app, ["typology", "--format", fmt])
    assert res.exit_code == 0
    assert all(tid in res.output for tid in ("lora", "ia3", "prefix_tuning"))


def test_show_has_derived_facts() -> None:
    out = _json(["show", "lora", "--json"])
    assert out["efficiency"]["mergeable"] is True
    assert out["efficiency"]["latency_class"] == "none once merged"
    assert out["parameters"]["trainable"] == 4194304
    assert out["typology"]["integration_form"] == "scaled addition"


def test_efficiency_facts(catalog) -> None:
    shape = catalog.shape("llama-2-7b")
    lora = efficiency(catalog.technique("lora"), shape, catalog)
    # per token, per layer: q and v each 2·(d·r + r·d) multiply-add FLOPs
    assert lora.flops_per_token == 32 * 2 * 2 * (4096 * 8 + 8 * 4096)
    assert lora.flops_per_token_merged == 0
    prompt = efficiency(catalog.technique("prompt_tuning"), shape, catalog)
    assert (prompt.extra_tokens, prompt.latency) == (20, "parallel")
    adapter = efficiency(catalog.technique("houlsby_adapter"), shape, catalog)
    assert adapter.latency == "sequential" and not adapter.mergeable


def test_demo_runs_every_technique(catalog) -> None:
    from pefref.language.check import expand_modules
    from pefref.models.build import applicable

    rows = _json(["demo", "--json"])
    ref = catalog.family(catalog.shape("tiny-ref").family)
    left_out = {tid for tid, t in catalog.techniques.items() if not applicable(expand_modules(t, catalog.techniques)[0], ref)}
    assert left_out == {"adaption_prompt"}  # it reads queries after a rotary embedding, which the reference model has not
    assert {r["id"] for r in rows} == set(catalog.techniques) - left_out
    for r in rows:
        assert r["removed_diff"] == 0.0
        assert r["adapted_diff"] > 0
        if r["identity_at_init"]:
            assert r["init_diff"] < 1e-5, r["id"]
        if r["mergeable"]:
            assert r["merge_diff"] < 1e-5, r["id"]


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines |= set(range(first.lineno, first.end_lineno + 1))
    return lines


def test_compiler_names_no_technique(catalog) -> None:
    """The compiler is technique-agnostic: no catalog id or name appears in pefref/'s code or strings
    (docstrings, which cite the papers primitives come from, and comments aside)."""
    words = {t.id for t in catalog.techniques.values()} | {t.name for t in catalog.techniques.values()}
    hits = []
    for path in (ROOT / "pefref").rglob("*.py"):
        text = path.read_text()
        docs = _docstring_lines(ast.parse(text))
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if n in docs:
                continue
            for w in words:
                if re.search(rf"(?<![\w.]){re.escape(w)}(?![\w])", code):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {w}")
    assert not hits, "\n".join(hits)


def test_params_says_na_with_the_reason_where_a_technique_cannot_be_placed() -> None:
    """A technique that reads a site the family does not bind (the adaption prompt's post-rotary queries on GPT-2)
    or finds no host tensor (BitFit on Llama) is not applicable there: 'n/a' and why, never a count apply would refuse."""
    r = CliRunner().invoke(app, ["params", "adaption_prompt", "--model", "gpt2"])
    assert r.exit_code == 0 and "n/a" in r.output and "attn.q_rot" in r.output and "trainable parameters" not in r.output
    r = CliRunner().invoke(app, ["params", "adaption_prompt", "--model", "gpt2", "--json"])
    got = json.loads(r.output)
    assert got["trainable"] == 0 and any("attn.q_rot" in d for d in got["dropped"])
    r = CliRunner().invoke(app, ["params", "adaption_prompt", "--model", "tiny-llama"])
    assert "trainable parameters" in r.output and "not placed" not in r.output
