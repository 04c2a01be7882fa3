"""Quantisation primitives as bitsandbytes defines them, in plain torch, and LoftQ's alternating initialisation.

* NF4 (Dettmers et al. 2023, QLoRA, https://arxiv.org/abs/2305.14314): the tensor is flattened (row-major) and cut
  into blocks of ``blocksize`` elements (bitsandbytes' default 64; a last, shorter block holds the rest). Each block
  :math:`b` keeps its absolute maximum :math:`s_b = \\max_{j \\in b} |w_j|` (fp32) and each element the index of the
  nearest of the 16 NF4 code values :math:`c_0 < \\dots < c_{15}` (:data:`NF4_CODE`; quantiles of
  :math:`\\mathcal{N}(0, 1)` scaled to [-1, 1], with an exact 0):
  :math:`q_j = \\arg\\min_k |w_j / s_b - c_k|`, ties at a midpoint going to the lower code, as bitsandbytes'
  kernels decide. Dequantised: :math:`\\hat w_j = c_{q_j} s_b`.
* int8, row-wise absmax (LLM.int8's vector-wise quantisation, Dettmers et al. 2022,
  https://arxiv.org/abs/2208.07339, as bitsandbytes' ``Int8Params`` stores a weight): the weight is first rounded to
  fp16, then each row :math:`i` keeps :math:`s_i = \\max_j |w_{ij}|` and each element
  :math:`q_{ij} = \\mathrm{round}(127\\, w_{ij} / s_i)` (an int8); dequantised :math:`\\hat w_{ij} = q_{ij} s_i / 127`.
* LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659, algorithm 1; peft's ``loftq_init``): with the residual
  :math:`R_0 = W`, for :math:`t = 1..T`: :math:`Q_t = \\mathrm{deq}(\\mathrm{quant}(R_{t-1}))` and the rank-r SVD
  :math:`W - Q_t \\approx U_r S_r V_r^\\top`, :math:`B_t = U_r S_r^{1/2}`, :math:`A_t = S_r^{1/2} V_r^\\top`,
  :math:`R_t = W - B_t A_t`. The host weight becomes :math:`Q_T` and the low-rank pair :math:`(A_T, B_T)`
  starts the adapter, so :math:`Q_T + B_T A_T \\approx W`.

Everything computes in fp32; a primitive's result keeps ``w``'s dtype (the LoftQ factors are fp32, as peft's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.shapes import Shape, ShapeMismatch, shape_rule, workspace_rule

if TYPE_CHECKING:
    import torch

__all__ = ["NF4_CODE", "Quantised", "nf4_quantise", "nf4_dequantise", "int8_quantise", "int8_dequantise",
           "nf4", "int8", "quantise", "quant_svd", "QuantSVD", "quant_svd_a", "quant_svd_b", "quant_svd_base"]

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 code values (bitsandbytes' table, the fp32 values of QLoRA's appendix E)."""

BITS = (4, 8)
"""The widths :func:`quantise` knows: 4 (NF4, blockwise) and 8 (int8, row-wise)."""


@dataclass(frozen=True)
class Quantised:
    """A quantised tensor: one code per element (``codes``, flat uint8 indices into :data:`NF4_CODE` for NF4,
    int8 values of the [rows, cols] matrix for int8), the fp32 scales (``absmax``: one per block, or per row),
    the original shape and dtype, and the block size (0: row-wise)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int


def _blocked(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` as rows of ``blocksize`` elements, the last row padded with zeros (they change no block's absmax)."""
    import torch

    pad = -flat.numel() % blocksize
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize) if pad else flat.view(-1, blocksize)


def nf4_quantise(w: torch.Tensor, blocksize: int = 64) -> Quantised:
    """NF4 codes and block absmax of ``w`` (see the module's docstring): codes by the midpoints between code values
    (``torch.bucketize``), a zero block scaled by 1e-38 (bitsandbytes' clamp) so its codes are 0's."""
    import torch

    if blocksize < 1:
        raise ValueError(f"nf4: blocksize must be positive, found {blocksize}")
    flat = w.detach().reshape(-1).float()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    blocks = _blocked(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1).reshape(-1)[:flat.numel()]
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return Quantised(codes, absmax, tuple(w.shape), w.dtype, int(blocksize))


