"""Decompositions, seeded draws, integer draws and stochastic ops.

* ``qr_q`` / ``qr_r``: the reduced QR factors of a matrix (OLoRA's initialisation, DEFT's projection).
* Seeded draws (``gaussian``, ``random_orthogonal``): a tensor that is a pure function of a shape and a
  seed, from a generator of its own (torch's global generator is not touched). Two initialisers of one
  unit that call a draw with the same seed get the same values, so two tensors can come from one draw
  (e.g. the even and odd rows of one orthogonal matrix). Initialisers see ``init_seed``, an integer
  drawn once per unit from torch's global generator (only when some initialiser reads it), so a run
  seeded with :func:`torch.manual_seed` is reproducible and every unit draws anew.
* ``randint``: an initialiser of uniform integer draws (index tensors; store them ``trainable: false``).
* Stochastic ops sample only in training mode, from torch's global generator, and are deterministic in
  eval (see ``stochastic`` in :mod:`pefref.ops`); the compiler supplies their ``training`` argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.inits import initialiser

if TYPE_CHECKING:
    import torch

__all__ = ["qr_q", "qr_r", "gaussian", "random_orthogonal", "randint", "gaussian_sample", "relaxed_bernoulli", "randint_like"]


# --- QR --------------------------------------------------------------------------------------------------


def _qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    return torch.linalg.qr(a.float())  # reduced QR in fp32 (unreliable in half precision)


@primitive(intra="orthogonal")
def qr_q(a: torch.Tensor, k: int = 0) -> torch.Tensor:
    """The orthonormal factor :math:`Q` of the reduced QR decomposition :math:`A = QR` of ``a`` [m, n]
    ([m, min(m, n)], fp32), its first ``k`` columns when ``k`` > 0 (:func:`torch.linalg.qr`). OLoRA
    (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775) starts ``B`` from :math:`Q_{:, :r}`; DEFT orthonormalises
    its projection with it."""
    q = _qr(a)[0]
    return q[..., :k] if k else q


@primitive()
def qr_r(a: torch.Tensor, k: int = 0) -> torch.Tensor:
    """The upper-triangular factor :math:`R` of the reduced QR decomposition of ``a`` [m, n] ([min(m, n), n], fp32),
    its first ``k`` rows when ``k`` > 0 (OLoRA's ``A`` is :math:`R_{:r}`)."""
    r = _qr(a)[1]
    return r[..., :k, :] if k else r


# --- seeded draws ------------------------------------------------------------------------------------------


def _generator(seed: Any) -> torch.Generator:
    import torch
    return torch.Generator().manual_seed(int(seed) % (2**63))


@primitive()
def gaussian(shape: Any, seed: int) -> torch.Tensor:
    """A standard normal tensor :math:`\\mathcal{N}(0, 1)` of ``shape`` (a tuple) drawn from a generator seeded with
    ``seed`` (fp32, on the CPU; an initialiser's result moves to the parameter's device and dtype): the same
    ``(shape, seed)`` always gives the same values."""
    import torch
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    return torch.randn(shape, generator=_generator(seed))


@primitive(intra="orthogonal")
def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random orthogonal [n, n] matrix, the :math:`Q` of the QR decomposition of a seeded standard normal matrix
    (as peft's orthogonal low-rank initialisation draws one).
    Initialisers that call it with one seed (e.g. ``init_seed``) share the draw."""
    import torch
    return torch.linalg.qr(gaussian((int(n), int(n)), seed))[0]


@initialiser(integer=True)
def randint(shape, dtype, device, high: int, low: int = 0) -> torch.Tensor:
    """Integers drawn uniformly from :math:`\\{\\text{low}, \\ldots, \\text{high} - 1\\}` (int64, torch's global
    generator: :func:`torch.randint`), e.g. the positions at which UniLoRA's modules read one shared vector
    (Li et al. 2025, https://arxiv.org/abs/2506.00799). Store the tensor ``trainable: false``."""
    import torch
    if int(high) <= int(low):
        raise ValueError(f"randint: high ({high}) must be above low ({low})")
    if torch.device(device).type == "meta":
        return torch.empty(tuple(shape), dtype=torch.int64, device=device)
    return torch.randint(int(low), int(high), tuple(shape), dtype=torch.long).to(device)


# --- stochastic ops (sample in training, deterministic in eval) ------------------------------------------------


@primitive(nonlinear=True, stochastic=True, linear_in=(0,), eval_args=(0,))
def gaussian_sample(mu: torch.Tensor, logvar: torch.Tensor, training: bool = False) -> torch.Tensor:
    """The reparameterised Gaussian sample (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114),

    :math:`z = \\mu + \\epsilon \\odot e^{\\frac{1}{2}\\log\\sigma^2}`, :math:`\\epsilon \\sim \\mathcal{N}(0, I)`,

    in training (``epsilon`` from torch's global generator, :func:`torch.randn_like`); :math:`\\mu` in eval, as PVeRA
    samples its latent code (Fillioux et al. 2025, https://arxiv.org/abs/2512.07703; peft's ``PVeRA``)."""
    import torch
    if not training:
        return mu
    std = torch.exp(0.5 * logvar)
    return mu + torch.randn_like(std) * std


@primitive(nonlinear=True, stochastic=True)
def relaxed_bernoulli(logits: torch.Tensor, temperature: float = 1.0, training: bool = False) -> torch.Tensor:
    """A relaxed Bernoulli (binary Concrete) sample of the given logits (Maddison et al. 2017,
    https://arxiv.org/abs/1611.00712), :math:`\\sigma\\big((\\ell + \\log u - \\log(1 - u)) / \\tau\\big)`,
    :math:`u \\sim \\mathcal{U}(0, 1)`, in training (:class:`torch.distributions.RelaxedBernoulli`'s ``rsample``,
    torch's global generator); the probabilities :math:`\\sigma(\\ell)` in eval, as Poly's router does
    (Ponti et al. 2023, https://arxiv.org/abs/2202.13914)."""
    import torch
    if not training:
        return torch.sigmoid(logits)
    return torch.distributions.RelaxedBernoulli(torch.tensor(float(temperature), device=logits.device), logits=logits).rsample()


@primitive(nonlinear=True, stochastic=True, int_out=True)
def randint_like(a: torch.Tensor, high: int, fixed: int = 0, training: bool = False) -> torch.Tensor:
    """Integers of ``a``'s shape drawn uniformly from :math:`\\{0, \\ldots, \\text{high} - 1\\}` in training
    (:func:`torch.randint`, torch's global generator; int64 on ``a``'s device), the fixed choice ``fixed``
    everywhere in eval (e.g. a randomly routed expert while training, a chosen one at inference)."""
    import torch
    if not training:
        return torch.full(a.shape, int(fixed), dtype=torch.long, device=a.device)
    return torch.randint(0, int(high), a.shape, dtype=torch.long, device=a.device)
