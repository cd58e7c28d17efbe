"""Grokking figures: train/val loss on log axes with the three phases shaded, the Fourier heat-map of
the embedding over training, the progress measures over steps, and the training-fraction threshold.

Inputs are a grokking run's tidy metrics (``workbench.grokking.run(...).metrics``), its phases dict
(``workbench.grokking.phases``) and the threshold table (``workbench.grokking.tian_threshold``).
No torch, no Panel, no I/O.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["loss_curves", "fourier_heatmap", "fourier_spectrum", "measure_curves", "threshold_curve", "PHASE_COLOURS"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=60, b=40))
PHASE_COLOURS = {"memorisation": "rgba(31,119,180,0.10)", "circuit formation": "rgba(255,127,14,0.12)",
                 "clean-up": "rgba(44,160,44,0.12)"}


def _empty(title: str, height: int = 360) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=height, **_LAYOUT)
    fig.add_annotation(text="nothing recorded yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _phase_spans(phases: dict | None) -> list[tuple[str, float, float]]:
    if not phases:
        return []
    end = phases.get("end") or 0
    mem, clean, grok = phases.get("memorised"), phases.get("cleanup"), phases.get("grokked")
    spans = []
    if mem is not None:
        spans.append(("memorisation", 1, mem))
        stop = clean if clean is not None else end
        spans.append(("circuit formation", mem, stop))
        if clean is not None:
            spans.append(("clean-up", clean, grok if grok is not None else end))
    return [(n, a, b) for n, a, b in spans if b > a]


@builder
def loss_curves(metrics: pd.DataFrame | None, phases: dict | None = None,
                title: str = "Grokking: train and validation loss") -> go.Figure:
    """Train/val loss (log-log, steps from 1) and accuracy, the phases shaded (``phases`` from the engine)."""
    if metrics is None or not len(metrics):
        return _empty(title, 460)
    m = metrics[metrics["split"].isin(["train", "val"]) & metrics["metric"].isin(["loss", "acc"])]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    colours = {"train": "#1f77b4", "val": "#d62728"}
    for col, metric in ((1, "loss"), (2, "acc")):
        for split in ("train", "val"):
            s = m[(m["metric"] == metric) & (m["split"] == split)].sort_values("step")
            fig.add_trace(go.Scatter(x=s["step"].clip(lower=1), y=s["value"], mode="lines", name=f"{split} {metric}",
                                     line=dict(color=colours[split], dash="solid" if metric == "loss" else "dot")),
                          row=1, col=col)
    for name, a, b in _phase_spans(phases):
        for col in (1, 2):
            fig.add_vrect(x0=max(a, 1), x1=b, fillcolor=PHASE_COLOURS[name], line_width=0, row=1, col=col,
                          annotation_text=name if col == 1 else None, annotation_position="top left")
    fig.update_xaxes(type="log", title="step")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title, height=460, **_LAYOUT)
    return fig


@builder
def fourier_heatmap(metrics: pd.DataFrame | None, title: str = "Fourier norms of the embedding") -> go.Figure:
    """Heat-map: frequency k (rows) x measured step (columns), colour the norm of frequency k in ``W_E``."""
    if metrics is None or not len(metrics):
        return _empty(title, 420)
    m = metrics[(metrics["split"] == "measure") & metrics["metric"].str.startswith("fourier_")]
    if not len(m):
        return _empty(title, 420)
    m = m.assign(k=m["metric"].str.slice(8).astype(int))
    grid = m.pivot_table(index="k", columns="step", values="value").sort_index()
    fig = go.Figure(go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), colorscale="Viridis",
                               colorbar=dict(title="norm")))
    fig.update_layout(title=title, height=420, xaxis_title="step", yaxis_title="frequency k", **_LAYOUT)
    return fig


@builder
def fourier_spectrum(metrics: pd.DataFrame | None, step: int | None = None, title: str = "") -> go.Figure:
    """Bars: the norm of each frequency k of the embedding at the measured ``step`` (default the last), the
    key frequencies of that step (``key_rank_r`` rows) in orange."""
    title = title or "Fourier norms of the embedding" + ("" if step is None else f" at step {step}")
    if metrics is None or not len(metrics):
        return _empty(title, 320)
    m = metrics[metrics["split"] == "measure"]
    if step is None and len(m):
        step = int(m["step"].max())
    m = m[m["step"] == step]
    norms = m[m["metric"].str.startswith("fourier_")]
    if not len(norms):
        return _empty(title, 320)
    k = norms["metric"].str.slice(8).astype(int)
    keys = {int(v) for v in m[m["metric"].str.startswith("key_rank_")]["value"]}
    fig = go.Figure(go.Bar(x=k.tolist(), y=norms["value"].tolist(), name="norm",
                           marker=dict(color=["#ff7f0e" if f in keys else "#1f77b4" for f in k])))
    fig.update_layout(title=title, height=320, xaxis_title="frequency k (orange: key frequencies)",
                      yaxis_title="norm", showlegend=False, **_LAYOUT)
    return fig


_MEASURES = [("restricted_loss", "restricted loss (key frequencies only, all pairs)", 1),
             ("excluded_loss", "excluded loss (key frequencies removed, train)", 1),
             ("sum_sq_weights", "sum of squared weights", 2)]


@builder
def measure_curves(metrics: pd.DataFrame | None, phases: dict | None = None,
                   title: str = "Progress measures") -> go.Figure:
    """Restricted and excluded loss (log y) and the sum of squared weights against step, phases shaded."""
    if metrics is None or not len(metrics):
        return _empty(title, 420)
    m = metrics[metrics["split"] == "measure"]
    if not len(m):
        return _empty(title, 420)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("losses", "weights"))
    for metric, label, col in _MEASURES:
        s = m[m["metric"] == metric].sort_values("step")
        fig.add_trace(go.Scatter(x=s["step"], y=s["value"], mode="lines+markers", name=label), row=1, col=col)
    tr = metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")].sort_values("step")
    fig.add_trace(go.Scatter(x=tr["step"], y=tr["value"], mode="lines", name="train loss",
                             line=dict(color="#7f7f7f", dash="dot")), row=1, col=1)
    for name, a, b in _phase_spans(phases):
        for col in (1, 2):
            fig.add_vrect(x0=a, x1=b, fillcolor=PHASE_COLOURS[name], line_width=0, row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title="step")
    fig.update_layout(title=title, height=420, **_LAYOUT)
    return fig


@builder
def threshold_curve(table: pd.DataFrame | None, critical: float = 2.75, reported: dict | None = None,
                    title: str = "Test accuracy against n / (M ln M)") -> go.Figure:
    """Test (and train) accuracy against the ratio, the critical line at ``critical``; ``reported``
    ``{ratio: accuracy}`` drawn as markers (Tian's numbers)."""
    if table is None or not len(table):
        return _empty(title, 380)
    t = table.sort_values("ratio")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=t["ratio"], y=t["test_acc"], mode="lines+markers", name="test accuracy (here)"))
    if "train_acc" in t:
        fig.add_trace(go.Scatter(x=t["ratio"], y=t["train_acc"], mode="lines+markers", name="train accuracy",
                                 line=dict(dash="dot")))
    if reported:
        fig.add_trace(go.Scatter(x=list(reported), y=list(reported.values()), mode="markers", name="Tian 2025",
                                 marker=dict(symbol="x", size=10)))
    fig.add_vline(x=critical, line_dash="dash", annotation_text=f"critical {critical:g}")
    fig.update_layout(title=title, height=380, xaxis_title="n / (M ln M)", yaxis_title="accuracy",
                      yaxis_range=[-0.02, 1.02], **_LAYOUT)
    return fig
