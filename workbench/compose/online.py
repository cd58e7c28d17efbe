"""Merging as tasks arrive: OPCM's orthogonal projection and the sequential baselines.

Definitions: ``docs/definitions.md#opcm``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core.training import evaluate as _evaluate_one
from .merges import _apply, _task_names, task_vectors

# ----------------------------------------------------------------------------- sequential merging (OPCM)


def _split_rank(s: torch.Tensor, alpha: float) -> int:
    """OPCM's split rank: the first index whose cumulative share of the singular values exceeds ``alpha``."""
    if s.sum() <= 0:
        return 0
    return int((s.cumsum(0) / s.sum() > alpha).float().argmax())


def opcm_project(tau: torch.Tensor, merged: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """OPCM's projection of a 2-D task vector ``tau`` away from the top singular directions of ``merged``.

    With the full SVD ``merged = U S V^T`` and ``P = U^T tau V``: the diagonal of ``P`` is zeroed
    (no ``u_i v_i^T`` component for any ``i``) and its top-left ``r x r`` block, ``r`` the first
    index at which the cumulative share of singular values exceeds ``alpha``; returns ``U P V^T``
    (Tang et al. 2025, the authors' FusionBench code). Definition: ``docs/definitions.md#opcm``.
    """
    m64 = merged.double()
    if m64.norm() == 0:
        return tau.clone()
    u, s, vh = torch.linalg.svd(m64, full_matrices=True)
    p = u.T @ tau.double() @ vh.T
    p.diagonal().zero_()
    r = _split_rank(s, alpha)
    p[:r, :r] = 0
    return (u @ p @ vh).to(tau.dtype)


def _norm(vec: Mapping[str, torch.Tensor]) -> float:
    return float(sum(float(v.double().pow(2).sum()) for v in vec.values())) ** 0.5


SEQUENTIAL = ("opcm", "average", "task_arithmetic")


def _sequential_vectors(taus, method: str, alpha: float, scale: float) -> list[dict[str, torch.Tensor]]:
    """The merged task vector after each task arrives (``len(taus)`` of them)."""
    out = []
    if method == "opcm":
        acc = None
        norms = []
        for tau in taus:
            norms.append(_norm(tau))
            if acc is None:
                acc = {k: v.clone() for k, v in tau.items()}
            else:
                acc = {k: acc[k] + (opcm_project(v, acc[k], alpha) if v.dim() == 2 else v) for k, v in tau.items()}
            total = _norm(acc)
            target = sum(norms) / len(norms)
            out.append({k: v * (target / total) if total > 0 else v.clone() for k, v in acc.items()})
    else:
        acc = None
        for i, tau in enumerate(taus, 1):
            acc = {k: v.clone() for k, v in tau.items()} if acc is None else {k: acc[k] + v for k, v in tau.items()}
            factor = 1.0 / i if method == "average" else scale
            out.append({k: factor * v for k, v in acc.items()})
    return out


def sequential(base: nn.Module, models, method: str = "opcm", datasets=None, alpha: float = 0.5,
               scale: float = 1.0, split: str = "val", max_examples: int = 0):
    """Merge models one at a time as their tasks arrive: ``(merged after each task, table)``.

    ``models``: the fine-tuned models in arrival order (a list, or ``{task: model}``); ``method``:
    ``"opcm"`` (Tang et al. 2025: each new task vector projected by :func:`opcm_project` away from
    the running merge's top singular directions in every 2-D tensor, added to the running sum,
    which is rescaled to the mean norm of the task vectors seen so far), ``"average"``
    (``theta_0 + mean_{i<=t} tau_i``) or ``"task_arithmetic"`` (``theta_0 + scale * sum_{i<=t} tau_i``).
    ``datasets`` (one per model, same order; optional): the table has the loss and accuracy of
    the merge after ``n_tasks`` tasks on every task seen so far, tidy ``method, n_tasks, task,
    metric, value``. Definition: ``docs/definitions.md#opcm``.
    """
    from ..lmc.permute import check_model_data

    checks.check_choice("method", method, SEQUENTIAL)
    alpha = checks.check_float("alpha", alpha, 0.0, 1.0, hi_open=True)
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    named = _task_names(models, list(datasets) if isinstance(datasets, Mapping) and not isinstance(models, Mapping)
                        else None)
    if datasets is not None:
        parts = list(datasets.values()) if isinstance(datasets, Mapping) else datasets
        if not isinstance(parts, (list, tuple)) or len(parts) != len(named):
            raise ValueError(f"datasets must give one Dataset per model ({len(named)}), got "
                             f"{len(parts) if hasattr(parts, '__len__') else parts!r}")
        for name, ds in zip(named, parts):
            check_model_data(base, ds, f"datasets[{name!r}]")
    merged = [_apply(base, v) for v in _sequential_vectors(task_vectors(base, list(named.values())), method,
                                                            alpha, scale)]
    rows = []
    if datasets is not None:
        tasks = list(named)
        for n, model in enumerate(merged, 1):
            for task, ds in zip(tasks[:n], parts[:n]):
                for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                    rows.append({"method": method, "n_tasks": n, "task": task, "metric": metric, "value": value})
    return merged, pd.DataFrame(rows, columns=["method", "n_tasks", "task", "metric", "value"])


def opcm(base: nn.Module, models: Sequence[nn.Module], alpha: float = 0.5) -> nn.Module:
    """The OPCM merge after all ``models`` arrived in order (:func:`sequential` with ``method="opcm"``)."""
    return sequential(base, list(models), "opcm", alpha=alpha)[0][-1]


