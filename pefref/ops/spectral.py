"""Spectral primitives: the discrete Fourier transform over one dimension, block-circulant products,
the inverse 2-D discrete wavelet transform.

Complex tensors appear only between :func:`fft`/:func:`ifft` and :func:`real` (or :func:`block_circulant`,
which keeps them inside): a module's parameters and outputs stay real. The transforms compute in fp32
(complex64) whatever the host's precision, as the reference implementations do, and :func:`real` casts
back to the real dtype the expression started from only where asked (``dtype`` of ``like``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import TORCH_SETUP, primitive
from pefref.ops.wavelet_filters import WAVELETS, filters

if TYPE_CHECKING:
    import torch

__all__ = ["fft", "ifft", "real", "block_circulant", "circulant_matrix", "idwt2"]


def _complex(a: torch.Tensor) -> torch.Tensor:
    """``a`` in complex64/128, real inputs through fp32 (the transforms are not defined in half precision)."""
    return a if a.is_complex() else a.float()


@primitive(linear_in=(0,), complex_in=True)
def fft(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Discrete Fourier transform along ``dim``, :math:`\\hat a_k = \\sum_j a_j e^{-2\\pi i jk/n}`
    (:func:`torch.fft.fft`; a real input is taken in fp32 and the result is complex). Linear in ``a``.
    Used by circulant adapters (C3A, Chen et al. 2025, https://arxiv.org/abs/2407.19342)."""
    import torch
    return torch.fft.fft(_complex(a), dim=dim)


