"""Figures for composed models: the domain-by-model table as a heat-map, per-token gate weights, the cosine
matrix of task vectors, accuracy against a merge's knob and against the number of sequentially merged tasks."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .safe import builder

__all__ = ["domain_heatmap", "gate_weights", "cosine_matrix", "knob_curve", "sequential_curve"]

_SCALES = {"loss": "RdYlGn_r", "acc": "RdYlGn"}  # green is good in both


@builder
def domain_heatmap(table: pd.DataFrame | None, metric: str = "loss", title: str = "") -> go.Figure:
    """Heat-map of ``metric`` for every model (rows: specialists, then merges, then references) on every domain.

    ``table``: tidy ``model, role, domain, metric, value`` as from ``compose.evaluate``. Cells carry
    their value; green is better (low loss, high accuracy).
    """
    fig = go.Figure()
    if table is not None and len(table):
        sel = table[table["metric"] == metric]
        order = {"specialist": 0, "merge": 1, "reference": 2}
        models = (sel.drop_duplicates("model").assign(_o=lambda d: d["role"].map(order).fillna(3))
                  .sort_values("_o", kind="stable"))
        rows = [f"{m} ({r})" for m, r in zip(models["model"], models["role"])]
        domains = list(dict.fromkeys(sel["domain"]))
        grid = sel.pivot_table(index="model", columns="domain", values="value").reindex(
            index=list(models["model"]), columns=domains)
        fmt = ".3f" if metric == "acc" else ".2f"
        fig.add_trace(go.Heatmap(z=grid.values, x=domains, y=rows, colorscale=_SCALES.get(metric, "Viridis"),
                                 text=[[format(v, fmt) for v in row] for row in grid.values],
                                 texttemplate="%{text}", colorbar=dict(title=metric),
                                 hovertemplate="%{y}<br>domain %{x}<br>" + metric + " %{z:.4f}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or f"validation {metric}: model x domain", template="plotly_white",
                      height=max(260, 60 + 34 * (0 if table is None else table["model"].nunique())),
                      margin=dict(l=160, r=20, t=50, b=40), xaxis_title="domain")
    return fig


@builder
def gate_weights(weights: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Stacked bars: the weight of each member at each position of a text.

    ``weights``: tidy ``position, token, member, weight`` (as from ``compose.gate_table``).
    """
    fig = go.Figure()
    if weights is not None and len(weights):
        positions = sorted(weights["position"].unique())
        labels = weights.drop_duplicates("position").set_index("position")["token"].reindex(positions)
        ticks = [f"{p}:{t!r}"[:8] for p, t in zip(positions, labels)]
        for member, part in weights.groupby("member", sort=False):
            part = part.set_index("position").reindex(positions)
            fig.add_trace(go.Bar(x=ticks, y=part["weight"], name=str(member)))
    fig.update_layout(barmode="stack", title=title or "gate: weight of each member per token", height=300,
                      template="plotly_white", yaxis=dict(range=[0, 1], title="weight"),
                      margin=dict(l=50, r=20, t=50, b=60), legend=dict(orientation="h", y=-0.3))
    return fig


@builder
def cosine_matrix(table: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Heat-map of the cosine of every pair of task vectors (tidy ``a, b, cosine`` from ``compose.task_cosines``)."""
    fig = go.Figure()
    if table is not None and len(table):
        names = list(dict.fromkeys(table["a"]))
        grid = table.pivot_table(index="a", columns="b", values="cosine").reindex(index=names, columns=names)
        fig.add_trace(go.Heatmap(z=grid.values, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu_r",
                                 text=[[format(v, ".2f") for v in row] for row in grid.values],
                                 texttemplate="%{text}", colorbar=dict(title="cosine"),
                                 hovertemplate="%{y} . %{x}<br>cosine %{z:.4f}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "cosine of task vectors", template="plotly_white", height=340,
                      margin=dict(l=120, r=20, t=50, b=60))
    return fig


@builder
def knob_curve(table: pd.DataFrame | None, metric: str = "acc", title: str = "") -> go.Figure:
    """``metric`` on each domain, and their mean (thick), against a merge's knob (tidy table of ``compose.sweep``)."""
    fig = go.Figure()
    knob = "knob"
    if table is not None and len(table):
        sel = table[table["metric"] == metric]
        knob = str(sel["knob"].iloc[0]) if len(sel) else knob
        for domain, part in sel.groupby("domain", sort=False):
            part = part.sort_values("x")
            fig.add_trace(go.Scatter(x=part["x"], y=part["value"], mode="lines+markers", name=str(domain)))
        mean = sel.groupby("x", sort=True)["value"].mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines", name="mean", line=dict(width=4)))
    fig.update_layout(title=title or f"validation {metric} against {knob}", template="plotly_white", height=320,
                      xaxis_title=knob, yaxis_title=metric, margin=dict(l=50, r=20, t=50, b=40))
    return fig


@builder
def sequential_curve(table: pd.DataFrame | None, metric: str = "acc", title: str = "") -> go.Figure:
    """Mean ``metric`` over the tasks seen so far against the number of merged tasks, one line per method.

    ``table``: tidy ``method, n_tasks, task, metric, value`` (``compose.sequential``, methods concatenated).
    """
    fig = go.Figure()
    if table is not None and len(table):
        sel = table[table["metric"] == metric]
        for method, part in sel.groupby("method", sort=False):
            mean = part.groupby("n_tasks", sort=True)["value"].mean()
            fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name=str(method)))
    fig.update_layout(title=title or f"mean {metric} on the tasks seen so far", template="plotly_white",
                      height=320, xaxis=dict(title="number of tasks merged", dtick=1), yaxis_title=metric,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig
