"""Grow: a model grown in depth through a schedule (or by the natural criterion), and grown against
scratch on equal FLOPs with a growth recipe.

One pipeline for the Grow page (its jobs, presets and "As code" box), the sweeps' ``"grow"`` task and
notebook 01: :func:`preset` is where "G_stack at step N" and "one layer at a time" are decided,
:func:`run` grows one model, :func:`task` compares grown and scratch on a recipe.

>>> stages = wb.experiments.grow.preset("gstack", 200, final_layers=2)
>>> run = wb.experiments.grow.run("khop", dict(wb.recipes.KHOP.data_options), {"n_layers": 1}, {"lr": 3e-3}, stages)
"""
from __future__ import annotations

import dataclasses

from ..core import checks, recipes
from ..core import monitor as _monitor
from ..core.progress import TrainProgress
from . import _shared

__all__ = ["run", "as_code", "task", "preset", "PRESETS", "RECIPES", "model_defaults", "TRAIN_DEFAULTS"]

PRESETS = ("layerwise", "gstack", "scratch")
RECIPES = {"khop": recipes.KHOP, "text": recipes.TEXT}   # the growth recipes a page or a sweep picks by name
# Training defaults before a recipe fills them (the recipes' optimizer; steps come from the schedule).
TRAIN_DEFAULTS = {"batch_size": 64, "lr": 3e-3, "eval_every": 50}

CODE = """import workbench as wb
from workbench import growth
ds = wb.data.load({name!r}{opts})
model = wb.models.build(wb.models.config_for(ds{model}))
schedule = {schedule}
run = growth.grow(model, ds, schedule, wb.TrainConfig({train}), store=wb.RunStore())
wb.figures.growth.growth_curves(run.metrics, x="flops")"""

CRITERION_CODE = """import workbench as wb
from workbench import growth
ds = wb.data.load({name!r}{opts})
model = wb.models.build(wb.models.config_for(ds{model}))
run = growth.grow(model, ds, config=wb.TrainConfig({train}), criterion="natural", {criterion}, store=wb.RunStore())
wb.figures.growth.eta_trace(growth.trace_table(run), tau=run.meta["tau"])
wb.figures.growth.width_depth_timeline(growth.timeline_table(run))"""


def preset(name: str, steps: int, *, start_layers: int = 1, final_layers: int = 2) -> list:
    """A ready-made schedule (the Grow page's presets, the sweeps' and notebook 01's schedules).

    ``"layerwise"``: ``start_layers`` blocks trained ``steps``, then one block at a time added (zero
    init) and trained ``steps`` with every older block frozen. ``"gstack"``: G_stack at step N:
    ``start_layers`` blocks trained ``steps``, stacked to ``final_layers``, trained on for as many steps
    as the layer-wise schedule has left (``(final_layers - start_layers) * steps``), so both spend the
    same steps. ``"scratch"``: one stage of ``steps * final_layers`` (build the model with
    ``final_layers`` blocks).
    """
    from .. import growth

    checks.check_choice("preset", name, PRESETS)
    if name == "gstack":   # growth.preset checks the bounds; these three only make the total computable
        steps, final = checks.check_int("steps", steps, 1), checks.check_int("final_layers", final_layers, 1)
        start = checks.check_int("start_layers", start_layers, 1, final)
        return growth.preset("gstack", steps, start_layers=start, final_layers=final,
                             total_steps=steps * (1 + final - start), stack_at=steps)
    if name == "scratch":
        return growth.preset("scratch", steps, final_layers=final_layers)
    return growth.preset("layerwise", steps, start_layers=start_layers, final_layers=final_layers)


def model_defaults(dataset: str) -> dict:
    """The model size a grow form starts from for ``dataset`` (before a recipe fills it): the KHOP
    recipe's Transformer for sequence tasks, a small MLP for vector data; one block (the schedule grows it)."""
    from ..core import data

    if data.kind_of(dataset) == "vector":
        return {"d_model": 64, "d_hidden": 128, "n_layers": 1}
    return {**recipes.KHOP.model_options(), "n_layers": 1}


def _stage_kwargs(s) -> dict:
    from .. import growth

    default = growth.Stage()
    d = {"op": s.op, "steps": s.steps}
    for f in ("freeze", "lr", "init", "n", "position", "factor", "fade_steps"):
        v = getattr(s, f)
        if v != getattr(default, f) and not (f == "init" and s.op != "add_layer"):
            d[f] = v
    return d


class _Live:
    """The payloads of a grow run on a page: the metrics so far (finished stages and the current one) and
    the block table every few steps, and at the end of each stage its metrics, blocks and eta trace."""

    def __init__(self, monitor):
        self.monitor, self.previous = monitor, None

    def step(self, state) -> dict:
        import pandas as pd

        from .. import growth

        current = pd.DataFrame(state.rows)
        metrics = current if self.previous is None else pd.concat([self.previous, current], ignore_index=True)
        return {"metrics": metrics, "blocks": growth.block_table(state.model)}

    def stage(self, run) -> None:
        from .. import growth

        self.previous = run.metrics
        meta = run.meta or {}
        self.monitor.report(None, f"stage {meta.get('stage', 0)} done",
                            {"metrics": run.metrics, "blocks": growth.block_table(run.model), "stage_done": True,
                             "trace": growth.trace_table(run) if "trace" in meta else None, "tau": meta.get("tau")},
                            force=True)


