"""Connectivity: train a pair from two seeds, then the barriers between them before and after aligning
their units; and the analyses of a pair (curves, layer-wise barriers, the plane, fusion, instability).

One pipeline for the Connectivity page (its jobs and "As code" box), the sweeps' ``"barrier"`` task,
notebook 03 and the bench: :func:`pair` trains the two models, :func:`barriers` measures them,
:func:`run` is both ("train a pair, then barriers before and after matching"); :func:`analysis`,
:func:`fusion` and :func:`layerwise` are the page's analyses of two trained models.

>>> result = wb.experiments.connectivity.run("digits", model={"d_model": 32}, train={"steps": 200})
>>> result["barriers"]      # alignment, split, metric, value
"""
from __future__ import annotations

import pandas as pd

from ..core import checks, recipes
from ..core import monitor as _monitor
from . import _shared

__all__ = ["run", "pair", "barriers", "analysis", "fusion", "layerwise", "instability", "as_code", "task",
           "pair_choices", "FUSION_REGS"]

FUSION_REGS = (0.01, 0.03, 0.08, 0.3, 1.0)   # Sinkhorn regs of a fusion (Imfeld et al.'s default 0.08 among them)

CODE = """import dataclasses
import workbench as wb
from workbench.figures import lmc as figs
store = wb.RunStore()
run_a, run_b = store.load({run_a!r}), store.load({run_b!r})
a, b = run_a.model.eval(), run_b.model.eval()
ds = wb.data.from_spec(run_a.dataset)
curves = wb.lmc.compare(a, b, ds, n_alphas={n_alphas}, max_examples={max_examples})  # none, weights, activations, repair
figs.connectivity_curves(curves)
figs.barrier_table(wb.lmc.barrier(curves))
b_w = wb.lmc.align(a, b, method="weights")
figs.layerwise_bars(wb.lmc.layerwise(a, b_w, ds, n_alphas={n_layer_alphas}, max_examples={max_examples}))
figs.plane_contour(wb.lmc.plane(a, b, b_w, ds, resolution={resolution}, max_examples={plane_examples}))
tc = dataclasses.replace(run_a.train_config, steps={inst_steps}, eval_every={inst_steps})
figs.instability_plot(wb.lmc.instability(a.config, ds, spawn_steps={spawn!r}, train_config=tc,
                                         n_alphas={n_layer_alphas}, max_examples={max_examples}))
table, maps = wb.lmc.fusion_curve(a, b, ds, max_examples={max_examples})     # vanilla, EMD, Sinkhorn by reg
figs.fusion_vs_reg(table)
figs.transport_map(maps[("emd", None)]["res"])
lw = wb.lmc.layerwise_curves(a, b_w, ds, n_alphas={n_layer_alphas}, max_examples={max_examples})
figs.layerwise_heatmap(lw, base="A")
figs.cumulative_barriers(wb.lmc.layerwise(a, b_w, ds, mode="cumulative", max_examples={max_examples}),
                         wb.lmc.barrier_estimate(a, b_w, ds, split="val", max_examples={max_examples}))"""

PAIR_CODE = """import workbench as wb
ds = wb.data.load({dataset!r}{options})
config = wb.models.config_for(ds{model})
runs = wb.lmc.train_pair(config, ds, seeds={seeds!r}, train_config=wb.TrainConfig({train}))
store = wb.RunStore()
RUN_A, RUN_B = [store.save(r) for r in runs]      # then compare them (pick them as model A and B)"""


def pair_choices(dataset: str) -> dict:
    """The pair a form starts from for ``dataset``: :data:`workbench.recipes.TRANSFORMER_PAIR` for its
    task, :data:`workbench.recipes.MLP_PAIR`'s sizes and budget for any other (``data_options``, ``model``
    overrides, ``train`` fields)."""
    r = recipes.TRANSFORMER_PAIR if dataset == recipes.TRANSFORMER_PAIR.dataset else recipes.MLP_PAIR
    data_options = dict(r.data_options) if dataset == r.dataset else {}
    return {"data_options": data_options, "model": dict(r.model_options),
            "train": {"steps": r.steps, "lr": r.lr, "eval_every": r.steps}}


def pair(dataset="digits", data_options: dict | None = None, model: dict | None = None, train=None, *,
         seeds=(0, 1), monitor=None) -> list:
    """Two (or more) models of ``models.config_for(ds, **model)`` trained with ``TrainConfig(**train)``, one
    per seed (initialisation and data order from it: :func:`workbench.lmc.train_pair`); returns the Runs.
    ``monitor``: the steps of all of them as progress; Stop ends them (their status ``"cancelled"``)."""
    from .. import lmc
    from ..core import models

    ds = _shared.load(dataset, data_options)
    config = models.config_for(ds, **_shared.choices("model", model))
    return lmc.train_pair(config, ds, seeds=tuple(seeds), train_config=_shared.train_config(train),
                          monitor=monitor)


