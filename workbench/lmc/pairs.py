"""Training pairs for connectivity: two seeds of one configuration, and Frankle et al.'s instability
analysis (children spawned from one parent at step k).

Definitions: ``docs/definitions.md#instability``.
"""
from __future__ import annotations

import copy
from typing import Sequence

import pandas as pd

from ..core import checks
from ..core import monitor as _monitor
from ..core.data import Dataset
from .permute import check_model_data
from .interpolation import (
    MAX_SEEDS,
    MAX_SPAWN_STEPS,
    SPLITS,
    Cancelled,
    _check_n_alphas,
    barrier,
    barrier_value,
    curve,
)

# ----------------------------------------------------------------------------- training helpers


def _check_seeds(name: str, seeds, at_least: int) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)) \
            or not at_least <= len(seeds) <= MAX_SEEDS:
        raise ValueError(f"{name} must be a list of {at_least} to {MAX_SEEDS} seeds, got {seeds!r}")
    return [checks.check_seed(f"{name}[]", s) for s in seeds]


def train_pair(config, dataset: Dataset, seeds: Sequence[int] = (0, 1), train_config=None, callbacks=(),
               monitor=None) -> list:
    """Train one model per seed (initialisation and data order both from the seed); returns the Runs.

    ``monitor``: the steps of all of them as one progress; stopped, the training in progress ends and
    those after it end at once (their Runs' status ``"cancelled"``).
    """
    import dataclasses

    from ..core.models import build
    from ..core.progress import TrainProgress
    from ..core.training import TrainConfig, train

    seeds = _check_seeds("seeds", seeds, 1)
    tc = (train_config or TrainConfig()).validate()
    check_model_data(build(config.validate()), dataset)
    progress = TrainProgress(_monitor.resolve(monitor), total_steps=len(seeds) * tc.steps)
    runs = []
    for s in seeds:
        model = build(dataclasses.replace(config, seed=s))
        runs.append(train(model, dataset, dataclasses.replace(tc, seed=s), callbacks=[*callbacks, progress],
                          name=f"{dataset.name}-{config.family}-seed{s}"))
    return runs


def instability(config, dataset: Dataset, spawn_steps: Sequence[int], train_config=None,
                child_seeds: Sequence[int] = (1, 2), n_alphas: int = 11, split: str = "val",
                max_examples: int = 2048, monitor=None) -> pd.DataFrame:
    """Instability analysis (Frankle et al. 2020): spawn two children at step k and measure their barrier.

    One parent (init ``config.seed``, data order ``train_config.seed``) is trained to each
    spawn step in turn, keeping its optimizer state. At step ``k`` two copies (with the
    parent's optimizer state) train for the remaining ``train_config.steps - k`` steps with
    data orders ``child_seeds``. Returns one row per ``k``: ``spawn_step``, the linear loss
    and error barriers between the children (``loss_barrier``, ``error_barrier``) and their
    accuracies (``acc_a``, ``acc_b``) on ``split``. ``monitor``: the training steps as progress;
    stopped, it raises :class:`Cancelled`.
    """
    import dataclasses

    from ..core.models import build
    from ..core.progress import TrainProgress
    from ..core.training import TrainConfig, make_optimizer, train

    tc = (train_config or TrainConfig()).validate()
    if isinstance(spawn_steps, (str, bytes)) or not isinstance(spawn_steps, (list, tuple, range)) \
            or not 1 <= len(spawn_steps) <= MAX_SPAWN_STEPS:
        raise ValueError(f"spawn_steps must be a list of 1 to {MAX_SPAWN_STEPS} steps in [0, {tc.steps - 1}] "
                         f"(train_config.steps = {tc.steps}), got {spawn_steps!r}")
    steps = sorted(set(checks.check_int("spawn_steps[]", k, 0, tc.steps - 1) for k in spawn_steps))
    if isinstance(child_seeds, (str, bytes)) or not isinstance(child_seeds, (list, tuple)) or len(child_seeds) != 2:
        raise ValueError(f"child_seeds must be a list of two seeds (one per child), got {child_seeds!r}")
    child_seeds = [checks.check_seed("child_seeds[]", s) for s in child_seeds]
    _check_n_alphas(n_alphas)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    monitor = _monitor.resolve(monitor)
    progress = TrainProgress(monitor, total_steps=max(1, steps[-1] + sum(2 * (tc.steps - k) for k in steps)))
    cbs = [progress]
    parent = build(config.validate())
    check_model_data(parent, dataset)
    opt = make_optimizer(parent, tc)
    at, rows = 0, []
    for k in steps:
        _monitor.check(monitor)
        progress.label = f"spawn at step {k}: step"
        if k > at:
            train(parent, dataset, dataclasses.replace(tc, steps=k - at), callbacks=cbs, optimizer=opt, start_step=at)
            at = k
        children = []
        for s in child_seeds:
            _monitor.check(monitor)
            child = copy.deepcopy(parent)
            child_opt = make_optimizer(child, tc)
            child_opt.load_state_dict(opt.state_dict())
            run = train(child, dataset, dataclasses.replace(tc, steps=tc.steps - k, seed=s), callbacks=cbs,
                        optimizer=child_opt, start_step=k)
            if run.status == "cancelled":
                raise Cancelled("cancelled")
            children.append(child)
        c = curve(children[0], children[1], dataset, n_alphas, (split,), max_examples)
        b = barrier(c)
        ends = c.sort_values("alpha")
        rows.append({"spawn_step": k, "split": split,
                     "loss_barrier": barrier_value(b, split, "loss", "linear"),
                     "error_barrier": barrier_value(b, split, "error", "linear"),
                     "acc_a": float(ends["acc"].iloc[0]), "acc_b": float(ends["acc"].iloc[-1])})
    monitor.report(1.0, "done")
    return pd.DataFrame(rows)
