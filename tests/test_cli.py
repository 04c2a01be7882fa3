"""The command line: help, JSON output, lookups with suggestions, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import catalog_root

COMMANDS = ("validate", "list", "show", "schema", "models")
TECHNIQUES = sorted(p.stem for p in (catalog_root() / "techniques").glob("*.yaml"))
REQUIRED_MODELS = {
    "tiny-bert", "tiny-gpt2", "tiny-llama", "bert-base-uncased", "roberta-base", "gpt2",
    "llama-2-7b", "mistral-7b", "qwen2-0.5b", "llama-3-70b",
}

runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_help_lists_every_command() -> None:
    out = _ok("--help")
    for cmd in COMMANDS:
        assert cmd in out
    for cmd in COMMANDS:
        assert "Usage" in _ok(cmd, "--help")


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "validate" in result.output


def test_validate_catalog() -> None:
    assert "OK" in _ok("validate")
    report = json.loads(_ok("validate", "--json"))
    assert report["ok"] and report["problems"] == []
    assert sorted(report["techniques"]) == TECHNIQUES


def test_list_json() -> None:
    rows = json.loads(_ok("list", "--json"))
    assert [r["id"] for r in rows] == TECHNIQUES
    for r in rows:
        assert {"id", "name", "year", "sites", "forms"} <= set(r)
        assert isinstance(r["year"], int)
        for key in ("sites", "forms"):
            assert r[key] and r[key] == sorted(set(r[key]))
    by_id = {r["id"]: r for r in rows}
    assert by_id["lora"]["forms"] == ["parallel"] and by_id["lora"]["sites"] == ["attn.q", "attn.v"]


def test_list_table() -> None:
    out = _ok("list")
    assert f"{len(TECHNIQUES)} techniques" in out and "lora" in out and "parallel" in out


def test_models_json() -> None:
    rows = json.loads(_ok("models", "--json"))
    for r in rows:
        assert {"name", "family", "source", "description"} <= set(r)
    assert {r["name"] for r in rows} >= REQUIRED_MODELS
    assert "tiny-llama" in _ok("models")


def test_one_model() -> None:
    row = json.loads(_ok("models", "gpt2", "--json"))
    assert row["name"] == "gpt2" and row["family"] == "gpt2" and row["config"]
    assert "gpt2" in _ok("models", "gpt2")


@pytest.mark.parametrize("tid", TECHNIQUES)
def test_show(tid: str) -> None:
    summary = json.loads(_ok("show", tid, "--json"))
    assert summary["id"] == tid
    assert {"name", "paper", "summary", "hyperparameters", "modules"} <= set(summary)
    for m in summary["modules"]:
        assert {"name", "form", "sites", "layers", "params", "expressions"} <= set(m)
        for p in m["params"].values():
            assert p["shape"] and "init" in p
    out = _ok("show", tid)
    assert summary["name"] in out and summary["paper"]["link"] in out
    for name in summary["hyperparameters"]:
        assert name in out


def test_show_lora_details() -> None:
    s = json.loads(_ok("show", "lora", "--json"))
    assert s["hyperparameters"]["r"] == {"type": "int", "default": 8, "min": 1, "description": "rank of the update"}
    (m,) = s["modules"]
    assert m["params"]["A"]["shape"] == ["r", "d_in"]
    assert m["expressions"]["integrate"] == "h + (alpha / r) * delta"


@pytest.mark.parametrize(("args", "wanted"), [
    (["show", "lroa"], "did you mean 'lora'?"),
    (["show", "prefix"], "no technique 'prefix'"),
    (["models", "gtp2"], "did you mean 'gpt2'?"),
])
def test_unknown_name(args: list[str], wanted: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert wanted in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert isinstance(result.exception, SystemExit)


def test_unknown_id_subprocess_has_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "pefref.cli", "show", "lroa"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "did you mean 'lora'?" in proc.stderr


def test_schema_write_and_check(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "--check", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "technique.schema.json" in result.output
    _ok("schema", "--out", str(tmp_path))
    assert (tmp_path / "technique.schema.json").read_text(encoding="utf-8").endswith("}\n")
    from pefref.language.schemagen import GENERATED_MARK

    (tmp_path / "stale.schema.json").write_text(f'{{"$comment": "{GENERATED_MARK}"}}\n', encoding="utf-8")
    assert runner.invoke(app, ["schema", "--check", "--out", str(tmp_path)]).exit_code == 1
    _ok("schema", "--out", str(tmp_path))
    assert not (tmp_path / "stale.schema.json").exists()
    _ok("schema", "--check", "--out", str(tmp_path))


def test_cli_import_is_light() -> None:
    code = "import sys, pefref.cli; print(sorted(m for m in ('torch', 'transformers', 'pefref.language.catalog') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_first_tutorial_tour(tmp_path: Path) -> None:
    """The first tutorial's example technique validates, and its error example is what pefref prints."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "first-technique.md").read_text(encoding="utf-8")
    example = page.split("```yaml title=", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    good = tmp_path / "ffn_lora.yaml"
    good.write_text(example, encoding="utf-8")
    assert "OK 1 file: 1 technique" in _ok("validate", str(good))
    bad = tmp_path / "bad" / "ffn_lora.yaml"
    bad.parent.mkdir()
    bad.write_text(example.replace("ffn.down]", "ffn.donw]").replace("linear(linear(x, A), B)", "linear(linear(x, A), B2)"), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    for line in page.split("2 problems in 1 file")[0].splitlines()[-2:]:
        where, _, rest = line.partition(" ")
        assert f"{bad}:{where.split(':', 1)[1]} {rest.split('...')[0]}" in result.output
    assert "2 problems in 1 file" in result.output
