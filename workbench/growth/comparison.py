"""Grown against scratch on equal FLOPs, and sweeps of depth: when does depth start to matter?

Definitions: ``docs/definitions.md#growth-comparison``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..core import checks
from ..core import models as _models
from ..core.flops import examples_seen, flops_per_example, steps_for_budget
from ..core.training import TrainConfig
from .loop import grow
from .operators import MAX_DEPTH, MAX_SEEDS, MAX_SWEEP_RUNS
from .schedule import Stage, _dataset_obj, schedule_depths

# ----------------------------------------------------------------------------- compare, sweep


def _as_model_config(ds, model_config):
    """A model config for ``ds``: ``None`` (the family's fit, :func:`workbench.models.config_for`), a dict of
    overrides, or a config (validated)."""
    if model_config is None:
        return _models.config_for(ds)
    if isinstance(model_config, dict):
        return _models.config_for(ds, **model_config)
    return model_config.validate()


def flops_to_reach(metrics, target: float, metric: str = "loss", split: str = "val") -> float:
    """Training FLOPs at which ``metric`` on ``split`` first reaches ``target`` (<= for loss, >= for acc).

    Linear interpolation in FLOPs between the two evaluations around the crossing; NaN if never reached.
    """
    import pandas as pd

    if not isinstance(metrics, pd.DataFrame) or not {"metric", "split", "flops", "step", "value"} <= set(metrics):
        raise ValueError("metrics must be a run's metrics DataFrame with columns step, split, metric, value, flops")
    target = checks.check_float("target", target)
    checks.check_choice("metric", metric, ("loss", "acc"))
    checks.check_choice("split", split, ("train", "val", "batch"))
    m = metrics[(metrics["metric"] == metric) & (metrics["split"] == split)].sort_values(["flops", "step"])
    better = (lambda v: v <= target) if metric == "loss" else (lambda v: v >= target)
    prev = None
    for f, v in zip(m["flops"], m["value"]):
        if better(v):
            if prev is None or prev[1] == v:
                return float(f)
            f0, v0 = prev
            return float(f0 + (f - f0) * (v0 - target) / (v0 - v))
        prev = (f, v)
    return float("nan")


@dataclass
class Comparison:
    """Result of :func:`compare`. ``metrics``: tidy rows of both runs with a ``method`` column."""

    metrics: Any                      # DataFrame: method, stage, step, flops, split, metric, value, ...
    summary: Any                      # DataFrame: one row per method
    target_loss: float                # the from-scratch model's final validation loss
    flops_to_target: dict             # {"grown": FLOPs, "scratch": FLOPs} to reach target_loss
    ratio: float                      # grown / scratch (< 1: growth saves compute); NaN if not reached
    runs: dict = field(default_factory=dict)   # {"grown": Run, "scratch": Run}

    def __repr__(self) -> str:
        return (f"Comparison(target_loss={self.target_loss:.4f}, flops_to_target="
                f"{ {k: f'{v:.3g}' for k, v in self.flops_to_target.items()} }, ratio={self.ratio:.3f})")


def compare(schedule, dataset, model_config=None, config: TrainConfig | None = None, *, start_layers: int | None = None,
            store=None, callbacks=(), name: str | None = None) -> Comparison:
    """A growth schedule against a from-scratch model of the final depth, on equal FLOP budgets.

    The grown model starts from ``model_config`` with ``start_layers`` blocks (default: the
    config's ``n_layers``) and follows ``schedule``; the scratch model is the same config at
    the final depth, same seed, trained with ``config`` for as many steps as fit in the grown
    run's total training FLOPs. ``target_loss`` is scratch's final validation loss, and
    ``flops_to_target`` the FLOPs each needs to first reach it.
    """
    import pandas as pd

    ds = _dataset_obj(dataset)
    config = (config or TrainConfig()).validate()
    mc = _as_model_config(ds, model_config)
    if start_layers is not None:
        checks.check_int("start_layers", start_layers, 0, MAX_DEPTH)
        mc = dataclasses.replace(mc, n_layers=start_layers).validate()
    final_depth = schedule_depths(schedule, mc.n_layers)[-1]
    name = name or f"{ds.name}-compare"

    grown_model = _models.build(mc)
    grown = grow(grown_model, ds, schedule, config, store=store, name=f"{name}-grown", callbacks=callbacks)
    budget = grown.meta["flops"]

    scratch_model = _models.build(dataclasses.replace(mc, n_layers=final_depth))
    seq_len = ds.sequence_length
    per_example = flops_per_example(scratch_model, seq_len)
    steps = steps_for_budget(budget, per_example, len(ds.x_train), config.batch_size)
    scratch = grow(scratch_model, ds, [Stage("train", steps)], config, store=store, name=f"{name}-scratch",
                   callbacks=callbacks)

    target = scratch.final("loss", "val")
    frames, rows, reach = [], [], {}
    for method, run in (("grown", grown), ("scratch", scratch)):
        frames.append(run.metrics.assign(method=method))
        reach[method] = flops_to_reach(run.metrics, target)
        rows.append({"method": method, "n_layers": run.model.config.n_layers,
                     "steps": int(run.metrics["step"].max()), "flops": run.meta["flops"],
                     "val_loss": run.final("loss"), "val_acc": run.final("acc"), "flops_to_target": reach[method]})
    metrics = pd.concat(frames, ignore_index=True)
    cols = ["method"] + [c for c in metrics.columns if c != "method"]
    ratio = reach["grown"] / reach["scratch"] if reach["scratch"] and not math.isnan(reach["scratch"]) else float("nan")
    return Comparison(metrics=metrics[cols], summary=pd.DataFrame(rows), target_loss=target,
                      flops_to_target=reach, ratio=float(ratio), runs={"grown": grown, "scratch": scratch})


def depth_sweep(datasets, depths, model_config=None, config: TrainConfig | None = None, *, seeds=(0,),
                callbacks=()):
    """Final accuracy and loss against depth, each depth trained from scratch with the same steps.

    ``datasets``: one Dataset (or name), a list, or ``{label: Dataset}`` (e.g. khop with hops
    1..3 in the table layout, where ``hops`` look-ups need about ``hops`` blocks:
    ``{h: wb.recipes.KHOP.load_data(hops=h) for h in (1, 2, 3)}``). Returns a tidy
    DataFrame with columns ``task, depth, seed, split, metric, value, flops`` (``flops``:
    the run's training FLOPs).
    """
    import pandas as pd

    from ..core import training as _training

    if isinstance(datasets, dict):
        items = list(datasets.items())
    elif isinstance(datasets, (list, tuple)):
        items = [(None, d) for d in datasets]
    else:
        items = [(None, datasets)]
    config = (config or TrainConfig()).validate()
    if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
        raise ValueError(f"depths must be a non-empty list of integers in [0, {MAX_DEPTH}], got {depths!r}")
    depths = list(depths)
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DEPTH]
    if bad or not depths:
        raise ValueError(f"depths must be a non-empty list of integers in [0, {MAX_DEPTH}], got {depths!r}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range)) \
            or not 1 <= len(seeds) <= MAX_SEEDS:
        raise ValueError(f"seeds must be a list of 1 to {MAX_SEEDS} seeds, got {seeds!r}")
    seeds = [checks.check_seed("seeds[]", s) for s in seeds]
    n_runs = len(items) * len(seeds) * len(depths)
    if n_runs > MAX_SWEEP_RUNS:
        raise ValueError(f"depth_sweep: datasets x seeds x depths = {len(items)} x {len(seeds)} x {len(depths)} = "
                         f"{n_runs} runs; at most {MAX_SWEEP_RUNS} are allowed")
    datasets_ = [(label, _dataset_obj(d)) for label, d in items]
    models_ = [_as_model_config(ds, model_config) for _, ds in datasets_]
    rows = []
    for (label, ds), base_mc in zip(datasets_, models_):
        from ..lmc.permute import check_model_data

        check_model_data(_models.build(dataclasses.replace(base_mc, n_layers=0)), ds)
        label = label if label is not None else ds.name
        seq_len = ds.sequence_length
        for seed in seeds:
            for depth in depths:
                mc = dataclasses.replace(base_mc, n_layers=depth, seed=seed)
                model = _models.build(mc)
                per_example = flops_per_example(model, seq_len)
                cfg = dataclasses.replace(config, seed=seed, eval_every=config.steps)
                run = _training.train(model, ds, cfg, callbacks=callbacks)
                flops = per_example * examples_seen(int(run.metrics["step"].max()), len(ds.x_train), cfg.batch_size)
                for split in ("train", "val"):
                    for metric in ("loss", "acc"):
                        rows.append({"task": label, "depth": depth, "seed": seed, "split": split, "metric": metric,
                                     "value": run.final(metric, split), "flops": float(flops)})
    return pd.DataFrame(rows)
