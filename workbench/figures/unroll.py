"""Shallow-unrolling figures (Bermeitinger et al. 2023): the gap against depth, the deep / unrolled /
fine-tuned bars and the two layouts retrained at equal parameters. Tidy DataFrames in, plotly Figures out."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["gap_curve", "compare_bars", "layout_bars"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.25))
_GAP_LINES = {"gap": ("gap E||y - y_par|| / E||y - x0||", "#d62728"),
              "second_order": ("second-order term E||S2|| / E||y - x0||", "#1f77b4"),
              "second_order_share": ("share of the gap explained by S2", "#2ca02c")}
_ACC_LINES = {"acc_deep": ("deep (sequential) prefix", "#7f7f7f"), "acc_parallel": ("first-order (parallel)", "#ff7f0e")}
_MODEL_COLORS = {"deep": "#7f7f7f", "unrolled": "#ff7f0e", "unrolled + fine-tuned": "#2ca02c"}


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


@builder
def gap_curve(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``unroll.gap`` table: the gap and second-order terms against depth (left), accuracy of the readout
    reading the deep and the first-order stream (right, when labels were given)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("distance from the first-order model", "accuracy"),
                        horizontal_spacing=0.1)
    if df is None or not len(df):
        return _empty(fig.update_layout(height=340, **_LAYOUT), "no gap measured yet")
    for col, lines in ((1, _GAP_LINES), (2, _ACC_LINES)):
        for metric, (name, color) in lines.items():
            sel = df[df["metric"] == metric].sort_values("depth")
            if len(sel):
                fig.add_trace(go.Scatter(x=sel["depth"].tolist(), y=sel["value"].tolist(), name=name,
                                         mode="lines+markers", line=dict(color=color)), row=1, col=col)
    fig.update_xaxes(title_text="depth prefix (blocks)", dtick=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title or None, height=340, **_LAYOUT)
    return fig


@builder
def compare_bars(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``unroll.compare`` table: validation accuracy and loss of deep, unrolled, unrolled + fine-tuned."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation accuracy", "validation loss"))
    if df is None or not len(df):
        return _empty(fig.update_layout(height=320, **_LAYOUT), "no comparison yet")
    for col, metric in ((1, "acc"), (2, "loss")):
        sel = df[df["metric"] == metric]
        fig.add_trace(go.Bar(x=sel["model"].tolist(), y=sel["value"].tolist(), showlegend=False,
                             marker_color=[_MODEL_COLORS.get(m, "#999999") for m in sel["model"]],
                             text=[f"{v:.3f}" for v in sel["value"]], textposition="outside"), row=1, col=col)
    fig.update_layout(title=title or None, height=320, **_LAYOUT)
    return fig


@builder
def layout_bars(df: pd.DataFrame | None, metric: str = "loss", title: str = "") -> go.Figure:
    """``unroll.compare_layouts`` table: mean (and each seed) of a validation metric per layout."""
    fig = go.Figure()
    if df is None or not len(df):
        return _empty(fig.update_layout(height=300, **_LAYOUT), "no layouts trained yet")
    sel = df[df["metric"] == metric]
    stats = sel.groupby("layout")["value"].agg(["mean", "std"]).reindex(["sequential", "parallel"]).dropna(how="all")
    fig.add_trace(go.Bar(x=stats.index.tolist(), y=stats["mean"].tolist(), name="mean over seeds",
                         error_y=dict(type="data", array=stats["std"].fillna(0).tolist()),
                         marker_color=["#7f7f7f", "#ff7f0e"][:len(stats)]))
    fig.add_trace(go.Scatter(x=sel["layout"].tolist(), y=sel["value"].tolist(), mode="markers", name="seeds",
                             marker=dict(color="black", size=6)))
    fig.update_layout(title=title or f"validation {metric}, both layouts retrained at equal parameters",
                      yaxis_title=f"validation {metric}", height=300, **_LAYOUT)
    return fig
