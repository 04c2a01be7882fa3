"""Sequence primitives: recurrent encoders over a sequence of vectors.

P-tuning (Liu et al. 2021, https://arxiv.org/abs/2103.10385) produces its
virtual token embeddings with a bidirectional LSTM over learned input
embeddings; :func:`lstm` is that recurrence, with torch's weight layout so
weights move to and from ``torch.nn.LSTM`` unchanged.

Its weights may be split parameters (``split:``): the recurrence then reads
each layer's and direction's weight as the tensor it is stored as, the same
tensors ``torch.nn.LSTM`` holds, without slicing or stacking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pefref.ops import primitive

if TYPE_CHECKING:
    import torch

__all__ = ["lstm"]


def _dims(t: Any) -> tuple[int, ...]:
    """The shape of a tensor, or of a split one (nested sequences of tensors along its first dimensions)."""
    lead: list[int] = []
    while isinstance(t, Sequence):
        lead.append(len(t))
        t = t[0]
    return (*lead, *t.shape)


@primitive(intra="dense", nonlinear=True, parts=True)
def lstm(
    x: torch.Tensor,
    w_ih: Any,
    w_hh: Any,
    b_ih: Any,
    b_hh: Any,
    w_ih_rest: Any = None,
) -> torch.Tensor:
    """Multi-layer (optionally bidirectional) LSTM over a sequence, from zero initial states
    (Hochreiter & Schmidhuber 1997; the encoder of P-tuning, Liu et al. 2021, https://arxiv.org/abs/2103.10385).

    Per layer and direction, with gates in torch's order (input, forget, cell, output):
    :math:`[i, f, g, o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}`,
    :math:`c_t = \\sigma(f) c_{t-1} + \\sigma(i) \\tanh(g)`, :math:`h_t = \\sigma(o) \\tanh(c_t)`.
    The backward direction reads the sequence reversed; each layer's output is
    the directions' :math:`h_t` concatenated, the next layer's input.

    Shapes (``L`` layers, ``D`` directions = 1 or 2, hidden width ``h``):
    ``x`` [seq, in] or [batch, seq, in]; ``w_ih`` [D, 4h, in] (layer 0's input
    weights); ``w_hh`` [L, D, 4h, h]; ``b_ih``, ``b_hh`` [L, D, 4h];
    ``w_ih_rest`` [L-1, D, 4h, D·h] (input weights of layers 1..L-1, omitted for
    one layer). Returns [seq, D·h] (or [batch, seq, D·h]). ``torch.nn.LSTM``'s
    ``weight_ih_l{k}{_reverse}`` etc. are the slices ``[k, dir]`` of these.
    Each weight may also come split along its leading (layer, direction)
    dimensions, as nested lists of those slices: they run as they are.
    """
    import torch

    layers, dirs, four_h, h = _dims(w_hh)
    if dirs not in (1, 2) or four_h != 4 * h:
        raise ValueError(f"lstm: w_hh must be [layers, 1 or 2, 4h, h], found {tuple(w_hh.shape)}")
    if layers > 1 and (w_ih_rest is None or _dims(w_ih_rest)[0] != layers - 1):
        raise ValueError(f"lstm: {layers} layers need w_ih_rest of shape [{layers - 1}, {dirs}, {four_h}, {dirs * h}]")
    flat: list[torch.Tensor] = []
    for k in range(layers):
        for j in range(dirs):
            flat += [w_ih[j] if k == 0 else w_ih_rest[k - 1][j], w_hh[k][j], b_ih[k][j], b_hh[k][j]]
    unbatched = x.dim() == 2
    xb = x.unsqueeze(0) if unbatched else x
    h0 = xb.new_zeros(layers * dirs, xb.shape[0], h)
    # ``train`` only switches dropout (0 here), but cuDNN keeps what its backward needs only in
    # training mode: an adapter trained with the model in eval() mode failed on CUDA
    # ("cudnn RNN backward can only be called in training mode"; found by the H200 benchmark)
    out, _, _ = torch._VF.lstm(xb, (h0, h0), flat, True, layers, 0.0, torch.is_grad_enabled(), dirs == 2, True)
    return out.squeeze(0) if unbatched else out
