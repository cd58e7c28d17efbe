"""Scaling-law fits ``y = a x^-alpha + c`` (Hestness et al. 2017), robust to outliers.

:func:`fit` minimises a Huber loss on the log residual ``log(a x^-alpha + c) - log y``
(``scipy.optimize.least_squares(loss="huber")``) from many starts, with a seeded bootstrap band;
:func:`extrapolation` fits the small end and reports the relative error on the largest points
(``docs/definitions.md#scaling-fit``). :func:`sweep` trains a small family of models on one of our
tasks and returns the tidy table a fit reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core import monitor as _monitor
from ..core.checks import check_choice, check_float, check_int, check_seed

__all__ = ["PowerLaw", "fit", "extrapolation", "sweep", "SWEEP_AXES", "SWEEP_COLUMNS"]


@dataclass
class PowerLaw:
    """``y = a x^-alpha + c``; ``band`` holds bootstrap quantiles of the parameters (``{"a": (lo, hi), ...}``)."""

    a: float
    alpha: float
    c: float
    cost: float = float("nan")            # Huber cost of the best start
    n: int = 0                            # points fitted
    band: dict = field(default_factory=dict)
    boot: np.ndarray | None = None        # bootstrap parameters (B, 3): a, alpha, c

    def predict(self, x) -> np.ndarray:
        """``a x^-alpha + c`` at ``x`` (positive numbers)."""
        x = _positive("x", x)
        return self.a * x ** (-self.alpha) + self.c

    def predict_band(self, x, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise ``level`` band of the bootstrap fits' predictions at ``x`` (the fit itself if no bootstrap)."""
        check_float("level", level, 0, 1, lo_open=True, hi_open=True)
        x = _positive("x", x)
        if self.boot is None or not len(self.boot):
            y = self.predict(x)
            return y, y
        pred = self.boot[:, :1] * x[None, :] ** (-self.boot[:, 1:2]) + self.boot[:, 2:3]
        q = (1 - level) / 2
        return np.quantile(pred, q, axis=0), np.quantile(pred, 1 - q, axis=0)


def _positive(name: str, v) -> np.ndarray:
    try:
        arr = np.asarray(v, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of positive finite numbers, got {v!r:.60}") from None
    if not len(arr) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a list of positive finite numbers, got {v!r:.60}")
    return arr


def _residual(theta, lx, ly):
    log_a, alpha, log_c = theta
    return np.logaddexp(log_a - alpha * lx, log_c) - ly


def _jacobian(theta, lx, ly):
    log_a, alpha, log_c = theta
    w = 1.0 / (1.0 + np.exp(np.clip(log_c - (log_a - alpha * lx), -700, 700)))  # share of the power-law term
    return np.stack([w, -lx * w, 1.0 - w], axis=1)


def _fit_once(lx, ly, starts, f_scale):
    from scipy.optimize import least_squares

    best = None
    for s in starts:
        try:
            r = least_squares(_residual, s, jac=_jacobian, args=(lx, ly), loss="huber", f_scale=f_scale,
                              bounds=([-50.0, 0.0, -50.0], [50.0, 10.0, 50.0]))
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(r.x)) and (best is None or r.cost < best.cost):
            best = r
    return best


def _starts(ly, n_starts, rng):
    y_min = float(np.exp(ly.min()))
    out = []
    for i in range(n_starts):
        alpha = rng.uniform(0.05, 2.0)
        c = y_min * rng.uniform(0.0, 0.99) if i % 4 else y_min * 1e-3
        a = rng.uniform(0.5, 2.0) * max(float(np.exp(ly.max())) - c, 1e-12)
        out.append(np.array([math.log(a), alpha, math.log(max(c, 1e-12))]))
    return out


def fit(x, y, *, n_starts: int = 16, n_boot: int = 100, f_scale: float = 0.05, seed: int = 0,
        level: float = 0.9) -> PowerLaw:
    """Fit ``y = a x^-alpha + c`` (``a > 0``, ``alpha >= 0``, ``c > 0``) robustly (``docs/definitions.md#scaling-fit``).

    Huber loss (``f_scale`` in log units) on ``log(a x^-alpha + c) - log y``, minimised from
    ``n_starts`` seeded starts (the lowest cost wins); ``n_boot`` bootstrap resamples of the points
    (seeded, 2 starts each: the fit and a perturbation of it) give the ``level`` quantile band of each parameter.
    ``x`` and ``y`` must be positive, finite, of equal length, at least 4 points.
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 4:
        raise ValueError(f"x must hold at least 4 points for a 3-parameter fit, got {len(x)}")
    n_starts = check_int("n_starts", n_starts, 1, 10_000)
    n_boot = check_int("n_boot", n_boot, 0, 100_000)
    f_scale = check_float("f_scale", f_scale, 0, 100, lo_open=True)
    check_float("level", level, 0, 1, lo_open=True, hi_open=True)
    rng = np.random.default_rng(check_seed("seed", seed))
    lx, ly = np.log(x), np.log(y)
    best = _fit_once(lx, ly, _starts(ly, n_starts, rng), f_scale)
    if best is None:
        raise ValueError("the power-law fit failed from every start (x and y may hold too little variation)")
    log_a, alpha, log_c = best.x
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        starts = [best.x] + [best.x + rng.normal(0, [0.5, 0.1, 0.5])]
        starts = [np.clip(s, [-50, 0, -50], [50, 10, 50]) for s in starts]
        r = _fit_once(lx[idx], ly[idx], starts, f_scale)
        if r is not None:
            boot.append([math.exp(r.x[0]), r.x[1], math.exp(r.x[2])])
    boot_arr = np.array(boot) if boot else np.zeros((0, 3))
    q = (1 - level) / 2
    band = ({k: (float(np.quantile(boot_arr[:, i], q)), float(np.quantile(boot_arr[:, i], 1 - q)))
             for i, k in enumerate(("a", "alpha", "c"))} if len(boot_arr) else {})
    return PowerLaw(a=math.exp(log_a), alpha=float(alpha), c=math.exp(log_c), cost=float(best.cost), n=len(x),
                    band=band, boot=boot_arr)


def extrapolation(x, y, n_heldout: int = 2, **fit_kwargs) -> dict:
    """Fit the points with the smallest ``x`` (all but the ``n_heldout`` largest) and predict the held-out ones.

    Returns ``{"fit": PowerLaw, "x": held-out x, "y": their y, "pred": predictions, "rel_error":
    |pred - y| / y}`` (arrays in increasing ``x``).
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n_heldout = check_int("n_heldout", n_heldout, 1, max(1, len(x) - 4))
    if len(x) - n_heldout < 4:
        raise ValueError(f"n_heldout must leave at least 4 points to fit, got {n_heldout} of {len(x)}")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    f = fit(x[:-n_heldout], y[:-n_heldout], **fit_kwargs)
    pred = f.predict(x[-n_heldout:])
    return {"fit": f, "x": x[-n_heldout:], "y": y[-n_heldout:], "pred": pred,
            "rel_error": np.abs(pred - y[-n_heldout:]) / y[-n_heldout:]}


SWEEP_AXES = ("width", "depth", "data")


SWEEP_COLUMNS = ["axis", "value", "params", "n_train", "val_loss", "val_acc", "train_loss"]


def sweep(axis: str = "width", values=(8, 16, 32, 64, 128), *, dataset: str = "digits", steps: int = 300,
          seed: int = 0, lr: float = 3e-3, monitor=None) -> pd.DataFrame:
    """Validation loss of MLPs on ``dataset`` (a vector task) against ``axis`` (a plain loop, one seed;
    ``docs/definitions.md#scaling-sweep``).

    ``width``: ``d_model`` (``d_hidden = 2 d_model``), 2 blocks; ``depth``: blocks at width 32;
    ``data``: training examples (the first n of the training split) at width 32, 2 blocks.
    Returns columns ``axis, value, params, n_train, val_loss, val_acc, train_loss``.

    ``monitor`` (:mod:`workbench.monitor`): the training steps as progress, and after each point a
    report whose payload is the table so far; its ``stopped`` is read every training step: once stopped
    the sweep ends and returns the points finished (the interrupted one is dropped).
    """
    from ..core import data as _data, models as _models
    from ..core.progress import TrainProgress
    from ..core.training import TrainConfig, train

    check_choice("axis", axis, SWEEP_AXES)
    monitor = _monitor.resolve(monitor)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not len(values):
        raise ValueError(f"values must be a non-empty list of positive integers, got {values!r:.60}")
    values = [check_int(f"values[{i}]", v, 1, 100_000) for i, v in enumerate(values)]
    steps = check_int("steps", steps, 1, 1_000_000)
    seed = check_seed("seed", seed)
    ds_full = _data.load(dataset)
    if ds_full.kind != "vector":
        raise ValueError(f"dataset must be a vector dataset (digits, mnist1d), got {dataset!r}")
    rows = []
    for i, v in enumerate(values):
        if monitor.stopped:
            break
        ds, width, depth = ds_full, 32, 2
        if axis == "width":
            width = v
        elif axis == "depth":
            depth = v
        else:
            if v > len(ds_full.x_train):
                raise ValueError(f"values[{values.index(v)}] must be at most the {len(ds_full.x_train)} "
                                 f"training examples of {dataset!r}, got {v}")
            ds = _data.Dataset(ds_full.name, ds_full.kind, ds_full.x_train[:v], ds_full.y_train[:v],
                               ds_full.x_val, ds_full.y_val, ds_full.n_classes, ds_full.description,
                               ds_full.vocab, ds_full.options)
        cfg = _models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=width, d_hidden=2 * width,
                                n_layers=depth, seed=seed)
        model = _models.build(cfg)
        progress = TrainProgress(_monitor.part(monitor, i / len(values), 1 / len(values)),
                                 label=f"point {i + 1}: step", payload=False)
        run = train(model, ds, TrainConfig(steps=steps, lr=lr, eval_every=steps, seed=seed), callbacks=[progress])
        if monitor.stopped:
            break
        rows.append({"axis": axis, "value": v, "params": cfg.param_count(), "n_train": len(ds.x_train),
                     "val_loss": run.final("loss", "val"), "val_acc": run.final("acc", "val"),
                     "train_loss": run.final("loss", "train")})
        monitor.report(len(rows) / len(values), f"point {len(rows)} / {len(values)}",
                       pd.DataFrame(rows, columns=SWEEP_COLUMNS), force=True)
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)
