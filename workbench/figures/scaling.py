"""Scaling-law figures: points and the fitted ``a x^-alpha + c`` on log-log axes, with the bootstrap band,
the asymptote ``c`` and the held-out points the fit extrapolated to.

Inputs are plain arrays or dicts (what ``workbench.scaling.fit`` / ``extrapolation`` return, read as
attributes and keys); no torch, no Panel, no I/O.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .safe import builder

__all__ = ["power_law"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=60, b=40))


@builder
def power_law(x, y, fit=None, heldout: dict | None = None, xlabel: str = "x", ylabel: str = "loss",
              title: str = "Power-law fit", level: float = 0.9, reference=None) -> go.Figure:
    """Log-log scatter of ``(x, y)``; with ``fit`` (a ``PowerLaw``) its curve over the whole range, the
    ``level`` bootstrap band and the asymptote ``c``; with ``heldout`` (from ``extrapolation``) the held-out
    points and their predictions with the relative error in the legend; ``reference`` (another
    ``PowerLaw``, e.g. the fit of all points next to the small-end fit) drawn dashed."""
    fig = go.Figure()
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not len(x):
        fig.update_layout(title=title, height=400, **_LAYOUT)
        fig.add_annotation(text="nothing recorded yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        return fig
    fit_x, fit_y = x, y
    if heldout is not None:
        keep = ~np.isin(x, np.asarray(heldout["x"], float))
        fit_x, fit_y = x[keep], y[keep]
    fig.add_trace(go.Scatter(x=fit_x, y=fit_y, mode="markers", name="fitted points", marker=dict(size=8)))
    if fit is not None:
        grid = np.geomspace(x.min(), x.max(), 200)
        if getattr(fit, "boot", None) is not None and len(fit.boot):
            lo, hi = fit.predict_band(grid, level)
            fig.add_trace(go.Scatter(x=np.r_[grid, grid[::-1]], y=np.r_[hi, lo[::-1]], fill="toself",
                                     fillcolor="rgba(31,119,180,0.15)", line=dict(width=0),
                                     name=f"{level:.0%} bootstrap band", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=grid, y=fit.predict(grid), mode="lines",
                                 name=f"{fit.a:.3g} x^-{fit.alpha:.3f} + {fit.c:.3g}"))
        fig.add_hline(y=fit.c, line_dash="dot", annotation_text=f"asymptote c = {fit.c:.3g}")
    if reference is not None:
        grid = np.geomspace(x.min(), x.max(), 200)
        fig.add_trace(go.Scatter(x=grid, y=reference.predict(grid), mode="lines", line=dict(dash="dash"),
                                 name=f"all points: {reference.a:.3g} x^-{reference.alpha:.3f} + {reference.c:.3g}"))
    if heldout is not None:
        err = ", ".join(f"{e:.1%}" for e in np.asarray(heldout["rel_error"]))
        fig.add_trace(go.Scatter(x=heldout["x"], y=heldout["y"], mode="markers", name="held out",
                                 marker=dict(size=10, symbol="diamond-open")))
        fig.add_trace(go.Scatter(x=heldout["x"], y=heldout["pred"], mode="markers",
                                 name=f"extrapolated (error {err})", marker=dict(size=9, symbol="x")))
    fig.update_xaxes(type="log", title=xlabel)
    fig.update_yaxes(type="log", title=ylabel)
    fig.update_layout(title=title, height=420, **_LAYOUT)
    return fig
