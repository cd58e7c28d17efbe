"""Alignment before interpolation: permutation matching (weights or activations), REPAIR's rescaling of
the interpolated units, and the comparison of all methods on one pair.

Definitions: ``docs/definitions.md#weight-matching``, ``#repair``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from .. import hooks
from . import permute as _perm
from ..core.data import Dataset
from .permute import check_same_architecture
from .interpolation import (
    METHODS,
    _check_data,
    _check_n_alphas,
    _check_splits,
    _evaluate,
    _params,
    _progress,
    curve,
    interpolate,
)

# ----------------------------------------------------------------------------- alignment


def align(model_a: nn.Module, model_b: nn.Module, method: str = "weights", data=None, seed: int = 0,
          max_iter: int = 100, max_examples: int = 2048) -> nn.Module:
    """A copy of B with its units permuted to match A; it computes exactly B's function.

    Exactly up to float round-off: permuting features changes the order of sums (matrix
    products, LayerNorm statistics), so float32 outputs may differ in the last bits (about
    1e-6 of the largest logit); in float64 the difference is ~1e-14.

    ``method="weights"``: Git Re-Basin weight matching (:func:`workbench.permute.match_weights`,
    random sweep order from ``seed``). ``method="activations"``: correlation of activations
    on ``data`` (a Dataset, whose training inputs are used, or an input tensor).
    """
    checks.check_choice("method", method, ("weights", "activations"))
    seed = checks.check_seed("seed", seed)
    checks.check_int("max_iter", max_iter, 1, _perm.MAX_ITER)
    checks.check_int("max_examples", max_examples, 0)
    if method == "weights":
        perm, _ = _perm.match_weights(model_a, model_b, seed=seed, max_iter=max_iter)
    elif method == "activations":
        if data is None:
            raise ValueError("activation matching needs data (a Dataset or an input tensor)")
        perm, _ = _perm.match_activations(model_a, model_b, data, max_examples=max_examples)
    else:
        raise ValueError(f"method must be 'weights' or 'activations', got {method!r}")
    return _perm.permute(model_b, perm).eval()


# ----------------------------------------------------------------------------- REPAIR


@torch.no_grad()
def _unit_stats(model: nn.Module, layers: list[nn.Linear], x: torch.Tensor, batch_size: int = 1024):
    """Mean and std of each layer's output units over examples (and positions), float64: one
    ``(mean, std)`` pair per layer, all from the same forward passes (recorded with :func:`hooks.watch`)."""
    s = [0.0] * len(layers)
    ss = [0.0] * len(layers)
    n = [0] * len(layers)

    def add(i, out):
        o = out.reshape(-1, out.shape[-1]).double()
        s[i], ss[i], n[i] = s[i] + o.sum(0), ss[i] + (o * o).sum(0), n[i] + o.shape[0]

    device = next(model.parameters()).device
    with hooks.watch(dict(enumerate(layers)), add):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    means = [si / ni for si, ni in zip(s, n)]
    return [(m, (q / ni - m**2).clamp_min(0).sqrt()) for m, q, ni in zip(means, ss, n)]


@torch.no_grad()
def repair(model_a: nn.Module, model_b: nn.Module, alpha: float, data, max_examples: int = 2048,
           eps: float = 1e-5) -> nn.Module:
    """REPAIR (Jordan et al. 2022): the interpolated model with its hidden units renormalised.

    For every block's ``fc`` layer (the hidden units before the activation) the goal
    statistics per unit are ``mu = (1-alpha) mu_A + alpha mu_B`` and
    ``sd = (1-alpha) sd_A + alpha sd_B``, measured on ``data``. Block by block, the
    interpolated model's own statistics are measured (with earlier blocks already
    repaired) and the layer's rows and bias are rescaled so its units have the goal
    statistics; the correction is folded into the weights, so the result is a plain model.

    REPAIR was defined for networks without norms or with BatchNorm. Our models use
    LayerNorm, which re-standardises each example's residual vector, so the block inputs
    keep their scale; the variance collapse of interpolation shows up in the hidden units,
    and those are what is renormalised. The residual stream, attention and the output
    projections are left as interpolated. ``data``: a Dataset (training inputs) or a tensor.
    """
    check_same_architecture(model_a, model_b)
    alpha = checks.check_float("alpha", alpha, 0.0, 1.0)
    checks.check_float("eps", eps, 0.0, 1.0, lo_open=True)
    x = _perm._inputs(data, max_examples, model_a)
    model = interpolate(model_a, model_b, alpha)
    was = model_a.training, model_b.training
    model_a.eval(), model_b.eval()
    try:
        stats_a = _unit_stats(model_a, model_a.repair_sites(), x)
        stats_b = _unit_stats(model_b, model_b.repair_sites(), x)
        goals = [((1 - alpha) * ma + alpha * mb, (1 - alpha) * sa + alpha * sb)
                 for (ma, sa), (mb, sb) in zip(stats_a, stats_b)]
    finally:
        model_a.train(was[0]), model_b.train(was[1])
    for layer, (goal_mean, goal_std) in zip(model.repair_sites(), goals):   # block by block: earlier ones repaired
        (mean, std), = _unit_stats(model, [layer], x)
        scale = goal_std / (std + eps)
        layer.weight.mul_(scale[:, None].to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.double() - mean) * scale + goal_mean).to(layer.bias.dtype))
    return model


# ----------------------------------------------------------------------------- comparison


def compare(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, n_alphas: int = 25,
            methods: Sequence[str] = ("none", "weights", "activations", "repair"),
            splits: Sequence[str] = ("train", "val"), max_examples: int = 2048, seed: int = 0,
            monitor=None) -> pd.DataFrame:
    """Curves before alignment, after weight matching, after activation matching and after REPAIR.

    REPAIR is applied on top of activation matching (as in Jordan et al.), one repaired
    model per alpha. Returns the curves of :func:`curve` with a ``method`` column. ``monitor``
    (:mod:`workbench.monitor`): progress per method; stopped, it raises :class:`Cancelled`.
    """
    _check_data(model_a, model_b, dataset)
    _check_n_alphas(n_alphas)
    splits = _check_splits(splits)
    checks.check_int("max_examples", max_examples, 0)
    seed = checks.check_seed("seed", seed)
    methods = checks.check_choices("methods", methods, METHODS)
    monitor = _monitor.resolve(monitor)
    frames, matched = [], {}
    steps = len(methods)
    for i, method in enumerate(methods):
        _progress(monitor, i, steps, f"curve: {method}")
        if method == "none":
            df = curve(model_a, model_b, dataset, n_alphas, splits, max_examples)
        elif method == "weights":
            df = curve(model_a, align(model_a, model_b, "weights", seed=seed), dataset, n_alphas, splits, max_examples)
        else:
            if "activations" not in matched:
                matched["activations"] = align(model_a, model_b, "activations", data=dataset, max_examples=max_examples)
            b = matched["activations"]
            if method == "activations":
                df = curve(model_a, b, dataset, n_alphas, splits, max_examples)
            else:
                df = _repair_curve(model_a, b, dataset, n_alphas, splits, max_examples, monitor)
        frames.append(df.assign(method=method))
    monitor.report(1.0, "done")
    return pd.concat(frames, ignore_index=True)[["method", "alpha", "split", "loss", "acc", "error"]]


def _repair_curve(model_a, model_b, dataset, n_alphas, splits, max_examples, monitor=None) -> pd.DataFrame:
    monitor = _monitor.resolve(monitor)
    grid = np.linspace(0, 1, n_alphas)
    repaired = []
    for a in grid:
        _monitor.check(monitor)
        m = model_a if a == 0 else model_b if a == 1 else repair(model_a, model_b, float(a), dataset, max_examples)
        repaired.append(_params(m))
    stacked = {k: torch.stack([p[k].to(repaired[0][k].device) for p in repaired]) for k in repaired[0]}
    rows = []
    for split in splits:
        loss, acc = _evaluate(model_a, stacked, dataset, split, max_examples)
        rows += [{"alpha": float(a), "split": split, "loss": float(l), "acc": float(c), "error": 1 - float(c)}
                 for a, l, c in zip(grid, loss, acc)]
    return pd.DataFrame(rows)