def run(dataset="khop", data_options: dict | None = None, model: dict | None = None, train=None, schedule=None,
        criterion: dict | None = None, *, name: str | None = None, store=None, control=None,
        live_every: int | None = None, monitor=None):
    """Grow ``models.config_for(ds, **model)`` through ``schedule`` (stages, e.g. :func:`preset`) or, with
    ``criterion`` (the keyword arguments of ``growth.grow(criterion="natural", ...)``), by the natural
    criterion over ``train["steps"]``; returns the Run of :func:`workbench.growth.grow`.

    ``train``: TrainConfig fields (the stages set their steps); ``store``: every stage saved there;
    ``control``: a :class:`~workbench.growth.GrowControl` ("add a block now"). ``monitor``: steps of all
    stages as progress, Stop ends the run; with ``live_every`` the metrics so far and the block table
    every that many steps, and each finished stage, are its payloads (a page's live figures).
    """
    from .. import growth
    from ..core import models

    if (schedule is None) == (criterion is None):
        raise ValueError("give a schedule or a criterion (the natural criterion's options), not both")
    if live_every is not None:
        checks.check_int("live_every", live_every, 1)
    monitor = _monitor.resolve(monitor)
    ds = _shared.load(dataset, data_options)
    model_ = models.build(models.config_for(ds, **_shared.choices("model", model)))
    train = _shared.choices("train", train)
    if criterion is None:
        stages = growth.check_schedule(schedule, model_.config.n_layers)
        tc = _shared.train_config({**train, "steps": train.get("steps", 1)})
        total = sum(s.steps for s in stages)
    else:
        tc = _shared.train_config(train)
        total = tc.steps
    live = _Live(monitor) if live_every else None
    progress = TrainProgress(monitor, total_steps=total, every=live_every or 10,
                             payload=live.step if live else None)
    options = dict(store=store, callbacks=[progress], control=control, name=name, monitor=monitor,
                   on_stage=live.stage if live else None)
    if criterion is not None:
        return growth.grow(model_, ds, None, tc, criterion="natural", **options, **_shared.choices("criterion",
                                                                                                      criterion))
    return growth.grow(model_, ds, stages, tc, **options)


def as_code(dataset: str = "khop", data_options: dict | None = None, model: dict | None = None, train=None,
            schedule=None, criterion: dict | None = None, *, text_file: str | None = None) -> str:
    """The notebook code of :func:`run` for these choices (an uploaded text is read from ``text_file``)."""
    from .. import growth

    overrides = _shared.choices("model", model)
    train = {k: v for k, v in _shared.choices("train", train).items() if k != "warmup"}
    common = dict(name=dataset, opts=_shared.data_arguments(data_options, text_file),
                  model=", " + _shared.kwargs(overrides) if overrides else "")
    if criterion is not None:
        return CRITERION_CODE.format(**common, train=_shared.kwargs(train),
                                     criterion=_shared.kwargs(_shared.choices("criterion", criterion)))
    stages = [s if isinstance(s, growth.Stage) else growth.Stage(**s) for s in schedule]
    return CODE.format(**common, train=_shared.kwargs({k: v for k, v in train.items() if k != "steps"}),
                       schedule="[\n    " + ",\n    ".join(f"growth.Stage({_shared.kwargs(_stage_kwargs(s))})"
                                                        for s in stages) + ",\n]")


def task(recipe: str = "khop", *, seed: int = 0, steps: int | None = None, schedule: str = "gstack",
         final_layers: int | None = None, d_model: int | None = None, n_heads: int | None = None,
         d_mlp: int | None = None, eval_every: int | None = None, eval_max: int | None = None,
         data_options: dict | None = None) -> dict:
    """The sweeps' ``"grow"`` point: grown against from scratch on equal FLOPs
    (:func:`workbench.growth.compare`) with a growth recipe.

    ``recipe``: ``"khop"`` or ``"text"`` (:data:`workbench.recipes.KHOP` / ``TEXT``); ``steps`` per
    stage (default the recipe's); ``schedule``: ``"gstack"`` (1 block for ``steps``, stacked to
    ``final_layers``, trained ``(final_layers - 1) * steps`` more) or ``"layerwise"`` (one block at a
    time, lower ones frozen): :func:`preset`. Rows per ``method`` (``grown``, ``scratch``):
    ``flops_to_target`` (FLOPs to reach scratch's final val loss), ``flops``, ``val_loss``, ``val_acc``;
    ``flops_ratio`` (grown / scratch, method ``grown``) and ``target_loss`` (method ``scratch``).
    """
    from .. import growth

    r = RECIPES[checks.check_choice("recipe", recipe, tuple(RECIPES))]
    checks.check_choice("schedule", schedule, ("gstack", "layerwise"))
    ds = r.load_data(**dict(data_options or {}))
    steps = r.steps_per_stage if steps is None else steps
    final = r.final_layers if final_layers is None else final_layers
    sizes = {k: v for k, v in dict(d_model=d_model, n_heads=n_heads, d_mlp=d_mlp).items() if v is not None}
    mc = r.model_config(ds, 1, seed=seed, **sizes)
    stages = preset(schedule, steps, start_layers=1, final_layers=final)
    config = dataclasses.replace(r.train_config(steps=steps), seed=seed,
                                 eval_every=r.eval_every if eval_every is None else eval_every,
                                 eval_max=r.eval_max if eval_max is None else eval_max).validate()
    cmp = growth.compare(stages, ds, mc, config, callbacks=[TrainProgress(total_steps=2 * final * steps)])
    rows = []
    for _, s in cmp.summary.iterrows():
        for metric in ("flops_to_target", "flops", "val_loss", "val_acc"):
            rows.append({"method": s["method"], "metric": metric, "value": float(s[metric])})
    rows += [{"method": "grown", "metric": "flops_ratio", "value": float(cmp.ratio)},
             {"method": "scratch", "metric": "target_loss", "value": float(cmp.target_loss)}]
    statuses = {_shared.status(run.status) for run in cmp.runs.values()}
    status = next((s for s in ("diverged", "cancelled") if s in statuses), "done")
    return {"status": status, "rows": rows}
