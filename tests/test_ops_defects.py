"""Defects that passed validate and failed only in apply (or computed something else than documented)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.ops import PRIMITIVES
from pefref.runtime.api import apply
from tests.conftest import model_inputs, output_of, tiny_model

PROBE = """\
id: {tid}
name: probe
paper: {{title: "x", authors: y, year: 2021, arxiv: "2106.09685"}}
modules:
  - name: m
    sites: [{site}]
    form: {form}
    params:
      g: {{shape: [d_out], init: "{init}"}}
    compute: {compute}
    integrate: h + delta
"""


def _load(tmp_path: Path, compute: str, site: str = "attn.q", form: str = "parallel", init: str = "normal(std=0.1)", tid: str = "probe"):
    p = tmp_path / f"{tid}.yaml"
    p.write_text(PROBE.format(tid=tid, site=site, form=form, compute=compute, init=init), encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    return loaded.get(tid), problems


def test_sqrt_and_the_scalar_ops_work_on_tensors_and_numbers(tmp_path: Path) -> None:
    assert PRIMITIVES["sqrt"].fn(9) == 3.0 and PRIMITIVES["log2"].fn(8) == 3.0 and PRIMITIVES["min"].fn(2, 3) == 2
    a, b = torch.randn(3, 4), torch.randn(4)
    assert torch.equal(PRIMITIVES["sqrt"].fn(a.abs()), a.abs().sqrt())
    assert torch.equal(PRIMITIVES["min"].fn(a, b), torch.minimum(a, b)) and torch.equal(PRIMITIVES["max"].fn(a, 0.0), a.clamp(min=0.0))
    t, problems = _load(tmp_path, "g * sqrt(linear(x, W) * linear(x, W) + 1)")
    assert not problems
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    apply(model, t)
    assert not torch.allclose(output_of(model, inputs), base)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_the_host_bias_b_is_bound_and_zero_where_the_host_has_none(tmp_path: Path, family: str) -> None:
    """``compute: g * b`` adds ``g ⊙ b`` to the query projection: the same as adding it to the host's bias (GPT-2: the
    query rows of the fused c_attn; llama's projections have no bias: b is zeros, nothing changes)."""
    t, problems = _load(tmp_path, "g * b")
    assert not problems
    model = tiny_model(family)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    expected = copy.deepcopy(model)
    inputs = model_inputs(family)
    ad = apply(model, t)
    g = {k: v for k, v in ad.state_dict().items() if k.endswith(".g")}
    with torch.no_grad():
        for k, v in g.items():
            layer = int(k.split("__")[-1].split(".")[0])
            if family == "gpt2":
                host = expected.transformer.h[layer].attn.c_attn
                host.bias[: v.shape[0]] += v * host.bias[: v.shape[0]]
            elif family == "bert":
                host = expected.bert.encoder.layer[layer].attention.self.query if hasattr(expected, "bert") else expected.encoder.layer[layer].attention.self.query
                host.bias += v * host.bias
    got, want = output_of(model, inputs), output_of(expected, inputs)
    assert (got - want).abs().max().item() <= 1e-5
    if family != "llama":
        assert not torch.allclose(got, output_of(tiny_model(family), inputs))


