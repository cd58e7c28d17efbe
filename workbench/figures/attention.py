"""Attention figures from the tidy frames of :mod:`workbench.attention`. Pure: DataFrame -> plotly Figure.

- :func:`pattern_figure`: the pattern viewer, query tokens (rows) x key tokens (columns), one head at a
  time behind a head menu, the weight on hover (plotly only: no CircuitsVis, nothing from a CDN);
- :func:`score_map`: heads x layers heat-map of one head-type score (or one panel per score);
- :func:`scores_across`: a score across growth stages or training checkpoints, the best head of each layer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["pattern_figure", "score_map", "scores_across"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=70, r=20, t=60, b=60))
_SHOW = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}


def _empty(title: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title or None, height=height, **_LAYOUT,
                      annotations=[dict(text="no data yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                                        yref="paper", font=dict(color="#888"))])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _axis_labels(frame: pd.DataFrame, position: str, token: str, n: int) -> list[str]:
    """Unique labels ``"3:a"`` per position (the same token at two positions stays two labels)."""
    names = {}
    if token in frame:
        names = dict(zip(frame[position].astype(int), frame[token].astype(str)))
    return [f"{i}:{''.join(_SHOW.get(c, c) for c in names[i])}" if i in names else str(i) for i in range(n)]


@builder
def pattern_figure(frame: pd.DataFrame | None, title: str = "") -> go.Figure:
    """The attention pattern viewer: query (y, top to bottom) x key (x) per head, a menu to pick the head.

    ``frame``: :meth:`workbench.attention.Pattern.frame` (``layer, head, query, key, query_token,
    key_token, weight``); future keys (above the diagonal) are left blank."""
    if frame is None or not len(frame):
        return _empty(title or "Attention pattern", 360)
    layer = int(frame["layer"].iloc[0])
    n = int(max(frame["query"].max(), frame["key"].max())) + 1
    ylab = _axis_labels(frame, "query", "query_token", n)
    xlab = _axis_labels(frame, "key", "key_token", n)
    heads = sorted(int(h) for h in frame["head"].unique())
    fig = go.Figure()
    for i, h in enumerate(heads):
        sub = frame[frame["head"] == h]
        z = np.full((n, n), np.nan)
        z[sub["query"].to_numpy(int), sub["key"].to_numpy(int)] = sub["weight"].to_numpy(float)
        fig.add_trace(go.Heatmap(z=z, x=xlab, y=ylab, zmin=0.0, zmax=1.0, colorscale="Blues", visible=(i == 0),
                                 name=f"head {h}", colorbar=dict(title="weight"),
                                 hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra>head " + str(h)
                                 + "</extra>"))
    buttons = [dict(label=f"head {h}", method="update",
                    args=[{"visible": [j == i for j in range(len(heads))]},
                          {"title": (title or f"Attention pattern, layer {layer}") + f", head {h}"}])
               for i, h in enumerate(heads)]
    fig.update_layout(title=(title or f"Attention pattern, layer {layer}") + f", head {heads[0]}",
                      height=min(900, max(360, 120 + 18 * n)), **_LAYOUT,
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.12,
                                        yanchor="top", showactive=True)])
    fig.update_xaxes(title_text="key (attended to)", type="category", tickangle=-60)
    fig.update_yaxes(title_text="query (attending)", type="category", autorange="reversed")
    return fig


def _map(df: pd.DataFrame) -> tuple[np.ndarray, list[int], list[int]]:
    grid = df.pivot_table(index="layer", columns="head", values="value", aggfunc="mean").sort_index()
    return grid.to_numpy(float), [int(i) for i in grid.index], [int(c) for c in grid.columns]


@builder
def score_map(scores: pd.DataFrame | None, kind: str | None = None, title: str = "") -> go.Figure:
    """Heads (x) x layers (y) heat-map of the ``kind`` score (``None``: one panel per score kind).

    ``scores``: :func:`workbench.attention.head_scores` (``layer, head, score_kind, value``)."""
    if scores is None or not len(scores):
        return _empty(title or "Head-type scores", 320)
    kinds = list(dict.fromkeys(scores["score_kind"])) if kind is None else [kind]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True,
                        horizontal_spacing=0.04 if len(kinds) > 1 else 0.1)
    n_layers = 1
    for c, k in enumerate(kinds, start=1):
        z, layers, heads = _map(scores[scores["score_kind"] == k])
        n_layers = max(n_layers, len(layers))
        fig.add_trace(go.Heatmap(z=z, x=[str(h) for h in heads], y=[str(l) for l in layers], zmin=0.0, zmax=1.0,
                                 colorscale="Viridis", showscale=(c == len(kinds)), name=k,
                                 colorbar=dict(title="score"),
                                 hovertemplate="layer %{y}, head %{x}<br>" + k + " %{z:.3f}<extra></extra>"),
                      row=1, col=c)
        fig.update_xaxes(title_text="head", type="category", row=1, col=c)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    fig.update_layout(title=title or ("Head-type scores" if kind is None else f"{kind} score per head"),
                      height=max(260, 100 + 28 * n_layers), **_LAYOUT)
    return fig


@builder
def scores_across(frame: pd.DataFrame | None, kind: str = "induction", column: str | None = None,
                  title: str = "") -> go.Figure:
    """The ``kind`` score across stages or checkpoints: one line per layer, the best head of that layer
    at each stage (named on hover); layers absent at a stage (before a growth) have no point there.

    ``frame``: :func:`workbench.attention.head_scores_across`; ``column``: its stage column (default:
    the first of ``stage``, ``step``, ``label`` present)."""
    if frame is None or not len(frame):
        return _empty(title or f"{kind} score across stages", 320)
    if column is None:
        column = next(c for c in ("stage", "step", "label") if c in frame)
    sub = frame[frame["score_kind"] == kind]
    order = list(dict.fromkeys(frame[column]))
    fig = go.Figure()
    for layer in sorted(int(l) for l in sub["layer"].unique()):
        rows = sub[sub["layer"] == layer]
        best = rows.loc[rows.groupby(column, sort=False)["value"].idxmax()]
        best = best.set_index(column).reindex([s for s in order if s in set(best[column])])
        fig.add_trace(go.Scatter(x=[str(s) for s in best.index], y=best["value"], mode="lines+markers",
                                 name=f"layer {layer}", customdata=best["head"].astype(int),
                                 hovertemplate=f"{column} %{{x}}<br>layer {layer}, head %{{customdata}}<br>{kind} "
                                               "%{y:.3f}<extra></extra>"))
    fig.update_xaxes(title_text=column, type="category", categoryorder="array",
                     categoryarray=[str(s) for s in order])
    fig.update_yaxes(title_text=f"{kind} score (best head)", range=[0, 1.05])
    fig.update_layout(title=title or f"{kind} score across {column}s: the best head of each layer", height=340,
                      **_LAYOUT)
    return fig
