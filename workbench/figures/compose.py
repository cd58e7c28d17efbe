"""Figures for composed models: the domain-by-model table as a heat-map, and per-token gate weights."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

__all__ = ["domain_heatmap", "gate_weights"]

_SCALES = {"loss": "RdYlGn_r", "acc": "RdYlGn"}  # green is good in both


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
