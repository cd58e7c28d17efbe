"""Interpolation between two models: weights along the line, batched evaluation of many interpolated
models at once (``torch.func.functional_call``), the curve, its barriers, and the plane through three models.

Definitions: ``docs/definitions.md#interpolation``, ``#barrier``, ``#loss-plane``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..core import checks
from ..core import monitor as _monitor
from ..core.data import IGNORE, Dataset
from .permute import check_model_data, check_same_architecture

# Bounds on the sizes of a computation (each point is one evaluation of a model on the data).
N_ALPHAS = (2, 1001)          # points on an interpolation curve
MAX_RESOLUTION = 101          # points per axis of plane()
MAX_SPAWN_STEPS = 100         # spawn points of instability()
MAX_SEEDS = 16                # models trained by train_pair()
SPLITS = ("train", "val")
METHODS = ("none", "weights", "activations", "repair")


def _check_n_alphas(n_alphas) -> int:
    return checks.check_int("n_alphas", n_alphas, *N_ALPHAS)


def _check_splits(splits) -> list[str]:
    return checks.check_choices("splits", splits, SPLITS)


def _check_data(model_a: nn.Module, model_b: nn.Module, dataset) -> None:
    """Both models of one architecture (so one pairing check covers both) and able to run on ``dataset``."""
    check_same_architecture(model_a, model_b)
    check_model_data(model_a, dataset)


Cancelled = _monitor.Stopped   # raised when the monitor is stopped during a long computation (the one Stopped)


def _progress(monitor, done: int, total: int, message: str) -> None:
    """Raise :class:`Cancelled` if the monitor is stopped, else report ``done / total`` and ``message``."""
    _monitor.check(monitor)
    monitor.report(done / max(total, 1), message)


def _refuse_batchnorm(model: nn.Module) -> None:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise NotImplementedError("BatchNorm models need their statistics reset after interpolation; "
                                  "the workbench's models use LayerNorm only")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Distinct parameters by name (tied weights once, as ``named_parameters`` lists them)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def _pair(model_a: nn.Module, model_b: nn.Module) -> tuple[dict, dict]:
    check_same_architecture(model_a, model_b)
    _refuse_batchnorm(model_a)
    pa, pb = _params(model_a), _params(model_b)
    device = next(iter(pa.values())).device
    return pa, {k: v.to(device) for k, v in pb.items()}


def _lerp_stack(pa: dict, pb: dict, alphas: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """``{name: (n_alphas, *shape)}``; only ``names`` are interpolated (the rest stay A's, broadcast)."""
    out = {}
    for k, a in pa.items():
        if names is None or k in names:
            w = alphas.to(a.device, a.dtype).view(-1, *([1] * a.dim()))
            out[k] = torch.lerp(a.unsqueeze(0), pb[k].unsqueeze(0), w)
        else:
            out[k] = a.unsqueeze(0).expand(len(alphas), *a.shape)
    return out


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new model with parameters ``(1 - alpha) A + alpha B`` (``alpha`` any finite number: outside [0, 1]
    the line is extrapolated)."""
    alpha = checks.check_float("alpha", alpha)
    pa, pb = _pair(model_a, model_b)
    out = copy.deepcopy(model_a)
    with torch.no_grad():
        for k, p in out.named_parameters():
            p.copy_(torch.lerp(pa[k], pb[k], float(alpha)))
    return out.eval()


# ----------------------------------------------------------------------------- batched evaluation


def _split_data(dataset: Dataset, split: str, max_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.split(split)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    return x, y


@torch.no_grad()
def evaluate_params(model: nn.Module, params: dict[str, torch.Tensor], dataset: Dataset, split: str = "val",
                    max_examples: int = 2048, max_rows: int = 1 << 13,
                    use_vmap: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of ``n`` parameter sets ``{name: (n, *shape)}`` run through ``model``'s code.

    The ``n`` models share one module; nothing is rebuilt or copied. On GPUs one
    ``functional_call`` under ``torch.vmap`` per data batch runs them as batched matrix
    products; on CPUs, where those products are compute-bound anyway, a plain loop of
    ``functional_call`` over the sets measured faster than ``vmap`` (``use_vmap`` overrides).
    Returns ``(loss (n,), acc (n,))`` over the first ``max_examples`` examples of ``split``
    (0: all), scored positions only.
    """
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    checks.check_int("max_rows", max_rows, 1)
    if use_vmap is not None:
        checks.check_bool("use_vmap", use_vmap)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: (n, *shape) tensor}")
    check_model_data(model, dataset)
    return _evaluate(model, params, dataset, split, max_examples, max_rows, use_vmap)


@torch.no_grad()
def _evaluate(model: nn.Module, params: dict[str, torch.Tensor], dataset: Dataset, split: str, max_examples: int,
              max_rows: int = 1 << 13, use_vmap: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate_params` without the argument checks (the callers here have made them once)."""
    x, y = _split_data(dataset, split, max_examples)
    n = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    if use_vmap is None:
        use_vmap = device.type != "cpu"
    per_example = int(np.prod(x.shape[1:])) if x.dim() > 1 and dataset.kind == "sequence" else 1
    batch = max(1, max_rows // ((n if use_vmap else 1) * per_example))
    if use_vmap:
        run = torch.vmap(lambda p, xb: functional_call(model, p, (xb,)), in_dims=(0, None))
    else:
        def run(p, xb):
            return torch.stack([functional_call(model, {k: v[i] for k, v in p.items()}, (xb,)) for i in range(n)])
    loss, correct, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    try:
        with warnings.catch_warnings():
            # CPU attention has no vmap batching rule yet: torch loops over the models (still one call).
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for i in range(0, len(x), batch):
                xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
                logits = run(params, xb)                                  # (n, B, [T,] K)
                flat = logits.reshape(n, -1, logits.shape[-1])            # (n, rows, K)
                target = yb.reshape(1, -1).expand(n, -1)                  # (n, rows)
                ce = F.cross_entropy(flat.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
                mask = target != IGNORE
                loss += ce.sum(1).double().cpu()
                correct += ((flat.argmax(-1) == target) & mask).sum(1).double().cpu()
                count += int(mask[0].sum())
    finally:
        model.train(was_training)
    return (loss / max(count, 1)).numpy(), (correct / max(count, 1)).numpy()


def _chunked_eval(model, stacked_fn, n: int, dataset, split, max_examples, budget: int = 50_000_000):
    """Evaluate ``n`` parameter sets produced by ``stacked_fn(slice)`` in chunks of bounded memory."""
    params = _params(model)
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(n, budget // max(n_params, 1)))
    if next(iter(params.values())).device.type == "cpu":
        chunk = 1  # CPU: one parameter set at a time (see evaluate_params); nothing large is stacked
    losses, accs = [], []
    for s in range(0, n, chunk):
        l, a = _evaluate(model, stacked_fn(slice(s, min(n, s + chunk))), dataset, split, max_examples)
        losses.append(l), accs.append(a)
    return np.concatenate(losses), np.concatenate(accs)


def curve(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, n_alphas: int = 25,
          splits: Sequence[str] = ("train", "val"), max_examples: int = 2048,
          alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Loss and accuracy along the straight line from A (alpha 0) to B (alpha 1).

    Returns a tidy DataFrame with columns ``alpha, split, loss, acc, error``; ``max_examples``
    per split (0: all). ``alphas`` overrides the evenly spaced grid: 1 to 1001 finite numbers
    (outside [0, 1] the line is extrapolated).
    """
    _check_data(model_a, model_b, dataset)
    splits = _check_splits(splits)
    checks.check_int("max_examples", max_examples, 0)
    if alphas is None:
        grid = torch.linspace(0, 1, _check_n_alphas(n_alphas))
    else:
        if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__len__") \
                or not 1 <= len(alphas) <= N_ALPHAS[1]:
            raise ValueError(f"alphas must be a list of 1 to {N_ALPHAS[1]} numbers, got {alphas!r}")
        grid = torch.tensor([checks.check_float("alphas[]", a) for a in alphas], dtype=torch.float32)
    pa, pb = _pair(model_a, model_b)
    rows = []
    for split in splits:
        loss, acc = _chunked_eval(model_a, lambda s: _lerp_stack(pa, pb, grid[s]), len(grid), dataset, split,
                                  max_examples)
        rows += [{"alpha": float(a), "split": split, "loss": float(l), "acc": float(c), "error": 1 - float(c)}
                 for a, l, c in zip(grid, loss, acc)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- barriers


def _barrier_1d(alpha: np.ndarray, value: np.ndarray, definition: str) -> tuple[float, float]:
    order = np.argsort(alpha)
    alpha, value = alpha[order], value[order]
    if not (np.isclose(alpha[0], 0) and np.isclose(alpha[-1], 1)):
        raise ValueError("a barrier needs the curve's endpoints (alpha 0 and 1)")
    v0, v1 = value[0], value[-1]
    if definition == "endpoint_mean":
        excess = value - (v0 + v1) / 2
    elif definition == "linear":
        excess = value - ((1 - alpha) * v0 + alpha * v1)
    else:
        raise ValueError(f"definition must be 'endpoint_mean' or 'linear', got {definition!r}")
    i = int(np.argmax(excess))
    return float(excess[i]), float(alpha[i])


def barrier(curve_df: pd.DataFrame) -> pd.DataFrame:
    """Barriers of a curve, one row per (split, metric, definition), with the alpha where each peaks.

    - ``endpoint_mean`` (Git Re-Basin's code): ``max_a L(a) - (L(0) + L(1)) / 2``.
    - ``linear`` (Entezari et al. 2022, Frankle et al. 2020): ``max_a L(a) - ((1-a) L(0) + a L(1))``.

    Metrics are ``loss`` and ``error`` (1 - accuracy). Any extra grouping columns of the
    curve (e.g. ``method``) are kept. Columns: ``[groups...], split, metric, definition,
    barrier, alpha``. The two definitions agree when ``L(0) = L(1)`` and differ by at most
    ``|L(1) - L(0)| / 2`` otherwise.
    """
    if not isinstance(curve_df, pd.DataFrame):
        raise ValueError(f"curve_df must be a DataFrame from curve(), got {type(curve_df).__name__}")
    missing = {"alpha", "loss", "acc"} - set(curve_df.columns)
    if missing or curve_df.empty:
        raise ValueError(f"curve_df must be a non-empty curve() table with columns alpha, loss, acc; "
                         f"missing {sorted(missing)}" if missing else "curve_df must be a non-empty curve() table")
    if "error" not in curve_df:
        curve_df = curve_df.assign(error=1 - curve_df["acc"])
    groups = [c for c in curve_df.columns if c not in ("alpha", "loss", "acc", "error")]
    rows = []
    for key, g in curve_df.groupby(groups, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in ("loss", "error"):
            for definition in ("endpoint_mean", "linear"):
                b, a = _barrier_1d(g["alpha"].to_numpy(float), g[metric].to_numpy(float), definition)
                rows.append({**dict(zip(groups, key)), "metric": metric, "definition": definition,
                             "barrier": b, "alpha": a})
    return pd.DataFrame(rows)


def barrier_value(barriers: pd.DataFrame, split: str = "val", metric: str = "loss", definition: str = "linear",
                  **where) -> float:
    """One number out of :func:`barrier`'s table (``where`` filters extra columns such as ``method``)."""
    checks.check_choice("metric", metric, ("loss", "error"))
    checks.check_choice("definition", definition, ("endpoint_mean", "linear"))
    if not isinstance(barriers, pd.DataFrame) or "barrier" not in barriers:
        raise ValueError("barriers must be the DataFrame from barrier()")
    for k in where:
        if k not in barriers:
            raise ValueError(f"{k} is not a column of barriers (columns: {list(barriers.columns)})")
    sel = (barriers["split"] == split) & (barriers["metric"] == metric) & (barriers["definition"] == definition)
    for k, v in where.items():
        sel &= barriers[k] == v
    if sel.sum() != 1:
        raise ValueError(f"expected one barrier row for {split}/{metric}/{definition} {where}, found {int(sel.sum())}")
    return float(barriers.loc[sel, "barrier"].iloc[0])


# ----------------------------------------------------------------------------- plane


@dataclass
class Plane:
    """Loss over the plane through three models: ``grid`` (x, y, loss, acc) and ``points`` (name, x, y)."""

    grid: pd.DataFrame
    points: pd.DataFrame
    split: str


def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, dataset: Dataset, resolution: int = 15,
          margin: float = 0.2, split: str = "val", max_examples: int = 1024) -> Plane:
    """Evaluate ``A + x e1 + y e2`` on a ``resolution x resolution`` grid.

    ``e1`` points from A to B, ``e2`` is the part of ``C - A`` orthogonal to it (Gram-Schmidt,
    Garipov et al. 2018), both unit vectors in parameter space; A sits at (0, 0), B at
    (|B - A|, 0), C above the x axis. The grid covers the three points plus ``margin`` of
    the span on every side. ``resolution`` in [2, 101] per axis, ``margin`` in [0, 10].
    """
    _check_data(model_a, model_b, dataset)
    check_same_architecture(model_a, model_c)
    checks.check_int("resolution", resolution, 2, MAX_RESOLUTION)
    checks.check_float("margin", margin, 0.0, 10.0)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    pa, pb = _pair(model_a, model_b)
    _, pc = _pair(model_a, model_c)
    names = list(pa)
    flat = lambda p: torch.cat([p[k].reshape(-1).double() for k in names])  # noqa: E731
    a, b, c = flat(pa), flat(pb), flat(pc)
    u, v = b - a, c - a
    e1 = u / u.norm()
    v = v - (v @ e1) * e1
    if v.norm() < 1e-12:
        raise ValueError("the three models lie on one line; no plane through them")
    e2 = v / v.norm()
    pts = {"A": (0.0, 0.0), "B": (float(u.norm()), 0.0), "C": (float((c - a) @ e1), float((c - a) @ e2))}
    xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    gx = np.linspace(min(xs) - margin * span, max(xs) + margin * span, resolution)
    gy = np.linspace(min(ys) - margin * span, max(ys) + margin * span, resolution)
    X, Y = np.meshgrid(gx, gy)
    coords = torch.tensor(np.stack([X.ravel(), Y.ravel()], 1))              # (n, 2)
    shapes = [pa[k].shape for k in names]
    sizes = [pa[k].numel() for k in names]
    dtype = pa[names[0]].dtype

    def stacked(s: slice) -> dict:
        theta = a[None] + coords[s, :1].to(a.device) * e1[None] + coords[s, 1:].to(a.device) * e2[None]  # (m, P)
        parts = theta.to(dtype).split(sizes, dim=1)
        return {k: t.reshape(-1, *shape) for k, t, shape in zip(names, parts, shapes)}

    loss, acc = _chunked_eval(model_a, stacked, len(coords), dataset, split, max_examples)
    grid = pd.DataFrame({"x": coords[:, 0].numpy(), "y": coords[:, 1].numpy(), "loss": loss, "acc": acc})
    points = pd.DataFrame([{"name": k, "x": x, "y": y} for k, (x, y) in pts.items()])
    return Plane(grid, points, split)
