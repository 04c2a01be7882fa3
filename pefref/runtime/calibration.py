"""Calibration: the statistics a technique's modules declare (``calibration:``), gathered on batches.

:func:`gather` runs the model once over the calibration batches (an iterable of model input dicts), with a
forward hook on the host of every placement whose module declares statistics, and returns each placement's
statistics by name (fp32), for its initialisers and ``host_update`` to read. Memory stays bounded: a
covariance is a running sum of :math:`X_b^\\top X_b` ([d, d] per placement), never the activations; a
weight's gradient a running sum of [out, in]; the principal axes of the inputs (``input_pca``) are those of the
centred scatter matrix, formed in fp64 from the running sums of :math:`X_b^\\top X_b` and of the rows of :math:`X_b`;
a streaming estimate of them (``input_ipca``) is a per-placement :class:`~pefref.runtime.ipca.IncrementalFit` updated
batch by batch on the tokens the batch's attention mask keeps, each fit stopping once it has converged, the batches
cycled (the later passes only feed those fits) until every fit has converged. The pass runs in eval mode (no dropout) under
``torch.no_grad()`` unless a ``weight_grad`` is declared (then the model's loss is differentiated with
respect to the host weights only, with ``torch.autograd.grad``: no ``.grad`` is written). Hooks, modes
and ``requires_grad`` flags are restored afterwards, whatever happens: gathering changes nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn

from pefref.language.errors import PefrefError
from pefref.language.schema.technique import Statistic
from pefref.language.shapecheck import ipca_components
from pefref.language.sizes import eval_scalar
from pefref.runtime.inject import Placement
from pefref.runtime.ipca import IncrementalFit, signed_rows
from pefref.runtime.patches import first_tensor
from pefref.runtime.rows import take

__all__ = ["Accumulator", "declares_calibration", "gather", "refuse_without", "random_batches", "takes_labels", "meta_statistics"]


@dataclass
class Accumulator:
    """The running sum of one statistic at one placement, with the batches and tokens it has seen."""

    stat: Statistic
    total: torch.Tensor | None = field(default=None, repr=False)
    batches: int = 0
    tokens: int = 0
    rows: torch.Tensor | None = field(default=None, repr=False)  # input_pca: the running sum of the inputs' rows
    fit: IncrementalFit | None = field(default=None, repr=False)  # input_ipca: the placement's incremental PCA

    def add(self, value: torch.Tensor, tokens: int, rows: torch.Tensor | None = None) -> None:
        self.total = value if self.total is None else self.total + value
        if rows is not None:
            self.rows = rows if self.rows is None else self.rows + rows
        self.batches += 1
        self.tokens += tokens

    def value(self) -> torch.Tensor:
        if self.fit is not None:
            assert self.fit.axes is not None
            return self.fit.axes.float()
        assert self.total is not None
        if self.stat.kind == "input_pca":
            assert self.rows is not None
            return principal_axes(self.total, self.rows, self.tokens)
        n = {"batches": self.batches, "tokens": self.tokens if self.stat.kind != "weight_grad" else self.batches, "none": 1}[self.stat.average]
        return self.total / n


def declares_calibration(modules: Iterable[Any]) -> list[str]:
    """The names of the modules that declare calibration statistics (their initialisation reads data)."""
    return [m.name for m in modules if getattr(m, "calibration", None)]


def refuse_without(tid: str, modules: Iterable[Any]) -> None:
    """A clear error for a technique that initialises from data applied without calibration batches."""
    names = declares_calibration(modules)
    if names:
        stats = sorted({f"{n} ({st.kind})" for m in modules if m.name in names for n, st in m.calibration.items()})
        raise PefrefError(f"{tid}: module(s) {', '.join(names)} initialise from calibration statistics {', '.join(stats)}; "
                          "pass calibration=batches (an iterable of model input dicts; in an experiment, a calibration: section)")


def _covariance(t: torch.Tensor, st: Statistic) -> tuple[torch.Tensor, int]:
    x = t.detach().reshape(-1, t.shape[-1]).float()  # [tokens, d]
    if st.normalise == "batch_max":
        x = x / torch.max(x).abs()
    return x.T @ x, x.shape[0]


def _scatter(t: torch.Tensor, st: Statistic) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A batch's :math:`X^\\top X` and the sum of its rows, in fp64 (``input_pca``)."""
    x = t.detach().reshape(-1, t.shape[-1]).double()  # [tokens, d]
    if st.normalise == "batch_max":
        x = x / torch.max(x).abs()
    return x.T @ x, x.shape[0], x.sum(0)