def barriers(model_a, model_b, dataset, *, n_alphas: int = 11, split: str = "val", max_examples: int = 2048,
             seed: int = 0, monitor=None) -> pd.DataFrame:
    """The linear loss and error barriers on ``split`` before alignment and after weight matching (``seed``):
    columns ``alignment`` (``"none"``, ``"weights"``), ``metric`` (``loss_barrier``, ``error_barrier``),
    ``value``. Stopped, it raises :class:`workbench.monitor.Stopped`."""
    from .. import lmc

    monitor = _monitor.resolve(monitor)
    rows = []
    for alignment in ("none", "weights"):
        _monitor.check(monitor)
        other = model_b if alignment == "none" else lmc.align(model_a, model_b, "weights", seed=seed)
        table = lmc.barrier(lmc.curve(model_a, other, dataset, n_alphas, (split,), max_examples))
        for metric in ("loss", "error"):
            rows.append({"alignment": alignment, "metric": f"{metric}_barrier",
                         "value": lmc.barrier_value(table, split, metric, "linear")})
    return pd.DataFrame(rows, columns=["alignment", "metric", "value"])


def run(dataset="digits", data_options: dict | None = None, model: dict | None = None, train=None, *,
        seeds=(0, 1), n_alphas: int = 11, split: str = "val", max_examples: int = 2048, monitor=None) -> dict:
    """Train a pair (:func:`pair`), then its barriers before and after weight matching (:func:`barriers`).

    Returns ``{"runs": [run_a, run_b], "barriers": DataFrame or None}``: no barriers when a training was
    stopped or diverged (the runs say which).
    """
    if isinstance(seeds, (str, bytes)) or len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"seeds must be two different seeds (a pair), got {seeds!r}")
    ds = _shared.load(dataset, data_options)
    runs = pair(ds, model=model, train=train, seeds=seeds, monitor=monitor)
    if {r.status for r in runs} & {"diverged", "cancelled"}:
        return {"runs": runs, "barriers": None}
    table = barriers(runs[0].model, runs[1].model, ds, n_alphas=n_alphas, split=split, max_examples=max_examples,
                     seed=seeds[0], monitor=monitor)
    return {"runs": runs, "barriers": table}


