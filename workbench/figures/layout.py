"""What the residual-stream figure modules share: the plotly layout, the empty figure and readable token labels.

Pure: no torch, no Panel. :mod:`workbench.figures.residual` (and the depth report it assembles),
:mod:`workbench.figures.lenses` and :mod:`workbench.figures.interventions` draw with them.
"""
from __future__ import annotations

import plotly.graph_objects as go

from .safe import builder

__all__ = ["LAYOUT", "empty", "token_labels"]

LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=50, b=45))
_SHOW = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}


@builder
def empty(title: str, height: int = 320) -> go.Figure:
    """A figure that says "no data yet" (what a view shows before its first result)."""
    fig = go.Figure()
    fig.update_layout(title=title or None, height=height, **LAYOUT,
                      annotations=[dict(text="no data yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                                        yref="paper", font=dict(color="#888"))])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def token_labels(tokens: list[str] | None, n: int) -> list[str]:
    """Unique, readable x labels ``"3:a"`` for positions (spaces and newlines made visible)."""
    if tokens is None:
        return [str(i) for i in range(n)]
    return [f"{i}:{_SHOW.get(t, t)}" for i, t in enumerate(tokens[:n])] + [str(i) for i in range(len(tokens), n)]
