"""Language capabilities behind the new primitives: initialisers that read earlier tensors, a unit's shared seed,
stochastic modules, word choices of an op, integer index tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pefref.language.catalog import default_catalog, load_techniques
from pefref.runtime.api import apply
from pefref.view.analysis import mergeability, stochastic_ops
from tests.conftest import model_inputs, output_of, tiny_model

HEAD = """\
id: {tid}
name: probe
paper: {{title: "x", authors: y, year: 2021, arxiv: "2106.09685"}}
hyperparameters:
  r: {{type: int, default: 4, min: 2}}
modules:
  - name: m
    sites: [attn.q, attn.v]
    form: {form}
    params:
"""


def _load(tmp_path: Path, params: str, fields: str, form: str = "parallel", tid: str = "probe"):
    p = tmp_path / f"{tid}.yaml"
    p.write_text(HEAD.format(tid=tid, form=form) + params + fields, encoding="utf-8")
    cat = default_catalog()
    loaded, _s, _p, problems = load_techniques([p], cat.reference, cat.techniques)
    return loaded.get(tid), problems


def test_an_initialiser_reads_the_initial_value_of_a_tensor_declared_before_it(tmp_path: Path) -> None:
    """DEFT's identity start: R = Q_P^T W with Q_P = qr(P), so the update Q_P (R - Q_P^T W) is zero at start."""
    t, problems = _load(tmp_path, """\
      P: {shape: [d_out, r], init: "normal(std=0.02)"}
      R: {shape: [r, d_in], init: "t(qr_q(P)) @ W"}
""", "    compute: linear(x, qr_q(P) @ (R - t(qr_q(P)) @ W))\n    integrate: h + delta\n")
    assert not problems, problems
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    torch.manual_seed(0)
    ad = apply(model, t)
    assert (output_of(model, inputs) - base).abs().max().item() <= 1e-5
    unit = ad.units["m__attn_q__0"]
    q = torch.linalg.qr(unit.own("P"))[0]
    W = model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(unit.own("R"), q.T @ W, atol=1e-5)
    with torch.no_grad():
        unit.own("R").add_(0.1)
    assert not torch.allclose(output_of(model, inputs), base)


def test_an_initialiser_cannot_read_a_tensor_declared_after_it(tmp_path: Path) -> None:
    _t, problems = _load(tmp_path, """\
      R: {shape: [r, d_in], init: "t(P) @ W"}
      P: {shape: [d_out, r], init: "normal(std=0.02)"}
""", "    compute: linear(linear(x, R), P)\n    integrate: h + delta\n")
    assert len(problems) == 1 and "unknown name 'P'" in problems[0].message and problems[0].field.endswith("params.R.init")


def test_two_tensors_from_one_seeded_draw_per_unit(tmp_path: Path) -> None:
    """peft's orthogonal LoRA start: A and B from the odd and even rows of one orthogonal draw (init_seed)."""
    t, problems = _load(tmp_path, """\
      A: {shape: [r, d_in], init: "t(t(strided(random_orthogonal(r, init_seed), 0, 0, 2)) @ strided(random_orthogonal(r, init_seed), 0, 0, 2)) @ gaussian((r, d_in), init_seed + 1)"}
      B: {shape: [d_out, r], init: "gaussian((d_out, r), init_seed + 2) @ t(strided(random_orthogonal(r, init_seed), 0, 1, 2)) @ strided(random_orthogonal(r, init_seed), 0, 1, 2)"}
""", "    compute: linear(linear(x, A), B)\n    integrate: h + delta\n")
    assert not problems, problems
    outs, units = [], []
    for seed in (3, 3, 4):
        model = tiny_model("llama")
        torch.manual_seed(seed)
        ad = apply(model, t)
        units.append(ad.units)
        outs.append(output_of(model, model_inputs("llama")))
    a, b = units[0]["m__attn_q__0"].own("A"), units[0]["m__attn_q__0"].own("B")
    assert torch.allclose(b @ a, torch.zeros(b.shape[0], a.shape[1]), atol=1e-4)  # the two halves of one draw are orthogonal
    assert not torch.equal(a, units[0]["m__attn_q__1"].own("A"))  # every unit draws anew
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])  # reproducible under torch.manual_seed


