"""Invalid input: each fixture is reported at its exact place with a helpful message, never with a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.catalog import catalog_root, default_catalog, load_catalog, load_techniques
from pefref.language.errors import CatalogError, Problem
from pefref.language.yamlsrc import MAX_BYTES

INVALID = Path(__file__).parent / "fixtures" / "invalid"
HEADER = "# yaml-language-server: $schema=../../../schemas/technique.schema.json\n"

# fixture, line, column, field path, message substrings
CASES: list[tuple[str, int, int, str, tuple[str, ...]]] = [
    ("unknown_key", 5, 1, "sumary", ("unknown key 'sumary'", "did you mean 'summary'?")),
    ("wrong_type", 7, 27, "hyperparameters.r.default", ("valid integer", "'four'")),
    ("missing_field", 9, 5, "modules[0].compute", ("required field is missing",)),
    ("unknown_site", 10, 21, "modules[0].sites[1]", ("unknown site 'ffn.upp'", "did you mean 'ffn.up'?")),
    ("form_not_allowed", 10, 13, "modules[0].sites[0]", ("form 'rescale' cannot attach to site 'attn.kv'", "accepts: prepend")),
    ("unknown_name", 15, 35, "modules[0].compute", ("unknown name 'C'", "available:")),
    ("unknown_op", 15, 21, "modules[0].compute", ("unknown op 'relux'", "did you mean 'relu'?")),
    ("attribute_access", 15, 15, "modules[0].compute", ("attribute access is not allowed",)),
    ("expression_syntax", 15, 20, "modules[0].compute", ("syntax error", "never closed")),
    ("python_tag", 4, 7, "name", ("python/object/apply:os.system", "not allowed")),
    ("python_tag_scalar", 4, 7, "name", ("python/name:os.system", "not allowed")),
    ("alias", 13, 10, "", ("anchors", "not allowed")),
    ("duplicate_key", 5, 1, "name", ("duplicate key 'name'",)),
    ("default_out_of_bounds", 7, 27, "hyperparameters.r.default", ("default 0 is",)),
    ("unknown_use", 9, 10, "modules[0].use", ("unknown technique 'lroa'", "did you mean 'lora'?")),
    ("unknown_extends", 6, 17, "extends[1]", ("unknown technique 'dorra'", "did you mean 'dora'?")),
    ("syntax_error", 11, 9, "", ("YAML syntax error",)),
    ("id_mismatch", 3, 5, "id", ("file name 'id_mismatch.yaml' does not match id 'another_id'",)),
    ("unknown_form", 11, 11, "modules[0].form", ("unknown form 'paralel'", "did you mean 'parallel'?")),
    ("unknown_shape_name", 13, 19, "modules[0].params.A.shape[0]", ("unknown name 'rank' in a shape",)),
    ("wrong_init_shape", 14, 37, "modules[0].params.B.init", ("init gives [128, 5], the parameter is [128, 4]",)),
    ("wrong_compute_shape", 15, 21, "modules[0].compute", ("linear: input width 512 does not match weight [4, 128]",)),
    ("wrong_integrate_shape", 16, 16, "modules[0].integrate", ("+: shapes [2, 9, 128] and [2, 9, 512] do not broadcast",)),
    ("split_too_deep", 13, 51, "modules[0].params.A.split", ("split: 2 must be below the number of dimensions (2)",)),
    ("wrong_gate_shape", 16, 11, "modules[0].gate", ("gate gives [2, 9, 1]; one value per example, [batch, 1] = [2, 1]",)),
    ("wrong_loss_length", 9, 17, "loss.prompt_types", ("gives shape (3,); the technique prepends 4 position(s)",)),
    ("unknown_loss_name", 10, 18, "loss.keep", ("unknown name 'types' in the loss's keep", "did you mean 'type'?")),
]

def _problems(*paths: Path) -> list[Problem]:
    cat = default_catalog()
    return load_techniques(list(paths), cat.reference, cat.techniques)[3]


def test_every_fixture_has_a_case() -> None:
    assert {p.stem for p in INVALID.glob("*.yaml")} == {c[0] for c in CASES}
    assert len(CASES) >= 15


@pytest.mark.parametrize(
    ("name", "line", "column", "field", "messages"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_invalid_fixture(name: str, line: int, column: int, field: str, messages: tuple[str, ...]) -> None:
    path = INVALID / f"{name}.yaml"
    assert path.read_text(encoding="utf-8").startswith(HEADER)
    problems = _problems(path)
    assert len(problems) == 1, "\n".join(map(str, problems))
    p = problems[0]
    assert Path(p.location.file) == path
    assert (p.location.line, p.location.column) == (line, column), str(p)
    assert p.field == field, str(p)
    for m in messages:
        assert m in p.message, str(p)
    assert str(p).startswith(f"{path}:{line}:{column}: ")


def test_oversized_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("id: big\n" + ("# padding\n" * (MAX_BYTES // 10 + 1)), encoding="utf-8")
    (p,) = _problems(big)
    assert Path(p.location.file) == big
    assert "larger than" in p.message and str(MAX_BYTES) in p.message


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f'id: bad\nname: !!python/object/apply:os.system ["touch {marker}"]\nsummary: !!python/object/apply:subprocess.call {{args: [touch, {marker}]}}\n',
        encoding="utf-8",
    )
    assert _problems(bad)
    assert not marker.exists()


def test_alias_bomb_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (p,) = _problems(bomb)
    assert (p.location.line, p.location.column) == (1, 5)
    assert "anchors" in p.message


def test_one_run_reports_every_file() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["validate", "--json", str(INVALID)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"]
    assert {Path(p["file"]).stem for p in report["problems"]} == {p.stem for p in INVALID.glob("*.yaml")}
    for p in report["problems"]:
        assert {"file", "line", "column", "field", "message"} <= set(p)


def test_several_files_on_the_command_line() -> None:
    files = [INVALID / "unknown_key.yaml", INVALID / "unknown_site.yaml", Path(__file__).parent / "fixtures" / "kitchen_sink.yaml"]
    result = CliRunner().invoke(app, ["validate", *map(str, files)])
    assert result.exit_code == 1
    assert "unknown_key.yaml:5:1: sumary:" in result.output
    assert "unknown_site.yaml:10:21: modules[0].sites[1]:" in result.output
    assert "kitchen_sink" not in result.output
    assert "2 problems in 2 files" in result.output


def test_broken_catalog_reports_every_problem(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    shutil.copytree(catalog_root(), root)
    lora = root / "techniques" / "lora.yaml"
    lora.write_text(lora.read_text(encoding="utf-8").replace("sites: [attn.q, attn.v]", "sites: [attn.q, attn.vv]"), encoding="utf-8")
    gpt2 = root / "families" / "gpt2.yaml"
    gpt2.write_text(gpt2.read_text(encoding="utf-8").replace("family: gpt2", "family: gpt2\nfamilly: typo"), encoding="utf-8")
    with pytest.raises(CatalogError) as err:
        load_catalog(root)
    files = {Path(p.location.file).name for p in err.value.problems}
    assert {"lora.yaml", "gpt2.yaml"} <= files
    result = CliRunner().invoke(app, ["validate", str(root)])
    assert result.exit_code == 1
    assert "did you mean 'attn.v'?" in result.output and "did you mean 'family'?" in result.output


@pytest.mark.parametrize("name", ["unknown_key", "python_tag", "syntax_error"])
def test_cli_exits_1_without_traceback(name: str) -> None:
    bad = INVALID / f"{name}.yaml"
    proc = subprocess.run([sys.executable, "-m", "pefref.cli", "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert f"{name}.yaml:" in out


def test_missing_path_is_a_problem(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "no such file" in result.output