def principal_axes(scatter: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The principal axes of ``n`` rows whose :math:`X^\\top X` is ``scatter`` and whose sum is ``rows``: the eigenvectors
    of the centred scatter :math:`X^\\top X - n \\bar{x} \\bar{x}^\\top` (the right singular vectors of
    :math:`X - \\bar{x}`) as rows [d, d] by decreasing eigenvalue, each signed so that its largest-magnitude entry is
    positive (``svd_flip`` on V in sklearn's and peft's IncrementalPCA); fp32."""
    mean = rows / n
    _vals, vecs = torch.linalg.eigh(scatter - n * torch.outer(mean, mean))  # ascending
    return signed_rows(vecs.flip(1).T.contiguous()).float()


@dataclass
class _Running:
    """The batch the model is running and which pass over the batches it is (later passes feed input_ipca fits only)."""

    batch: Mapping[str, Any] | None = None
    cycle: int = 0


def _kept_rows(t: torch.Tensor, batch: Mapping[str, Any] | None, st: Statistic) -> torch.Tensor:
    """The host input's rows [tokens, d] an input_ipca fit reads: those whose attention mask is 1 and, where the batch
    has per-token labels, whose label is not ``st.ignore_label`` (peft's language-modelling preparation)."""
    x = t.detach()
    keep = _token_mask(batch or {}, st)
    laid_out = keep is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(keep.shape)
    if keep is None or (bool(keep.all()) and not laid_out):
        return x.reshape(-1, x.shape[-1])
    if not laid_out:
        raise PefrefError(f"input_ipca leaves out the tokens the batch masks, {tuple(keep.shape)}, which do not lay out the host's "
                          f"input {tuple(x.shape)}")
    return x[keep.to(x.device)].reshape(-1, x.shape[-1])


def _token_mask(batch: Mapping[str, Any], st: Statistic) -> torch.Tensor | None:
    ids, mask, labels = batch.get("input_ids"), batch.get("attention_mask"), batch.get("labels")
    keep = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool) if isinstance(ids, torch.Tensor) else None
    if keep is not None and st.ignore_label is not None and isinstance(labels, torch.Tensor) and labels.shape == keep.shape:
        keep = keep & (labels.to(keep.device) != st.ignore_label)
    return keep


def _hook(pl: Placement, accs: Mapping[str, Accumulator], running: _Running) -> Any:
    """A forward hook on ``pl.host`` adding its input's and output's statistics to ``accs`` (on later passes, only
    feeding the input_ipca fits that have not converged)."""

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        with torch.no_grad():
            for acc in accs.values():
                if acc.fit is not None:
                    if not acc.fit.converged:
                        acc.fit.update(_kept_rows(first_tensor(args, kwargs), running.batch, acc.stat))
                elif running.cycle:
                    continue
                elif acc.stat.kind == "input_cov":
                    acc.add(*_covariance(first_tensor(args, kwargs), acc.stat))
                elif acc.stat.kind == "input_pca":
                    acc.add(*_scatter(first_tensor(args, kwargs), acc.stat))
                elif acc.stat.kind == "output_cov":
                    h = output[0] if isinstance(output, tuple) else output
                    acc.add(*_covariance(take(h, h.dim() - 1, pl.start, pl.size, pl.period), acc.stat))

    return hook


@contextlib.contextmanager
def _calibrating(model: nn.Module, weights: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode and gradients on ``weights`` for the pass; every module's mode and every flag restored after."""
    modes = [(mod, mod.training) for mod in model.modules()]
    flags = [(w, w.requires_grad) for w in weights]
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for mod, training in modes:
            mod.training = training
        for w, flag in flags:
            w.requires_grad_(flag)


def _accumulator(st: Statistic, pl: Placement, names: Mapping[str, Any]) -> Accumulator:
    if st.kind != "input_ipca":
        return Accumulator(st)
    env = {**names, "d_in": pl.d_in, "d_out": pl.d_out}
    try:
        n = int(eval_scalar(cast("str | int", st.components), env))
        q = 2 * n if st.q is None else int(eval_scalar(st.q, env))
    except Exception as ex:
        raise PefrefError(f"{pl.module.name} at {pl.path}: input_ipca's components or q cannot be computed ({ex})") from None
    if not 1 <= n <= q:
        raise PefrefError(f"{pl.module.name} at {pl.path}: input_ipca needs 1 <= components ({n}) <= q ({q})")
    return Accumulator(st, fit=IncrementalFit(n, q, st.niter, st.seed, st.tau))


def gather(model: nn.Module, places: list[Placement], batches: Iterable[Mapping[str, Any]],
           names: Mapping[str, Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """Each placement's declared statistics (fp32, by name; empty for a module that declares none), gathered in
    one pass over ``batches`` (more, feeding only the input_ipca fits, until they have converged); ``names``: the
    hyperparameters and sizes an input_ipca's components read. The model is left as it was."""
    accs: list[dict[str, Accumulator]] = [{n: _accumulator(st, pl, names or {}) for n, st in (getattr(pl.module, "calibration", None) or {}).items()}
                                          for pl in places]
    fits = [(f"{pl.module.name} at {pl.path}", acc) for pl, a in zip(places, accs) for acc in a.values() if acc.fit is not None]
    if fits:
        batches = list(batches)  # cycled
    grads = [(i, n) for i, a in enumerate(accs) for n, acc in a.items() if acc.stat.kind == "weight_grad"]
    for i, a in enumerate(accs):
        if a and not (places[i].kind.has_weight and places[i].binding.side == "module"):
            raise PefrefError(f"{places[i].module.name} at {places[i].path}: calibration statistics are gathered at hosts with a weight")
    params: list[torch.Tensor] = list({id(w): w for w in (cast(torch.Tensor, places[i].host.weight) for i, _n in grads)}.values())
    running = _Running()
    handles = [pl.host.register_forward_hook(_hook(pl, a, running), with_kwargs=True) for pl, a in zip(places, accs) if a]
    seen = 0
    try:
        with _calibrating(model, params):
            with torch.set_grad_enabled(bool(grads)):
                for batch in batches:
                    if not isinstance(batch, Mapping):
                        raise PefrefError(f"a calibration batch is a dict of model inputs, found {type(batch).__name__}")
                    running.batch = batch
                    out = model(**batch)
                    seen += 1
                    if grads:
                        _add_grads(out, places, accs, grads, params)
            if fits and seen:
                _cycle(model, cast(list[Mapping[str, Any]], batches), running, fits)
    finally:
        for hd in handles:
            hd.remove()
    if not seen:
        raise PefrefError("the calibration batches are empty: nothing to gather statistics from")
    return [{n: acc.value() for n, acc in a.items()} for a in accs]


class ConvergenceWarning(UserWarning):
    """An incremental fit of calibration statistics stopped at its bound of passes before it converged."""


def _cycle(model: nn.Module, batches: list[Mapping[str, Any]], running: _Running, fits: list[tuple[str, Accumulator]]) -> None:
    """Further passes over ``batches`` (under no_grad) until every input_ipca fit has converged, stopping at the first
    batch before which they all have; a fit still unconverged after its statistic's ``max_cycles`` passes keeps its last
    estimate, with a :class:`ConvergenceWarning`."""
    unfitted = [(where, acc) for where, acc in fits if acc.fit is not None and acc.fit.axes is None]
    if unfitted:
        where, acc = unfitted[0]
        raise PefrefError(f"{where}: input_ipca keeps {acc.fit.components if acc.fit else 0} principal axes, and no calibration batch has "
                          "that many tokens (after masking) to fit them on")
    bound = max(acc.stat.max_cycles for _w, acc in fits)
    with torch.no_grad():
        for cycle in range(1, bound + 2):  # the check at the start of pass bound + 1 ends it
            late = [(where, acc) for where, acc in fits if acc.fit is not None and not acc.fit.converged and acc.stat.max_cycles <= cycle]
            for where, acc in late:  # as scikit-learn does: the last estimate, with a warning (peft would cycle on forever)
                assert acc.fit is not None
                acc.fit.converged = True
                warnings.warn(f"{where}: input_ipca has not converged (tau {acc.stat.tau}) after {acc.stat.max_cycles} passes over the "
                              f"{len(batches)} calibration batches (max_cycles); its last estimate is used. Give more or more varied "
                              "batches, a lower tau, or more cycles", ConvergenceWarning, stacklevel=2)
            running.cycle = cycle
            for batch in batches:
                if all(acc.fit is not None and acc.fit.converged for _w, acc in fits):
                    return
                running.batch = batch
                model(**batch)


def _add_grads(out: Any, places: list[Placement], accs: list[dict[str, Accumulator]], grads: list[tuple[int, str]],
               params: list[torch.Tensor]) -> None:
    """Add the gradient of the batch's loss with respect to each declaring placement's host weight ([out, in])."""
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise PefrefError("weight_grad statistics differentiate the model's loss: give calibration batches with labels")
    got = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True)))
    for i, n in grads:
        pl = places[i]
        g = got[id(pl.host.weight)]
        if g is None:
            g = torch.zeros_like(pl.host.weight)
        assert pl.kind.get_weight is not None
        w = pl.kind.get_weight(SimpleNamespace(weight=g.detach().float()))  # in the [out, in] layout of the host's weight
        accs[i][n].add(take(w, 0, pl.start, pl.size, pl.period), 0)


def meta_statistics(places: list[Placement], names: Mapping[str, Any] | None = None) -> list[dict[str, torch.Tensor]] | None:
    """On a model whose declaring hosts are all on the meta device (built without weights, loaded later) there is
    nothing to gather: each statistic is an empty meta tensor of its shape, as the initialisers' fillers are.
    None where some declaring host holds values."""
    declaring = [pl for pl in places if getattr(pl.module, "calibration", None)]
    if not declaring or any(not pl.host.weight.is_meta for pl in declaring):
        return None
    def dims(st: Statistic, pl: Placement) -> tuple[int, int]:
        return {"input_cov": (pl.d_in, pl.d_in), "input_pca": (pl.d_in, pl.d_in), "output_cov": (pl.d_out, pl.d_out), "weight_grad": (pl.d_out, pl.d_in),
                "input_ipca": (ipca_components(st, names, pl.d_in, pl.d_out), pl.d_in)}[st.kind]

    return [{n: torch.empty(dims(st, pl), device="meta") for n, st in (getattr(pl.module, "calibration", None) or {}).items()}
            for pl in places]


def random_batches(model: nn.Module, n: int, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of one sequence of ``seq`` random token ids (from a generator seeded with ``seed``, on the
    model's device), the tokens also as ``labels`` where the model takes them: calibration for a model with random
    weights (the CLI's ``apply`` and ``demo``, tests)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, max(vocab, 4), (1, seq), generator=g) for _ in range(n)]
    labelled = takes_labels(model)  # a model with a loss gets the tokens as labels (what weight_grad differentiates)
    return [{"input_ids": t.to(device), "attention_mask": torch.ones_like(t).to(device), **({"labels": t.to(device)} if labelled else {})}
            for t in ids]


def takes_labels(model: nn.Module) -> bool:
    """Whether the model's forward takes ``labels`` (a model with a task head computes its loss from them)."""
    import inspect

    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
