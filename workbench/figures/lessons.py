"""Lesson figures for the Teacher page: the class's predictions against the measured outcome.

Input: a tidy frame with ``kind`` (``"prediction"`` or ``"outcome"``) and ``value`` (numbers, or the
choices of a choice question), one row per student and kind (:func:`workbench.lessons.summary` gives the
two parts). No torch, no Panel, no I/O.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .safe import builder

__all__ = ["predictions_histogram"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=60, b=45), height=300)


def _numeric(values: pd.Series) -> bool:
    return len(values) > 0 and pd.to_numeric(values, errors="coerce").notna().all() and \
        not values.map(lambda v: isinstance(v, bool)).any()


@builder
def predictions_histogram(frame: pd.DataFrame | None, title: str = "Predictions against the outcome",
                          unit: str = "", categorical: bool = False) -> go.Figure:
    """Histogram of the predictions, the measured outcome as a vertical line (its median over the students
    who measured it; the line's label says how many). ``categorical``: the answers are choices (bars per
    choice, the most frequent outcome marked)."""
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=unit or "value", yaxis_title="students", **_LAYOUT)
    if frame is None or not len(frame):
        fig.add_annotation(text="no predictions yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        return fig
    preds = frame.loc[frame["kind"] == "prediction", "value"].dropna()
    outs = frame.loc[frame["kind"] == "outcome", "value"].dropna()
    numeric = not categorical and _numeric(pd.concat([preds, outs]))
    if numeric:
        fig.add_trace(go.Histogram(x=pd.to_numeric(preds), name="predictions", nbinsx=20,
                                   marker_color="rgba(31,119,180,0.75)"))
    else:
        counts = preds.astype(str).value_counts().sort_index()
        cats = sorted(set(counts.index) | set(outs.astype(str)))
        fig.add_trace(go.Bar(x=cats, y=[int(counts.get(c, 0)) for c in cats], name="predictions",
                             marker_color="rgba(31,119,180,0.75)"))
        fig.update_xaxes(type="category")
    if len(outs):
        if numeric:
            at = float(pd.to_numeric(outs).median())
            label = f"measured: {at:.3g}"
        else:
            top = outs.astype(str).mode().iloc[0]
            at, label = cats.index(top), f"measured: {top}"
        fig.add_shape(type="line", x0=at, x1=at, y0=0, y1=1, yref="paper", line=dict(color="crimson", width=3))
        fig.add_annotation(x=at, y=1, yref="paper", yanchor="bottom", showarrow=False, font=dict(color="crimson"),
                           text=f"{label} ({len(outs)} student{'s' * (len(outs) != 1)})")
    fig.update_layout(showlegend=False, bargap=0.05)
    return fig
