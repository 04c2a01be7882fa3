"""The view model of the site's results pages: what they show of an experiment folder, as plain data.

Rendering never reads a results database: the caller (``pefref site --results``,
through :func:`pefref.experiments.site_view.results_view`) builds a
:class:`ResultsView` and hands it to :func:`pefref.render.site.build.site_files`;
the results section (:mod:`pefref.render.site.results`) only formats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Fact", "GroupLine", "ExperimentView", "Plot", "ResultsView", "RunLine", "Spread"]


@dataclass(frozen=True)
class Spread:
    """A mean over seeds and its sample standard deviation."""

    mean: float
    std: float


@dataclass(frozen=True)
class Fact:
    """One line of an experiment's setup: what (model, task, ...) and its value, as text."""

    term: str
    value: str


@dataclass(frozen=True)
class GroupLine:
    """One row of the ranking: a run label aggregated over its seeds."""

    rank: int
    label: str
    techniques: tuple[str, ...]  # the catalog ids the label's technique names (a composition: several)
    seeds: int
    lr: float
    metric: Spread | None
    other: Spread | None
    trainable: int | None
    pct: float | None
    ms: float | None  # mean time per optimizer step, milliseconds
    ms_std: float | None
    mib: float | None  # mean peak memory, MiB
    links: tuple[str, ...] = ()  # those of ``techniques`` that have a page on the site (set when rendering)


@dataclass(frozen=True)
class RunLine:
    """One run (one seed), finished or not."""

    label: str
    seed: int
    lr: float
    status: str
    step: int
    total: int | None
    metric: float | None
    other: float | None
    ms: float | None
    wall: float | None
    id: str


@dataclass(frozen=True)
class Plot:
    """One plot of an experiment: its name, its file under the site root, what it shows, and its SVG."""

    name: str
    path: str
    what: str
    svg: bytes = field(repr=False)


@dataclass(frozen=True)
class ExperimentView:
    """One experiment of a results folder, as the results page shows it."""

    id: str
    metric: str
    other: str
    higher: bool
    setup: list[Fact]
    groups: list[GroupLine]
    runs: list[RunLine]
    plots: list[Plot] = field(default_factory=list)
    unfinished: int = 0


@dataclass(frozen=True)
class ResultsView:
    """Every experiment of a results folder, in the order the page lists them."""

    experiments: list[ExperimentView]
