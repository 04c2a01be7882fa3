"""Core primitives: scalars, linear algebra, activations, dropout, attention."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

# --- scalars (usable in shapes, scales and initialisers; entrywise on tensors) -------------------
# ``scalar=True``: callable in shapes (numbers only there); on tensors each works entrywise. Not marked
# ``nonlinear``: that flag means an activation between projections (typology), and these mostly compute
# scales (``alpha / sqrt(r)``); mergeability reads ``linear_in`` (empty: not linear), so it stays right.


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@primitive(scalar=True)
def sqrt(v: Any) -> Any:
    """Square root :math:`\\sqrt{v}`, of a number (shapes, scales: no torch) or entrywise of a tensor."""
    if _number(v):
        return math.sqrt(v)  # numbers (shapes, scales) never import torch
    import torch
    return torch.sqrt(v)


@primitive(scalar=True)
def min_(a: Any, b: Any) -> Any:
    """The smaller of two numbers, or entrywise :math:`\\min(a, b)` of tensors (broadcast)."""
    if _number(a) and _number(b):
        return min(a, b)
    import torch
    if _number(a) or _number(b):
        t, n = (b, a) if _number(a) else (a, b)
        return t.clamp(max=n)
    return torch.minimum(a, b)


@primitive(scalar=True)
def max_(a: Any, b: Any) -> Any:
    """The larger of two numbers, or entrywise :math:`\\max(a, b)` of tensors (broadcast)."""
    if _number(a) and _number(b):
        return max(a, b)
    import torch
    if _number(a) or _number(b):
        t, n = (b, a) if _number(a) else (a, b)
        return t.clamp(min=n)
    return torch.maximum(a, b)


@primitive(scalar=True)
def log2(v: Any) -> Any:
    """Base-2 logarithm :math:`\\log_2 v` of a number, or entrywise of a tensor."""
    if _number(v):
        return math.log2(v)
    import torch
    return torch.log2(v)


# --- linear algebra --------------------------------------------------------

_F: Any = None


def _functional() -> Any:
    """torch.nn.functional, imported on first use (an import statement per call costs ~0.5 us)."""
    global _F
    if _F is None:
        import torch.nn.functional as F

        _F = F
    return _F


@primitive(intra="dense", linear_in=(0,), offset_args=(2,))
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Affine map :math:`x W^\\top + b` with ``weight`` of shape [out, in] (torch's convention)."""
    return _functional().linear(x, weight, bias)


@primitive(intra="dense", linear_in=(0, 1))
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product :math:`a b` (also written ``a @ b``)."""
    import torch
    return torch.matmul(a, b)


@primitive(linear_in=(0,))
def t(a: torch.Tensor) -> torch.Tensor:
    """Transpose of the last two dimensions, :math:`a^\\top`."""
    return a.transpose(-2, -1)


@primitive(intra="kronecker/hypercomplex", linear_in=(0, 1))
def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product :math:`a \\otimes b` (Compacter, KronA, LoKr)."""
    import torch
    return torch.kron(a, b)


@primitive(linear_in=(0,))
def diag(v: torch.Tensor) -> torch.Tensor:
    """Diagonal matrix from a vector, :math:`\\operatorname{diag}(v)`."""
    import torch
    return torch.diag(v)


@primitive()
def eye(n: int, like: torch.Tensor) -> torch.Tensor:
    """Identity matrix :math:`I_n` with the dtype and device of ``like``."""
    import torch
    return torch.eye(n, dtype=like.dtype, device=like.device)


