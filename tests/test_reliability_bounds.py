"""Every op's output is bounded before it runs; apply's memory budget counts the transient peak.

Validate infers each op's result shape on the reference sizes and refuses one over
``max_elements`` (located at the op's column); apply infers them again on the model's
sizes (hyperparameter overrides included) and refuses a peak (kept tensors plus the largest
transient: an SVD, a QR, an intermediate) over the allocation budget, before the model changes.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pefref.language.catalog import default_catalog
from pefref.language.errors import PefrefError
from pefref.language.schema import Technique
from pefref.language.validate import validate_paths
from pefref.runtime.api import apply
from pefref.runtime.applying import plan

from .conftest import tiny_model
from .modelstate import assert_same_state, model_state

pytestmark = pytest.mark.timeout(600)  # per test: an op that is not refused before it runs would hang; that fails the test (no time is asserted)

HEAD = """\
id: probe
name: Probe
paper: {title: t, authors: a, year: 2024, arxiv: "2401.00001"}
hyperparameters:
  r: {type: int, default: 4, min: 1}
  n: {type: int, default: 3000, min: 1}
modules:
  - name: m
    sites: [attn.q]
    form: parallel
    params:
      A: {shape: [r, d_in], init: zeros()}
      B: {shape: [d_out, r], init: zeros()}
"""


def _file(tmp_path: Path, compute: str, init_a: str = "zeros()") -> Path:
    body = HEAD.replace("init: zeros()}", f"init: \"{init_a}\"}}", 1) + f"    compute: \"{compute}\"\n    integrate: h + delta\n"
    p = tmp_path / "probe.yaml"
    p.write_text(textwrap.dedent(body))
    return p


LOW_RANK = "linear(linear(x, A), B)"
# each adds zero times a reduction of a huge tensor: the result's shape is right, so only the size bound can refuse it
HUGE = {
    "eye": "0 * sum(sum(eye(10**6, A), -1), -1)",
    "kron_square": "0 * sum(sum(kron(kron(B, t(B)), kron(B, t(B))), -1), -1)",
    "scatter2d": "0 * sum(sum(scatter2d(sum(A, 0), topk_indices(A, 2, 0), 10**5, 10**5), -1), -1)",  # positions: integer indices
    "outer": "0 * sum(sum(unsqueeze(unsqueeze(x, -1), -1) * unsqueeze(eye(4096, A), 0), -1), -1)",  # broadcasting: an outer product
}


@pytest.mark.parametrize("op", ["eye", "kron_square", "scatter2d", "outer"])
def test_huge_op_result_is_a_located_problem_at_validate(tmp_path: Path, op: str) -> None:
    compute = f"{LOW_RANK} + {HUGE[op]}"
    p = _file(tmp_path, compute)
    problems, _ = validate_paths([p])
    hits = [pr for pr in problems if "more than the limit" in pr.message]
    assert hits, problems
    assert hits[0].field.endswith("compute") and hits[0].location.line == 14
    # the column points into the expression, at or before the op that gives the tensor (the outermost over the limit)
    text_col = (p.read_text().splitlines()[13].index('"') + 2)
    assert text_col < hits[0].location.column <= text_col + len(compute)


@pytest.mark.parametrize("bad", ["eye(-3, A)", "eye(2.5, A)", "scatter2d(sum(A, 0), topk_indices(A, 2, 0), -1, 4)"])
def test_negative_or_fractional_sizes_are_located(tmp_path: Path, bad: str) -> None:
    p = _file(tmp_path, f"{LOW_RANK} + 0 * sum(sum({bad}, -1), -1)")
    problems, _ = validate_paths([p])
    assert any("non-negative integer" in pr.message and pr.field.endswith("compute") for pr in problems), problems


def test_huge_tensor_in_an_init_expression_is_located(tmp_path: Path) -> None:
    # kron(W, W) of the [512, 512] reference weight: [262144, 262144]
    p = _file(tmp_path, LOW_RANK, init_a="zeros() + 0 * sum(sum(kron(W, W), -1), -1)")
    problems, _ = validate_paths([p])
    assert any("more than the limit" in pr.message and pr.field.endswith("params.A.init") for pr in problems), problems


@pytest.mark.parametrize("op", sorted(HUGE))
def test_apply_refuses_a_huge_op_before_running_it(tmp_path: Path, op: str) -> None:
    from pefref.language.limits import limits

    # a Technique built in Python skips validate: apply's own inference (on the model's sizes) refuses it
    tech = Technique.model_validate(yaml.safe_load(_file(tmp_path, f"{LOW_RANK} + {HUGE[op]}").read_text()))
    model = tiny_model("llama")
    before = model_state(model)
    with limits(max_alloc_bytes=1 << 30), pytest.raises(PefrefError, match=r"attn\.q|budget") as e:
        apply(model, tech)
    assert "more than the limit" in str(e.value) or "over the allocation budget" in str(e.value)
    assert_same_state(before, model_state(model))


def test_override_that_makes_an_op_huge_is_refused_at_apply(tmp_path: Path) -> None:
    from pefref.language.limits import limits

    p = _file(tmp_path, f"{LOW_RANK} + 0 * sum(sum(eye(n, A), -1), -1)")
    assert validate_paths([p])[0] == []  # n = 3000 by default: 9 million entries, fine
    model = tiny_model("llama")
    before = model_state(model)
    with limits(max_alloc_bytes=1 << 30):
        with pytest.raises(PefrefError, match=r"eye giving \[30000, 30000\].*over the allocation budget"):
            apply(model, p, n=30000)  # 3.4 GiB: within max_elements, over this budget
        with pytest.raises(PefrefError, match=r"column \d+ .*eye gives a tensor of shape \[1000000, 1000000\]|eye gives a tensor of shape \[1000000, 1000000\]"):
            apply(model, p, n=10**6)
        assert_same_state(before, model_state(model))
        adapter = apply(model, p)  # the default size applies
    adapter.remove()
    assert_same_state(before, model_state(model))


def _plan_of(tid: str, **hps) -> tuple[int, int]:
    """(kept, peak) bytes apply plans for ``tid`` on a fresh tiny model (its plan, read before anything is built)."""
    planned = plan(tiny_model("llama"), tid, default_catalog(), hyperparameters=hps).shapes
    return planned.nbytes, planned.peak


@pytest.mark.parametrize("tid", ["pissa", "oft"])
def test_budget_between_kept_and_peak_is_refused_before_anything_changes(tid: str) -> None:
    from pefref.language.limits import limits

    kept, peak = _plan_of(tid)
    assert peak > kept > 0  # PiSSA: an SVD of each host weight; OFT: the Cayley transform's intermediates
    model = tiny_model("llama")
    before = model_state(model)
    with limits(max_alloc_bytes=(kept + peak) // 2), pytest.raises(PefrefError, match="at its peak") as e:
        apply(model, tid)
    assert "kept" in str(e.value) and "while evaluating" in str(e.value)
    assert_same_state(before, model_state(model))
    with limits(max_alloc_bytes=peak):
        apply(model, tid).remove()
    assert_same_state(before, model_state(model))


def test_svd_workspace_is_counted() -> None:
    kept, peak = _plan_of("pissa")
    lora_kept, lora_peak = _plan_of("lora", r=8)
    # PiSSA's transient is an SVD of a host weight (fp32 copy and factors): more than LoRA's largest intermediate
    assert peak - kept > lora_peak - lora_kept
