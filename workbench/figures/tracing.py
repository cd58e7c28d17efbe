"""Causal-tracing and attribution-patching figures from the frames of :mod:`workbench.tracing`. Pure: DataFrame -> plotly.

- :func:`trace_heatmap`: ROME's picture, positions (rows, the subject starred) x layers, coloured by the
  answer's probability with one state restored, ``p_corrupt`` at the bottom of the scale;
- :func:`patching_comparison`: exact patching, AtP and AtP-IG side by side on one grid, the rank
  correlation with the exact recovery in each panel's title.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["trace_heatmap", "patching_comparison"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=80, r=20, t=60, b=50))
_KIND = {"resid": ("Purples", "the residual leaving the layer"), "mlp": ("Greens", "MLP outputs around the layer"),
         "attn": ("Reds", "attention outputs around the layer")}
_METHODS = {"exact": "exact patching", "atp": "AtP (first order)", "ig": "AtP-IG (integrated gradients)"}


def _empty(title: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title or None, height=height, **_LAYOUT,
                      annotations=[dict(text="no data yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                                        yref="paper", font=dict(color="#888"))])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _labels(tokens, n: int, subject=None) -> list[str]:
    show = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
    out = []
    for i in range(n):
        name = str(tokens[i]) if tokens is not None and i < len(tokens) else ""
        star = "*" if subject is not None and subject[0] <= i < subject[1] else ""
        out.append(f"{i}:{''.join(show.get(c, c) for c in name)}{star}" if name else f"{i}{star}")
    return out


@builder
def trace_heatmap(frame: pd.DataFrame | None, tokens: list[str] | None = None, subject=None, title: str = "",
                  answer: str | None = None) -> go.Figure:
    """Causal trace: position (y, top to bottom, subject positions starred) x layer (x), colour = the answer's
    probability with that state restored, from ``p_corrupt`` up. ``frame``: :meth:`workbench.tracing.Trace.frame`
    (``position, layer, prob, effect, kind, clean, corrupt``); ``tokens``/``subject``: ``Trace.tokens`` / ``.subject``."""
    if frame is None or not len(frame):
        return _empty(title or "Causal trace", 340)
    kind = str(frame["kind"].iloc[0]) if "kind" in frame else "resid"
    scale, what = _KIND.get(kind, _KIND["resid"])
    grid = frame.pivot_table(index="position", columns="layer", values="prob", aggfunc="mean").sort_index()
    n = int(grid.index.max()) + 1
    grid = grid.reindex(range(n))
    effect = frame.pivot_table(index="position", columns="layer", values="effect", aggfunc="mean").reindex(range(n))
    low = float(frame["corrupt"].iloc[0]) if "corrupt" in frame else float(np.nanmin(grid.to_numpy()))
    high = float(frame["clean"].iloc[0]) if "clean" in frame else float(np.nanmax(grid.to_numpy()))
    p = f"p({answer})" if answer else "p(answer)"
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(float), x=[str(c) for c in grid.columns], y=_labels(tokens, n, subject),
        customdata=effect.to_numpy(float), colorscale=scale, zmin=low, zmax=max(high, float(np.nanmax(grid.to_numpy()))),
        colorbar=dict(title=p),
        hovertemplate="position %{y}<br>layer %{x}<br>" + p + " %{z:.4f}<br>indirect effect %{customdata:+.4f}"
                      "<extra></extra>"))
    fig.update_xaxes(title_text=f"layer (restored: {what})", type="category")
    fig.update_yaxes(title_text="position", type="category", autorange="reversed")
    fig.update_layout(title=title or f"Causal trace: restoring {what} (clean {high:.3f}, corrupt {low:.3f})",
                      height=max(300, 90 + 24 * n), **_LAYOUT)
    return fig


@builder
def patching_comparison(grid: pd.DataFrame | None, correlation: pd.DataFrame | None = None, site: str | None = None,
                        tokens: list[str] | None = None, title: str = "") -> go.Figure:
    """Exact patching beside AtP and AtP-IG for one ``site``: layer (y) x position (x) per method, one shared
    colour scale centred on 0, Spearman's rho with the exact recovery in the estimates' titles.

    ``grid`` / ``correlation``: :class:`workbench.tracing.PatchingComparison` ``.grid`` and ``.correlation``."""
    if grid is None or not len(grid):
        return _empty(title or "Patching: exact and attribution estimates", 340)
    site = site or str(grid["site"].iloc[0])
    sub = grid[grid["site"] == site]
    methods = [m for m in _METHODS if m in set(sub["method"])]
    rho = {}
    if correlation is not None and len(correlation):
        c = correlation[correlation["site"] == site]
        rho = dict(zip(c["method"], c["spearman"]))
    names = [_METHODS[m] + (f"<br>Spearman rho {rho[m]:.3f}" if m in rho and np.isfinite(rho[m]) else "")
             for m in methods]
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=names, shared_yaxes=True, horizontal_spacing=0.03)
    vmax = float(np.nanmax(np.abs(sub["recovery"].to_numpy(float)))) if sub["recovery"].notna().any() else 1.0
    n = int(sub["position"].max()) + 1
    for c, m in enumerate(methods, start=1):
        g = sub[sub["method"] == m].pivot_table(index="layer", columns="position", values="recovery",
                                                aggfunc="mean").sort_index()
        fig.add_trace(go.Heatmap(z=g.to_numpy(float), x=_labels(tokens, n)[:g.shape[1]], y=[str(i) for i in g.index],
                                 colorscale="RdBu", zmid=0.0, zmin=-vmax, zmax=vmax, showscale=(c == len(methods)),
                                 colorbar=dict(title="recovery"), name=m,
                                 hovertemplate="layer %{y}<br>position %{x}<br>recovery %{z:.4f}<extra>" + m
                                               + "</extra>"), row=1, col=c)
        fig.update_xaxes(title_text="position", type="category", row=1, col=c)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    n_layers = sub["layer"].nunique()
    fig.update_layout(title=title or f"Patching at {site}: exact and its attribution estimates",
                      height=max(300, 130 + 26 * n_layers), **_LAYOUT)
    return fig
