"""Pure figure builders: tidy DataFrame (or result object) -> plotly Figure. No torch, no Panel, no I/O.

Submodules (``training``, ``growth``, ``residual``, ``lmc``, ``collapse``, ``compose``) load on
first use: ``wb.figures.training.training_curves(run.metrics)``.
"""
import importlib


def __getattr__(name: str):
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'workbench.figures' has no attribute {name!r}") from None
