"""Entrywise and normalising primitives: sine, cosine, clamping, layer normalisation, flattening, lookup.

Each follows torch's semantics; dimensions are integers (negative from the end) so expressions stay
independent of the batch and sequence sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["sin", "cos", "clamp", "layer_norm", "rms_norm", "rotary", "cross_entropy", "flatten", "take", "strided"]


@primitive(nonlinear=True)
def sin(a: torch.Tensor) -> torch.Tensor:
    """Entrywise sine :math:`\\sin a` (periodic features and rotations, e.g. RoAd's 2×2 rotations,
    Liao et al. 2024, https://arxiv.org/abs/2409.00119)."""
    import torch
    return torch.sin(a)


@primitive(nonlinear=True)
def cos(a: torch.Tensor) -> torch.Tensor:
    """Entrywise cosine :math:`\\cos a` (see :func:`sin`)."""
    import torch
    return torch.cos(a)


@primitive(nonlinear=True)
def clamp(a: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    """Entrywise :math:`\\min(\\max(a, \\text{min}), \\text{max})` (either bound may be left out), :func:`torch.clamp`."""
    import torch
    return torch.clamp(a, min=min, max=max)


@primitive(nonlinear=True)
def layer_norm(a: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension (Ba et al. 2016, https://arxiv.org/abs/1607.06450),

    :math:`y = \\frac{a - \\mathrm{E}[a]}{\\sqrt{\\mathrm{Var}[a] + \\epsilon}} \\odot \\gamma + \\beta`

    with the biased variance, optional gain ``weight`` :math:`\\gamma` and shift ``bias`` :math:`\\beta` of the
    last dimension's width (:func:`torch.nn.functional.layer_norm`)."""
    import torch.nn.functional as F
    return F.layer_norm(a, (a.shape[-1],), weight, bias, eps)


@primitive(nonlinear=True)
def rms_norm(a: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467),

    :math:`y = \\frac{a}{\\sqrt{\\mathrm{E}[a^2] + \\epsilon}} \\odot \\gamma`

    with an optional gain ``weight`` :math:`\\gamma` of the last dimension's width; computed in fp32 and rounded
    to ``a``'s dtype before the gain, as Llama's norm does."""
    import torch
    v = a.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)
    return y if weight is None else weight * y


@primitive(nonlinear=True)
def rotary(a: torch.Tensor, d_head: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864) of a sequence of heads
    side by side, ``a`` [..., seq, heads * d_head], at positions :math:`p = 0, 1, \\dots` of its second-to-last
    dimension: each head's features :math:`a_p` become :math:`a_p \\cos(p \\omega) + \\mathrm{rotate\\_half}(a_p)
    \\sin(p \\omega)` with :math:`\\omega_j = \\theta^{-2j / d_\\mathrm{head}}` repeated over both halves (the
    convention of Llama's implementation). Linear in ``a`` at each position, but position-dependent: no weight
    holds it."""
    import torch
    *lead, s, w = a.shape
    inv = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64, device=a.device).float() / d_head))
    freqs = torch.arange(s, device=a.device).float()[:, None] * inv[None, :]  # [seq, d_head / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(a.dtype), emb.sin().to(a.dtype)
    hh = a.reshape(*lead, s, w // d_head, d_head)
    rot = torch.cat((-hh[..., d_head // 2:], hh[..., : d_head // 2]), dim=-1)
    out = hh * cos[:, None, :] + rot * sin[:, None, :]
    return out.reshape(*lead, s, w)


@primitive(nonlinear=True, int_args=("labels",))
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int = 0, ignore: int = -100) -> torch.Tensor:
    """Mean cross entropy of ``logits`` [..., classes] against the integer ``labels`` [...]:
    :math:`-\\frac{1}{|T|} \\sum_{t \\in T} \\log \\mathrm{softmax}(z_t)_{y_{t + \\mathrm{shift}}}` over the positions
    :math:`T` whose label is not ``ignore`` (-100, as transformers' losses); ``shift``: the logits at position t predict
    the label at t + shift along the second-to-last dimension of ``logits`` (1: next-token prediction)
    (:func:`torch.nn.functional.cross_entropy`). One value."""
    import torch.nn.functional as F
    if shift:
        logits, labels = logits[..., :-shift, :], labels[..., shift:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=ignore)


@primitive(linear_in=(0,), layout=True)
def flatten(a: torch.Tensor, start: int = -2, end: int = -1) -> torch.Tensor:
    """Dimensions ``start`` .. ``end`` (inclusive) merged into one, the others kept: [..., E, r] becomes [..., E·r]
    with the defaults, the inverse of ``unflatten(a, -1, (E, r))`` (:func:`torch.flatten`). Linear in ``a``."""
    return a.flatten(start, end)


@primitive(linear_in=(0,), int_args=("index",))
def take(a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` picked by an integer tensor of any shape, :math:`y[i_1..i_k] = a[\\mathrm{index}[i_1..i_k]]`
    (``a[index]``; shape ``index.shape + a.shape[1:]``): a shared bank read at stored positions, as UniLoRA builds
    its factors from one vector (Li et al. 2025, https://arxiv.org/abs/2506.00799). Linear in ``a``."""
    return a[index.long()]


@primitive(linear_in=(0,))
def strided(a: torch.Tensor, dim: int, start: int, step: int) -> torch.Tensor:
    """Every ``step``-th entry of ``a`` along ``dim`` from ``start``, ``a[..., start::step, ...]`` (e.g. the even and
    odd rows of one orthogonal draw, as peft's orthogonal LoRA initialisation splits it). Linear in ``a``."""
    index = [slice(None)] * a.dim()
    index[dim] = slice(start, None, step)
    return a[tuple(index)]
