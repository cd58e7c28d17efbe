"""Collapse: a recipe trained into the terminal phase while neural collapse is tracked, then the geometry
of its head and of mixed inputs.

One pipeline for the Collapse page (its job and "As code" box), the sweeps' ``"collapse"`` task and
notebook 04: :func:`run` trains a recipe (:func:`workbench.collapse.train_collapse`, which notebooks call
as ``wb.collapse.train_collapse``) and measures what the page draws after training.

>>> result = wb.experiments.collapse.run("digits", epochs=20, every=2)
>>> result["run"].metrics        # the loss, the accuracy and the collapse rows
"""
from __future__ import annotations

import time

from ..core import checks
from ..core import monitor as _monitor
from ..core.progress import TrainProgress
from ..core.training import Callback

__all__ = ["run", "as_code", "task", "NC_KEEP"]

NC_KEEP = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "train_acc")   # the sweep's rows
MIXUP_CLASSES = (0, 1, 2)   # the classes whose mixes are drawn after training

CODE = """import workbench as wb
from workbench import collapse
model, cfg, ds = collapse.recipe({recipe})
tracker = collapse.track(every={every}, max_samples={max_samples}, seed={seed})
run = wb.train(model, ds, cfg, callbacks=[tracker]{loss})
wb.figures.collapse.nc_curves(tracker.table)
wb.figures.collapse.layer_curves(tracker.table)
geo = collapse.geometry(tracker.latest["means"], tracker.latest["classifier"])
wb.figures.collapse.simplex_3d(geo["view"]); wb.figures.collapse.gram_heatmaps(geo)
wb.figures.collapse.head_gram_heatmaps(collapse.head_gram(model))
mix = collapse.mixup_geometry(model, ds.x_train, ds.y_train, classes={classes!r}, n_pairs={n_pairs})
wb.figures.collapse.mixup_geometry(mix)"""


class _TrainingData(Callback):
    """Keeps the training data the recipe built (imbalanced, subsampled) for the measures after training."""

    dataset = None

    def on_start(self, state) -> None:
        self.dataset = state.dataset


class _Records:
    """Sends each collapse record (the table so far, the class means' geometry) to the monitor, at most
    every ``min_interval`` seconds; :meth:`last` sends the final one whatever the interval."""

    def __init__(self, monitor, min_interval: float):
        self.monitor, self.min_interval = monitor, min_interval
        self.tracker, self._sent_at, self._sent_step = None, None, None

    def __call__(self, tracker, force: bool = False) -> None:
        from .. import collapse

        self.tracker = tracker
        now = time.perf_counter()
        if not force and self._sent_at is not None and now - self._sent_at < self.min_interval:
            return
        self._sent_at, latest = now, tracker.latest
        self._sent_step = latest["step"]
        self.monitor.report(None, f"epoch {latest['epoch']:g}",
                            {"table": tracker.table, "counts": latest["counts"], "epoch": latest["epoch"],
                             "geometry": collapse.geometry(latest["means"], latest["classifier"])}, force=True)

    def last(self) -> None:
        if self.tracker is not None and self.tracker.latest["step"] != self._sent_step:
            self(self.tracker, force=True)