def analysis(model_a, model_b, dataset, *, n_alphas: int = 25, resolution: int = 15, max_examples: int = 1024,
             monitor=None) -> dict:
    """The Connectivity page's comparison of two models: curves of every alignment method, layer-wise
    barriers on the weight-matched pair (``n_alphas // 2``, at least 5, alphas) and the loss plane through
    A, B and weight-matched B. ``monitor``: the curves and layer-wise barriers are reported as payloads
    (``{"curves": ...}``, ``{"layerwise": ...}``) as they come; stopped, :class:`~workbench.monitor.Stopped`."""
    import torch

    from .. import lmc

    monitor = _monitor.resolve(monitor)
    with torch.no_grad():
        curves = lmc.compare(model_a, model_b, dataset, n_alphas=n_alphas, max_examples=max_examples,
                             monitor=_monitor.part(monitor, 0.0, 0.6))
        monitor.report(0.6, "layer-wise barriers", {"curves": curves}, force=True)
        b_w = lmc.align(model_a, model_b, method="weights")
        layer = lmc.layerwise(model_a, b_w, dataset, n_alphas=max(5, n_alphas // 2), max_examples=max_examples,
                              monitor=_monitor.part(monitor, 0.6, 0.25))
        monitor.report(0.85, "loss plane", {"layerwise": layer}, force=True)
        _monitor.check(monitor)
        plane = lmc.plane(model_a, model_b, b_w, dataset, resolution=resolution,
                          max_examples=min(max_examples, 1024))
    return {"curves": curves, "layerwise": layer, "plane": plane}


def fusion(model_a, model_b, dataset, *, ground: str = "activations", qk: str = "joint", max_examples: int = 1024,
           regs=FUSION_REGS, monitor=None) -> dict:
    """Fused models for vanilla averaging, EMD and every Sinkhorn ``reg``, and their couplings:
    ``{"fusion": table, "maps": maps}`` of :func:`workbench.lmc.fusion_curve`."""
    from .. import lmc

    table, maps = lmc.fusion_curve(model_a, model_b, dataset, regs=list(regs), ground=ground, qk=qk,
                                   max_examples=max_examples, monitor=monitor)
    return {"fusion": table, "maps": maps}


def layerwise(model_a, model_b, dataset, *, n_alphas: int = 11, max_examples: int = 1024, monitor=None) -> dict:
    """Single-layer curves (base A and B), cumulative barriers and the first-order barrier estimate, before
    and after weight matching (an ``alignment`` column): ``{"layer_curves", "cumulative", "estimate"}``."""
    from .. import lmc

    monitor = _monitor.resolve(monitor)
    pairs = (("none", model_b), ("weights", lmc.align(model_a, model_b, method="weights")))
    curves, cumulative, estimate = [], [], []
    for i, (alignment, other) in enumerate(pairs):
        stage = _monitor.part(monitor, i / 2, 0.4)
        curves.append(lmc.layerwise_curves(model_a, other, dataset, n_alphas=n_alphas, max_examples=max_examples,
                                           monitor=stage).assign(alignment=alignment))
        cumulative.append(lmc.layerwise(model_a, other, dataset, n_alphas=n_alphas, max_examples=max_examples,
                                        mode="cumulative", monitor=_monitor.part(monitor, i / 2 + 0.4, 0.0))
                          .assign(alignment=alignment))
        _monitor.check(monitor)
        estimate.append(lmc.barrier_estimate(model_a, other, dataset, split="val", max_examples=max_examples,
                                             n_alphas=n_alphas).assign(alignment=alignment))
    return {"layer_curves": pd.concat(curves, ignore_index=True),
            "cumulative": pd.concat(cumulative, ignore_index=True),
            "estimate": pd.concat(estimate, ignore_index=True)}


def instability(run, dataset, *, spawn_steps, steps: int, n_alphas: int = 11, max_examples: int = 2048,
                monitor=None) -> pd.DataFrame:
    """Frankle et al.'s instability of a stored run's configuration (:func:`workbench.lmc.instability`):
    its model config and training settings, ``steps`` in all, children spawned at each of ``spawn_steps``."""
    import dataclasses

    from .. import lmc

    tc = dataclasses.replace(run.train_config, steps=steps, eval_every=steps)
    return lmc.instability(run.model.config, dataset, spawn_steps, train_config=tc, n_alphas=n_alphas,
                           max_examples=max_examples, monitor=monitor)


def as_code(*, run_a: str | None = None, run_b: str | None = None, n_alphas: int = 25, resolution: int = 15,
            max_examples: int = 1024, inst_steps: int = 300, spawn=(0,), dataset: str = "digits",
            data_options: dict | None = None, model: dict | None = None, train=None, seeds=(0, 1)) -> str:
    """The notebook code of the page's analysis of two stored runs (``run_a``, ``run_b``: every figure of
    the page), or, without them, of training a pair (:func:`pair`: ``dataset``, ``model``, ``train``)."""
    if run_a and run_b:
        return CODE.format(run_a=run_a, run_b=run_b, n_alphas=n_alphas, n_layer_alphas=max(5, n_alphas // 2),
                           max_examples=max_examples, plane_examples=min(max_examples, 1024),
                           resolution=resolution, inst_steps=inst_steps, spawn=sorted(spawn))
    overrides = _shared.choices("model", model)
    return PAIR_CODE.format(dataset=dataset, options=_shared.data_arguments(data_options),
                            model=", " + _shared.kwargs(overrides) if overrides else "",
                            seeds=tuple(seeds), train=_shared.kwargs(_shared.choices("train", train)))


def task(dataset: str = "digits", *, seed: int = 0, seed_b: int | None = None, steps: int = 200,
         lr: float = 1e-3, batch_size: int = 64, d_model: int | None = None, n_layers: int | None = None,
         d_hidden: int | None = None, n_heads: int | None = None, d_mlp: int | None = None,
         n_alphas: int = 11, split: str = "val", max_examples: int = 2048,
         data_options: dict | None = None) -> dict:
    """The sweeps' ``"barrier"`` point: :func:`run` on a pair trained from ``seed`` and ``seed_b`` (default
    ``seed + 1``): the loss and error barriers (linear definition, on ``split``) before alignment and after
    weight matching.

    Rows: ``loss_barrier`` and ``error_barrier`` with ``alignment`` ``"none"`` or ``"weights"``, and
    the endpoints' accuracies ``acc_a``, ``acc_b``.
    """
    seed_b = seed + 1 if seed_b is None else seed_b
    if seed_b == seed:
        raise ValueError(f"seed_b must differ from seed (a pair needs two seeds), got {seed_b}")
    checks.check_seed("seed_b", seed_b)
    ds = _shared.load(dataset, data_options)
    sizes = _shared.size_overrides(ds, d_model=d_model, n_layers=n_layers, d_hidden=d_hidden, n_heads=n_heads,
                                   d_mlp=d_mlp)
    result = run(ds, model={"seed": seed, **sizes},
                 train={"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": steps, "seed": seed},
                 seeds=(seed, seed_b), n_alphas=n_alphas, split=split, max_examples=max_examples)
    run_a, run_b = result["runs"]
    if result["barriers"] is None:
        statuses = {run_a.status, run_b.status}
        return {"status": "diverged" if "diverged" in statuses else "cancelled", "rows": []}
    rows = result["barriers"].to_dict("records")
    rows += [{"metric": "acc_a", "value": run_a.final("acc", split)},
             {"metric": "acc_b", "value": run_b.final("acc", split)}]
    return {"status": "done", "rows": rows}
