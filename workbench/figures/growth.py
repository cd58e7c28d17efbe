"""Growth figures: loss against step or training FLOPs with stage boundaries, the block strip,
grown-vs-scratch, and accuracy against depth. Tidy DataFrames in, plotly Figures out."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["stage_boundaries", "growth_curves", "block_strip", "compare_curves", "depth_sweep_figure", "glyph_grid",
           "eta_trace", "width_depth_timeline"]

_SPLIT_COLORS = {"batch": "#c7c7c7", "train": "#1f77b4", "val": "#d62728"}
_METHOD_COLORS = {"grown": "#2ca02c", "scratch": "#7f7f7f"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.22))


def stage_boundaries(metrics: pd.DataFrame, x: str = "step") -> pd.DataFrame:
    """Where each stage after the first begins: columns ``stage, op, n_layers, step, flops``."""
    if metrics is None or not len(metrics) or "stage" not in metrics.columns:
        return pd.DataFrame(columns=["stage", "op", "n_layers", "step", "flops"])
    cols = [c for c in ("stage", "op", "n_layers", "step", "flops") if c in metrics.columns]
    first = metrics.sort_values(["step"]).groupby("stage", as_index=False).first()[cols]
    return first[first["stage"] > first["stage"].min()].reset_index(drop=True)


def _add_boundaries(fig, metrics, x, rows_cols):
    b = stage_boundaries(metrics)
    if x not in b.columns:
        return
    for r in b.itertuples():
        label = f"{getattr(r, 'op', '')} -> {int(r.n_layers)}" if hasattr(r, "n_layers") else f"stage {r.stage}"
        for row, col in rows_cols:
            fig.add_vline(x=getattr(r, x), line=dict(color="#999999", dash="dot", width=1), row=row, col=col)
        fig.add_annotation(x=getattr(r, x), y=1.0, yref="paper", text=label, showarrow=False, font=dict(size=10),
                           xanchor="left", yanchor="bottom", row=1, col=1)


@builder
def growth_curves(metrics: pd.DataFrame, x: str = "step", title: str = "") -> go.Figure:
    """Loss (log) and accuracy against ``x`` (``"step"`` or ``"flops"``), stage boundaries dotted."""
    if x not in ("step", "flops"):
        raise ValueError(f"x must be 'step' or 'flops', got {x!r}")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"), horizontal_spacing=0.1)
    if metrics is not None and len(metrics) and x in metrics.columns:
        for split in ("batch", "train", "val"):
            sel = metrics[(metrics["split"] == split) & (metrics["metric"] == "loss")].sort_values(["step", x])
            if len(sel):
                fig.add_trace(go.Scatter(x=sel[x].tolist(), y=sel["value"].tolist(), name=f"{split} loss",
                                         mode="lines", line=dict(color=_SPLIT_COLORS[split],
                                                                 width=1 if split == "batch" else 2)), row=1, col=1)
        for split in ("train", "val"):
            sel = metrics[(metrics["split"] == split) & (metrics["metric"] == "acc")].sort_values(["step", x])
            if len(sel):
                fig.add_trace(go.Scatter(x=sel[x].tolist(), y=sel["value"].tolist(), name=f"{split} acc",
                                         mode="lines+markers", line=dict(color=_SPLIT_COLORS[split])), row=1, col=2)
        _add_boundaries(fig, metrics, x, [(1, 1), (1, 2)])
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="training FLOPs" if x == "flops" else "step")
    fig.update_layout(title=title or None, height=340, **_LAYOUT)
    return fig


def _fmt(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.3g}{unit}"
    return f"{int(n)}"


@builder
def block_strip(blocks: pd.DataFrame, title: str = "") -> go.Figure:
    """The model as a strip of boxes, embedding -> blocks -> head; frozen parts shaded.

    ``blocks``: :func:`workbench.growth.block_table` (``layer, part, params, trainable_params,
    frozen, gate``). Each box shows its parameter count; a fading block shows its gate.
    """
    fig = go.Figure()
    if blocks is not None and len(blocks):
        labels, colors, texts, hover = [], [], [], []
        for r in blocks.itertuples():
            name = {"embed": "embed", "head": "head"}.get(r.part, f"block {int(r.layer)}")
            labels.append(name)
            frozen = bool(r.frozen)
            gate = getattr(r, "gate", 1.0)
            colors.append("#b0b7c3" if frozen else ("#9ecae1" if gate is not None and gate < 1 else "#3182bd"))
            t = _fmt(r.params)
            if gate is not None and not (isinstance(gate, float) and math.isnan(gate)) and gate < 1:
                t += f"<br>m={gate:.2f}"
            texts.append(t + ("<br>frozen" if frozen else ""))
            hover.append(f"{name}: {int(r.params):,} params, {int(r.trainable_params):,} trainable")
        fig.add_trace(go.Bar(x=labels, y=[1] * len(labels), marker=dict(color=colors, line=dict(color="white", width=2)),
                             text=texts, textposition="inside", insidetextanchor="middle", hovertext=hover,
                             hoverinfo="text", showlegend=False))
    fig.update_yaxes(visible=False, range=[0, 1])
    fig.update_layout(title=title or None, height=150, bargap=0.05, template="plotly_white",
                      margin=dict(l=20, r=20, t=40 if title else 10, b=30))
    return fig


@builder
def compare_curves(metrics: pd.DataFrame, target_loss: float | None = None, title: str = "") -> go.Figure:
    """Validation loss against training FLOPs for grown and scratch (``method`` column), target dashed."""
    fig = go.Figure()
    if metrics is not None and len(metrics):
        for method, g in metrics.groupby("method", sort=False):
            sel = g[(g["split"] == "val") & (g["metric"] == "loss")].sort_values(["flops", "step"])
            fig.add_trace(go.Scatter(x=sel["flops"].tolist(), y=sel["value"].tolist(), name=str(method),
                                     mode="lines+markers", line=dict(color=_METHOD_COLORS.get(method))))
        grown = metrics[metrics["method"] == "grown"] if "method" in metrics else metrics
        for r in stage_boundaries(grown).itertuples():
            fig.add_vline(x=r.flops, line=dict(color=_METHOD_COLORS["grown"], dash="dot", width=1))
    if target_loss is not None and math.isfinite(target_loss):
        fig.add_hline(y=target_loss, line=dict(color="black", dash="dash", width=1),
                      annotation_text="scratch final val loss", annotation_position="top right")
    fig.update_yaxes(type="log", title_text="validation loss")
    fig.update_xaxes(title_text="training FLOPs")
    fig.update_layout(title=title or None, height=340, **_LAYOUT)
    return fig


@builder
def depth_sweep_figure(sweep: pd.DataFrame, metric: str = "acc", split: str = "val", title: str = "") -> go.Figure:
    """``metric`` against depth, one line per task (mean over seeds, seeds as markers)."""
    fig = go.Figure()
    if sweep is not None and len(sweep):
        sel = sweep[(sweep["metric"] == metric) & (sweep["split"] == split)]
        for task, g in sel.groupby("task", sort=False):
            mean = g.groupby("depth", as_index=False)["value"].mean()
            fig.add_trace(go.Scatter(x=mean["depth"].tolist(), y=mean["value"].tolist(), mode="lines+markers",
                                     name=str(task)))
    fig.update_xaxes(title_text="depth (blocks)", dtick=1)
    fig.update_yaxes(title_text=f"{split} {metric}", range=[0, 1.02] if metric == "acc" else None)
    fig.update_layout(title=title or None, height=340, legend_title_text="task", **_LAYOUT)
    return fig


@builder
def glyph_grid(images, labels, columns: int = 12, title: str = "") -> go.Figure:
    """Glyph bitmaps ``(V, H, W)`` (e.g. :func:`workbench.models.glyph_images`) as a grid of small images."""
    import numpy as np

    images = np.asarray(images, dtype=float)
    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    h, w = images.shape[1:] if n else (1, 1)
    canvas = np.full((rows * (h + 2), cols * (w + 2)), np.nan)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    fig = go.Figure(go.Heatmap(z=canvas[::-1].tolist(), colorscale="Greys", showscale=False, hoverinfo="skip"))
    for i, label in enumerate(labels):
        r, c = divmod(i, cols)
        fig.add_annotation(x=c * (w + 2) + w / 2, y=(rows - r) * (h + 2) - 1, text=repr(label)[1:-1] or " ",
                           showarrow=False, font=dict(size=9, color="#d62728"), yanchor="bottom")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(title=title or None, height=max(160, 70 * rows + 40), template="plotly_white",
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


@builder
def eta_trace(trace: pd.DataFrame, tau: float | None = None, title: str = "") -> go.Figure:
    """The natural expansion score at every check of ``grow(criterion="natural")``.

    ``trace``: :func:`workbench.growth.trace_table` (``step, candidate, op, eta, eta_new, eta_ratio,
    accepted``). Left: ``eta`` of the model against step (log), with the accepted proposals' ``eta'`` as
    stars. Right: every proposal's ``eta'/eta`` (circles rejected, stars accepted, coloured by operation)
    against step, ``tau`` dashed.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("eta = g^T F^-1 g", "proposals: eta' / eta"),
                        horizontal_spacing=0.12)
    colors = {"add_layer": "#1f77b4", "widen": "#ff7f0e"}
    if trace is not None and len(trace):
        base = trace.groupby("step", as_index=False)["eta"].first().sort_values("step")
        fig.add_trace(go.Scatter(x=base["step"].tolist(), y=base["eta"].tolist(), mode="lines+markers", name="eta",
                                 line=dict(color="#333333")), row=1, col=1)
        acc = trace[trace["accepted"].astype(bool)]
        if len(acc):
            fig.add_trace(go.Scatter(x=acc["step"].tolist(), y=acc["eta_new"].tolist(), mode="markers",
                                     name="eta' accepted", marker=dict(symbol="star", size=13, color="#2ca02c"),
                                     text=acc["candidate"].tolist(), hovertemplate="%{text}: %{y:.4g}"),
                          row=1, col=1)
        for op, g in trace.groupby("op", sort=False):
            for accepted, sel in g.groupby(g["accepted"].astype(bool)):
                fig.add_trace(go.Scatter(
                    x=sel["step"].tolist(), y=sel["eta_ratio"].tolist(), mode="markers",
                    name=f"{op} {'accepted' if accepted else 'rejected'}", text=sel["candidate"].tolist(),
                    hovertemplate="%{text}: eta'/eta = %{y:.4g}",
                    marker=dict(symbol="star" if accepted else "circle-open", size=13 if accepted else 8,
                                color=colors.get(op, "#7f7f7f"))), row=1, col=2)
    if tau is not None and math.isfinite(tau):
        fig.add_hline(y=tau, line=dict(color="black", dash="dash", width=1), annotation_text=f"tau = {tau:g}",
                      annotation_position="top left", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title or None, height=340, **_LAYOUT)
    return fig


