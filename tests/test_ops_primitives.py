"""The general primitives against plain torch (and against peft's own functions where peft has them)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pefref.language.expr import parse_expr
from pefref.language.shapecheck import infer_shape
from pefref.ops import PRIMITIVES
from pefref.ops.inits import init_table
from pefref.ops.shapes import SHAPE_RULES, ComplexShape, IntShape, Shape

P = {k: p.fn for k, p in PRIMITIVES.items()}
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def _shape_of(text: str, **env: torch.Tensor | int) -> Shape:
    """The shape rule's answer for an expression over tensors (by their shapes) and numbers."""
    def kind(v: torch.Tensor) -> Shape:
        return ComplexShape(v.shape) if v.is_complex() else Shape(v.shape) if v.is_floating_point() else IntShape(v.shape)

    return infer_shape(parse_expr(text).tree, {k: kind(v) if isinstance(v, torch.Tensor) else v for k, v in env.items()})


def _agree(text: str, **env: torch.Tensor | int) -> torch.Tensor:
    """Evaluate ``text`` with the primitives and check the shape rule gives the result's shape."""
    from pefref.language.expr import evaluate

    got = evaluate(parse_expr(text), env, P)
    assert tuple(got.shape) == tuple(_shape_of(text, **env)), text
    return got


def test_pointwise_ops_match_torch() -> None:
    a, w, b = rand(2, 3, 8), rand(8), rand(8)
    assert torch.equal(_agree("sin(a)", a=a), torch.sin(a)) and torch.equal(_agree("cos(a)", a=a), torch.cos(a))
    assert torch.equal(_agree("clamp(a, min=-0.5, max=0.5)", a=a), a.clamp(-0.5, 0.5))
    assert torch.equal(_agree("clamp(a, max=0.0)", a=a), a.clamp(max=0.0))
    assert torch.allclose(_agree("layer_norm(a, w, b)", a=a, w=w, b=b), F.layer_norm(a, (8,), w, b))
    assert torch.allclose(_agree("layer_norm(a)", a=a), (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5), atol=1e-5)
    # flatten is the inverse of unflatten
    u = _agree("unflatten(a, -1, (2, 4))", a=a)
    assert torch.equal(_agree("flatten(u)", u=u), a) and tuple(_agree("flatten(a, 0, 1)", a=a).shape) == (6, 8)
    assert torch.equal(_agree("sqrt(a * a + 1)", a=a), torch.sqrt(a * a + 1))
    bank, idx = rand(10), torch.randint(0, 10, (3, 4), generator=G)
    assert torch.equal(_agree("take(bank, idx)", bank=bank, idx=idx), bank[idx])
    m = rand(6, 5)
    assert torch.equal(_agree("strided(m, 0, 1, 2)", m=m), m[1::2]) and torch.equal(_agree("strided(m, -1, 0, 3)", m=m), m[:, 0::3])


def test_fft_ifft_and_real_match_torch_fft() -> None:
    a = rand(3, 8)
    assert torch.allclose(_agree("fft(a)", a=a), torch.fft.fft(a)) and torch.allclose(_agree("ifft(a, dim=0)", a=a), torch.fft.ifft(a, dim=0))
    assert torch.allclose(_agree("real(ifft(fft(a)))", a=a), a, atol=1e-6)
    assert _agree("real(fft(a), a)", a=a.double()).dtype == torch.float64


def test_block_circulant_matches_peft_c3a() -> None:
    from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast

    w, x = rand(3, 2, 4), rand(2, 5, 8)  # m=3 blocks out, n=2 in, block size 4
    got = _agree("block_circulant(x, w)", x=x, w=w)
    assert (got - BlockCircularConvolution.apply(x, w)).abs().max().item() <= 1e-5
    C = _agree("circulant_matrix(w)", w=w)
    assert tuple(C.shape) == (12, 8) and (C - get_circulant_fast(w)).abs().max().item() <= 1e-5
    assert (x @ C.T - got).abs().max().item() <= 1e-5  # the matrix is what the product applies
    # each block is circulant: every row a rotation of the first
    blk = C[:4, :4]
    assert all(torch.allclose(blk[i], blk[0].roll(i), atol=1e-5) for i in range(4))


@pytest.mark.parametrize("dims", [(3, 2, 4), (2, 1, 16)])
def test_block_circulant_backward_is_autograds_through_the_transforms(dims) -> None:
    """The lean backward (x and w saved, spectra recomputed) gives autograd's gradients, for both inputs."""
    from pefref.ops.spectral import _circulant_forward, block_circulant

    m, n, b = dims
    x, w, g = rand(2, 5, n * b).requires_grad_(), rand(m, n, b).requires_grad_(), rand(2, 5, m * b)
    got = torch.autograd.grad((block_circulant(x, w) * g).sum(), (x, w))
    ref = torch.autograd.grad((_circulant_forward(x, w) * g).sum(), (x, w))
    for a, r in zip(got, ref):
        assert (a - r).abs().max().item() <= 1e-5 * max(1.0, r.abs().max().item())
    assert got[0].abs().max().item() > 0 and got[1].abs().max().item() > 0


