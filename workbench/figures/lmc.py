"""Connectivity figures: interpolation curves per alignment method, barrier table, layer-wise bars,
instability against spawn step, and the loss plane. Inputs are the tidy tables of :mod:`workbench.lmc`."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["connectivity_curves", "barrier_table", "layerwise_bars", "instability_plot", "plane_contour",
           "transport_map", "fusion_vs_reg", "layerwise_heatmap", "cumulative_barriers"]

METHOD_COLORS = {"none": "#7f7f7f", "weights": "#1f77b4", "activations": "#2ca02c", "repair": "#d62728"}
METHOD_LABELS = {"none": "no alignment", "weights": "weight matching", "activations": "activation matching",
                 "repair": "activation matching + REPAIR"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=40))


def _empty(title: str, height: int = 340) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=height, **_LAYOUT)
    fig.add_annotation(text="nothing computed yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


@builder
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


@builder
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


@builder
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


@builder
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


# ----------------------------------------------------------------------------- OT fusion and layer-wise LMC

FUSION_COLORS = {"A": "#7f7f7f", "B": "#bcbd22", "vanilla": "#d62728", "emd": "#1f77b4", "sinkhorn": "#2ca02c"}
ALIGN_DASH = {"none": "dot", "weights": "solid"}
ALIGN_LABELS = {"none": "before alignment", "weights": "after weight matching"}


@builder
def transport_map(coupling, name: str = "", title: str = "") -> go.Figure:
    """Heat-map of one coupling (rows: A's units, columns: B's units), scaled by ``n`` so that a hard
    (permutation) map has entries 0 and 1 and the uniform map ``1/n``."""
    if coupling is None or not len(coupling):
        return _empty(title or "transport map", 380)
    n = len(coupling)
    fig = go.Figure(go.Heatmap(z=[[float(v) * n for v in row] for row in coupling], colorscale="Blues",
                               zmin=0, zmax=1, colorbar=dict(title="n T")))
    fig.update_layout(title=title or f"transport map {name}".strip(), height=380, xaxis_title="unit of B",
                      yaxis_title="unit of A", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


@builder
def fusion_vs_reg(table: pd.DataFrame | None, metric: str = "loss", title: str = "") -> go.Figure:
    """Loss of the fused model against the Sinkhorn ``reg`` (log axis), with horizontal lines for
    vanilla averaging, EMD and the two parents (the table of :func:`workbench.lmc.fusion_curve`)."""
    if table is None or not len(table):
        return _empty(title or f"fused model {metric} against reg")
    fig = go.Figure()
    soft = table[table["method"] == "sinkhorn"].sort_values("reg")
    if len(soft):
        fig.add_trace(go.Scatter(x=soft["reg"], y=soft[metric], mode="lines+markers", name="Sinkhorn (soft)",
                                 line=dict(color=FUSION_COLORS["sinkhorn"])))
    labels = {"A": "parent A", "B": "parent B", "vanilla": "vanilla averaging", "emd": "EMD (hard)"}
    for method, label in labels.items():
        row = table[table["method"] == method]
        if len(row):
            fig.add_hline(y=float(row[metric].iloc[0]), line=dict(color=FUSION_COLORS[method], dash="dash"),
                          annotation_text=label, annotation_position="top left")
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label,
                                     line=dict(color=FUSION_COLORS[method], dash="dash")))
    fig.update_xaxes(type="log", title_text="Sinkhorn reg (soft <- large, hard <- small)")
    fig.update_layout(title=title or f"midpoint {metric} of the fused model", height=360, yaxis_title=metric,
                      legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


@builder
def layerwise_heatmap(curves: pd.DataFrame | None, base: str = "A", metric: str = "loss", title: str = "") -> go.Figure:
    """Layers x alpha heat-map of ``metric`` when only that layer moves (single-layer paths of
    :func:`workbench.lmc.layerwise_curves`), one panel per ``alignment`` (column optional)."""
    if curves is None or not len(curves):
        return _empty(title or f"layer-wise {metric}, base {base}", 360)
    sel = curves[(curves["base"] == base) & (curves["direction"] == "single")]
    if "alignment" not in sel:
        sel = sel.assign(alignment="none")
    aligns = list(dict.fromkeys(sel["alignment"]))
    if not aligns:
        return _empty(title or f"layer-wise {metric}, base {base}", 360)
    fig = make_subplots(rows=1, cols=len(aligns), subplot_titles=[ALIGN_LABELS.get(a, a) for a in aligns],
                        shared_yaxes=True, horizontal_spacing=0.08)
    zmin, zmax = float(sel[metric].min()), float(sel[metric].max())
    for i, al in enumerate(aligns):
        g = sel[sel["alignment"] == al]
        grid = g.pivot_table(index="group", columns="alpha", values=metric, sort=False)
        fig.add_trace(go.Heatmap(z=grid.values, x=[f"{a:.2f}" for a in grid.columns], y=list(grid.index),
                                 zmin=zmin, zmax=zmax, colorscale="Viridis", showscale=i == 0,
                                 colorbar=dict(title=metric)), row=1, col=i + 1)
    fig.update_xaxes(title_text=f"alpha (0 = {base})")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or f"{metric} with one layer interpolated, the rest from {base}", height=360,
                      **_LAYOUT)
    return fig


@builder
def cumulative_barriers(barriers: pd.DataFrame | None, estimate: pd.DataFrame | None = None,
                        metric: str = "loss", definition: str = "linear", base: str = "A",
                        title: str = "") -> go.Figure:
    """Barrier of the cumulative paths (layers ``1..k`` from the input, ``k..L`` from the output) against
    the layer ``k``, one line style per alignment, and the single-layer measured barrier with the
    first-order estimate as markers (``estimate``: :func:`workbench.lmc.barrier_estimate` rows, with an
    optional ``alignment`` column)."""
    if barriers is None or not len(barriers):
        return _empty(title or "cumulative layer-wise barriers")
    b = barriers[(barriers["metric"] == metric) & (barriers["definition"] == definition) & (barriers["base"] == base)]
    if "alignment" not in b:
        b = b.assign(alignment="none")
    fig = go.Figure()
    colors = {"from input": "#1f77b4", "from output": "#ff7f0e", "single": "#7f7f7f"}
    for (al, direction), g in b.groupby(["alignment", "direction"], sort=False):
        fig.add_trace(go.Scatter(x=g["group"], y=g["barrier"], mode="lines+markers",
                                 name=f"{direction} ({ALIGN_LABELS.get(al, al)})",
                                 line=dict(color=colors.get(direction), dash=ALIGN_DASH.get(al, "solid"))))
    if estimate is not None and len(estimate):
        est = estimate[estimate["group"] != "all"]
        if "alignment" not in est:
            est = est.assign(alignment="none")
        for al, g in est.groupby("alignment", sort=False):
            fig.add_trace(go.Scatter(x=g["group"], y=g["estimate"], mode="markers", name=f"first-order estimate "
                                     f"({ALIGN_LABELS.get(al, al)})", marker=dict(symbol="x", size=10,
                                                                                   color="#d62728")))
            fig.add_trace(go.Scatter(x=g["group"], y=g["midpoint"], mode="markers", name=f"single layer, measured "
                                     f"midpoint ({ALIGN_LABELS.get(al, al)})", marker=dict(symbol="circle-open",
                                                                                           size=10,
                                                                                           color="#d62728")))
    fig.update_layout(title=title or f"cumulative {metric} barrier ({definition}), base {base}", height=360,
                      xaxis_title="layer k", yaxis_title=f"{metric} barrier", legend=dict(orientation="h", y=-0.35),
                      **_LAYOUT)
    return fig
