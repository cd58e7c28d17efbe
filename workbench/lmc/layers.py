"""Layer-wise connectivity: interpolate one group of layers at a time (or cumulatively), and the quick
barrier estimate from a few points.

Definitions: ``docs/definitions.md#layerwise-lmc``, ``#barrier-estimate``.
"""
from __future__ import annotations

from typing import Callable

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
from .interpolation import (
    SPLITS,
    _barrier_1d,
    _check_data,
    _check_n_alphas,
    _chunked_eval,
    _lerp_stack,
    _pair,
    _params,
    _progress,
    _split_data,
    barrier,
)

# ----------------------------------------------------------------------------- layer-wise


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Default groups for :func:`layerwise`: ``embed``, each ``block i``, and ``readout`` (final norm + readout)."""
    groups: dict[str, list[str]] = {"embed": []}
    for i in range(len(model.blocks)):
        groups[f"block {i}"] = []
    groups["readout"] = []
    embeds = model.embedding_modules()  # the family's fact: stem, or token and position embeddings
    embed_prefixes = tuple(f"{name}." for name, m in model.named_modules() if any(m is e for e in embeds))
    for name in _params(model):
        if name.startswith("blocks."):
            groups[f"block {int(name.split('.')[1])}"].append(name)
        elif embed_prefixes and name.startswith(embed_prefixes):
            groups["embed"].append(name)
        else:
            groups["readout"].append(name)
    return {k: v for k, v in groups.items() if v}


def _layerwise_paths(groups: dict[str, list[str]], mode: str) -> list[tuple[str, str, set]]:
    """``(direction, group, names)`` of every path: one group at a time (``single``), or the groups
    ``1..k`` (``from input``) and ``k..L`` (``from output``) for every ``k`` (``cumulative``)."""
    order = list(groups)
    if mode == "single":
        return [("single", g, set(groups[g])) for g in order]
    ins = [("from input", order[k], {n for g in order[:k + 1] for n in groups[g]}) for k in range(len(order))]
    outs = [("from output", order[k], {n for g in order[k:] for n in groups[g]}) for k in range(len(order))]
    return ins + outs


def _check_groups(groups, pa: dict) -> dict[str, list[str]]:
    if groups is not None:
        if not isinstance(groups, dict) or not groups or not all(
                isinstance(k, str) and isinstance(v, (list, tuple, set)) and all(isinstance(n, str) for n in v)
                for k, v in groups.items()):
            raise ValueError("groups must be a non-empty dict {group name: [parameter names]}")
        unknown = {n for names in groups.values() for n in names} - set(pa)
        if unknown:
            raise ValueError(f"unknown parameter names in groups: {sorted(unknown)[:5]}")
    return groups


LAYERWISE_MODES = ("single", "cumulative")
LAYERWISE_BASES = ("both", "a", "b")


def layerwise_curves(model_a: nn.Module, model_b: nn.Module, dataset: Dataset,
                     groups: dict[str, list[str]] | None = None, n_alphas: int = 11, mode: str = "single",
                     base: str = "both", split: str = "val", max_examples: int = 2048,
                     monitor=None) -> pd.DataFrame:
    """The curves behind :func:`layerwise`: loss and accuracy along every layer-wise path.

    ``mode="single"``: only group ``l`` moves (``direction`` ``"single"``); ``mode="cumulative"``: the
    groups ``1..k`` move (``"from input"``) and the groups ``k..L`` (``"from output"``), ``group`` naming
    ``k``. ``base="a"``: everything else is A's, alpha 0 is A; ``"b"``: the mirror image (alpha 0 is B,
    alpha 1 is B with the moved groups taken from A); ``"both"``: both. Columns ``mode, direction,
    group, base, alpha, split, loss, acc, error`` (base ``"A"``/``"B"``). ``monitor``: progress per
    path; stopped, it raises :class:`Cancelled`. Definition: ``docs/definitions.md#layerwise-lmc``.
    """
    _check_data(model_a, model_b, dataset)
    _check_n_alphas(n_alphas)
    mode = checks.check_choice("mode", mode, LAYERWISE_MODES)
    base = checks.check_choice("base", base, LAYERWISE_BASES)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    pa, pb = _pair(model_a, model_b)
    groups = _check_groups(groups, pa) or layer_groups(model_a)
    paths = _layerwise_paths(groups, mode)
    bases = [b for b in (("A", (pa, pb)), ("B", (pb, pa))) if base in ("both", b[0].lower())]
    grid = torch.linspace(0, 1, n_alphas)
    monitor = _monitor.resolve(monitor)
    frames, total, done = [], len(bases) * len(paths), 0
    for bname, (p0, p1) in bases:
        for direction, gname, names in paths:
            _progress(monitor, done, total, f"layer-wise: {gname} {direction} (base {bname})")
            loss, acc = _chunked_eval(model_a, lambda s: _lerp_stack(p0, p1, grid[s], names), len(grid),
                                      dataset, split, max_examples)
            frames.append(pd.DataFrame({"mode": mode, "direction": direction, "group": gname, "base": bname,
                                        "alpha": grid.numpy().astype(float), "split": split, "loss": loss,
                                        "acc": acc, "error": 1 - acc}))
            done += 1
    monitor.report(1.0, "done")
    return pd.concat(frames, ignore_index=True)


def layerwise(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, groups: dict[str, list[str]] | None = None,
              n_alphas: int = 11, split: str = "val", max_examples: int = 2048,
              monitor=None, mode: str = "single", base: str = "both") -> pd.DataFrame:
    """Layer-wise LMC (Adilova et al. 2023): interpolate one group, take everything else from A (and from B).

    With base A the path runs from A (alpha 0) to A with the group replaced by B's
    (alpha 1); with base B from B with A's group to B. ``groups``: name -> parameter
    names (default :func:`layer_groups`). ``mode="cumulative"`` moves the groups ``1..k`` and
    ``k..L`` instead (a ``direction`` column, ``"from input"`` / ``"from output"``); ``base``
    ``"a"``, ``"b"`` or ``"both"`` (default). Returns a tidy DataFrame ``group, base, split, metric,
    definition, barrier, alpha`` (plus ``direction`` when cumulative); the curves themselves are
    :func:`layerwise_curves`. Definition: ``docs/definitions.md#layerwise-lmc``.
    """
    curves = layerwise_curves(model_a, model_b, dataset, groups, n_alphas, mode, base, split, max_examples,
                              monitor)
    cols = ["group", "base", "split", "metric", "definition", "barrier", "alpha"]
    if mode == "cumulative":
        cols = ["direction"] + cols
    keep = curves.drop(columns=["mode"] + ([] if mode == "cumulative" else ["direction"]))
    return barrier(keep)[cols]


# ----------------------------------------------------------------------------- barrier estimate


def _mean_loss(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (differentiable in ``params``)."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        logits = functional_call(model, params, (x[i:i + batch],))
        yb = y[i:i + batch].reshape(-1)
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb, ignore_index=IGNORE,
                                        reduction="sum")
        count += int((yb != IGNORE).sum())
    return total / max(count, 1)


def barrier_estimate(model_a: nn.Module, model_b: nn.Module, dataset: Dataset | None,
                     groups: dict[str, list[str]] | None = None, split: str = "train", max_examples: int = 2048,
                     n_alphas: int = 11, loss_fn: Callable[[dict], torch.Tensor] | None = None) -> pd.DataFrame:
    """First-order layer-wise barrier estimate (Adilova et al. 2024) next to the measured barrier.

    ``estimate = 1/4 (grad L(theta_A) - grad L(theta_B)) . (theta_B - theta_A)`` restricted to each
    group's parameters (the average of the two first-order expansions of ``L(midpoint)`` from A and
    from B, minus the endpoints' mean). Measured on the single-layer path with base A:
    ``midpoint`` = ``L(mid) - (L(A) + L(A with B's group)) / 2`` and ``barrier`` = the linear loss
    barrier over ``n_alphas`` points. For a quadratic loss without curvature between groups the
    estimate is exactly twice ``midpoint`` (``-d^T H d / 4`` against ``-d^T H d / 8``). A last row
    ``all`` is the whole model. ``loss_fn`` (params dict -> scalar tensor) replaces the mean
    cross-entropy on ``split`` of ``dataset`` (then ``dataset`` may be None). Columns ``group,
    estimate, midpoint, barrier``. Definition: ``docs/definitions.md#barrier-estimate``.
    """
    check_same_architecture(model_a, model_b)
    _check_n_alphas(n_alphas)
    if loss_fn is None:
        check_model_data(model_a, dataset)
        checks.check_choice("split", split, SPLITS)
        checks.check_int("max_examples", max_examples, 0)
        x, y = _split_data(dataset, split, max_examples)
        device = next(model_a.parameters()).device
        x, y = x.to(device), y.to(device)
        was = model_a.training
        model_a.eval()

        def loss_fn(p):  # noqa: F811 - the default loss
            return _mean_loss(model_a, p, x, y)
    elif not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable (params dict -> scalar tensor) or None, got {loss_fn!r}")
    else:
        was = model_a.training
    pa, pb = _pair(model_a, model_b)
    groups = _check_groups(groups, pa) or layer_groups(model_a)
    groups = {**groups, "all": list(pa)}
    try:
        grads = []
        for p in (pa, pb):
            leaf = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            with torch.enable_grad():
                g = torch.autograd.grad(loss_fn(leaf), list(leaf.values()), allow_unused=True)
            grads.append({k: (gi if gi is not None else torch.zeros_like(leaf[k])).detach() for k, gi in zip(leaf, g)})
        grid = torch.linspace(0, 1, n_alphas)
        mids = torch.tensor([0.0, 0.5, 1.0])
        rows = []
        with torch.no_grad():
            for gname, names in groups.items():
                names = set(names)
                est = sum(float(((grads[0][k] - grads[1][k]).double() * (pb[k] - pa[k]).double()).sum())
                          for k in names) / 4
                curve_ = [float(loss_fn({k: v[i] for k, v in _lerp_stack(pa, pb, grid, names).items()}))
                          for i in range(len(grid))]
                ends = [float(loss_fn({k: v[i] for k, v in _lerp_stack(pa, pb, mids, names).items()}))
                        for i in range(3)]
                b, _ = _barrier_1d(grid.numpy().astype(float), np.array(curve_), "linear")
                rows.append({"group": gname, "estimate": est, "midpoint": ends[1] - (ends[0] + ends[2]) / 2,
                             "barrier": b})
    finally:
        model_a.train(was)
    return pd.DataFrame(rows)
