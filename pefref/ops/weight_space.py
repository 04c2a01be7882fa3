"""Weight-space primitives: weight normalisation, truncated SVD factors, sparse spectra
and the inverse 2-D Fourier transform, Kronecker factor sizes, seeded random positions.

These build weight updates (or new weights) from a technique's tensors and the
host weight ``W`` ([out, in]): DoRA's magnitude/direction split, PiSSA's
principal-component initialisation, FourierFT's sparse spectrum, LoKr's
factorised dimensions. Each is general: any technique may call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.inits import initialiser
from pefref.ops.linear_maps import LinearMap, Mapped, NoLinearRule, Ops, as_map, dense, linear_rule

if TYPE_CHECKING:
    import torch

__all__ = [
    "weight_norm", "svd_u", "svd_s", "svd_vh", "top_right_singular", "scatter2d", "ifft2_real",
    "factor_left", "factor_right", "random_positions", "damped", "inv", "forget_decompositions",
]


# --- weight normalisation ----------------------------------------------------------------------


@primitive()
def weight_norm(v: torch.Tensor, g: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """Weight normalisation (Salimans & Kingma 2016, arXiv 1602.07868): each row of ``v`` is
    rescaled to the magnitude ``g``,

    :math:`W'_{i,:} = g_i \\, V_{i,:} / \\lVert V_{i,:} \\rVert_2`,

    with ``v`` of shape [out, in] and ``g`` of shape [out, 1] (or [out]). With ``detach=True`` the
    norm is treated as a constant for gradients (its value is unchanged), as DoRA does
    (Liu et al. 2024, arXiv 2402.09353, section 4.3). The result is not linear in ``v``; it applies
    no activation to hidden states (a weight-space normalisation, not a nonlinearity between
    projections).
    """
    import torch

    norm = torch.linalg.norm(v, dim=1, keepdim=True)  # [out, 1]
    if detach:
        norm = norm.detach()
    return g.reshape(-1, 1) * (v / norm)


@linear_rule("weight_norm")
def _weight_norm_map(ops: Ops, v: Any, g: Any, detach: bool = False) -> LinearMap:
    """With a detached norm, :math:`x W'^\\top = (x V^\\top) \\odot (g / \\lVert V \\rVert_{row})`: the rows' norms
    are computed from a constant copy of ``V`` (formed, used and freed at once, no graph), the output of ``V`` acting
    on ``x`` is rescaled; nothing ``V``-sized is kept for backward. A norm with gradients needs ``V`` itself: formed."""
    if detach is not True:
        raise NoLinearRule("weight_norm with a differentiated norm")
    m = as_map(v)
    if isinstance(g, LinearMap) and g.involves_w:
        raise NoLinearRule("a magnitude that depends on W")
    gv = dense(ops, g)

    def apply(x: Any) -> Any:
        norm = ops["row_norm"](m.value(ops, True))  # [out, 1], a constant
        return m.apply(ops, x) * (gv.reshape(-1, 1) / norm).reshape(-1)

    return Mapped(m.shape, m.involves_w, apply=apply)


# --- truncated SVD (data-dependent initialisation) ------------------------------------------------


_MEMO: list[tuple[str, torch.Tensor, tuple[Any, ...], Any]] = []
"""The last few decompositions (op, input, arguments, result): an initialiser's expressions call one op on the same
matrix several times (``svd_u``, ``svd_s`` and ``svd_vh`` of one weight; a damped covariance read by each factor)."""


def _memo(op: str, a: torch.Tensor, args: tuple[Any, ...], fn: Any) -> Any:
    """``fn()``, or the result of an earlier call of ``op`` on a tensor equal to ``a`` with ``args`` (deterministic ops only)."""
    import torch

    if a.is_meta:
        return fn()
    for name, t, targs, out in _MEMO:
        if name == op and targs == args and t.shape == a.shape and t.dtype == a.dtype and t.device == a.device and torch.equal(t, a):
            return _copy(out)
    out = fn()
    _MEMO.append((op, a.detach().clone(), args, out))
    del _MEMO[:-4]
    return _copy(out)


def _copy(out: Any) -> Any:
    """A result handed out of the memo is the caller's own (it may become a parameter, trained in place)."""
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def forget_decompositions() -> None:
    """Drop the memoised decompositions (apply calls it when its units are built: their inputs may be large)."""
    _MEMO.clear()


