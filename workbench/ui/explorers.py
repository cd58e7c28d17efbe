"""``wb.ui.explore``: the dashboard's own views, bound to a notebook's objects.

One function picks the explorer an object calls for and binds it: the same Viewer classes the dashboard's
pages embed (:mod:`workbench.ui.views`, :class:`workbench.ui.residual.ResidualExplorer`), so a notebook and
the dashboard cannot draw the same thing two ways. Show the result as the last expression of a cell (after
``wb.ui.extension()`` once); set its params in code (``view.stage = 1``) as its widgets do.
"""
from __future__ import annotations

import pandas as pd
import torch

from ..core.data import Dataset
from ..core.training import Run

__all__ = ["explore", "VIEWS", "WHAT_IT_SHOWS"]

VIEWS = ("residual", "connectivity", "collapse", "growth", "grokking")
WHAT_IT_SHOWS = (
    "explore shows: a model (ours, or a Hugging Face model) with token ids or inputs, or a Run of a sequence "
    "model (the residual stream explorer); two models or Runs with their Dataset (interpolation and barriers); a "
    "classifier with its inputs and labels, or with its Dataset, a collapse Run or tracker (collapse geometry); "
    "a grown Run or the stage Runs of a growth group (growth stages); a grokking Run or its metrics (progress "
    "measures); interpolation curves from wb.lmc.compare (barriers)")


def _refuse(obj, why: str = "") -> ValueError:
    what = type(obj).__name__
    return ValueError(f"explore cannot show a {what}{': ' + why if why else ''}. {WHAT_IT_SHOWS}")


def _is_model(obj) -> bool:
    if not isinstance(obj, torch.nn.Module):
        return False
    from .. import hooks

    try:
        hooks.adapter(obj)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def _dataset(run: Run) -> Dataset:
    from ..core import data

    return data.from_spec(run.dataset)


def _family(model) -> str:
    from .. import hooks

    return hooks.adapter(model).family


def _residual(model, x, options):
    from .residual import ResidualExplorer

    keep = {k: options.pop(k) for k in ("vocab", "corrupt", "train_x", "stages") if k in options}
    _no_more(options, "the residual stream explorer")
    return ResidualExplorer.of(model, x, **keep)


def _no_more(options: dict, what: str) -> None:
    if options:
        raise ValueError(f"{what} takes no option {sorted(options)}")


def _collapse(model, x, y, options, table=None):
    from .views import CollapseView

    return CollapseView(model, x, y, table=table, **options)


def _kind(obj, others, options) -> str:
    """The explorer ``explore(obj, *others)`` calls for."""
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(r, Run) for r in obj):
        return "growth"
    if isinstance(obj, Run):
        from .views.growth import is_grown
        from .views.grokking import is_grokking_frame

        if others and isinstance(others[0], Run):
            return "connectivity"
        if is_grown(obj):
            return "growth"
        if "grok" in obj.meta or is_grokking_frame(obj.metrics):
            return "grokking"
        if "collapse" in obj.meta or _family(obj.model) == "mlp":
            return "collapse"
        return "residual"
    if isinstance(obj, pd.DataFrame):
        from .views.grokking import is_grokking_frame

        if is_grokking_frame(obj):
            return "grokking"
        if {"method", "alpha", "split", "loss"} <= set(obj.columns) or {"alpha", "split", "loss", "acc"} <= set(obj.columns):
            return "connectivity"
        if {"metric", "value", "site"} <= set(obj.columns):
            return "collapse"
        raise _refuse(obj, f"a DataFrame with columns {list(obj.columns)[:8]} is none of the frames it reads")
    from ..collapse import CollapseTracker

    if isinstance(obj, CollapseTracker):
        return "collapse"
    if _is_model(obj):
        if len(others) >= 2 and _is_model(others[0]):
            return "connectivity"
        if len(others) == 1 and isinstance(others[0], Dataset):
            return "collapse" if others[0].kind == "vector" else "residual"
        if len(others) == 2:
            return "collapse"
        if len(others) == 1 or "x" in options:
            return "residual"
        raise _refuse(obj, "give the model its input too: explore(model, token_ids), explore(model, x, y) or "
                           "explore(model, dataset)")
    raise _refuse(obj)


