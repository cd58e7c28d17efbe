"""Collapse during training: a callback that measures a stratified sample every few epochs.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch

from ..core import checks
from ..core.data import IGNORE, Dataset
from ..core.training import Callback, TrainState
from .layers import collect, sites
from .measure import NC_METRICS, class_means, metrics, minority_collapse

# ----------------------------------------------------------------------------- tracking during training


class CollapseTracker(Callback):
    """Records collapse metrics on a fixed subsample of the training set every ``every`` epochs.

    One forward pass in eval mode with hooks at every layer (:func:`sites`) per record; the
    subsample (``max_samples`` examples, stratified by class, drawn once from ``seed``)
    keeps the cost bounded. Rows go to ``self.rows`` and into the run's metrics
    (``split="train"``, with ``epoch``, ``layer`` and ``site`` columns, metric names as in
    :data:`NC_METRICS` plus ``train_acc``, and ``minority_cos`` on imbalanced data). The last
    record's class means, classifier and counts are kept in ``self.latest`` for live plots;
    ``on_record(tracker)``, if given, is called after each record (the dashboard streams from it).
    ``self.seconds`` is the time spent recording (``self.record_seconds`` per record).
    """

    def __init__(self, every: int = 1, layers: bool = True, max_samples: int = 512, seed: int = 0,
                 batch_size: int = 2048, on_record=None):
        checks.check_int("every", every, 1, 1_000_000)
        checks.check_bool("layers", layers)
        checks.check_int("max_samples", max_samples, 2, 1_000_000)
        seed = checks.check_seed("seed", seed)
        checks.check_int("batch_size", batch_size, 1)
        if on_record is not None and not callable(on_record):
            raise ValueError(f"on_record must be a callable or None, got {on_record!r}")
        self.every, self.layers, self.max_samples, self.seed = every, layers, max_samples, seed
        self.batch_size, self.on_record = batch_size, on_record
        self.rows: list[dict] = []
        self.latest: dict | None = None
        self.seconds, self.record_seconds = 0.0, []
        self._last_step = None

    @property
    def table(self) -> pd.DataFrame:
        """Recorded rows so far: ``step, epoch, split, metric, value, layer, site`` (+ run extras)."""
        return pd.DataFrame(list(self.rows), columns=None if self.rows else
                            ["step", "epoch", "split", "metric", "value", "layer", "site"])

    def on_start(self, state: TrainState) -> None:
        ds: Dataset = state.dataset
        if ds.kind == "vector" and len(state.model.readout.weight) < ds.n_classes:
            raise ValueError(f"dataset {ds.name!r} has {ds.n_classes} classes; the model's readout has only "
                             f"{len(state.model.readout.weight)} rows")
        n = len(ds.x_train)
        self.steps_per_epoch = max(1, math.ceil(n / min(state.config.batch_size, n)))
        self._start = state.step
        idx = _stratified(ds.y_train, self.max_samples, self.seed, sequence=ds.kind == "sequence")
        self._x, self._y = ds.x_train[idx], ds.y_train[idx]
        self._sequence = ds.kind == "sequence"
        labels = ds.y_train[ds.y_train != IGNORE]
        counts = torch.bincount(labels, minlength=ds.n_classes)
        self.minority = ([int(c) for c in torch.nonzero((counts > 0) & (counts < counts.max())).flatten()]
                         if not self._sequence else [])  # classes with fewer examples than the largest
        self.record(state)

    def on_step(self, state: TrainState) -> None:
        if (state.step - self._start) % (self.every * self.steps_per_epoch) == 0:
            self.record(state)

    def on_end(self, state: TrainState) -> None:
        if self._last_step != state.step:
            self.record(state)

    def record(self, state: TrainState) -> None:
        t0 = time.perf_counter()
        model = state.model
        pairs = sites(model) if self.layers else [(len(model.blocks) + 1, "features")]
        feats, labels, preds = collect(model, self._x, self._y, [s for _, s in pairs], self.batch_size)
        # sequence data: the subsample need not contain every token at least twice
        opts = {"min_count": 2} if self._sequence else {"n_classes": state.dataset.n_classes}
        epoch = (state.step - self._start) / self.steps_per_epoch
        base = {"step": state.step, "epoch": epoch, "split": "train", **state.extra}
        rows = []
        for layer, site in pairs:
            clf = model.readout if site == "features" else None
            m = metrics(feats[site], labels, clf, preds, **opts)
            rows += [{**base, "metric": k, "value": m[k], "layer": layer, "site": site} for k in NC_METRICS]
        top = {**base, "layer": pairs[-1][0], "site": "features"}
        rows.append({**top, "metric": "train_acc", "value": float((preds == labels).double().mean())})
        if len(self.minority) >= 2:
            rows.append({**top, "metric": "minority_cos", "value": minority_collapse(model.readout, self.minority)})
        classes, means, counts = class_means(feats["features"], labels)
        self.latest = {"step": state.step, "epoch": epoch, "classes": classes.cpu().numpy(),
                       "means": means.cpu().numpy(), "counts": counts.cpu().numpy(),
                       "classifier": model.readout.weight.detach().double().cpu().numpy()}
        self.rows.extend(rows)
        state.rows.extend(rows)
        self._last_step = state.step
        self.record_seconds.append(time.perf_counter() - t0)
        self.seconds += self.record_seconds[-1]
        if self.on_record is not None:
            self.on_record(self)


def track(every: int = 1, layers: bool = True, max_samples: int = 512, seed: int = 0,
          on_record=None) -> CollapseTracker:
    """A training callback recording collapse metrics every ``every`` epochs (see :class:`CollapseTracker`)."""
    return CollapseTracker(every=every, layers=layers, max_samples=max_samples, seed=seed, on_record=on_record)


def _stratified(y: torch.Tensor, n: int, seed: int, sequence: bool = False) -> torch.Tensor:
    """Indices of at most ``n`` examples, each class kept in proportion (at least 2 where it has them)."""
    g = torch.Generator().manual_seed(seed)
    if sequence or len(y) <= n:
        return torch.randperm(len(y), generator=g)[:n].sort().values
    out = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        k = min(len(idx), max(2, round(n * len(idx) / len(y))))
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).sort().values
