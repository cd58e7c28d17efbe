"""Train: the model of the family that fits a dataset, trained (and saved, when given a store).

One pipeline for the Train page (its job and its "As code" box), the sweeps' ``"train"`` task and a
notebook: ``run(dataset, data_options, model, train)`` loads the data, builds
``models.config_for(ds, **model)`` and trains it with ``TrainConfig(**train)``.

>>> run = wb.experiments.train.run("digits", model={"d_model": 32}, train={"steps": 100})
>>> print(wb.experiments.train.as_code("digits", model={"d_model": 32}, train={"steps": 100}))
"""
from __future__ import annotations

from ..core import checks, recipes
from ..core import monitor as _monitor
from ..core.progress import TrainProgress
from ..core.training import train as train_model
from . import _shared

__all__ = ["run", "as_code", "task", "DEFAULTS", "PRESETS", "model_defaults"]

# The Train page's first choice (its quick preset): a residual MLP on digits, trained in seconds.
DEFAULTS = {"dataset": "digits", "data_options": {}, "model": {"d_model": 128, "n_layers": 2, "d_hidden": 256},
            "train": {"steps": 300, "eval_every": 50, "lr": 3e-3}}
# The size a form starts from on sequence data (a Transformer; the vocabulary and context come from the data).
SEQUENCE_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 256}


def _recipe_preset(r) -> dict:
    """A growth recipe's task and model at its final depth, trained one stage's budget."""
    return {"dataset": r.dataset, "data_options": dict(r.data_options),
            "model": {**r.model_options(), "n_layers": r.final_layers},
            "train": {"steps": r.steps_per_stage, "batch_size": r.batch_size, "lr": r.lr, "eval_every": r.eval_every,
                      "eval_max": r.eval_max}}


# Presets fill every field: the quick default, and the growth recipes' task and model (at their final depth).
PRESETS = {
    "digits, residual MLP (quick)": DEFAULTS,
    **{f"{r.dataset}, Transformer (recipes.{key})": _recipe_preset(r)
       for key, r in (("KHOP", recipes.KHOP), ("TEXT", recipes.TEXT))},
}


def model_defaults(dataset: str) -> dict:
    """The model sizes a form starts from for ``dataset``: :data:`DEFAULTS`' MLP on vector data,
    :data:`SEQUENCE_MODEL` on sequence data."""
    from ..core import data

    return dict(DEFAULTS["model"] if data.kind_of(dataset) == "vector" else SEQUENCE_MODEL)

CODE = """import workbench as wb
ds = wb.data.load({name!r}{opts})
model = wb.models.build(wb.models.config_for(ds{model}))
run = wb.train(model, ds, wb.TrainConfig({train}), callbacks=[wb.ProgressBar()])
wb.RunStore().save(run{save})
wb.figures.training.training_curves(run.metrics)"""


def _rows_so_far(state) -> list:
    return list(state.rows)


def run(dataset="digits", data_options: dict | None = None, model: dict | None = None, train=None, *,
        name: str | None = None, store=None, live_every: int | None = None, monitor=None):
    """Train ``models.config_for(ds, **model)`` on ``dataset`` with ``TrainConfig(**train)``; returns the Run.

    ``dataset``: a name (``data_options`` for :func:`workbench.data.load`) or a Dataset. ``model``: config
    overrides (``d_model``, ``n_layers``, ``seed`` ...); ``train``: TrainConfig fields (or a TrainConfig).
    ``name`` names the run; with ``store`` it is saved there (``run.run_id``). ``monitor``
    (:mod:`workbench.monitor`): steps as progress, Stop ends the training (the Run is kept, status
    ``"cancelled"``); with ``live_every`` the metrics rows so far are its payload every that many steps
    and at each evaluation (a page's live curves), else each evaluation's rows.
    """
    from ..core import models

    if live_every is not None:
        checks.check_int("live_every", live_every, 1)
    ds = _shared.load(dataset, data_options)
    config = models.config_for(ds, **_shared.choices("model", model))
    tc = _shared.train_config(train)
    if name is not None:
        checks.check_str("name", name, 200)
    progress = TrainProgress(_monitor.resolve(monitor), every=live_every or 10,
                             payload=_rows_so_far if live_every else None)
    result = train_model(models.build(config), ds, tc, callbacks=[progress])
    if name:
        result.name = name
    if store is not None:
        store.save(result)
    return result


def as_code(dataset: str = "digits", data_options: dict | None = None, model: dict | None = None, train=None, *,
            name: str | None = None, text_file: str | None = None) -> str:
    """The notebook code of :func:`run` for these choices (an uploaded text is read from ``text_file``)."""
    overrides = _shared.choices("model", model)
    return CODE.format(name=dataset, opts=_shared.data_arguments(data_options, text_file),
                       model=", " + _shared.kwargs(overrides) if overrides else "",
                       train=_shared.kwargs(_shared.choices("train", train)),
                       save=f", name={name!r}" if name else "")


def task(dataset: str = "digits", *, seed: int = 0, steps: int = 100, lr: float = 1e-3, batch_size: int = 64,
         eval_max: int = 0, d_model: int | None = None, n_layers: int | None = None,
         d_hidden: int | None = None, n_heads: int | None = None, d_mlp: int | None = None,
         data_options: dict | None = None, effective_depth: bool = False) -> dict:
    """The sweeps' ``"train"`` point: one model trained from ``seed`` (initialisation and data order) for
    ``steps``; final train/val loss and acc as ``{"status", "rows"}``.

    The model is the family's fit for the dataset (:func:`workbench.models.config_for`) with the
    size options given (``d_hidden`` for MLPs, ``n_heads``/``d_mlp`` for Transformers).
    ``effective_depth=True`` adds ``effective_depth`` and ``effective_depth_ratio``
    (:func:`workbench.depthlab.effective_depth` on the first 256 validation examples, scored tokens only).
    """
    ds = _shared.load(dataset, data_options)
    sizes = _shared.size_overrides(ds, d_model=d_model, n_layers=n_layers, d_hidden=d_hidden, n_heads=n_heads,
                                   d_mlp=d_mlp)
    result = run(ds, model={"seed": seed, **sizes},
                 train={"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": steps,
                        "eval_max": eval_max, "seed": seed})
    rows = [{"metric": f"{split}_{m}", "value": result.final(m, split)} for split in ("train", "val")
            for m in ("loss", "acc")]
    if checks.check_bool("effective_depth", effective_depth):
        from ..studies import depthlab

        x, y = ds.x_val[:256], ds.y_val[:256]
        eff = depthlab.effective_depth(result.model, x, y=y, mask=(y != -100) if y.shape == x.shape else None)
        rows += [{"metric": "effective_depth", "value": eff["effective_depth"]},
                 {"metric": "effective_depth_ratio", "value": eff["ratio"]}]
    return {"status": _shared.status(result.status), "rows": rows}