@pytest.mark.parametrize("wavelet", ["haar", "db1", "db2", "db4", "sym3", "coif1", "coif2"])
def test_idwt2_matches_peft_waverec2d(wavelet: str) -> None:
    from peft.tuners.waveft.waverec2d import waverec2d

    a = rand(24, 20)
    got = _agree(f"idwt2(a, {wavelet!r})", a=a)
    h2, w2 = 12, 10
    want = waverec2d([a[None, :h2, :w2], (a[None, :h2, w2:], a[None, h2:, :w2], a[None, h2:, w2:])], wavelet)[0]
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5
    if wavelet in ("haar", "db1"):
        assert got.shape == a.shape


def test_idwt2_shape_rule_refuses_odd_sizes_and_unknown_wavelets() -> None:
    from pefref.ops.shapes import ShapeMismatch

    with pytest.raises(ShapeMismatch):
        SHAPE_RULES["idwt2"](Shape((5, 4)))
    with pytest.raises(ShapeMismatch):
        SHAPE_RULES["idwt2"](Shape((4, 4)), "db99")


def test_qr_factors_match_torch_and_olora_relation() -> None:
    w = rand(12, 7)
    q, r = torch.linalg.qr(w)
    assert torch.allclose(_agree("qr_q(w)", w=w), q) and torch.allclose(_agree("qr_r(w, 3)", w=w), r[:3])
    assert torch.allclose(_agree("qr_q(w, 3)", w=w) @ _agree("qr_r(w, 3)", w=w) + q[:, 3:] @ r[3:], w, atol=1e-5)


def test_randomised_svd_shares_one_seeded_draw_and_leaves_the_global_generator() -> None:
    w = rand(20, 16)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    u, s, vh = (_agree(f"svd_{f}(w, 4, niter=2, seed=7)", w=w) for f in ("u", "s", "vh"))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    U, S, V = torch.svd_lowrank(w, q=4, niter=2)
    assert torch.allclose(u, U) and torch.allclose(s, S) and torch.allclose(vh, V.T)
    exact = torch.linalg.svdvals(w)[:4]
    assert (s - exact).abs().max().item() < 0.5 * exact[0].item()  # close to the true spectrum


def test_seeded_draws_are_pure_functions_of_the_seed() -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = P["gaussian"]((3, 4), 11), P["gaussian"]((3, 4), 11)
    q = P["random_orthogonal"](6, 3)
    assert torch.equal(a, b) and not torch.equal(a, P["gaussian"]((3, 4), 12))
    assert torch.allclose(q @ q.T, torch.eye(6), atol=1e-5) and torch.equal(q, P["random_orthogonal"](6, 3))
    assert torch.equal(torch.random.get_rng_state(), before)
    # two tensors from one draw: the even and odd rows of one orthogonal matrix are orthogonal to each other
    odd, even = P["strided"](q, 0, 0, 2), P["strided"](q, 0, 1, 2)
    assert torch.allclose(odd @ even.T, torch.zeros(3, 3), atol=1e-5)


def test_randint_initialiser_draws_int64_from_the_global_generator() -> None:
    table = init_table((3, 5), torch.float32, "cpu")
    torch.manual_seed(4)
    got = table["randint"](7)
    torch.manual_seed(4)
    assert got.dtype == torch.int64 and torch.equal(got, torch.randint(0, 7, (3, 5)))
    assert table["randint"](3, low=2).eq(2).all()


def test_stochastic_ops_sample_in_training_and_are_deterministic_in_eval() -> None:
    mu, logvar, logits = rand(4, 6), rand(4, 6), rand(4, 6)
    assert torch.equal(P["gaussian_sample"](mu, logvar), mu)
    assert torch.equal(P["relaxed_bernoulli"](logits), torch.sigmoid(logits))
    assert P["randint_like"](mu, 5, fixed=2).eq(2).all()
    torch.manual_seed(1)
    z = P["gaussian_sample"](mu, logvar, training=True)
    torch.manual_seed(1)
    assert torch.equal(z, mu + torch.randn_like(mu) * torch.exp(0.5 * logvar))
    torch.manual_seed(2)
    rb = P["relaxed_bernoulli"](logits, 0.5, training=True)
    torch.manual_seed(2)
    want = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    assert torch.equal(rb, want) and ((rb > 0) & (rb < 1)).all()
    torch.manual_seed(3)
    ri = P["randint_like"](mu, 5, training=True)
    assert ri.dtype == torch.int64 and int(ri.max()) < 5 and len(ri.unique()) > 1
    assert all(PRIMITIVES[n].stochastic for n in ("gaussian_sample", "relaxed_bernoulli", "randint_like"))


def test_every_new_primitive_is_documented_with_math_and_a_rule() -> None:
    new = ["sin", "cos", "clamp", "layer_norm", "flatten", "take", "strided", "fft", "ifft", "real", "block_circulant",
           "circulant_matrix", "idwt2", "qr_q", "qr_r", "gaussian", "random_orthogonal", "gaussian_sample", "relaxed_bernoulli",
           "randint_like"]
    for n in new:
        p = PRIMITIVES[n]
        assert n in SHAPE_RULES, n
        assert ":math:" in p.doc or n in ("flatten", "strided", "real", "take"), n
    linear = {"flatten": (0,), "take": (0,), "strided": (0,), "fft": (0,), "ifft": (0,), "real": (0,), "block_circulant": (0, 1),
              "circulant_matrix": (0,), "idwt2": (0,)}
    for n, idx in linear.items():
        assert PRIMITIVES[n].linear_in == idx, n
    assert math.isclose(P["sqrt"](2), math.sqrt(2))
