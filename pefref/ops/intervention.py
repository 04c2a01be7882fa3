"""Primitives for interventions on hidden states and factored linear maps.

* :func:`orthonormal_rows`: a matrix with orthonormal rows from a free one
  (a QR parameterisation of the Stiefel manifold, as ReFT's low-rank projection
  needs);
* :func:`position_mask`: a 0/1 column selecting the first and last positions of
  the sequence (interventions at chosen positions only);
* :func:`from_match`: a 0/1 column selecting the positions from the last
  occurrence of a token sequence on (an adapter activated by an invocation);
* :func:`kron_linear`: :math:`(A \\otimes B) x` computed without forming the
  Kronecker product (Kronecker adapters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["orthonormal_rows", "position_mask", "from_match", "kron_linear"]


@primitive(intra="orthogonal", nonlinear=True)
def orthonormal_rows(p: torch.Tensor) -> torch.Tensor:
    """A matrix with orthonormal rows spanning the row space of ``p`` ([r, n], r <= n).

    :math:`p^\\top = Q R` (reduced QR); the result is :math:`(Q\\,\\operatorname{diag}(\\operatorname{sign} R_{ii}))^\\top`,
    so :math:`R R^\\top = I_r` and the map is differentiable and unique (signs fixed by the diagonal of R).
    A free parameter passed through it is an unconstrained parameterisation of
    matrices with orthonormal rows, e.g. the projection :math:`R` of LoReFT
    (Wu et al. 2024, `arXiv:2404.03592 <https://arxiv.org/abs/2404.03592>`_).
    """
    import torch

    low = p.dtype in (torch.float16, torch.bfloat16)  # QR has no bf16/fp16 CPU kernels: fp32, cast back once
    q, r = torch.linalg.qr((p.float() if low else p).transpose(-2, -1), mode="reduced")  # q: [n, r], r: [r, r]
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return (q * sign.unsqueeze(-2)).transpose(-2, -1).to(p.dtype)


@primitive()
def position_mask(h: torch.Tensor, first: int = 0, last: int = 0) -> torch.Tensor:
    """A [seq, 1] column of ones at the first ``first`` and the last ``last`` positions of ``h`` ([..., seq, d]), zeros elsewhere.

    :math:`m_t = [t < p] \\lor [t \\ge n - s]` for a sequence of length :math:`n`;
    multiplying an update by it restricts an intervention to those positions
    (LoReFT's prefix and suffix positions, Wu et al. 2024,
    `arXiv:2404.03592 <https://arxiv.org/abs/2404.03592>`_). Positions are
    counted within the tensor of this call; overlapping ranges count once.
    """
    import torch

    n = h.shape[-2]
    t = torch.arange(n, device=h.device)
    m = (t < int(first)) | (t >= n - int(last))
    return m.to(h.dtype).unsqueeze(-1)


@primitive(int_args=("ids",))
def from_match(ids: torch.Tensor, tokens: Any) -> torch.Tensor:
    """A [..., seq, 1] column of ones from the start of the last occurrence of ``tokens`` in each row of token ids
    ``ids`` ([..., seq]) to the end, zeros before it and in a row without it.

    :math:`m_t = [t \\ge s^*]`, :math:`s^* = \\max\\{s : \\mathrm{ids}_{s:s+k} = \\mathrm{tokens}\\}`: multiplying an
    update by it activates an adapter from its invocation string on, the prefix computed as by the base model
    (activated LoRA, Greenewald et al. 2025, `arXiv:2504.12397 <https://arxiv.org/abs/2504.12397>`_).
    Positions are counted within the ids of this call.
    """
    import torch

    tok = torch.as_tensor(tuple(tokens), dtype=ids.dtype, device=ids.device)
    k, n = tok.numel(), ids.shape[-1]
    t = torch.arange(n, device=ids.device)
    if k > n:
        return torch.zeros((*ids.shape, 1), device=ids.device)
    hit = (ids.unfold(-1, k, 1) == tok).all(-1)  # [..., n - k + 1]: an occurrence starts here
    start = torch.where(hit, t[: n - k + 1], -1).amax(-1, keepdim=True)  # [..., 1]: the last start, -1 for none
    return ((t >= start) & (start >= 0)).to(torch.get_default_dtype()).unsqueeze(-1)


@primitive(intra="kronecker/hypercomplex", linear_in=(0, 1, 2))
def kron_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The linear map :math:`x (A \\otimes B)^\\top` without forming :math:`A \\otimes B`.

    With ``a`` [a1, a2], ``b`` [b1, b2] and ``x`` [..., a2*b2] read row-major as
    :math:`X \\in \\mathbb{R}^{a_2 \\times b_2}`, the result is :math:`A X B^\\top`
    flattened to [..., a1*b1]: :math:`O(a_1 a_2 b_2 + a_1 b_1 b_2)` per token
    instead of :math:`O(a_1 a_2 b_1 b_2)` (KronA, Edalati et al. 2022,
    `arXiv:2212.10650 <https://arxiv.org/abs/2212.10650>`_).
    """
    import torch

    a1, a2 = a.shape
    b1, b2 = b.shape
    xm = x.reshape(*x.shape[:-1], a2, b2)
    y = torch.matmul(torch.matmul(a, xm), b.transpose(-2, -1))  # [..., a1, b1]
    return y.reshape(*x.shape[:-1], a1 * b1)
