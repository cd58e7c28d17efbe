"""Merges by name (``MERGES``, ``merge``), a sweep of one merge's knob, and every member and merge on every
domain: the evaluation table and its verdict summary.

Definitions: ``docs/definitions.md#merge-evaluation``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch.nn as nn

from ..core import checks
from ..core.training import evaluate as _evaluate_one
from .merges import (
    dare,
    dare_ties,
    linear,
    lines,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from .online import opcm

# ----------------------------------------------------------------------------- evaluation


MERGES = {
    "linear": lambda base, models, **kw: linear(models, base=base, **kw),
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "lines": lines,
    "dare": dare,
    "dare_ties": dare_ties,
    "slerp": slerp,
    "model_stock": model_stock,
    "opcm": opcm,
}

def sweep(method: str, base: nn.Module, models: Sequence[nn.Module], datasets, knob: str, values,
          split: str = "val", max_examples: int = 0, **options) -> pd.DataFrame:
    """Loss and accuracy of ``merge(method, ..., knob=x)`` on every dataset for each ``x`` in ``values``.

    Tidy ``method, knob, x, domain, metric, value``; e.g. SLERP's accuracy against ``t``.
    """
    from ..lmc.permute import check_model_data

    checks.check_choice("method", method, sorted(MERGES))
    checks.check_str("knob", knob, 50)
    if knob in options:
        raise ValueError(f"options must not include the swept knob {knob!r}")
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not 1 <= len(values) <= 101:
        raise ValueError(f"values must be 1 to 101 numbers, got {values!r:.80}")
    xs = [checks.check_float("values[]", v) for v in values]
    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    if not datasets:
        raise ValueError("datasets: sweep needs at least one dataset")
    datasets = dict(datasets) if isinstance(datasets, Mapping) else _named(datasets)
    for domain, ds in datasets.items():
        check_model_data(base, ds, f"datasets[{domain!r}]")
    rows = []
    for x in xs:
        model = merge(method, base, models, **{knob: x}, **options)
        for domain, ds in datasets.items():
            for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                rows.append({"method": method, "knob": knob, "x": x, "domain": domain, "metric": metric,
                             "value": value})
    return pd.DataFrame(rows, columns=["method", "knob", "x", "domain", "metric", "value"])


def merge(method: str, base: nn.Module, models: Sequence[nn.Module], **options) -> nn.Module:
    """One entry point for the weight-space merges: ``method`` in :data:`MERGES`."""
    checks.check_choice("method", method, sorted(MERGES))
    return MERGES[method](base, list(models), **options)


def _named(models) -> dict[str, nn.Module]:
    if models is None:
        return {}
    if isinstance(models, Mapping):
        return dict(models)
    return {f"model {i}": m for i, m in enumerate(models)}


def evaluate(members, merges=None, datasets=None, split: str = "val", max_examples: int = 0,
             references=None) -> pd.DataFrame:
    """Loss and accuracy of every specialist and every merge on every domain, one tidy table.

    ``members`` and ``merges``: ``{name: model}`` (or lists, named ``model i``); ``datasets``:
    ``{domain: Dataset}``; ``references`` (optional, e.g. the shared base) are listed with role
    ``"reference"``. Columns: ``model, role ("specialist"/"merge"/"reference"), domain, metric
    ("loss"/"acc"), value``. See :func:`summary` for the verdict per model.
    """
    from ..lmc.permute import check_model_data

    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    if not datasets:
        raise ValueError("datasets: evaluate needs at least one dataset")
    datasets = _named(datasets) if not isinstance(datasets, Mapping) else dict(datasets)
    rows = []
    groups = (("specialist", _named(members)), ("merge", _named(merges)), ("reference", _named(references)))
    for role, group in groups:
        for name, model in group.items():
            for domain, ds in datasets.items():
                check_model_data(model, ds, f"datasets[{domain!r}]")
    for role, group in groups:
        for name, model in group.items():
            for domain, ds in datasets.items():
                for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                    rows.append({"model": name, "role": role, "domain": domain, "metric": metric, "value": value})
    return pd.DataFrame(rows, columns=["model", "role", "domain", "metric", "value"])


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model: mean loss and accuracy over domains, and the verdict against the specialists.

    ``worst_gap``: the largest excess loss over the best specialist on any one domain (forgetting
    shows as a large gap); ``beats_parts``: the mean loss is below every specialist's mean loss.
    """
    if not isinstance(table, pd.DataFrame) or not {"model", "role", "domain", "metric", "value"} <= set(table):
        raise ValueError("table must be evaluate()'s DataFrame (model, role, domain, metric, value)")
    loss = table[table["metric"] == "loss"].pivot_table(index="model", columns="domain", values="value", sort=False)
    acc = table[table["metric"] == "acc"].pivot_table(index="model", columns="domain", values="value", sort=False)
    roles = table.drop_duplicates("model").set_index("model")["role"]
    specialists = [m for m in loss.index if roles[m] == "specialist"]
    best = loss.loc[specialists].min() if specialists else loss.min()
    best_mean = loss.loc[specialists].mean(axis=1).min() if specialists else float("nan")
    out = pd.DataFrame({
        "model": loss.index, "role": [roles[m] for m in loss.index],
        "mean_loss": loss.mean(axis=1).values, "mean_acc": acc.loc[loss.index].mean(axis=1).values,
        "worst_gap": (loss - best).max(axis=1).values,
    })
    out["beats_parts"] = out["mean_loss"] < best_mean
    return out.reset_index(drop=True)
