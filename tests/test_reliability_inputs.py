"""No input hangs or crashes pefref: bounded evaluation, located errors, refused nonsense, checked user maps."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pefref.cli.app import app
from pefref.language.errors import CatalogError, PefrefError
from pefref.language.validate import validate_paths
from pefref.runtime.api import apply

from .conftest import tiny_model
from .modelstate import assert_same_state, model_state

runner = CliRunner()
pytestmark = pytest.mark.timeout(600)  # per test: an input that hangs pefref fails the test (no time is asserted)

HEAD = """\
id: {tid}
name: Probe
paper: {{title: t, authors: a, year: 2024, arxiv: "2401.00001"}}
"""

LORA_LIKE = """\
hyperparameters:
  r: {{type: int, default: 4, min: 1}}
  alpha: {{type: float, default: {alpha}}}
modules:
  - name: m
    sites: [attn.q]
    form: parallel
    params:
      A: {{shape: [{dim}, d_in], init: zeros()}}
      B: {{shape: [d_out, {dim}], init: zeros()}}
    compute: linear(linear(x, A), B)
    integrate: {integrate}
"""


def _file(tmp_path: Path, body: str, tid: str = "probe") -> Path:
    p = tmp_path / f"{tid}.yaml"
    p.write_text(HEAD.format(tid=tid) + textwrap.dedent(body))
    return p


def _lora(tmp_path: Path, dim: str = "r", integrate: str = "h + (alpha / r) * delta", alpha: str = "8", tid: str = "probe") -> Path:
    return _file(tmp_path, LORA_LIKE.format(dim=dim, integrate=integrate, alpha=alpha), tid)


def _problems(path: Path) -> list:
    problems, _ = validate_paths([path])
    return problems


def _cli(*args: str) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.output


# --- unbounded work ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["shape", "integrate"])
def test_huge_power_is_a_located_problem_not_a_hang(tmp_path: Path, where: str) -> None:
    p = _lora(tmp_path, dim="10**10**10") if where == "shape" else _lora(tmp_path, integrate="h + 10**10**10 * delta")
    problems = _problems(p)
    assert problems and all(pr.location.line > 0 for pr in problems)
    assert any("too large" in pr.message for pr in problems)


def test_huge_power_in_params_show_apply_is_an_error(tmp_path: Path) -> None:
    p = _lora(tmp_path, dim="2**64")
    for args in (["params", str(p), "--model", "tiny-llama"], ["show", str(p)], ["apply", str(p), "--model", "tiny-llama"]):
        out = _cli(*args)
        assert "too large" in out or "over the limit" in out or "positive integer" in out, out


def test_allocation_over_budget_is_refused_before_allocating(tmp_path: Path) -> None:
    from pefref.language.limits import limits

    p = _lora(tmp_path, dim="100000 * r")  # 400000 x 32 x 2 floats on attn.q of two layers: ~200 MB
    model = tiny_model("llama")
    before = model_state(model)
    with limits(max_alloc_bytes=50 << 20), pytest.raises(PefrefError, match="budget"):
        apply(model, p)
    assert_same_state(before, model_state(model))


def test_dimension_over_the_limit_is_refused(tmp_path: Path) -> None:
    p = _lora(tmp_path, dim="2**40")
    with pytest.raises(PefrefError, match="over the limit"):
        apply(tiny_model("llama"), p)


def test_division_by_zero_is_caught_at_validate(tmp_path: Path) -> None:
    problems = _problems(_lora(tmp_path, dim="r // (r - r)"))
    assert any("division by zero" in pr.message and pr.field.endswith("shape[0]") for pr in problems), problems


# --- tracebacks --------------------------------------------------------------------------------------------


def test_use_self_and_cycle_are_named(tmp_path: Path) -> None:
    base = """\
    modules:
      - {{use: {other}.m, name: used}}
      - name: m
        sites: [attn.q]
        form: rescale
        params: {{s: {{shape: [d_out], init: ones()}}}}
        scale: s
    """
    (tmp_path / "self").mkdir()
    p = _file(tmp_path / "self", base.format(other="probe"))
    problems = _problems(p)
    assert any("uses itself" in pr.message and pr.field == "modules[0].use" and pr.location.line > 0 for pr in problems), problems
    (tmp_path / "two").mkdir()
    _file(tmp_path / "two", base.format(other="probe_b"), "probe_a")
    _file(tmp_path / "two", base.format(other="probe_a"), "probe_b")
    problems, _ = validate_paths([tmp_path / "two"])
    assert any("probe_a -> probe_b -> probe_a" in pr.message or "probe_b -> probe_a -> probe_b" in pr.message for pr in problems), problems


@pytest.mark.parametrize("terms", [1200, 20000])
def test_long_expression_is_a_located_problem(tmp_path: Path, terms: int) -> None:
    problems = _problems(_lora(tmp_path, integrate="h + " + " + ".join(["delta"] * terms)))
    assert any(pr.field.endswith("integrate") and pr.location.line > 0 for pr in problems), problems


def test_deep_yaml_is_a_located_problem(tmp_path: Path) -> None:
    p = tmp_path / "deep.yaml"
    p.write_text("a: " + "[" * 10000 + "]" * 10000 + "\n")
    problems = _problems(p)
    assert problems and "nested" in problems[0].message and problems[0].location.line == 1
    p.write_text("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 300)))
    problems = _problems(p)
    assert problems and "nested" in problems[0].message


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x1b"])
def test_control_bytes_are_located(tmp_path: Path, ch: str) -> None:
    p = _lora(tmp_path)
    text = p.read_text().replace("name: Probe", f"name: Pro{ch}be")
    p.write_text(text)
    problems = _problems(p)
    assert problems and problems[0].location.line == 2 and "not allowed" in problems[0].message


def test_control_bytes_in_an_expression_are_refused() -> None:
    from pefref.language.expr import ExprError, parse_expr

    with pytest.raises(ExprError, match="control character"):
        parse_expr("h +\x00 delta")


def test_huge_integer_is_located(tmp_path: Path) -> None:
    problems = _problems(_lora(tmp_path, dim="1" * 5000))
    assert problems and problems[0].location.line > 0
    problems = _problems(_lora(tmp_path, alpha="9" * 5000))
    assert problems and problems[0].location.line > 0 and "digits" in problems[0].message


def test_hyperparameter_named_after_a_size_keeps_its_name(tmp_path: Path, catalog) -> None:
    from pefref.language.catalog import load_techniques
    from pefref.view.params import count_params

    p = _file(tmp_path, """\
    hyperparameters:
      d_inner: {type: int, default: 3, min: 1}
    modules:
      - name: m
        sites: [attn.q]
        form: parallel
        params:
          A: {shape: [d_inner, d_in], init: zeros()}
          B: {shape: [d_out, d_inner], init: zeros()}
        compute: linear(linear(x, A), B)
    """)
    loaded, _s, _p, problems = load_techniques([p], catalog.reference, catalog.techniques)
    assert not problems
    pc = count_params(loaded["probe"], catalog.shape("tiny-llama"), catalog)
    assert pc.trainable == 2 * 3 * (32 + 32)
    assert "d_inner" in pc.formula and "ner" not in pc.formula.replace("d_inner", "")
    out = runner.invoke(app, ["params", str(p), "--model", "tiny-llama", "--json"])
    assert out.exit_code == 0, out.output


# --- accepted nonsense -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_defaults_are_refused(tmp_path: Path, value: str) -> None:
    problems = _problems(_lora(tmp_path, alpha=value))
    assert any("finite" in pr.message and "alpha" in pr.field for pr in problems), problems


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_nan_and_inf_overrides_are_refused(value: str) -> None:
    out = _cli("params", "lora", "--model", "tiny-llama", "--set", f"alpha={value}")
    assert "finite" in out
    with pytest.raises(PefrefError, match="finite"):
        apply(tiny_model("llama"), "lora", alpha=float(value))


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    with pytest.raises(PefrefError, match="must be int"):
        apply(tiny_model("llama"), "lora", r=True)
    with pytest.raises(PefrefError, match="must be float"):
        apply(tiny_model("llama"), "lora", alpha=False)
    p = _lora(tmp_path)
    p.write_text(p.read_text().replace("default: 4", "default: true"))
    problems = _problems(p)
    assert any("boolean" in pr.message and pr.field.endswith("default") for pr in problems), problems
    p = _lora(tmp_path, dim="r")
    p.write_text(p.read_text().replace("shape: [r, d_in]", "shape: [true, d_in]"))
    assert any("boolean" in pr.message for pr in _problems(p))


def test_overrides_keep_their_types() -> None:
    from pefref.language.catalog import default_catalog
    from pefref.language.check import expand_modules
    from pefref.language.hparams import resolve_hyperparameters

    t = default_catalog().technique("lora")
    _m, decl = expand_modules(t, default_catalog().techniques)
    hps = resolve_hyperparameters(decl, {"r": "16", "alpha": "32", "dropout": 0})
    assert hps["r"] == 16 and isinstance(hps["r"], int)
    assert hps["alpha"] == 32.0 and isinstance(hps["alpha"], float) and math.isfinite(hps["alpha"])
    with pytest.raises(PefrefError):
        resolve_hyperparameters(decl, {"r": "2.5"})


# --- user architecture maps --------------------------------------------------------------------------------


def _map(tmp_path: Path, catalog, **site_updates) -> Path:
    import yaml

    src = (Path(__file__).resolve().parents[1] / "catalog" / "families" / "llama.yaml").read_text()
    data = yaml.safe_load(src)
    data["family"] = "my_llama"
    for site, upd in site_updates.items():
        data["sites"][site] = {**data["sites"].get(site, {}), **upd}
    p = tmp_path / "my_llama.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("path", ["model.layers.{x}.self_attn.q_proj", "model.layers.{i.__class__}.self_attn.q_proj", "model.layers.{i}.self_attn.q_proj{"])
def test_user_map_paths_allow_only_the_layer_index(tmp_path: Path, catalog, path: str) -> None:
    fam = _map(tmp_path, catalog, **{"attn.q": {"path": path}})
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(CatalogError) as e:
        apply(model, "lora", family=fam)
    msg = str(e.value)
    assert "sites.attn.q.path" in msg and "{i}" in msg and "my_llama.yaml:" in msg
    assert_same_state(before, model_state(model))


def test_user_map_site_bound_to_a_norm_is_refused(tmp_path: Path, catalog) -> None:
    fam = _map(tmp_path, catalog, **{"attn.q": {"path": "model.layers.{i}.input_layernorm"}})
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(PefrefError, match="attn.q.*norm.*linear"):
        apply(model, "lora", family=fam)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("start,size", [("-4", "d"), ("0", "4 * d"), ("d", "0"), ("2 * d", "d + 1")])
def test_user_map_slices_must_lie_within_the_module(tmp_path: Path, catalog, start: str, size: str) -> None:
    fam = _map(tmp_path, catalog, **{"attn.q": {"path": "model.layers.{i}.self_attn.q_proj", "slice": {"start": start, "size": size}}})
    model = tiny_model("llama")
    before = model_state(model)
    with pytest.raises(PefrefError, match="slice"):
        apply(model, "lora", family=fam)
    assert_same_state(before, model_state(model))


def test_user_map_unknown_size_in_a_slice_is_located(tmp_path: Path, catalog) -> None:
    fam = _map(tmp_path, catalog, **{"attn.q": {"path": "model.layers.{i}.self_attn.q_proj", "slice": {"start": "0", "size": "dd"}}})
    with pytest.raises(CatalogError, match="unknown name 'dd'"):
        apply(tiny_model("llama"), "lora", family=fam)


def test_a_valid_user_map_still_works(tmp_path: Path, catalog) -> None:
    fam = _map(tmp_path, catalog)
    model = tiny_model("llama")
    a = apply(model, "lora", family=fam)
    assert a.num_trainable() > 0
    x = torch.randint(3, 100, (1, 4))
    model(input_ids=x)
    a.remove()


def test_an_op_called_with_the_wrong_arguments_is_located(tmp_path: Path) -> None:
    """Found by the input fuzzer: ``sqrt()`` in a shape validated, then counting its parameters raised a TypeError."""
    from pefref.language.expr import ExprError, evaluate, parse_expr
    from pefref.language.hparams import _scalar_ops

    problems = _problems(_lora(tmp_path, dim="sqrt()"))
    assert any("sqrt: missing a required argument" in pr.message and pr.field.endswith("shape[0]") for pr in problems), problems
    with pytest.raises(ExprError, match="sqrt: too many positional arguments"):
        evaluate(parse_expr("sqrt(4, 9)"), {}, _scalar_ops())
