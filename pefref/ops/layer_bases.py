"""Bases shared by the host weights of every layer at one site, and the coordinates of one weight in them.

Initialisers of a tensor shared across layers (``shared: layers``) may read ``W_layers``, the host weights of
every layer the module is placed at, stacked [L, out, in]. :func:`joint_row_basis` turns that stack into one
basis of the input space; :func:`basis_coords_unit` and :func:`basis_coords_norm` give one layer's weight in
it (unit directions and their lengths); :func:`random_offdiag_positions` draws the seeded positions of a sparse
coupling between basis directions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.inits import initialiser
from pefref.ops.shapes import Shape, ShapeMismatch, shape_rule

if TYPE_CHECKING:
    import torch

__all__ = ["joint_row_basis", "basis_coords_unit", "basis_coords_norm", "random_offdiag_positions"]


def _joint_basis(ws: torch.Tensor, alpha: float) -> torch.Tensor:
    import torch

    mats = [w.detach().to(torch.float32).cpu() for w in ws]
    stacked = torch.cat(mats, dim=0)
    if stacked.shape[0] < stacked.shape[1]:  # fewer stacked rows than inputs: the right singular vectors
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    t_pi = torch.zeros((dim, dim), dtype=r.dtype)
    start = 0
    for m in mats:
        qs = q[start:start + m.shape[0], :]
        start += m.shape[0]
        t_pi += torch.linalg.inv(qs.T @ qs + alpha * torch.eye(dim, dtype=r.dtype))
    t_pi /= len(mats)
    return r.T @ torch.linalg.eigh(t_pi)[1]


@primitive()
def joint_row_basis(ws: torch.Tensor, alpha: float = 1e-3) -> torch.Tensor:
    """One basis ``V`` [in, in] of the input space shared by the weights ``ws`` [L, out, in] of ``L`` layers
    (hierarchical joint decomposition, Wan et al. 2026, arXiv 2512.23485; peft's
    ``_projection_from_weights``), in fp32: with the stacked weights ``S = QR`` (reduced QR, ``L·out >= in``),
    :math:`V = R^\\top E` where ``E`` are the eigenvectors (ascending eigenvalues) of
    :math:`\\frac1L \\sum_l (Q_l^\\top Q_l + \\alpha I)^{-1}` (``Q_l``: layer ``l``'s rows of ``Q``; ``alpha``
    keeps the inverses stable for correlated layers); with fewer stacked rows than inputs, the right singular
    vectors of ``S`` (:math:`V = V_S`, full)."""
    import torch

    if ws.device.type == "meta":
        return torch.empty((ws.shape[-1], ws.shape[-1]), dtype=torch.float32, device="meta")
    return _joint_basis(ws, float(alpha)).to(ws.device)


def _coords(w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = W V^{-T}`` in fp64 (a pseudo-inverse when ``V`` is singular), split into its column norms and unit columns."""
    import torch

    wd, vd = w.detach().to(torch.float64).cpu(), v.detach().to(torch.float64).cpu()
    try:
        b = torch.linalg.solve(vd, wd.T).T
    except RuntimeError:
        b = wd @ torch.linalg.pinv(vd, rtol=1e-6).T
    norm = torch.linalg.norm(b, dim=0)
    unit = torch.zeros_like(b)
    keep = norm > 1e-12
    unit[:, keep] = b[:, keep] / norm[keep]
    return unit.float().to(w.device), norm.float().to(w.device)


@primitive()
def basis_coords_unit(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The coordinates :math:`B = W V^{-\\top}` of the weight ``w`` [out, in] in the basis ``v`` [in, in]
    (so :math:`W = B V^\\top`), each column scaled to unit length (zero where its length is below 1e-12):
    ``U`` [out, in] of :math:`W = U \\operatorname{diag}(\\lambda) V^\\top`, computed in fp64 and returned in fp32."""
    import torch

    if w.device.type == "meta":
        return torch.empty(tuple(w.shape), dtype=torch.float32, device="meta")
    return _coords(w, v)[0]


@primitive()
def basis_coords_norm(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The column lengths :math:`\\lambda` [in] of :math:`B = W V^{-\\top}` (see :func:`basis_coords_unit`)."""
    import torch

    if w.device.type == "meta":
        return torch.empty((w.shape[-1],), dtype=torch.float32, device="meta")
    return _coords(w, v)[1]


@initialiser(integer=True)
def random_offdiag_positions(shape: Any, dtype: Any, device: Any, n: int, seed: int = 0) -> torch.Tensor:
    """``k = shape[-1]`` distinct off-diagonal positions of an [n, n] matrix as a [2, k] int64 tensor of
    (row, column): the off-diagonal positions in row-major order, permuted by ``torch.randperm`` from a
    generator seeded with ``seed``, the first ``k`` kept (peft's sparse rotation pattern, for one site)."""
    import torch

    if tuple(shape[:-1]) != (2,):
        raise ValueError(f"random_offdiag_positions makes a [2, k] tensor, not {tuple(shape)}")
    k, n = shape[-1], int(n)
    if k > n * n - n:
        raise ValueError(f"random_offdiag_positions: {k} positions do not fit the off-diagonal of a {n}x{n} matrix")
    if torch.device(device).type == "meta":
        return torch.empty((2, k), dtype=torch.int64, device=device)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    pos = pos[pos[:, 0] != pos[:, 1]]
    perm = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:k]
    return pos[perm].t().contiguous().to(device)


@shape_rule("joint_row_basis")
def _joint_row_basis_shape(ws: Shape, alpha: Any = 1e-3) -> Shape:
    if len(ws) != 3:
        raise ShapeMismatch(f"joint_row_basis reads the weights of every layer [L, out, in], found {ws}")
    return Shape((ws[2], ws[2]))


@shape_rule("basis_coords_unit")
def _coords_unit_shape(w: Shape, v: Shape) -> Shape:
    if len(w) != 2 or tuple(v) != (w[1], w[1]):
        raise ShapeMismatch(f"basis_coords_unit needs a weight [out, in] and a basis [in, in], found {w} and {v}")
    return Shape((w[0], w[1]))


@shape_rule("basis_coords_norm")
def _coords_norm_shape(w: Shape, v: Shape) -> Shape:
    if len(w) != 2 or tuple(v) != (w[1], w[1]):
        raise ShapeMismatch(f"basis_coords_norm needs a weight [out, in] and a basis [in, in], found {w} and {v}")
    return Shape((w[1],))
