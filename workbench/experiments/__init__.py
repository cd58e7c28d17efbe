"""The pipelines that pages, sweeps, the bench and notebooks share: each experiment once.

An experiment is a module of plain functions, not a framework: ``run(..., monitor=None) -> result``
(the pipeline: data, model, training, measures; progress and Stop through the monitor,
:mod:`workbench.monitor`) and ``as_code(**choices) -> str`` (the same pipeline as notebook code: a
page's "As code" box, executed by the tests against ``run``). A dashboard page calls ``run`` inside its
job, so every page job is a module-level function that a Dask worker can import; a sweep's built-in
task is the experiment's ``task`` (:data:`SWEEP_TASKS`, of which ``workbench.sweeps.TASKS`` is the view).

- :mod:`~workbench.experiments.train`: one model of the family that fits a dataset;
- :mod:`~workbench.experiments.grow`: growth through a schedule (the presets, G_stack among them) or by
  the natural criterion; grown against scratch on a recipe;
- :mod:`~workbench.experiments.connectivity`: train a pair, then barriers before and after matching;
  the analyses of a pair (curves, layer-wise, plane, fusion);
- :mod:`~workbench.experiments.collapse`: a collapse recipe trained and tracked, its geometry after;
- :mod:`~workbench.experiments.compose`: a base and specialists over one substrate, then their merges.
"""
from __future__ import annotations

from . import collapse, compose, connectivity, grow, train

__all__ = ["EXPERIMENTS", "SWEEP_TASKS", "train", "grow", "connectivity", "collapse", "compose"]

EXPERIMENTS = {"train": train, "grow": grow, "connectivity": connectivity, "collapse": collapse,
               "compose": compose}
# the sweeps' built-in tasks (their names are the sweeps' own: a "barrier" point is a connectivity pair)
SWEEP_TASKS = {"train": train.task, "barrier": connectivity.task, "collapse": collapse.task, "grow": grow.task}
