"""Clustering primitives: k-means labels of a matrix's rows, and one orthonormal basis per cluster.

A technique that splits a weight's output rows into subspaces (AdaMSS, peft's ``AdamssConfig``: the rows of the
weight's left singular vectors clustered by k-means, one low-rank update per cluster) initialises an
integer tensor of labels with :func:`kmeans_labels` and each cluster's down-projection with
:func:`cluster_row_bases`; its forward gathers a cluster's tensor per output row with ``index_select``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pefref.ops import primitive
from pefref.ops.shapes import Shape, ShapeMismatch, shape_rule

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["kmeans_labels", "cluster_row_bases"]

KMEANS_TOL = 1e-4
"""Convergence tolerance of :func:`kmeans_labels`, relative to the mean variance of the features (scikit-learn's default)."""


@primitive(nonlinear=True, int_out=True)
def kmeans_labels(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster labels (int64 [n], values below ``min(k, n)``) of the rows of ``x`` [n, f] by k-means (Lloyd's
    algorithm, at most ``iters`` iterations), computed in fp32 as scikit-learn's
    ``KMeans(n_clusters=k, init="random", n_init=1, max_iter=iters, random_state=seed)`` does: the rows centred
    on their mean; the first centres ``min(k, n)`` distinct rows drawn by numpy's ``RandomState(seed)``; each
    iteration assigns every row to its nearest centre (:math:`\\lVert c\\rVert^2 - 2 x\\cdot c`, the first on a
    tie) and moves each centre to its rows' mean (an empty cluster's centre to the row farthest from its own
    centre); it stops when no label changes or the centres move by at most 1e-4 of the rows' mean variance
    (squared), and the labels are then those of the last centres. Needs numpy."""
    import torch

    if x.is_meta:
        return torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    labels = _lloyd(x.detach().float().cpu().numpy().copy(), int(k), int(iters), int(seed))
    return torch.from_numpy(labels.astype("int64")).to(x.device)


def _lloyd(X: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    import numpy as np

    n = X.shape[0]
    k = min(k, n)
    tol = float(np.mean(np.var(X, axis=0))) * KMEANS_TOL
    X -= X.mean(axis=0)
    weight = np.ones(n, dtype=X.dtype)
    centres = X[np.random.RandomState(seed).choice(n, size=k, replace=False, p=weight / weight.sum())]
    labels, old = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    strict = False
    for _ in range(iters):
        labels = _nearest(X, centres)
        new = _means(X, centres, labels)
        shift = float(np.sum(np.sum((new - centres) ** 2, axis=1)))
        centres = new
        if np.array_equal(labels, old):
            strict = True
            break
        if shift <= tol:
            break
        old = labels
    return labels if strict else _nearest(X, centres)


def _nearest(X: np.ndarray, centres: np.ndarray) -> np.ndarray:
    import numpy as np

    d = np.einsum("ij,ij->i", centres, centres)[None, :] - 2 * (X @ centres.T)
    return np.argmin(d, axis=1)


def _means(X: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each centre moved to the mean of its rows (in row order, fp32); an empty cluster takes the row farthest from
    its centre (that row's cluster loses it), as scikit-learn relocates empty clusters."""
    import numpy as np

    k = centres.shape[0]
    sums = np.zeros_like(centres)
    np.add.at(sums, labels, X)  # row by row, in order (unbuffered)
    count = np.bincount(labels, minlength=k).astype(X.dtype)
    empty = np.where(count == 0)[0]
    if len(empty):
        dist = ((X - centres[labels]) ** 2).sum(axis=1)
        if np.max(dist) > 0:
            far = np.argpartition(dist, -len(empty))[:-len(empty) - 1:-1]
            for j, i in zip(empty, far):
                sums[labels[i]] -= X[i]
                sums[j] = X[i]
                count[j], count[labels[i]] = 1, count[labels[i]] - 1
    biggest = int(np.argmax(count))
    out = sums.copy()
    for j in range(k):
        if count[j] > 0:
            out[j] = sums[j] * (np.float32(1.0) / count[j])
    for j in range(k):
        if count[j] <= 0:
            out[j] = out[biggest]
    return out


@primitive(nonlinear=True, int_args=("labels",))
def cluster_row_bases(u: torch.Tensor, labels: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """One orthonormal basis per cluster of the rows of ``u`` [n, f]: a tensor [k, r, f] whose slice ``j`` holds, as
    rows, the leading ``r`` right singular vectors of the rows of ``u`` labelled ``j`` (fp32 thin SVD), zero rows
    past the cluster's size. AdaMSS starts each subspace's down-projection from them (the
    span of the cluster's rows)."""
    import torch

    out = torch.zeros(int(k), int(r), u.shape[1], dtype=torch.float32, device=u.device)
    if u.is_meta:
        return out
    for j in range(int(k)):
        rows = u[labels == j].float()
        if rows.shape[0]:
            vh = torch.linalg.svd(rows, full_matrices=False)[2][: int(r)]
            out[j, : vh.shape[0]] = vh
    return out


@shape_rule("kmeans_labels")
def _kmeans_labels_shape(x: Shape, k: Any, iters: Any = 10, seed: Any = 0) -> Shape:
    if len(x) != 2:
        raise ShapeMismatch(f"kmeans_labels clusters the rows of a matrix [n, f], found {x}")
    return Shape((x[0],))


@shape_rule("cluster_row_bases")
def _cluster_row_bases_shape(u: Shape, labels: Shape, k: int, r: int) -> Shape:
    if len(u) != 2 or tuple(labels) != (u[0],):
        raise ShapeMismatch(f"cluster_row_bases needs rows [n, f] and one label per row [n], found {u} and {labels}")
    return Shape((k, r, u[1]))