def _svd(w: torch.Tensor, k: int = 0, niter: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ``w`` in fp32: the thin SVD, or with ``niter`` > 0 the randomised one of rank ``k``
    (:func:`torch.svd_lowrank`, Halko et al. 2011) drawn from a generator seeded with ``seed`` (torch's global
    generator is left as it was), so the three factors of one seed come from one draw. Memoised on the last few
    inputs (the factors of one matrix are read by several calls)."""
    return _memo("svd", w, (int(k), int(niter), int(seed)), lambda: _svd_now(w, k, niter, seed))


def _svd_now(w: torch.Tensor, k: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    if not niter:
        return torch.linalg.svd(w.float(), full_matrices=False)  # thin SVD in fp32
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        u, s, v = torch.svd_lowrank(w.float(), q=int(k), niter=int(niter))
    return u, s, v.T


@primitive()
def svd_u(w: torch.Tensor, k: int, niter: int = 0, seed: int = 0) -> torch.Tensor:
    """The leading ``k`` left singular vectors of ``w`` ([out, in] → [out, k]), from the thin SVD
    :math:`W = U \\operatorname{diag}(S) V^\\top` computed in fp32 (singular values descending).
    PiSSA (Meng et al. 2024, arXiv 2404.02948) initialises from them. ``niter`` > 0: the randomised SVD with
    that many subspace iterations instead (peft's ``pissa_niter_{niter}``), drawn from ``seed``: the calls of one
    seed (``svd_u``, ``svd_s``, ``svd_vh`` of one unit, e.g. ``seed=init_seed``) share one draw."""
    return _svd(w, k, niter, seed)[0][:, :k]


@primitive()
def svd_s(w: torch.Tensor, k: int, niter: int = 0, seed: int = 0) -> torch.Tensor:
    """The ``k`` largest singular values of ``w`` (a vector [k], descending), fp32 thin SVD (randomised with
    ``niter`` > 0, see :func:`svd_u`)."""
    return _svd(w, k, niter, seed)[1][:k]


@primitive()
def svd_vh(w: torch.Tensor, k: int, niter: int = 0, seed: int = 0) -> torch.Tensor:
    """The leading ``k`` right singular vectors of ``w`` as rows, :math:`V_{:, :k}^\\top` ([k, in]),
    fp32 thin SVD (randomised with ``niter`` > 0, see :func:`svd_u`)."""
    return _svd(w, k, niter, seed)[2][:k]


@primitive()
def top_right_singular(b: torch.Tensor, a: torch.Tensor, start: torch.Tensor, iters: int = 15) -> torch.Tensor:
    """The dominant right singular vector of a product of factors, :math:`v_1(BA)` for ``b`` [..., out, r]
    and ``a`` [..., r, in] (a batch of low-rank updates, e.g. stacked LoRA experts [E, out, r] and
    [E, r, in]) → [..., in], without forming :math:`BA`: ``iters`` steps of power iteration on
    :math:`A^\\top (B^\\top B) A`, whose eigenvectors are the right singular vectors of :math:`BA`,

    :math:`v_0 = s / (\\lVert s \\rVert + 10^{-8})`, :math:`v \\leftarrow w / (\\lVert w \\rVert + 10^{-8})`,
    :math:`w = A^\\top (B^\\top B)(A v)`,

    in fp32, from the start vector ``start`` ([in], shared by the batch, or [..., in]; e.g. a fixed tensor
    initialised with :func:`gaussian`). The result is unit length and defined up to its sign; with enough steps it
    is the first row of :func:`svd_vh` of :math:`BA`. A constant for gradients (computed without autograd), cast to
    ``a``'s dtype. Arrow (Ostapenko et al. 2024, arXiv 2405.11157) routes tokens by it: each LoRA expert's prototype."""
    import torch

    with torch.no_grad():
        a32, b32, s32 = a.detach().float(), b.detach().float(), start.detach().float()
        v = (s32 / (torch.linalg.vector_norm(s32, dim=-1, keepdim=True) + 1e-8)).expand(*a32.shape[:-2], a32.shape[-1]).unsqueeze(-1)
        c = b32.transpose(-1, -2) @ b32  # [..., r, r]
        for _ in range(int(iters)):
            w = a32.transpose(-1, -2) @ (c @ (a32 @ v))
            v = w / (torch.linalg.vector_norm(w, dim=-2, keepdim=True) + 1e-8)
        return v.squeeze(-1).to(a.dtype)


# --- covariances (initialisation from calibration statistics) ---------------------------------------


@primitive(nonlinear=True)
def damped(c: torch.Tensor, damp: float = 0.01, tol: float = 0.05) -> torch.Tensor:
    """A covariance ``c`` ([n, n]) made safely invertible by Tikhonov damping relative to its mean variance,

    :math:`C_\\lambda = C + \\lambda \\, \\overline{\\operatorname{diag} C} \\, I`,

    starting at :math:`\\lambda` = ``damp`` and doubling it until :math:`\\lVert C_\\lambda C_\\lambda^{-1} - I \\rVert_F`
    < ``tol`` (fp32), as the reference implementation of CorDA (Yang et al. 2024, arXiv 2406.05223) does before
    weighting a weight by the covariance of its inputs."""
    return _memo("damped", c, (float(damp), float(tol)), lambda: _damped_now(c.float(), float(damp), float(tol)))


def _damped_now(c: torch.Tensor, damp: float, tol: float) -> torch.Tensor:
    import torch

    if c.is_meta:  # shapes only (a model built without weights)
        return c.clone()
    eye_n = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    lam = float(damp)
    for _ in range(64):
        fixed = c + torch.diag(torch.ones(c.shape[0], device=c.device) * torch.mean(torch.diag(c)) * lam)
        if torch.dist(fixed @ torch.linalg.inv(fixed), eye_n).item() < tol:
            return fixed
        lam *= 2
    raise ValueError(f"damped: the covariance stays singular after damping it by {lam:g} times its mean variance")


@primitive(nonlinear=True)
def inv(a: torch.Tensor) -> torch.Tensor:
    """The inverse :math:`A^{-1}` of a square matrix ([n, n], fp32 :func:`torch.linalg.inv`), e.g. of a damped covariance."""
    import torch

    return _memo("inv", a, (), lambda: torch.linalg.inv(a.float()))


# --- sparse spectra ----------------------------------------------------------------------------------


@primitive(intra="sparse", linear_in=(0,), int_args=("positions",))
def scatter2d(values: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A dense [rows, cols] matrix, zero except at the ``positions`` ([2, n] integer row and column
    indices), which hold ``values`` ([n]): :math:`M_{p_{0j}, p_{1j}} = v_j`. Linear in ``values``
    (FourierFT's sparse spectrum, Gao et al. 2024, arXiv 2405.03003)."""
    import torch

    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    return dense.index_put((positions[0], positions[1]), values)


@primitive(linear_in=(0,))
def ifft2_real(a: torch.Tensor) -> torch.Tensor:
    """Real part of the 2-D inverse discrete Fourier transform over the last two dimensions,

    :math:`\\Re\\, \\mathcal{F}^{-1}(A)_{pq} = \\Re \\frac{1}{mn} \\sum_{j,k} A_{jk} e^{2\\pi i (jp/m + kq/n)}`

    (computed in fp32 and cast back; a fixed change of basis, linear in ``a``). FourierFT maps its
    sparse spectrum to a weight update with it (Gao et al. 2024, arXiv 2405.03003)."""
    import torch

    return torch.fft.ifft2(a.float()).real.to(a.dtype).contiguous()  # its own real storage: a view would keep the complex result alive


# --- factorised dimensions (Kronecker products) --------------------------------------------------------


def _factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's factor pair (m, n) of ``dim`` (m * n = dim), as peft's LoKr ``factorization`` computes it."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    if factor == -1:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:  # walk up the divisors towards sqrt(dim), never past ``factor``
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@primitive(scalar=True)
def factor_left(dim: Any, factor: Any = -1) -> int:
    """The first member ``m`` of LyCORIS's factor pair :math:`(m, n)`, :math:`m \\cdot n = \\text{dim}`,
    used to split a dimension for Kronecker-product updates (LoKr; Yeh et al. 2024, arXiv 2309.14859):
    ``factor`` itself when it divides ``dim``; otherwise (``factor=-1`` means no bound) the divisor pair
    closest to :math:`\\sqrt{\\text{dim}}` whose smaller member does not exceed ``factor``, smaller first.
    E.g. 4096 → (64, 64), 128 → (8, 16), 127 → (1, 127), (128, factor=4) → (4, 32)."""
    return _factorize(int(dim), int(factor))[0]


@primitive(scalar=True)
def factor_right(dim: Any, factor: Any = -1) -> int:
    """The second member ``n = dim / factor_left(dim, factor)`` of the same factor pair."""
    return _factorize(int(dim), int(factor))[1]


# --- seeded random positions (initialiser) ----------------------------------------------------------


@initialiser(integer=True)
def random_positions(shape, dtype, device, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """``n = shape[-1]`` distinct positions of a [rows, cols] matrix drawn uniformly without
    replacement, as a [2, n] int64 tensor of (row, column) indices: the first ``n`` entries of a
    random permutation of the :math:`rows \\cdot cols` flat indices from a generator seeded with
    ``seed`` (so they are reproducible), split as (i // cols, i % cols). FourierFT's spectral entries
    (Gao et al. 2024, arXiv 2405.03003). The tensor keeps its integer dtype (store it with
    ``trainable: false``)."""
    import torch

    if tuple(shape[:-1]) != (2,):
        raise ValueError(f"random_positions makes a [2, n] tensor, not {tuple(shape)}")
    n = shape[-1]
    if n > rows * cols:
        raise ValueError(f"random_positions: {n} positions do not fit a {rows}x{cols} matrix")
    if torch.device(device).type == "meta":  # no values on the meta device (FLOP counts): skip the permutation
        return torch.empty((2, n), dtype=torch.int64, device=device)
    flat = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(int(seed)))[:n]
    return torch.stack([flat // cols, flat % cols]).to(device)