def run(dataset: str = "digits", *, every: int = 1, layers: bool = True, max_samples: int = 512, store=None,
        live: bool = False, min_interval: float = 0.4, monitor=None, **recipe_options) -> dict:
    """Train the collapse recipe for ``dataset`` (``recipe_options``: :func:`workbench.collapse.recipe`'s,
    e.g. ``epochs``, ``weight_decay``, ``imbalance``, ``mixup``, ``classifier``) while tracking collapse
    every ``every`` epochs on ``max_samples`` training examples (``layers``: every layer, else the
    features only); with ``store`` the run is saved there.

    Returns ``{"run": Run, "head": head Gram, "mixup": mixed-input geometry}`` (the last two measured
    after training: :func:`workbench.collapse.head_gram`, :func:`workbench.collapse.mixup_geometry` of
    classes 0-2). ``monitor``: steps as progress, Stop ends the training (the Run is kept); with ``live``
    each record is its payload (``{"table", "geometry", "counts", "epoch"}``, at most every
    ``min_interval`` seconds, the last one always).
    """
    from .. import collapse

    checks.check_bool("live", live)
    checks.check_float("min_interval", min_interval, 0.0, 3600.0)
    monitor = _monitor.resolve(monitor)
    records = _Records(monitor, min_interval) if live else None
    data = _TrainingData()
    result = collapse.train_collapse(dataset, every=every, layers=layers, max_samples=max_samples,
                                     on_record=records, callbacks=[TrainProgress(monitor, payload=False), data],
                                     **recipe_options)
    if records is not None:
        records.last()
    monitor.report(None, f"{result.status} at step {int(result.metrics['step'].max())}", force=True)
    if store is not None:
        store.save(result)
    ds = data.dataset
    return {"run": result, "head": collapse.head_gram(result.model),
            "mixup": None if ds is None else collapse.mixup_geometry(result.model, ds.x_train, ds.y_train,
                                                                     classes=MIXUP_CLASSES, n_pairs=30)}


def as_code(dataset: str = "digits", *, every: int = 1, max_samples: int = 512, **recipe_options) -> str:
    """The notebook code of :func:`run` for these choices (the recipe, the tracker, the figures)."""
    args = ", ".join([repr(dataset)] + [f"{k}={v!r}" for k, v in recipe_options.items()])
    mixup, seed = recipe_options.get("mixup", 0.0), recipe_options.get("seed", 0)
    return CODE.format(recipe=args, every=every, max_samples=max_samples, seed=seed, classes=MIXUP_CLASSES,
                       n_pairs=30, loss=f", loss_fn=collapse.MixupLoss({mixup!r}, {seed!r})" if mixup else "")


def task(dataset: str = "digits", *, seed: int = 0, epochs: int = 5, every: int = 1, record: str = "all",
         max_samples: int = 256, d_model: int | None = None, n_layers: int | None = None,
         lr: float | None = None, weight_decay: float | None = None, batch_size: int | None = None,
         mixup: float = 0.0, etf_classifier: bool = False, imbalance: float | None = None) -> dict:
    """The sweeps' ``"collapse"`` point: :func:`run` (last-layer features only) for ``epochs``.

    Rows: NC1-NC4 (``nc1``, ``nc2_equinorm``, ``nc2_equiangular``, ``nc3``, ``nc4``) and ``train_acc``
    per recorded ``epoch`` (``record="all"``, every ``every`` epochs) or at the last one (``"final"``),
    plus ``val_loss`` and ``val_acc`` at the end.
    """
    from .. import collapse
    from ._shared import status

    checks.check_choice("record", record, ("all", "final"))
    options = {k: v for k, v in dict(d_model=d_model, n_layers=n_layers, lr=lr, weight_decay=weight_decay,
                                     batch_size=batch_size, imbalance=imbalance).items() if v is not None}
    result = collapse.train_collapse(dataset, every=every, layers=False, max_samples=max_samples,
                                     callbacks=[TrainProgress()], seed=seed, epochs=epochs, mixup=mixup,
                                     etf_classifier=etf_classifier, **options)
    m = result.metrics
    nc = m[m["epoch"].notna() & m["metric"].isin(NC_KEEP)] if "epoch" in m else m.iloc[:0]
    if record == "final" and len(nc):
        nc = nc[nc["epoch"] == nc["epoch"].max()]
    rows = [{"epoch": float(e), "metric": str(k), "value": float(v)}
            for e, k, v in zip(nc["epoch"], nc["metric"], nc["value"])]
    last = float(nc["epoch"].max()) if len(nc) else float("nan")
    rows += [{"epoch": last, "metric": f"val_{k}", "value": result.final(k, "val")} for k in ("loss", "acc")]
    return {"status": status(result.status), "rows": rows}
