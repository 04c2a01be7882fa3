"""Primitives for interventions on hidden states and factored linear maps.

* :func:`orthonormal_rows`: a matrix with orthonormal rows from a free one
  (a QR parameterisation of the Stiefel manifold, as ReFT's low-rank projection
  needs);
* :func:`position_mask`: a 0/1 column selecting the first and last positions of
  the sequence (interventions at chosen positions only);
* :func:`kron_linear`: :math:`(A \\otimes B) x` computed without forming the
  Kronecker product (Kronecker adapters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["orthonormal_rows", "position_mask", "kron_linear"]


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
