"""Training curves from a run's tidy metrics (step, split, metric, value)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["training_curves", "config_table"]

_COLORS = {"batch": "#bbbbbb", "train": "#1f77b4", "val": "#d62728"}


@builder
def training_curves(metrics: pd.DataFrame, title: str = "") -> go.Figure:
    """Loss (log scale) and accuracy against step: minibatch loss in grey, train and val evaluations."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"), horizontal_spacing=0.1)
    if metrics is not None and len(metrics):
        for split in ("batch", "train", "val"):
            sel = metrics[(metrics["split"] == split) & (metrics["metric"] == "loss")]
            if len(sel):
                fig.add_trace(go.Scatter(x=sel["step"], y=sel["value"], name=f"{split} loss", mode="lines",
                                         line=dict(color=_COLORS[split], width=1 if split == "batch" else 2)),
                              row=1, col=1)
        for split in ("train", "val"):
            sel = metrics[(metrics["split"] == split) & (metrics["metric"] == "acc")]
            if len(sel):
                fig.add_trace(go.Scatter(x=sel["step"], y=sel["value"], name=f"{split} acc", mode="lines+markers",
                                         line=dict(color=_COLORS[split])), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title or None, height=340, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=-0.25), template="plotly_white")
    return fig


def config_table(config: dict) -> pd.DataFrame:
    """A flat two-column view of nested config dicts (``model.d_model`` -> 128)."""
    rows = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            rows.append({"field": prefix, "value": "" if value is None else str(value)})

    walk("", config)
    return pd.DataFrame(rows)