def explore(obj, *others, view: str | None = None, **options):
    """The explorer for ``obj`` (and ``others``), bound to them; ``view`` forces one of :data:`VIEWS`.

    - ``explore(model, x)``: the residual stream explorer (:class:`~workbench.ui.residual.ResidualExplorer`:
      layer and position sliders, the lens heat-map, a click on it intervenes there) on token ids ``x``
      ``(T,)`` or ``(B, T)`` (or vectors); ``vocab=``, ``corrupt=``, ``stages=`` as ``ResidualExplorer.of``.
      ``model`` is any model the hooks read: ours, or a Hugging Face GPT-2, Llama, ... in memory.
    - ``explore(model_a, model_b, dataset)`` or ``explore(run_a, run_b)``: interpolation curves and barriers
      (:class:`~workbench.ui.views.ConnectivityView`; ``methods=``, ``n_alphas=``, ``max_examples=``).
    - ``explore(model, x, y)``, ``explore(model, dataset)`` (vector data) or a collapse Run: the collapse
      geometry per layer (:class:`~workbench.ui.views.CollapseView`; ``max_samples=``); a ``CollapseTracker``
      or its table: NC1-NC4 over training.
    - a grown Run, or the stage Runs of one growth group: growth stages (:class:`~workbench.ui.views.GrowthView`).
    - a grokking Run or its metrics: the progress measures (:class:`~workbench.ui.views.GrokkingView`).
    - a Run of a sequence model: the residual stream explorer on ``examples`` (default 8) validation windows.

    Anything else is refused with a ``ValueError`` that says what it can show.
    """
    from ..core import checks
    from .views import ConnectivityView, GrokkingView, GrowthView

    kind = checks.check_choice("view", view, VIEWS) if view is not None else _kind(obj, others, options)
    if kind == "growth":
        _no_more(options, "the growth view")
        return GrowthView(obj)
    if kind == "grokking":
        _no_more(options, "the grokking view")
        frame = obj.metrics if isinstance(obj, Run) else obj
        from .views.grokking import is_grokking_frame

        if not is_grokking_frame(frame):
            raise _refuse(obj, "it holds no grokking progress measures")
        return GrokkingView(frame)
    if kind == "connectivity":
        if isinstance(obj, pd.DataFrame):
            _no_more(options, "the barrier view of given curves")
            v = ConnectivityView()
            v.show_curves(obj)
            return v
        if isinstance(obj, Run):
            if not others or not isinstance(others[0], Run):
                raise _refuse(obj, "interpolation needs two Runs (explore(run_a, run_b))")
            if obj.dataset != others[0].dataset:
                raise ValueError("the runs were trained on different data; interpolation compares two solutions "
                                 "of one task")
            return ConnectivityView(obj.model, others[0].model, others[1] if len(others) > 1 else _dataset(obj),
                                    **options)
        if len(others) != 2 or not isinstance(others[1], Dataset):
            raise _refuse(obj, "interpolation needs two models and their Dataset (explore(model_a, model_b, ds))")
        return ConnectivityView(obj, others[0], others[1], **options)
    if kind == "collapse":
        from ..collapse import CollapseTracker

        if isinstance(obj, CollapseTracker):
            _no_more(options, "the collapse view of a tracker")
            return _tracker_view(obj)
        if isinstance(obj, pd.DataFrame):
            _no_more(options, "the collapse view of a table")
            from .views import CollapseView

            return CollapseView(table=obj)
        if isinstance(obj, Run):
            ds = others[0] if others and isinstance(others[0], Dataset) else _dataset(obj)
            m = obj.metrics
            tracked = m[m["epoch"].notna()] if "epoch" in m and "site" in m else None
            return _collapse(obj.model, ds.x_train, ds.y_train, options, table=tracked)
        if len(others) == 1 and isinstance(others[0], Dataset):
            return _collapse(obj, others[0].x_train, others[0].y_train, options)
        if len(others) != 2:
            raise _refuse(obj, "the collapse view needs a classifier with its inputs and labels "
                               "(explore(model, x, y)) or its Dataset")
        return _collapse(obj, others[0], others[1], options)
    # residual
    if isinstance(obj, Run):
        ds = others[0] if others and isinstance(others[0], Dataset) else _dataset(obj)
        n = checks.check_int("examples", options.pop("examples", 8), 1, 256)
        options.setdefault("vocab", list(ds.vocab) if getattr(ds, "vocab", None) else None)
        return _residual(obj.model, ds.x_val[:n], options)
    if not _is_model(obj):
        raise _refuse(obj)
    if others and isinstance(others[0], Dataset):
        ds = others[0]
        n = checks.check_int("examples", options.pop("examples", 8), 1, 256)
        options.setdefault("vocab", list(ds.vocab) if getattr(ds, "vocab", None) else None)
        return _residual(obj, ds.x_val[:n], options)
    x = others[0] if others else options.pop("x")
    return _residual(obj, x, options)


def _tracker_view(tracker):
    """A :class:`~workbench.ui.views.CollapseView` of a ``CollapseTracker``: its table and its last record's
    class-mean geometry."""
    from .. import collapse
    from .views import CollapseView

    if tracker.latest is None:
        raise ValueError("the tracker has recorded nothing yet: train with it first (callbacks=[tracker])")
    v = CollapseView()
    latest = tracker.latest
    v.show_record(tracker.table, collapse.geometry(latest["means"], latest["classifier"]), counts=latest["counts"],
                  epoch=latest["epoch"])
    return v