def test_initialiser_arguments_are_checked_at_validate(tmp_path: Path) -> None:
    for init, needle in [("eye(2, W)", "the initialiser"), ("normal(std=0.1, bogus=3)", "bogus"), ("normal(0.1, 0.0, 2)", "too many")]:
        _t, problems = _load(tmp_path, "g * 1.0", init=init)
        assert len(problems) == 1 and needle in problems[0].message and problems[0].field.endswith("params.g.init"), (init, problems)
        assert problems[0].location.line == 9
    _t, problems = _load(tmp_path, "g * softmax(x, dim=-1, bogus=1)")
    assert problems and "bogus" in problems[0].message
    _t, problems = _load(tmp_path, "g * dropout(x, 0.1, True)")
    assert problems and "too many" in problems[0].message


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # one head
    allowed = mask[:, None, :].bool().expand(-1, q.shape[1], -1)
    if causal:
        allowed = allowed & torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    out = torch.zeros_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1])).clone()
    for bi in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys = allowed[bi, i]
            if keys.any():
                out[bi, i] = torch.softmax(s[bi, i][keys], -1) @ v[bi][keys]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_never_attends_to_a_padded_key_not_even_its_own(causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    got = PRIMITIVES["attention"].fn(q, k, v, heads=1, causal=causal, mask=mask)
    want = _attention_reference(q, k, v, mask, causal)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-5
    # the padded query of the second sequence reads only the real keys, not its own value
    v2 = v.clone()
    v2[1, 4] += 100.0
    assert torch.allclose(PRIMITIVES["attention"].fn(q, k, v2, heads=1, causal=causal, mask=mask)[1, 4], got[1, 4])


@pytest.mark.parametrize(("compute", "init", "needle"), [
    ("g * mean(argmax(x), dim=-1)", "normal(std=0.1)", "integer tensor"),        # indices where values are needed
    ("g * relu(2)", "normal(std=0.1)", "is a tensor, found 2"),                   # a number where the op takes a tensor
    ("g * narrow(x, 0, 0, g)", "normal(std=0.1)", "is a number"),                 # a tensor where it takes a number
    ("g * 1.0", "kaiming_uniform(a=1.0)", "at least 2 dimensions"),              # fan in and out of a vector
    ("g * 1.0", "randint(5)", "cannot train"),                                    # integer tensors cannot train
    ("g * take(x, g)", "normal(std=0.1)", "integer tensor"),                      # a floating index
])
def test_validate_refuses_what_apply_would_fail_on(tmp_path: Path, compute: str, init: str, needle: str) -> None:
    """Cases the property test (test_property_validate.py) found validating and failing in apply."""
    _t, problems = _load(tmp_path, compute, init=init)
    assert problems and needle in problems[0].message, problems
    assert problems[0].location.line is not None


def test_a_whole_float_size_is_an_integer_at_run_time(tmp_path: Path) -> None:
    """``r / 2`` is 2.0: shape inference takes it as a size, so the ops get it as the integer 2 (torch's unflatten refused)."""
    t, problems = _load(tmp_path, "g * flatten(unflatten(linear(x, W), -1, (2, d_out / 2)))")
    assert not problems, problems
    model = tiny_model("gpt2")
    apply(model, t)
    output_of(model, model_inputs("gpt2"))


def test_a_module_tensor_named_like_a_host_tensor_shadows_it(tmp_path: Path) -> None:
    _t, problems = _load(tmp_path, "g * b * 0 + linear(x, W) * 0", tid="shadow")
    assert not problems
    p = tmp_path / "shadow2.yaml"
    p.write_text(PROBE.format(tid="shadow2", site="attn.q", form="parallel", compute="b * 1.0", init="ones()").replace("      g:", "      b:"), encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    assert not problems
    model = tiny_model("gpt2")
    inputs = model_inputs("gpt2")
    base = output_of(model, inputs)
    ad = apply(model, loaded["shadow2"])
    unit = ad.units["m__attn_q__0"]
    assert "b" not in unit.used_inputs  # the module's own b, not the host's
    with torch.no_grad():
        for k, v in ad.state_dict().items():
            if k.endswith(".b"):
                v.zero_()
    assert torch.allclose(output_of(model, inputs), base, atol=1e-6)


def test_validate_refuses_a_gaussian_sample_whose_variance_does_not_fit_its_mean(tmp_path: Path) -> None:
    _t, problems = _load(tmp_path, "g * mean(gaussian_sample(unsqueeze(linear(x, W), -1), unsqueeze(g, 0)), -1)")
    assert problems and "log-variance" in problems[0].message, problems


def test_an_initialiser_reads_only_tensors_shared_as_it_is(tmp_path: Path) -> None:
    """A shared tensor starts once at its largest shape over the sites; reading an unshared one (one site's size) would not fit."""
    p = tmp_path / "mixed.yaml"
    p.write_text(PROBE.format(tid="mixed", site="attn.q", form="parallel", compute="g * G", init="normal(std=0.1)")
                 .replace("      g: {shape: [d_out], init: \"normal(std=0.1)\"}", "      g: {shape: [d_out], init: \"normal(std=0.1)\"}\n      G: {shape: [d_out], init: \"0.5 * g\", shared: sites}"),
                 encoding="utf-8")
    cat = default_catalog()
    _l, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    assert len(problems) == 1 and "reads only tensors shared as this one is" in problems[0].message, problems


def test_indices_pass_through_a_rearrangement_and_stay_indices(tmp_path: Path) -> None:
    """A layout op (reshape, flatten, narrow, ...) takes an integer tensor and gives one: indices reshaped before they
    index validate and run; the reshaped indices are still refused where values are needed."""
    ok = "g * 0 + linear(x, W) * 0 + mean(index_select(g, 0, reshape(argmax(unsqueeze(g, 0), dim=0), (-1,))), dim=-1)"
    t, problems = _load(tmp_path, ok, tid="reshaped")
    assert not problems, problems
    model = tiny_model("gpt2")
    apply(model, t)
    output_of(model, model_inputs("gpt2"))
    _t, problems = _load(tmp_path, "g * mean(reshape(argmax(x), (-1,)), dim=-1)", tid="stillint")
    assert problems and "integer tensor" in problems[0].message, problems
