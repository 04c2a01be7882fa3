"""Orthogonal primitives: skew-symmetric matrices, the Cayley transform, block-diagonal and
butterfly assembly of orthogonal blocks, chains of Householder reflections.

Weight-space techniques that rotate a frozen weight (OFT, BOFT, HRA) are built
from these: a free parameter is mapped to an orthogonal matrix (Cayley transform
of a skew-symmetric matrix, or a product of reflections), which is assembled
into a structured ``d × d`` matrix multiplying the host weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from pefref.ops import primitive
from pefref.ops.inits import initialiser

if TYPE_CHECKING:
    import torch

__all__ = ["skew", "cayley", "block_diag", "butterfly", "butterfly_perm", "householder", "paired_kaiming_uniform"]


_TRIU: dict[tuple[int, str], torch.Tensor] = {}


def _triu(b: int, device: torch.device) -> torch.Tensor:
    """The strict upper triangle's (row, column) indices of a ``b × b`` matrix, made once per size and device: the
    backward pass of :func:`skew` keeps them, and a copy made on every forward would be kept once per unit."""
    key = (b, str(device))
    idx = _TRIU.get(key)
    if idx is None:
        import torch

        idx = _TRIU[key] = torch.triu_indices(b, b, 1, device=device)
    return idx


@primitive(linear_in=(0,))
def skew(v: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric matrices from vectors of their strict upper triangles.

    :math:`Q = U - U^\\top` where :math:`U` is the strictly upper-triangular
    ``b × b`` matrix whose entries, read row by row, are ``v`` (the order of
    ``torch.triu_indices(b, b, 1)``). ``v`` is ``[..., b(b-1)/2]``; the result
    ``[..., b, b]``. Orthogonal finetuning (Qiu et al. 2023,
    https://arxiv.org/abs/2306.07280) learns ``Q`` in this form.
    """
    b = int(b)
    rows, cols = _triu(b, v.device)
    u = v.new_zeros(*v.shape[:-1], b, b)
    u[..., rows, cols] = v
    return u - u.transpose(-2, -1)


@primitive(intra="orthogonal", nonlinear=True)
def cayley(q: torch.Tensor, terms: int = 0) -> torch.Tensor:
    """Cayley transform of (a batch of) skew-symmetric matrices, an orthogonal matrix each.

    :math:`R = (I + Q)(I - Q)^{-1}` (Cayley 1846; used by OFT, Qiu et al. 2023,
    https://arxiv.org/abs/2306.07280, and BOFT, Liu et al. 2024,
    https://arxiv.org/abs/2311.06243). With ``terms = n ≥ 2`` the inverse is
    replaced by its truncated Neumann series, :math:`R \\approx (I + Q)\\sum_{k=0}^{n-2} Q^k
    = I + 2\\sum_{k=1}^{n-2} Q^k + Q^{n-1}` (cheaper, approximately orthogonal;
    for n ≥ 3 this is peft's ``num_cayley_neumann_terms = n``). ``q`` is
    ``[..., b, b]``; :math:`R(0) = I`.
    """
    import torch

    n = int(terms)
    b = q.shape[-1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device).expand(q.shape)
    if n == 0:  # LU has no bf16/fp16 kernels on CPU: solve in fp32, cast back once
        low = q.dtype in (torch.float16, torch.bfloat16)
        qf, ef = (q.float(), eye.float()) if low else (q, eye)
        return torch.linalg.solve(ef - qf, ef + qf, left=False).to(q.dtype)
    if n < 2:
        raise ValueError(f"cayley: terms must be 0 (exact) or at least 2, found {n}")
    r = eye.clone()
    power = eye
    for k in range(1, n):
        power = power @ q
        r = r + (power if k == n - 1 else 2.0 * power)
    return r


@primitive(linear_in=(0,))
def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matrix :math:`\\operatorname{diag}(B_1, \\dots, B_n)` from ``[n, b, c]`` blocks
    (``[n·b, n·c]``); OFT's structured rotation (Qiu et al. 2023, https://arxiv.org/abs/2306.07280)."""
    import torch

    return torch.block_diag(*blocks.unbind(0))


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> list[int]:
    """BOFT's block butterfly permutation of ``n`` indices for ``blocks`` groups of half-blocks of size ``half``:
    within each group of ``n / blocks`` indices the half-blocks are reordered even-first, then odd."""
    if factors <= 1:
        return list(range(n))
    if blocks * half * 2 > n:
        raise ValueError(f"butterfly: {blocks} blocks of {2 * half} do not fit {n} features")
    size = n // blocks
    step = size // half
    order = [p for p in range(0, step, 2)] + [p for p in range(1, step, 2)]
    within = [pos * half + j for pos in order for j in range(half)]
    return [g + k for g in range(0, n, size) for k in within]


@primitive(nonlinear=True)
def butterfly(blocks: torch.Tensor) -> torch.Tensor:
    """Butterfly product of block-diagonal factors (BOFT, Liu et al. 2024, https://arxiv.org/abs/2311.06243).

    ``blocks`` is ``[m, n, b, b]``: ``n`` blocks of size ``b`` for each of ``m``
    factors (``d = n·b``). Returns :math:`\\prod_{i=0}^{m-1} P_i\\,
    \\operatorname{diag}(B_{i,1}, \\dots, B_{i,n})\\,P_i^\\top` (factor 0 leftmost),
    where :math:`P_0 = I` and :math:`P_i` is the block butterfly permutation that
    pairs half-blocks :math:`2^{i-1}` blocks apart, so factor ``i`` mixes
    features :math:`2^i` blocks apart (the Cooley–Tukey pattern). Orthogonal
    blocks give an orthogonal product; ``m = 1`` is plain block-diagonal (OFT).
    Requires ``n`` divisible by :math:`2^{m-1}` and, for ``m > 1``, even ``b``.
    """
    import torch

    m, n, b, _ = blocks.shape
    d = n * b
    out = None
    for i in range(m):
        bd = torch.block_diag(*blocks[i].unbind(0))
        if n % (2 ** i):
            raise ValueError(f"butterfly: {n} blocks are not divisible by 2**{i}")
        idx = torch.tensor(butterfly_perm(d, n // 2 ** i, b // 2, m), device=blocks.device)
        f = bd[idx][:, idx]  # P B P^T with (P x)_j = x[idx[j]]
        out = f if out is None else out @ f
    return cast(torch.Tensor, out)


@primitive(intra="orthogonal", nonlinear=True)
def householder(u: torch.Tensor) -> torch.Tensor:
    """Product of Householder reflections, one per column of ``u`` ([d, r]).

    :math:`H = \\prod_{i=1}^{r} (I - 2\\,\\hat u_i \\hat u_i^\\top)`, :math:`\\hat u_i = u_i / \\lVert u_i \\rVert`,
    taken in column order (an orthogonal ``d × d`` matrix). HRA (Yuan et al. 2024,
    https://arxiv.org/abs/2405.17484) adapts a weight as :math:`W H`.
    """
    import torch

    un = u / u.norm(dim=0)
    h = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    for i in range(u.shape[1]):
        c = un[:, i : i + 1]
        h = h - 2 * (h @ c) @ c.t()
    return h


@initialiser(filler=True)
def paired_kaiming_uniform(shape, dtype, device, a: float = 0.0) -> torch.Tensor:
    """Kaiming-uniform columns in equal consecutive pairs, ``[d, r]`` (r even): each pair of equal
    Householder reflections cancels, so :func:`householder` of it is the identity (HRA's symmetric
    initialisation, Yuan et al. 2024). For odd r, plain kaiming-uniform columns."""
    import torch

    r = shape[-1]
    if r % 2:
        return torch.nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype, device=device), a=a)
    half = torch.nn.init.kaiming_uniform_(torch.empty(*shape[:-1], r // 2, dtype=dtype, device=device), a=a)
    return torch.repeat_interleave(half, 2, dim=-1)