def nf4_dequantise(q: Quantised) -> torch.Tensor:
    """:math:`\\hat w_j = c_{q_j} s_b` in fp32, reshaped to the original shape and cast to its dtype."""
    import torch

    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=q.codes.device)
    values = _blocked(code[q.codes.long()], q.blocksize) * q.absmax.unsqueeze(-1)
    return values.reshape(-1)[:q.codes.numel()].reshape(q.shape).to(q.dtype)


def int8_quantise(w: torch.Tensor) -> Quantised:
    """Row-wise int8 codes and row absmax of a matrix ``w`` [rows, cols] (rounded to fp16 first, as bitsandbytes'
    ``Int8Params`` does); a zero row keeps zeros (bitsandbytes divides by its zero absmax)."""
    import torch

    if w.dim() != 2:
        raise ValueError(f"int8: row-wise quantisation takes a matrix, found {w.dim()} dimensions")
    half = w.detach().to(torch.float16)
    absmax = half.abs().amax(dim=1).float()
    codes = torch.round(half * (127.0 / absmax.clamp(min=1e-38).unsqueeze(-1))).to(torch.int8)
    return Quantised(codes, absmax, tuple(w.shape), w.dtype, 0)


def int8_dequantise(q: Quantised) -> torch.Tensor:
    """:math:`\\hat w_{ij} = q_{ij} s_i / 127` (bitsandbytes multiplies by the fp32 reciprocal of 127), in ``q``'s dtype."""
    return (q.codes * q.absmax.view(-1, 1) * 7.874015718698502e-3).reshape(q.shape).to(q.dtype)


@primitive()
def nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``w`` through NF4 and back, :math:`\\mathrm{deq}(\\mathrm{quant}(w))` (blockwise absmax over the flattened
    tensor, ``blocksize`` elements a block, bitsandbytes' default 64; the equations in :mod:`pefref.ops.quantise`).
    What a 4-bit QLoRA base weight computes with."""
    return nf4_dequantise(nf4_quantise(w, int(blocksize)))


@primitive()
def int8(w: torch.Tensor) -> torch.Tensor:
    """A matrix ``w`` through row-wise absmax int8 and back, :math:`q_{ij} s_i / 127` with
    :math:`q_{ij} = \\mathrm{round}(127\\, w_{ij} / s_i)`, :math:`s_i = \\max_j |w_{ij}|` (after rounding to fp16, as
    bitsandbytes' ``Int8Params`` stores it)."""
    return int8_dequantise(int8_quantise(w))


@primitive()
def quantise(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``w`` through the quantiser of ``bits`` bits and back: 4, :func:`nf4` (block size 64); 8, :func:`int8`."""
    bits = int(bits)
    if bits not in BITS:
        raise ValueError(f"quantise: bits must be one of {BITS}, found {bits}")
    return nf4(w) if bits == 4 else int8(w)


@dataclass(frozen=True)
class QuantSVD:
    """LoftQ's result for one weight: the dequantised base ``Q`` (the host's new weight, in the weight's dtype) and
    the low-rank pair ``A`` [r, in], ``B`` [out, r] (fp32) with :math:`Q + BA \\approx W`."""

    Q: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor


_LAST: list[tuple[tuple[int, int, int], torch.Tensor, QuantSVD]] = []  # the last result and the weight it came from


def quant_svd(w: torch.Tensor, r: int, bits: int = 4, iters: int = 1) -> QuantSVD:
    """LoftQ's alternating quantisation and rank-``r`` SVD of ``w`` [out, in] for ``iters`` rounds (the module's
    docstring). The last result is kept with a copy of its weight, so the three primitives of one unit
    (:func:`quant_svd_a`, :func:`quant_svd_b`, :func:`quant_svd_base`) run the procedure once; a different weight (compared
    elementwise) or arguments recompute it."""
    import torch

    key = (int(r), int(bits), int(iters))
    if w.is_meta:  # no values: nothing to keep
        return _quant_svd(w, *key)
    if _LAST and _LAST[0][0] == key and _LAST[0][1].shape == w.shape and _LAST[0][1].device == w.device \
            and torch.equal(_LAST[0][1], w.detach().float()):
        return _LAST[0][2]
    out = _quant_svd(w, *key)
    _LAST[:] = [(key, w.detach().float().clone(), out)]
    return out


def _quant_svd(w: torch.Tensor, r: int, bits: int, iters: int) -> QuantSVD:
    import torch

    if w.dim() != 2:
        raise ValueError(f"quant_svd: takes a matrix, found {w.dim()} dimensions")
    if iters < 1 or not 0 < r <= min(w.shape):
        raise ValueError(f"quant_svd: needs iters >= 1 and 0 < r <= {min(w.shape)}, found iters={iters}, r={r}")
    weight = w.detach().float()
    res = weight
    for i in range(iters):
        q = quantise(res, bits)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        root = torch.sqrt(s[:r])
        b, a = u[:, :r] * root, root.unsqueeze(-1) * vh[:r]
        if i + 1 < iters:
            res = weight - b @ a
    return QuantSVD(q.to(w.dtype), a, b)


@primitive()
def quant_svd_a(w: torch.Tensor, r: int, bits: int = 4, iters: int = 1) -> torch.Tensor:
    """LoftQ's down projection :math:`A_T = S_r^{1/2} V_r^\\top` ([r, in], fp32) for ``w`` [out, in] (:func:`quant_svd`)."""
    return quant_svd(w, r, bits, iters).A


@primitive()
def quant_svd_b(w: torch.Tensor, r: int, bits: int = 4, iters: int = 1) -> torch.Tensor:
    """LoftQ's up projection :math:`B_T = U_r S_r^{1/2}` ([out, r], fp32) for ``w`` [out, in] (:func:`quant_svd`)."""
    return quant_svd(w, r, bits, iters).B


@primitive()
def quant_svd_base(w: torch.Tensor, r: int, bits: int = 4, iters: int = 1) -> torch.Tensor:
    """LoftQ's quantised base :math:`Q_T` (dequantised, ``w``'s shape and dtype): the host weight LoftQ trains on
    (:func:`quant_svd`)."""
    return quant_svd(w, r, bits, iters).Q


# --- shapes and workspace -----------------------------------------------------------------------------------


def _matrix(w: Shape, op: str) -> None:
    if len(w) != 2:
        raise ShapeMismatch(f"{op} takes a matrix, found {w}")


@shape_rule("nf4", "quantise")
def _same(w: Shape, *_: Any, **__: Any) -> Shape:
    return w


@shape_rule("int8", "quant_svd_base")
def _same_matrix(w: Shape, *_: Any, **__: Any) -> Shape:
    _matrix(w, "int8 (row-wise) / quant_svd_base")
    return w


@shape_rule("quant_svd_a")
def _quant_svd_a(w: Shape, r: int, *_: Any, **__: Any) -> Shape:
    _matrix(w, "quant_svd_a")
    return Shape((_rank(r, w), w[1]))


@shape_rule("quant_svd_b")
def _quant_svd_b(w: Shape, r: int, *_: Any, **__: Any) -> Shape:
    _matrix(w, "quant_svd_b")
    return Shape((w[0], _rank(r, w)))


def _rank(r: Any, w: Shape) -> int:
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= min(w):
        raise ShapeMismatch(f"quant_svd's rank r must be an integer in 1..{min(w)} for a {w} weight, found {r!r}")
    return r


@workspace_rule("nf4", "int8", "quantise")
def _quant_work(w: Shape, *_: Any, **__: Any) -> int:
    # an fp32 copy, the scaled values, the codes (counted as elements)
    return 3 * math.prod(w)


@workspace_rule("quant_svd_a", "quant_svd_b", "quant_svd_base")
def _quant_svd_work(w: Shape, *_: Any, **__: Any) -> int:
    # fp32 copies of w, the residual, the quantised weight and the one kept for reuse, the thin SVD's factors
    m, n = (w[-2], w[-1]) if len(w) >= 2 else (1, math.prod(w))
    p = min(m, n)
    return 6 * m * n + 2 * p * (m + n + 1)
