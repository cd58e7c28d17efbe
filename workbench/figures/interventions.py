"""Figures of one intervention on the Residual stream page: how the output distribution changes per token.

Pure ``DataFrame -> plotly``; the tables come from :func:`workbench.residual.erase` (``output``:
``position, kl, l2``) and :func:`workbench.residual.skip_effects` (``output`` rows of one skipped layer,
with the position it was skipped from).
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .residual import token_labels
from .safe import builder

__all__ = ["output_change_figure"]


@builder
def output_change_figure(df: pd.DataFrame | None, tokens: list[str] | None = None, title: str = "") -> go.Figure:
    """KL(p || p') and ||p - p'||_2 of the output distribution at each position (grouped bars)."""
    title = title or "Change of the output distribution"
    fig = go.Figure()
    if df is None or not len(df):
        fig.update_layout(title=title, height=340, annotations=[dict(
            text="click a cell of the logit-lens heat-map to intervene there", showarrow=False,
            xref="paper", yref="paper", x=0.5, y=0.5)], xaxis_visible=False, yaxis_visible=False)
        return fig
    n = int(df["position"].max()) + 1
    labels = token_labels(tokens, n)
    x = [labels[int(p)] if int(p) < len(labels) else str(int(p)) for p in df["position"]]
    for column, name in (("kl", "KL(p || p')"), ("l2", "||p - p'||_2")):
        if column in df:
            fig.add_bar(x=x, y=df[column], name=name,
                        hovertemplate="%{x}<br>" + name + " %{y:.4f}<extra></extra>")
    fig.update_layout(title=title, height=340, barmode="group", xaxis_title="token", yaxis_title="change",
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig
