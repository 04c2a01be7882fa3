"""Experiments: declare (YAML), train, record (SQLite), compare (tables, plots, site pages).

Modules: :mod:`~pefref.experiments.grid` (runs of an experiment), :mod:`~pefref.experiments.tasks`
(models, heads, what trains), :mod:`~pefref.experiments.data`, :mod:`~pefref.experiments.train`
(one run), :mod:`~pefref.experiments.runner` (all runs, resume, Ctrl-C),
:mod:`~pefref.experiments.evaluation` (loss and metrics), :mod:`~pefref.experiments.memory` (training memory on CPU),
:mod:`~pefref.experiments.records` (the database), :mod:`~pefref.experiments.checkpoint`,
:mod:`~pefref.experiments.results` and :mod:`~pefref.experiments.plots` (comparison),
:mod:`~pefref.experiments.site_view` (results as the site's view model),
:mod:`~pefref.experiments.distributed` (DDP).
"""
