"""Depth Workbench: grow models, read their residual stream, measure connectivity and collapse.

>>> import workbench as wb
>>> ds = wb.data.load("digits")
>>> model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10))
>>> run = wb.train(model, ds, wb.TrainConfig(steps=200))

Submodules (``data``, ``models``, ``growth``, ``residual``, ``lmc``, ``collapse``,
``compose``, ``store``) are imported on first use, so ``import workbench`` stays cheap
and has no side effects.
"""
from __future__ import annotations

import importlib

from . import data, models
from .store import RunStore, StoreError
from .training import Callback, ProgressBar, Run, StopOnEvent, TrainConfig, evaluate, train

__version__ = "0.1.0"
__all__ = ["data", "models", "train", "evaluate", "TrainConfig", "Run", "Callback", "ProgressBar", "StopOnEvent",
           "RunStore", "StoreError", "growth", "residual", "lmc", "collapse", "compose", "store", "figures", "hooks",
           "recipes"]

_LAZY = {"growth", "residual", "lmc", "collapse", "compose", "figures", "store", "training", "sampling", "interop",
         "flops", "permute", "hooks", "adapters", "recipes", "checks", "roots", "jobs", "sweeps", "classroom",
         "attention", "tracing",
         "grokking", "scaling", "unroll", "learngene", "lenses", "depthlab", "earlyexit"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
