"""Depth-lab figures from the tidy tables of :mod:`workbench.depthlab` and :mod:`workbench.earlyexit`.

Pure: DataFrame in, plotly Figure out (no torch). Each builder takes the table its engine function returns.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["angular_heatmap", "rankings_figure", "prune_heal_figure", "strategies_figure", "oracle_histogram",
           "depth_profile_figure", "exit_curve_figure", "effective_depth_figure"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=60, b=45))
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
METHOD_COLORS = {"block_influence": "#1f77b4", "angular": "#ff7f0e", "skip": "#2ca02c", "random": "#7f7f7f"}
METHOD_NAMES = {"block_influence": "Block Influence (ShortGPT)", "angular": "angular distance (Gromov)",
                "skip": "skip effect (ours)", "random": "random"}
PROFILE_TITLES = {"resid_norm": "residual norm ||h_l||", "norm_growth": "norm growth ||h_l+1|| / ||h_l||",
                  "cos_in_out": "cos(h_l, h_l+1)", "rel_norm": "relative contribution",
                  "jac_dev": "||J_l - I|| (sampled)", "skip_l2": "output change when skipped"}


def _empty(title: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title or None, height=height, **_LAYOUT,
                      annotations=[dict(text="no data yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                                        yref="paper", font=dict(color="#888"))])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


@builder
def angular_heatmap(angular: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``Similarity.angular`` / ``Rankings.angular`` (``start, n, distance``): the n x l heat-map of Gromov et al.,
    the smallest distance of each span length marked (the span a pruning of ``n`` blocks would cut)."""
    title = title or "Angular distance d(h_l, h_l+n) / pi: which span of n blocks changes the stream least"
    if angular is None or not len(angular):
        return _empty(title, 360)
    grid = angular.pivot(index="n", columns="start", values="distance").sort_index()
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[int(c) for c in grid.columns], y=[int(r) for r in grid.index],
                               colorscale="Viridis", zmin=0, colorbar=dict(title="distance"),
                               hovertemplate="blocks %{x} .. %{x}+%{y}-1<br>distance %{z:.3f}<extra></extra>"))
    best = angular.loc[angular.groupby("n")["distance"].idxmin()]
    fig.add_trace(go.Scatter(x=best["start"].tolist(), y=best["n"].tolist(), mode="markers", name="smallest per n",
                             marker=dict(symbol="x", size=10, color="white", line=dict(color="black", width=1))))
    fig.update_xaxes(title_text="first block of the span (l)", dtick=1)
    fig.update_yaxes(title_text="blocks in the span (n)", dtick=1)
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig


@builder
def rankings_figure(table: pd.DataFrame | None, correlation: pd.DataFrame | None = None, title: str = "") -> go.Figure:
    """``Rankings.table`` (``layer, method, score, rank``): one panel per method, the score per block with its
    rank above the bar (0 = first to remove); the Spearman correlations in the title."""
    title = title or "Layer rankings side by side (rank 0: the first block a pruning removes)"
    if table is None or not len(table):
        return _empty(title, 320)
    methods = list(dict.fromkeys(table["method"]))
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[METHOD_NAMES.get(m, m) for m in methods],
                        horizontal_spacing=0.07)
    for j, m in enumerate(methods):
        sel = table[table["method"] == m].sort_values("layer")
        fig.add_trace(go.Bar(x=sel["layer"].tolist(), y=sel["score"].tolist(), showlegend=False,
                             marker_color=METHOD_COLORS.get(m, _color(j)),
                             text=[f"#{int(r)}" for r in sel["rank"]], textposition="outside"), row=1, col=j + 1)
        fig.update_xaxes(title_text="block", dtick=1, row=1, col=j + 1)
    if correlation is not None and len(correlation):
        pairs = "; ".join(f"{a} vs {b}: {v:+.2f}" if np.isfinite(v) else f"{a} vs {b}: n/a"
                          for a, b, v in correlation[["method_a", "method_b", "spearman"]].itertuples(index=False))
        title = f"{title}<br>Spearman: {pairs}"
    fig.update_layout(title=title, height=340, **_LAYOUT)
    return fig


@builder
def prune_heal_figure(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``prune_heal_curve`` table: accuracy (left) and loss (right) against the fraction of blocks removed, one
    colour per ranking, dashed after healing."""
    title = title or "Prune, then heal: accuracy and loss against the fraction of blocks removed"
    if df is None or not len(df):
        return _empty(title, 360)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation accuracy", "validation loss"),
                        horizontal_spacing=0.1)
    for j, method in enumerate(dict.fromkeys(df["method"])):
        for healed in (False, True):
            sel = df[(df["method"] == method) & (df["healed"] == healed)].sort_values("fraction")
            if not len(sel):
                continue
            name = METHOD_NAMES.get(method, method) + (", healed" if healed else "")
            line = dict(color=METHOD_COLORS.get(method, _color(j)), dash="dash" if healed else "solid")
            for col, metric in ((1, "acc"), (2, "loss")):
                fig.add_trace(go.Scatter(x=sel["fraction"].tolist(), y=sel[metric].tolist(), mode="lines+markers",
                                         name=name, legendgroup=name, showlegend=col == 1, line=line,
                                         text=sel["removed"].tolist(),
                                         hovertemplate="removed %{text}<br>%{y:.3f}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="fraction of blocks removed", range=[-0.02, 1.0])
    fig.update_layout(title=title, height=380, legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


@builder
def strategies_figure(df: pd.DataFrame | None, metric: str = "acc", title: str = "") -> go.Figure:
    """``strategies`` table: ``metric`` per strategy (groups) and span (bars), the model's own order as a line."""
    title = title or f"Execution strategies: {metric} per strategy and span"
    if df is None or not len(df):
        return _empty(title, 360)
    fig = go.Figure()
    full = df[df["strategy"] == "full"]
    rest = df[df["strategy"] != "full"]
    spans = list(dict.fromkeys(f"{s}..{s + n - 1}" for s, n in zip(rest["start"], rest["n"])))
    for j, span in enumerate(spans):
        sel = rest[[f"{s}..{s + n - 1}" == span for s, n in zip(rest["start"], rest["n"])]]
        fig.add_trace(go.Bar(x=sel["strategy"].tolist(), y=sel[metric].tolist(), name=f"blocks {span}",
                             marker_color=_color(j), text=sel["order"].tolist(),
                             hovertemplate="%{x}, order %{text}<br>" + metric + " %{y:.3f}<extra></extra>"))
    if len(full):
        fig.add_hline(y=float(full[metric].iloc[0]), line_dash="dash", line_color="#444",
                      annotation_text="own order", annotation_position="top left")
    fig.update_layout(title=title, barmode="group", height=380, yaxis_title=metric,
                      legend=dict(orientation="h", y=-0.2), **_LAYOUT)
    return fig


@builder
def oracle_histogram(hist: pd.DataFrame | None, n_layers: int | None = None, title: str = "") -> go.Figure:
    """``Oracle.histogram()`` (``hops, oracle_length, count, share``): the share of examples per oracle length,
    one bar colour per hop count (``-1``: no chain answers it, drawn as "none")."""
    title = title or "Oracle depth per example: the shortest chain of blocks that still answers, by hops"
    if hist is None or not len(hist):
        return _empty(title, 340)
    fig = go.Figure()
    lengths = sorted(set(int(v) for v in hist["oracle_length"]))
    labels = {v: ("none" if v < 0 else str(v)) for v in lengths}
    for j, hops in enumerate(sorted(set(hist["hops"]))):
        sel = hist[hist["hops"] == hops].set_index("oracle_length")
        fig.add_trace(go.Bar(x=[labels[v] for v in lengths],
                             y=[float(sel["share"].get(v, 0.0)) for v in lengths], name=f"{hops} hops",
                             marker_color=_color(j)))
    if n_layers is not None:
        fig.add_annotation(text=f"full depth: {n_layers} blocks", x=1, y=1.08, xref="paper", yref="paper",
                           showarrow=False, xanchor="right")
    fig.update_xaxes(title_text="oracle length (block applications)", type="category",
                     categoryarray=[labels[v] for v in lengths])
    fig.update_layout(title=title, barmode="group", height=340, yaxis_title="share of examples", **_LAYOUT)
    return fig


@builder
def depth_profile_figure(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """``depth_profile`` table(s) (``layer, metric, value`` and an optional ``model`` column): one panel per
    measure against the layer, one line per model (e.g. Pre-LN against LayerNorm Scaling)."""
    title = title or "The curse of depth, layer by layer"
    if df is None or not len(df):
        return _empty(title, 420)
    metrics = [m for m in PROFILE_TITLES if m in set(df["metric"])]
    cols = 3
    rows = -(-len(metrics) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[PROFILE_TITLES[m] for m in metrics],
                        horizontal_spacing=0.08, vertical_spacing=0.18)
    models = list(dict.fromkeys(df["model"])) if "model" in df else [None]
    for j, model in enumerate(models):
        sub = df if model is None else df[df["model"] == model]
        for i, metric in enumerate(metrics):
            sel = sub[sub["metric"] == metric].sort_values("layer")
            fig.add_trace(go.Scatter(x=sel["layer"].tolist(), y=sel["value"].tolist(), mode="lines+markers",
                                     name=str(model) if model is not None else metric, legendgroup=str(model),
                                     showlegend=i == 0 and model is not None, line=dict(color=_color(j))),
                          row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(title=title, height=260 * rows + 80, legend=dict(orientation="h", y=-0.12), **_LAYOUT)
    return fig


@builder
def exit_curve_figure(curves: pd.DataFrame | None, acceptance: pd.DataFrame | None = None,
                      title: str = "") -> go.Figure:
    """``exit_curve`` table(s) (``exit, acc, loss`` and an optional ``recipe`` column) on the left; with
    ``acceptance`` (``acceptance_curve`` tables, same optional column) the acceptance rate on the right."""
    title = title or "Early exit: accuracy when stopping after e blocks, and self-speculation's acceptance"
    if curves is None or not len(curves):
        return _empty(title, 340)
    both = acceptance is not None and len(acceptance)
    fig = make_subplots(rows=1, cols=2 if both else 1, horizontal_spacing=0.1,
                        subplot_titles=("accuracy at exit e", "draft tokens accepted") if both else None)
    recipes = list(dict.fromkeys(curves["recipe"])) if "recipe" in curves else [None]
    for j, rec in enumerate(recipes):
        sel = (curves if rec is None else curves[curves["recipe"] == rec]).sort_values("exit")
        name = str(rec) if rec is not None else "accuracy"
        fig.add_trace(go.Scatter(x=sel["exit"].tolist(), y=sel["acc"].tolist(), mode="lines+markers", name=name,
                                 legendgroup=name, line=dict(color=_color(j))), row=1, col=1)
        if both:
            acc = acceptance if rec is None or "recipe" not in acceptance else acceptance[acceptance["recipe"] == rec]
            acc = acc.sort_values("exit")
            fig.add_trace(go.Scatter(x=acc["exit"].tolist(), y=acc["acceptance"].tolist(), mode="lines+markers",
                                     name=name, legendgroup=name, showlegend=False, line=dict(color=_color(j)),
                                     text=[f"{v:.2f} tokens per verifying forward" for v in acc["tokens_per_verify"]],
                                     hovertemplate="exit %{x}: %{y:.3f}<br>%{text}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="exit after e blocks", dtick=1)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(title=title, height=340, legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


@builder
def effective_depth_figure(df: pd.DataFrame | None, x: str = "stage", title: str = "") -> go.Figure:
    """``effective_depth_stages`` table (or any table with ``n_layers``, ``effective_depth``, ``ratio`` and
    column ``x``): the effective depth and the depth (left), the ratio ``D / L`` (right)."""
    title = title or "Effective depth: where the blocks stop feeding later blocks"
    if df is None or not len(df):
        return _empty(title, 320)
    sel = df.sort_values(x)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("blocks", "effective-depth ratio D / L"),
                        horizontal_spacing=0.1)
    fig.add_trace(go.Scatter(x=sel[x].tolist(), y=sel["n_layers"].tolist(), mode="lines+markers", name="depth L",
                             line=dict(color="#7f7f7f")), row=1, col=1)
    fig.add_trace(go.Scatter(x=sel[x].tolist(), y=sel["effective_depth"].tolist(), mode="lines+markers",
                             name="effective depth D", line=dict(color="#1f77b4")), row=1, col=1)
    fig.add_trace(go.Scatter(x=sel[x].tolist(), y=sel["ratio"].tolist(), mode="lines+markers", name="D / L",
                             line=dict(color="#d62728")), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text=x)
    fig.update_layout(title=title, height=320, legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig
