"""A streaming incremental PCA (``input_ipca`` calibration statistics), updated batch by batch.

:class:`IncrementalFit` follows sklearn's ``IncrementalPCA.partial_fit`` as peft 0.21's port computes it
(``peft.utils.incremental_pca``, ``lowrank=True``): the running mean and variance in fp64, each new batch centred on
its own mean and stacked under the previous fit's scaled axes and a mean-correction row, a randomised SVD
(``torch.svd_lowrank`` with ``q`` columns and ``niter`` iterations, the global generator forked and seeded with
``seed`` at every batch so that the draw is reproducible and nothing else's randomness moves), signs by ``svd_flip``
on V. After each batch but the first the fit compares its axes with the previous batch's (cosine similarity per
axis): it has converged when every one reaches ``tau``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pefref.language.errors import PefrefError

__all__ = ["IncrementalFit", "signed_rows"]


@dataclass
class IncrementalFit:
    """The state of one placement's incremental PCA: ``components`` axes, fitted on the rows given to :meth:`update`."""

    components: int
    q: int
    niter: int
    seed: int
    tau: float
    axes: torch.Tensor | None = field(default=None, repr=False)  # [components, d], the fit's principal axes
    singular: torch.Tensor | None = field(default=None, repr=False)
    mean: torch.Tensor | None = field(default=None, repr=False)
    var: torch.Tensor | None = field(default=None, repr=False)
    seen: torch.Tensor | None = field(default=None, repr=False)
    converged: bool = False
    batches: int = 0

    def update(self, x: torch.Tensor) -> None:
        """Fit the rows ``x`` [n, d] (skipped where ``n`` is below the number of components); then judge convergence."""
        if x.shape[0] < self.components:
            return
        if self.components > x.shape[1]:
            raise PefrefError(f"input_ipca: {self.components} principal axes asked of inputs of width {x.shape[1]}")
        previous = None if self.axes is None else self.axes.clone()
        self._partial_fit(x.float().clone())
        self.batches += 1
        if previous is not None:
            assert self.axes is not None
            sim = torch.nn.functional.cosine_similarity(self.axes, previous)
            self.converged = bool(torch.all(sim >= self.tau))

    def _partial_fit(self, x: torch.Tensor) -> None:
        first = self.axes is None
        n = x.shape[0]
        if first:
            self.seen = torch.tensor([0], device=x.device)
        assert self.seen is not None
        mean, var, total = _mean_and_var(x, self.mean, self.var, self.seen)
        if first:
            x -= mean
        else:
            assert self.singular is not None and self.axes is not None and self.mean is not None
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.seen.double() / total) * n)
            x = torch.vstack((self.singular.view((-1, 1)) * self.axes, x, factor * (self.mean - batch_mean)))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _u, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vt = signed_rows(v.mH)
        self.seen, self.mean, self.var = total, mean, var
        self.axes, self.singular = vt[: self.components], s[: self.components]


def _mean_and_var(x: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None,
                  last_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The running mean and variance over the rows seen and ``x`` (sklearn's ``_incremental_mean_and_var``, fp64 sums)."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None else last_mean * last_count
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    t = x - new_sum / new_count
    correction = t.sum(dim=0, dtype=torch.float64).square()
    unnormalised = t.square().sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return mean, unnormalised / count, count
    ratio = last_count.double() / new_count
    unnormalised = last_var * last_count + unnormalised + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, unnormalised / count, count


def signed_rows(axes: torch.Tensor) -> torch.Tensor:
    """Each row of ``axes`` signed so that its largest-magnitude entry is positive (``svd_flip`` on V, as scikit-learn's
    and peft's IncrementalPCA do); an all-zero row stays zero."""
    signs = torch.sign(axes[torch.arange(axes.shape[0], device=axes.device), torch.argmax(torch.abs(axes), dim=1)])
    return axes * signs.view(-1, 1)