def test_a_stochastic_module_samples_in_training_and_is_its_mean_in_eval(tmp_path: Path) -> None:
    """PVeRA-like: a Gaussian latent code, sampled while training, its mean in eval; merged, the mean is folded."""
    t, problems = _load(tmp_path, """\
      A: {shape: [r, d_in], init: "normal(std=0.3)"}
      L: {shape: [r, d_in], init: "normal(std=0.3)"}
      B: {shape: [d_out, r], init: "normal(std=0.3)"}
""", "    compute: linear(gaussian_sample(linear(x, A), linear(x, L)), B)\n    integrate: h + delta\n")
    assert not problems, problems
    (m,) = t.modules
    assert stochastic_ops(m) == ["gaussian_sample"] and mergeability(m, ["linear"]) == "yes"
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    ad = apply(model, t)
    ev1, ev2 = output_of(model, inputs), output_of(model, inputs)
    assert torch.equal(ev1, ev2)
    model.train()
    torch.manual_seed(1)
    tr1 = output_of(model, inputs)
    torch.manual_seed(1)
    tr2 = output_of(model, inputs)
    tr3 = output_of(model, inputs)
    assert torch.equal(tr1, tr2) and not torch.equal(tr1, tr3) and not torch.allclose(tr1, ev1)
    model.eval()
    ad.merge()
    assert (output_of(model, inputs) - ev1).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("call", "ok"), [("'db2'", True), ("wavelet='sym3'", True), ("'db99'", False), ("wavelet='bogus'", False)])
def test_an_op_takes_a_word_only_among_its_declared_choices(tmp_path: Path, call: str, ok: bool) -> None:
    _t, problems = _load(tmp_path, "      S: {shape: [16, 16], init: 'zeros()'}\n",
                         f"    compute: linear(x, W) * sum(sum(idwt2(S, {call})))\n    integrate: h + delta\n")
    assert (not problems) == ok, problems
    if not ok:
        assert "choices" in problems[0].message and "idwt2" in problems[0].message
    _t, problems = _load(tmp_path, "      S: {shape: [16, 16], init: 'zeros()'}\n", "    compute: linear(x, W, 'db2') * sum(sum(S))\n    integrate: h + delta\n")
    assert problems and "word" in problems[0].message


def test_an_integer_index_tensor_reads_a_shared_bank(tmp_path: Path) -> None:
    """UniLoRA-like: A and B read one trainable vector at stored random positions (int64 buffers)."""
    t, problems = _load(tmp_path, """\
      theta: {shape: [64], init: "normal(std=0.1)", shared: all}
      iA: {shape: [r, d_in], init: "randint(64)", trainable: false}
      iB: {shape: [d_out, r], init: "randint(64)", trainable: false}
""", "    compute: linear(linear(x, take(theta, iA)), take(theta, iB))\n    integrate: h + delta\n")
    assert not problems, problems
    model = tiny_model("llama")
    inputs = model_inputs("llama")
    base = output_of(model, inputs)
    ad = apply(model, t)
    assert ad.num_trainable() == 64
    idx = ad.units["m__attn_q__0"].own("iA")
    assert idx.dtype == torch.int64 and int(idx.max()) < 64
    assert not torch.allclose(output_of(model, inputs), base)
    output_of(model, inputs).sum().backward()
    theta = next(p for p in ad.units.parameters() if p.requires_grad)
    assert theta.grad is not None and theta.grad.abs().sum() > 0


@pytest.mark.parametrize(("compute", "needle"), [("linear(fft(x), W)", "linear takes real tensors"), ("fft(linear(x, W))", "complex"),
                                                 ("fft(x) @ t(W)", "@ of a complex tensor"), ("real(ifft(fft(linear(x, W)))) * 2", None)])
def test_validate_tracks_complex_tensors(tmp_path: Path, compute: str, needle: str | None) -> None:
    """fft/ifft give complex tensors: only real(), fft/ifft and elementwise arithmetic take them; a field may not give one."""
    _t, problems = _load(tmp_path, "      g: {shape: [d_out], init: 'ones()'}\n", f"    compute: g * {compute}\n    integrate: h + delta\n")
    if needle is None:
        assert not problems, problems
    else:
        assert len(problems) == 1 and needle in problems[0].message, problems
