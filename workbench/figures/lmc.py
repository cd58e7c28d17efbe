"""Connectivity figures: interpolation curves per alignment method, barrier table, layer-wise bars,
instability against spawn step, and the loss plane. Inputs are the tidy tables of :mod:`workbench.lmc`."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["connectivity_curves", "barrier_table", "layerwise_bars", "instability_plot", "plane_contour"]

METHOD_COLORS = {"none": "#7f7f7f", "weights": "#1f77b4", "activations": "#2ca02c", "repair": "#d62728"}
METHOD_LABELS = {"none": "no alignment", "weights": "weight matching", "activations": "activation matching",
                 "repair": "activation matching + REPAIR"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=40))


def _empty(title: str, height: int = 340) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=height, **_LAYOUT)
    fig.add_annotation(text="nothing computed yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def connectivity_curves(curves: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Loss and error against alpha: one colour per method (``method`` column, optional), solid val, dashed train."""
    if curves is None or not len(curves):
        return _empty(title or "interpolation curves")
    if "method" not in curves:
        curves = curves.assign(method="none")
    if "error" not in curves:
        curves = curves.assign(error=1 - curves["acc"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "error (1 - accuracy)"), horizontal_spacing=0.1)
    for method, g in curves.groupby("method", sort=False):
        for split, gs in g.groupby("split", sort=False):
            gs = gs.sort_values("alpha")
            style = dict(color=METHOD_COLORS.get(method), dash="solid" if split == "val" else "dash")
            name = f"{METHOD_LABELS.get(method, method)} ({split})"
            for col, metric in ((1, "loss"), (2, "error")):
                fig.add_trace(go.Scatter(x=gs["alpha"], y=gs[metric], mode="lines+markers", name=name,
                                         legendgroup=name, showlegend=col == 1, line=style, marker=dict(size=4)),
                              row=1, col=col)
    fig.update_xaxes(title_text="alpha (0 = A, 1 = B)")
    fig.update_layout(title=title or None, height=380, legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


def barrier_table(barriers: pd.DataFrame, split: str = "val") -> pd.DataFrame:
    """One row per method (or per curve) with the four barriers of ``split`` and where they peak."""
    b = barriers[barriers["split"] == split]
    index = [c for c in b.columns if c not in ("split", "metric", "definition", "barrier", "alpha")] or None
    wide = b.assign(col=b["metric"] + " / " + b["definition"].str.replace("_", " "))
    if index is None:
        wide = wide.assign(curve="A-B")
        index = ["curve"]
    table = wide.pivot_table(index=index, columns="col", values="barrier", sort=False)
    peak = wide[wide["definition"] == "linear"].pivot_table(index=index, columns="metric", values="alpha", sort=False)
    table = table.join(peak.add_prefix("peak alpha, "))
    if "method" in table.index.names:
        table = table.rename(index=METHOD_LABELS)
    return table.round(4).reset_index()


def layerwise_bars(layerwise: pd.DataFrame | None, metric: str = "loss", definition: str = "linear",
                   title: str = "") -> go.Figure:
    """Barrier when only one group is interpolated, the rest from A (and from B)."""
    if layerwise is None or not len(layerwise):
        return _empty(title or "layer-wise barriers")
    sel = layerwise[(layerwise["metric"] == metric) & (layerwise["definition"] == definition)]
    fig = go.Figure()
    for base, g in sel.groupby("base", sort=False):
        fig.add_trace(go.Bar(x=g["group"], y=g["barrier"], name=f"rest from {base}"))
    fig.update_layout(title=title or f"layer-wise {metric} barrier ({definition})", barmode="group", height=320,
                      yaxis_title=f"{metric} barrier", **_LAYOUT)
    return fig


def instability_plot(instability: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Error and loss barrier between two children against the step where they were spawned."""
    if instability is None or not len(instability):
        return _empty(title or "instability")
    df = instability.sort_values("spawn_step")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=df["spawn_step"], y=df["error_barrier"], name="error barrier", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=df["spawn_step"], y=df["loss_barrier"], name="loss barrier", mode="lines+markers",
                             line=dict(dash="dot")), secondary_y=True)
    fig.add_hline(y=0.02, line=dict(color="#999", dash="dash"), annotation_text="2% (Frankle: stable below)")
    fig.update_xaxes(title_text="spawn step k")
    fig.update_yaxes(title_text="error barrier", secondary_y=False)
    fig.update_yaxes(title_text="loss barrier", secondary_y=True)
    fig.update_layout(title=title or "instability: barrier between children spawned at step k", height=320,
                      **_LAYOUT)
    return fig


def plane_contour(plane, title: str = "") -> go.Figure:
    """Contour of the loss over the plane through three models (a :class:`workbench.lmc.Plane`)."""
    if plane is None:
        return _empty(title or "loss plane", 420)
    grid = plane.grid.pivot(index="y", columns="x", values="loss")
    fig = go.Figure(go.Contour(x=grid.columns, y=grid.index, z=grid.values, colorscale="Viridis",
                               colorbar=dict(title="loss"), contours=dict(coloring="heatmap")))
    fig.add_trace(go.Scatter(x=plane.points["x"], y=plane.points["y"], text=plane.points["name"],
                             mode="markers+text", textposition="top center", marker=dict(color="white", size=9,
                             line=dict(color="black", width=1)), textfont=dict(color="white"), showlegend=False))
    fig.update_layout(title=title or f"{plane.split} loss over the plane through A, B, C", height=420,
                      xaxis_title="along B - A", yaxis_title="orthogonal, towards C", **_LAYOUT)
    fig.update_yaxes(scaleanchor="x", scaleratio=1)
    return fig
