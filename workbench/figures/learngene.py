"""TLEG learngene figures (Xia et al. 2024): how linear in depth each block parameter is (r2 of the fit),
and descendants of each depth from one learngene against random initialisation. Tidy DataFrames in,
plotly Figures out."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["r2_bars", "expansion_curves"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.25))
_INIT_COLORS = {"learngene": "#2ca02c", "random": "#7f7f7f"}


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


@builder
def r2_bars(table: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``Learngene.table()``: r2 of ``W_l = W_base + (l/L) W_slope`` per block parameter."""
    fig = go.Figure()
    if table is None or not len(table):
        return _empty(fig.update_layout(height=320, **_LAYOUT), "no learngene fitted yet")
    fig.add_trace(go.Bar(x=table["param"].tolist(), y=table["r2"].tolist(), marker_color="#1f77b4",
                         text=[f"{v:.2f}" for v in table["r2"]], textposition="outside",
                         hovertext=[f"{n:,} values" for n in table["numel"]]))
    fig.update_layout(title=title or "how linear in depth the blocks are: r2 of the learngene fit per parameter",
                      yaxis=dict(title="r2", range=[min(0.0, float(table["r2"].min()) - 0.05), 1.1]),
                      height=320, **_LAYOUT)
    return fig


@builder
def expansion_curves(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``learngene.expansion`` table: validation accuracy and loss against depth, learngene vs random
    (mean over seeds; the loss at initialisation dotted)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation accuracy", "validation loss"),
                        horizontal_spacing=0.1)
    if df is None or not len(df):
        return _empty(fig.update_layout(height=340, **_LAYOUT), "no expansion experiment yet")
    mean = df.groupby(["init", "metric", "depth"], as_index=False)["value"].mean()
    for init, color in _INIT_COLORS.items():
        for col, metric, dash, suffix in ((1, "acc", None, ""), (2, "loss", None, ""),
                                          (2, "loss_at_init", "dot", " at init")):
            sel = mean[(mean["init"] == init) & (mean["metric"] == metric)].sort_values("depth")
            if len(sel):
                fig.add_trace(go.Scatter(x=sel["depth"].tolist(), y=sel["value"].tolist(), name=init + suffix,
                                         legendgroup=init, showlegend=col == 1 or bool(suffix),
                                         mode="lines+markers", line=dict(color=color, dash=dash)), row=1, col=col)
    fig.update_xaxes(title_text="depth of the descendant", dtick=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title or None, height=340, **_LAYOUT)
    return fig
