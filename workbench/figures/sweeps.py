"""Sweep figures: a metric against one grid key, mean over seeds with its spread, one line per another key.

Inputs are the tidy tables of :func:`workbench.sweeps.run` (``point, <grid keys>, [task columns],
metric, value, status, error``). :func:`summarize` is the table behind every figure (mean, std,
min, max and count per x and line); :func:`metric_plot` draws it; :func:`barrier_vs_width`,
:func:`nc_vs_epochs` and :func:`flops_to_loss` are the three presets (barrier against width before
and after alignment, NC1 against epochs, FLOPs-to-loss grown against scratch). Pure: no torch, no
Panel, no I/O.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from .safe import builder

__all__ = ["summarize", "metric_plot", "barrier_vs_width", "nc_vs_epochs", "flops_to_loss", "SPREADS"]

SPREADS = ("minmax", "std", "none")
_BOOKKEEPING = ("point", "metric", "value", "status", "error")
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=45))
_PALETTE = plotly.colors.qualitative.Plotly


def _empty(title: str, note: str = "nothing computed yet", height: int = 360) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=height, **_LAYOUT)
    fig.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def summarize(df: pd.DataFrame, x: str, metric: str, color: str | None = None, over: str = "seed",
              where: dict | None = None, statuses=("done",)) -> pd.DataFrame:
    """Mean, std, min, max and n of ``metric`` per ``x`` (and ``color``), over ``over`` (the seeds).

    Rows: those of ``metric`` whose ``status`` is in ``statuses`` and whose value is finite, after
    ``where`` (``{column: value}``) filters. Every other column that still varies within one
    (x, color) group -- another grid key -- is refused with a message (fix it with ``where`` or
    draw it as ``color``), so different settings are never averaged together unawares.
    Columns: ``[color], x, mean, std, min, max, n`` (``std`` is 0 for a single value).
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a DataFrame from sweeps.run, got {type(df).__name__}")
    missing = [c for c in ("metric", "value") if c not in df]
    for name, col in (("x", x), ("color", color)):
        if col is not None and col not in df:
            missing.append(col)
    if missing:
        raise ValueError(f"df has no column(s) {missing}; its columns: {list(df.columns)}")
    if color is not None and color == x:
        raise ValueError(f"color and x must be different columns, got {x!r} twice")
    sel = df[df["metric"] == metric]
    if "status" in sel and statuses is not None:
        sel = sel[sel["status"].isin(list(statuses))]
    for col, value in (where or {}).items():
        if col not in df:
            raise ValueError(f"where: df has no column {col!r}; its columns: {list(df.columns)}")
        sel = sel[sel[col] == value]
    sel = sel[np.isfinite(sel["value"].to_numpy(dtype=float))]
    keys = [c for c in (color, x) if c is not None]
    out_cols = keys + ["mean", "std", "min", "max", "n"]
    if sel.empty:
        return pd.DataFrame(columns=out_cols)
    others = [c for c in sel.columns if c not in (*_BOOKKEEPING, *keys, over)]
    for col in others:
        varying = sel.groupby(keys, dropna=False)[col].nunique(dropna=False)
        if (varying > 1).any():
            raise ValueError(f"column {col!r} takes several values within one point of the plot; fix it with "
                             f"where={{{col!r}: ...}} or draw it as color={col!r}")
    g = sel.groupby(keys, sort=False, dropna=False)["value"]
    out = g.agg(mean="mean", std="std", min="min", max="max", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    if pd.api.types.is_numeric_dtype(out[x]):
        out = out.sort_values(keys, kind="stable")
    return out[out_cols].reset_index(drop=True)


@builder
def metric_plot(df: pd.DataFrame | None, x: str, metric: str, color: str | None = None, *, spread: str = "minmax",
                over: str = "seed", where: dict | None = None, title: str | None = None, log_x: bool = False,
                log_y: bool = False, labels: dict | None = None) -> go.Figure:
    """``metric`` against ``x``: the mean over ``over`` (seeds) as a line with markers, the spread as a
    band (``"minmax"``: min to max; ``"std"``: mean +- one standard deviation; ``"none"``), one line
    per value of ``color``. Hover shows mean, spread and the number of seeds behind each point."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {list(SPREADS)}, got {spread!r}")
    title = title or f"{metric} against {x}" + (f" by {color}" if color else "")
    if df is None or not len(df):
        return _empty(title)
    table = summarize(df, x, metric, color, over, where)
    if table.empty:
        return _empty(title, f"no finished points with a finite {metric}")
    labels = labels or {}
    fig = go.Figure()
    groups = table.groupby(color, sort=False, dropna=False) if color else [(None, table)]
    for i, (key, g) in enumerate(groups):
        colour = _PALETTE[i % len(_PALETTE)]
        name = labels.get(key, f"{color} = {key}" if color else metric)
        xs = g[x].tolist()
        if spread != "none" and (g["n"] > 1).any():
            lo = g["min"] if spread == "minmax" else g["mean"] - g["std"]
            hi = g["max"] if spread == "minmax" else g["mean"] + g["std"]
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi.tolist() + lo.tolist()[::-1], fill="toself",
                                     fillcolor=colour, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=str(name), name=f"{name} spread"))
        fig.add_trace(go.Scatter(
            x=xs, y=g["mean"].tolist(), mode="lines+markers", name=str(name), legendgroup=str(name),
            line=dict(color=colour), marker=dict(size=6),
            customdata=np.stack([g["min"], g["max"], g["std"], g["n"]], axis=1),
            hovertemplate=(f"{x} = %{{x}}<br>mean %{{y:.4g}}<br>min %{{customdata[0]:.4g}}, max "
                           f"%{{customdata[1]:.4g}}, std %{{customdata[2]:.3g}}<br>n = %{{customdata[3]}}"
                           f"<extra>{name}</extra>")))
    n = table["n"]
    note = f"mean over {over}s ({int(n.min())}" + (f"-{int(n.max())}" if n.max() != n.min() else "") + " each)"
    if spread != "none":
        note += "; band: " + ("min to max" if spread == "minmax" else "mean +- 1 std")
    fig.update_layout(title=dict(text=title, subtitle=dict(text=note)), height=380, xaxis_title=x,
                      yaxis_title=metric, legend=dict(orientation="h", y=-0.2), **_LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


@builder
def barrier_vs_width(df: pd.DataFrame | None, width: str = "d_model", metric: str = "loss_barrier",
                     **kwargs) -> go.Figure:
    """The ``"barrier"`` sweep: the barrier against ``width``, one line before and one after weight matching."""
    return metric_plot(df, width, metric, color="alignment", title=f"{metric.replace('_', ' ')} against {width}",
                       labels={"none": "no alignment", "weights": "weight matching"}, **kwargs)


@builder
def nc_vs_epochs(df: pd.DataFrame | None, metric: str = "nc1", color: str | None = None, **kwargs) -> go.Figure:
    """The ``"collapse"`` sweep: an NC metric against epochs (log scale), one line per ``color`` (a grid key)."""
    kwargs.setdefault("log_y", metric == "nc1")
    return metric_plot(df, "epoch", metric, color=color, title=f"{metric} against epochs", **kwargs)


@builder
def flops_to_loss(df: pd.DataFrame | None, x: str, metric: str = "flops_to_target", **kwargs) -> go.Figure:
    """The ``"grow"`` sweep: FLOPs to reach scratch's final loss against ``x``, grown against scratch."""
    kwargs.setdefault("log_y", True)
    return metric_plot(df, x, metric, color="method", title=f"FLOPs to reach scratch's final loss against {x}",
                       labels={"grown": "grown", "scratch": "from scratch"}, **kwargs)