@builder
def width_depth_timeline(timeline: pd.DataFrame, title: str = "") -> go.Figure:
    """Depth (blocks) and total MLP width (hidden units over all blocks) against step, as steps.

    ``timeline``: :func:`workbench.growth.timeline_table` (``stage, op, step, n_layers, width``).
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if timeline is not None and len(timeline):
        t = timeline.sort_values("step")
        ops = [f"{o}" for o in t["op"]]
        fig.add_trace(go.Scatter(x=t["step"].tolist(), y=t["n_layers"].tolist(), mode="lines+markers",
                                 line=dict(shape="hv", color="#1f77b4"), name="depth (blocks)", text=ops,
                                 hovertemplate="step %{x}: %{y} blocks (%{text})"), secondary_y=False)
        fig.add_trace(go.Scatter(x=t["step"].tolist(), y=t["width"].tolist(), mode="lines+markers",
                                 line=dict(shape="hv", color="#ff7f0e", dash="dot"), name="width (hidden units)",
                                 text=ops, hovertemplate="step %{x}: %{y} units (%{text})"), secondary_y=True)
    fig.update_yaxes(title_text="blocks", rangemode="tozero", dtick=1, secondary_y=False)
    fig.update_yaxes(title_text="hidden units", rangemode="tozero", secondary_y=True)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title or None, height=300, **_LAYOUT)
    return fig