@primitive(linear_in=(0,))
def sum_(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over one dimension."""
    return a.sum(dim)


@primitive(nonlinear=True)
def row_norm(w: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of a matrix, :math:`\\lVert W_{i,:} \\rVert_2`, as a [rows, 1] column (DoRA's magnitude)."""
    import torch
    return torch.linalg.norm(w, dim=1, keepdim=True)


@primitive(nonlinear=True)
def col_norm(w: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each column, :math:`\\lVert W_{:,j} \\rVert_2`, as a [1, cols] row."""
    import torch
    return torch.linalg.norm(w, dim=0, keepdim=True)


@primitive()
def detach(a: torch.Tensor) -> torch.Tensor:
    """Stops gradients: the value of ``a`` treated as a constant."""
    return a.detach()


# --- activations -----------------------------------------------------------


@primitive(nonlinear=True)
def relu(a: torch.Tensor) -> torch.Tensor:
    """:math:`\\max(0, a)`."""
    import torch.nn.functional as F
    return F.relu(a)


@primitive(nonlinear=True)
def gelu(a: torch.Tensor) -> torch.Tensor:
    """Gaussian error linear unit (exact erf form)."""
    import torch.nn.functional as F
    return F.gelu(a)


@primitive(nonlinear=True)
def gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation."""
    import torch.nn.functional as F
    return F.gelu(a, approximate="tanh")


@primitive(nonlinear=True)
def silu(a: torch.Tensor) -> torch.Tensor:
    """:math:`a \\sigma(a)`."""
    import torch.nn.functional as F
    return F.silu(a)


@primitive(nonlinear=True)
def tanh(a: torch.Tensor) -> torch.Tensor:
    """Hyperbolic tangent."""
    import torch
    return torch.tanh(a)


@primitive(nonlinear=True)
def sigmoid(a: torch.Tensor) -> torch.Tensor:
    """Logistic function :math:`1 / (1 + e^{-a})` (gates)."""
    import torch
    return torch.sigmoid(a)


@primitive(nonlinear=True)
def exp(a: torch.Tensor) -> torch.Tensor:
    """:math:`e^a`."""
    import torch
    return torch.exp(a)


@primitive(nonlinear=True)
def softmax(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over dimension ``dim``, :math:`\\mathrm{softmax}(a)_j = e^{a_j} / \\sum_k e^{a_k}` (routers' gates)."""
    import torch
    return torch.softmax(a, dim)


# --- regularisation ----------------------------------------------------------


@primitive(linear_in=(0,), leaf=True)
def dropout(a: torch.Tensor, p: float, training: bool = False) -> torch.Tensor:
    """Dropout with probability ``p`` (identity at inference). The compiler supplies ``training``."""
    import torch.nn.functional as F
    return F.dropout(a, p, training) if p > 0 else a


# --- attention ---------------------------------------------------------------


@primitive(intra="attention", nonlinear=True, dynamic=True)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention over the sequence:
    :math:`\\mathrm{softmax}(q k^\\top / \\sqrt{d_h}) v` per head, inputs [..., seq, heads*d_h].
    ``causal``: each position attends to itself and earlier ones; ``mask`` [batch, seq_k]: keys
    with 0 are never attended to (padding), not even by their own position; a query left with no key
    to attend to (a padded query before any real token under ``causal``, or a row of padding only)
    gives zeros. Grouped-query attention: keys of fewer heads (``k`` narrower than ``q``, heads of the
    same width) each serve ``heads / kv_heads`` consecutive query heads, their values with them; keys and
    values without the queries' leading dimensions (e.g. a learned prompt [n, kv_heads*d_h]) are the same
    for every example."""
    import torch
    import torch.nn.functional as F

    *lead, s, dq = q.shape
    dh = dq // heads
    kvh = k.shape[-1] // dh
    dv = v.shape[-1] // kvh * heads
    sk = k.shape[-2]
    qh = q.reshape(*lead, s, heads, dh).transpose(-3, -2)
    kh = k.reshape(*k.shape[:-2], sk, kvh, dh).transpose(-3, -2)
    vh = v.reshape(*v.shape[:-2], sk, kvh, v.shape[-1] // kvh).transpose(-3, -2)
    if kvh != heads:
        kh, vh = kh.repeat_interleave(heads // kvh, dim=-3), vh.repeat_interleave(heads // kvh, dim=-3)
    if kh.dim() < qh.dim():
        kh, vh = kh.expand(*lead, *kh.shape[-3:]), vh.expand(*lead, *vh.shape[-3:])
    allowed = None
    if causal:
        allowed = torch.ones(s, sk, dtype=torch.bool, device=q.device).tril(sk - s)
    if mask is not None:
        keys = mask[..., -sk:].bool()[:, None, None, :]  # [b, 1, 1, sk]
        allowed = keys if allowed is None else keys & allowed
    has = None
    if allowed is not None:
        has = allowed.any(-1, keepdim=True)  # [b|1, 1, s, 1]: the query has a key to attend to
        allowed = allowed | ~has  # a query with none attends nowhere: its output is set to zero below (no NaN)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed)
    if has is not None:
        out = out * has.to(out.dtype)
    return out.transpose(-3, -2).reshape(*lead, s, dv)


@primitive(intra="kronecker/hypercomplex", linear_in=(0, 1))
def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of Kronecker products :math:`\\sum_i A_i \\otimes B_i` over the leading dimension
    (parameterised hypercomplex multiplication, Zhang et al. 2021; Compacter)."""
    import torch
    _n, a1, a2 = a.shape
    _, b1, b2 = b.shape
    return torch.einsum("nij,nkl->ikjl", a, b).reshape(a1 * b1, a2 * b2)