@primitive(linear_in=(0,), complex_in=True)
def ifft(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse discrete Fourier transform along ``dim``, :math:`a_j = \\frac{1}{n}\\sum_k \\hat a_k e^{2\\pi i jk/n}`
    (:func:`torch.fft.ifft`; complex result). Linear in ``a``."""
    import torch
    return torch.fft.ifft(_complex(a), dim=dim)


@primitive(linear_in=(0,), complex_in=True)
def real(a: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Real part :math:`\\Re\\, a` of a complex tensor (a real one unchanged), in ``like``'s dtype when given
    (so a module's output returns to the host's precision). Real-linear in ``a``."""
    out = a.real if a.is_complex() else a
    return out.to(like.dtype) if like is not None else out.contiguous()


@primitive(intra="dense", linear_in=(0, 1))
def block_circulant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Product of ``x`` [..., n·b] with the block-circulant matrix of the kernels ``w`` [m, n, b] (each block
    is a b×b circulant matrix given by one kernel), computed with FFTs as C3A does (Chen et al. 2025,
    https://arxiv.org/abs/2407.19342; peft's ``BlockCircularConvolution``): with :math:`x` as blocks
    :math:`x_1..x_n` of width b,

    :math:`y_i = \\Re\\, \\mathcal{F}\\big(\\textstyle\\sum_j \\mathcal{F}^{-1}(x_j) \\odot \\mathcal{F}(w_{ij})\\big)`,

    output [..., m·b], in fp32 and cast back to ``x``'s dtype. Bilinear: linear in ``x`` and in ``w``
    (the matrix is :func:`circulant_matrix`).

    Memory-lean: the backward pass keeps only ``x`` and ``w`` (autograd through the transforms would keep
    the complex spectrum of ``x``, twice its fp32 size) and recomputes the transforms, as peft's
    ``BlockCircularConvolution`` does."""
    return _circulant_function().apply(x, w)


def _circulant_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    import torch

    _m, n, b = w.shape
    xs = x.float().reshape(*x.shape[:-1], n, b)
    y = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(xs), torch.fft.fft(w.float()))
    return torch.fft.fft(y).real.reshape(*x.shape[:-1], -1).to(x.dtype)


_CIRCULANT: Any = None


def _circulant_function() -> Any:
    """The autograd function of :func:`block_circulant` (defined on first use: torch is imported lazily)."""
    global _CIRCULANT
    if _CIRCULANT is None:
        import torch

        class BlockCirculant(torch.autograd.Function):
            """:func:`block_circulant`, saving ``x`` and ``w`` only; the backward recomputes their spectra:
            :math:`\\partial x_j = \\Re\\,\\mathcal{F}(\\sum_i \\mathcal{F}^{-1}(g_i) \\odot \\overline{\\mathcal{F}(w_{ij})})`
            and :math:`\\partial w_{ij} = \\Re\\,\\mathcal{F}(\\sum \\mathcal{F}(g_i) \\odot \\mathcal{F}^{-1}(x_j))` (summed
            over the leading dimensions), both equal to autograd's through the transforms. (peft 0.21's
            ``BlockCircularConvolution`` takes :math:`\\mathcal{F}(g_i) \\odot \\mathcal{F}^{-1}(w_{ij})` for the first,
            which is not the adjoint: its gradient for the input differs from autograd's.)"""

            @staticmethod
            def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return _circulant_forward(x, w)

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
                ctx.save_for_backward(*inputs)

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                x, w = ctx.saved_tensors
                m, n, b = w.shape
                g = grad.float().reshape(*grad.shape[:-1], m, b)
                gx = gw = None
                if ctx.needs_input_grad[0]:  # the adjoint of x -> Re F(F^-1(x) * F(w)): x -> Re F(F^-1(x) * conj F(w))
                    gx = torch.fft.fft(torch.einsum("...mb,mnb->...nb", torch.fft.ifft(g), torch.fft.fft(w.float()).conj())).real
                    gx = gx.reshape(*x.shape).to(x.dtype)
                if ctx.needs_input_grad[1]:
                    xs = torch.fft.ifft(x.float().reshape(*x.shape[:-1], n, b))
                    gw = torch.fft.fft(torch.einsum("...mb,...nb->mnb", torch.fft.fft(g), xs)).real.to(w.dtype)
                return gx, gw

        _CIRCULANT = BlockCirculant
    return _CIRCULANT


TORCH_SETUP.append(_circulant_function)


@primitive(intra="dense", linear_in=(0,))
def circulant_matrix(w: torch.Tensor) -> torch.Tensor:
    """The [m·b, n·b] matrix :math:`C` that :func:`block_circulant` applies (``block_circulant(x, w) == x @ C.mT``),
    formed from the kernels ``w`` [m, n, b] as peft's ``get_circulant_fast`` forms it (for merging, for a
    weight update). Linear in ``w``."""
    import torch

    _m, n, b = w.shape
    eye = torch.eye(n * b, dtype=torch.float32, device=w.device).reshape(n * b, n, b)
    y = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(eye), torch.fft.fft(w.float()))
    return torch.fft.fft(y).real.flatten(start_dim=1).T.contiguous().to(w.dtype)


@primitive(linear_in=(0,), choices={"wavelet": WAVELETS})
def idwt2(a: torch.Tensor, wavelet: Any = "db1") -> torch.Tensor:
    """One level of the inverse 2-D discrete wavelet transform over the last two dimensions, as peft's WaveFT
    applies it (Bilican et al. 2025, https://arxiv.org/abs/2505.12532; PyWavelets' ``waverec2d``): ``a`` [..., H, W]
    (H, W even) holds the approximation and the horizontal, vertical and diagonal details as its quadrants
    :math:`\\begin{bmatrix} c_A & c_H \\\\ c_V & c_D \\end{bmatrix}`, and

    :math:`Y = \\sum_{s \\in \\{A,H,V,D\\}} c_s \\star_{\\uparrow 2} g_s`, with the separable filters
    :math:`g_A = l l^\\top, g_H = h l^\\top, g_V = l h^\\top, g_D = h h^\\top` of the wavelet's reconstruction
    low-pass :math:`l` and high-pass :math:`h` (length F) applied as a stride-2 transposed convolution, trimmed by
    :math:`F - 2` on each side, so the result is [..., H + 2 - F, W + 2 - F] (``haar``/``db1``: the same size).
    ``wavelet``: ``haar``, ``db1``..``db10``, ``sym2``..``sym10``, ``coif1``..``coif5``. Computed in fp32, cast
    back. Linear in ``a``."""
    import torch
    import torch.nn.functional as F

    lo_, hi_ = filters(str(wavelet))
    lo = torch.tensor(lo_, dtype=torch.float32, device=a.device)
    hi = torch.tensor(hi_, dtype=torch.float32, device=a.device)
    filt = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)]).unsqueeze(1)  # [4, 1, F, F]
    *lead, h, w = a.shape
    x = a.float().reshape(-1, h, w)
    h2, w2 = h // 2, w // 2
    quads = torch.stack([x[:, :h2, :w2], x[:, :h2, w2:], x[:, h2:, :w2], x[:, h2:, w2:]], 1)  # [N, 4, H/2, W/2]
    y = F.conv_transpose2d(quads, filt, stride=2).squeeze(1)
    pad = (2 * len(lo_) - 3) // 2
    if pad > 0:
        y = y[..., pad:-pad, pad:-pad]
    return y.reshape(*lead, *y.shape[-2:]).to(a.dtype)
