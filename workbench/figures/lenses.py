"""Lens figures from the tidy tables of :mod:`workbench.lenses`. Pure: DataFrame -> plotly Figure.

- :func:`lens_comparison_figure`: KL to the final output and top-1 agreement per layer, one line per lens
  (:func:`workbench.lenses.compare`);
- :func:`lens_token_heatmap`: layer x position, each cell the lens's top-1 token (text) coloured by its
  probability, with the commitment layer of every position as a strip above or below
  (:func:`workbench.lenses.top_tokens` and :func:`workbench.lenses.commitment`);
- :func:`lens_diagnostics_figure`: the fidelity diagnostics per layer, one line per lens
  (:func:`workbench.lenses.diagnostics`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .layout import LAYOUT as _LAYOUT
from .layout import empty as _empty
from .layout import token_labels
from .safe import builder

__all__ = ["LENS_COLORS", "lens_comparison_figure", "lens_token_heatmap", "lens_diagnostics_figure"]

LENS_COLORS = {"logit": "#1f77b4", "tuned": "#ff7f0e", "jacobian": "#2ca02c"}
_ORDER = ["logit", "tuned", "jacobian"]
_CRITERIA = {"top1": "final top-1 is the lens top-1", "top3": "final top-1 within the lens top-3",
             "p50": "lens probability of the final top-1 > 0.5"}


def _lenses(df: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(df["lens"]))
    return [n for n in _ORDER if n in present] + [n for n in present if n not in _ORDER]


def _lines(fig: go.Figure, df: pd.DataFrame, column: str, row: int, col: int, legend: bool) -> None:
    for name in _lenses(df):
        sel = df[df["lens"] == name].sort_values("layer")
        fig.add_trace(go.Scatter(x=sel["layer"], y=sel[column], name=name, mode="lines+markers", legendgroup=name,
                                 showlegend=legend, line=dict(color=LENS_COLORS.get(name))), row=row, col=col)


@builder
def lens_comparison_figure(df: pd.DataFrame | None, title: str = "", perplexity: bool = False) -> go.Figure:
    """KL(final || lens) (left) and top-1 agreement with the model (right) per layer, one line per lens;
    with ``perplexity`` a third panel, the perplexity of the lens's prediction (log scale).

    ``df``: :func:`workbench.lenses.compare` output (``lens, layer, kl_to_final, top1_agree, ...``).
    """
    title = title or "Lenses per layer: logit, tuned and Jacobian"
    if df is None or not len(df) or "lens" not in df:
        return _empty(title, 320)
    panels = ["KL(final || lens) [nats]", "lens top-1 = final top-1"]
    perplexity = perplexity and "perplexity" in df
    if perplexity:
        panels.append("perplexity on the targets")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.1 if not perplexity
                        else 0.07)
    _lines(fig, df, "kl_to_final", 1, 1, True)
    _lines(fig, df, "top1_agree", 1, 2, False)
    if perplexity:
        _lines(fig, df, "perplexity", 1, 3, False)
        fig.update_yaxes(type="log", row=1, col=3)
    fig.update_xaxes(title_text="layer (residual entering it)", dtick=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title, height=330, legend=dict(orientation="h", y=-0.25), **_LAYOUT)
    return fig


def _token_text(ids, vocab: list[str] | None) -> list[str]:
    show = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
    if vocab is None:
        return [str(int(i)) for i in ids]
    return [show.get(vocab[int(i)], vocab[int(i)]) if 0 <= int(i) < len(vocab) else str(int(i)) for i in ids]


@builder
def lens_token_heatmap(tokens: pd.DataFrame | None, commitment: pd.DataFrame | None = None, lens: str = "logit",
                       batch: int = 0, criterion: str = "top1", vocab: list[str] | None = None,
                       input_tokens: list[str] | None = None, strip: str = "under", title: str = "") -> go.Figure:
    """The lens heat-map of one sequence: layers (y) x positions (x), each cell the lens's top-1 token
    (text; ``vocab`` maps ids to strings) coloured by its probability; cells whose token is the model's
    final prediction are outlined. With ``commitment``, a strip (``strip="under"`` or ``"over"`` the map)
    gives each position's commitment layer for ``criterion`` (blank: never).

    ``tokens``: :func:`workbench.lenses.top_tokens`; ``commitment``: :func:`workbench.lenses.commitment`;
    ``input_tokens``: the input's token strings (x labels).
    """
    title = title or f"{lens} lens: top-1 token per layer and position"
    if tokens is None or not len(tokens):
        return _empty(title, 360)
    sel = tokens[(tokens["lens"] == lens) & (tokens["batch"] == batch)]
    if not len(sel):
        return _empty(title, 360)
    grid = sel.pivot(index="layer", columns="position", values="prob").sort_index()
    tok = sel.pivot(index="layer", columns="position", values="token").loc[grid.index, grid.columns]
    final = sel.pivot(index="layer", columns="position", values="final_token").loc[grid.index, grid.columns]
    n_layers = int(grid.index.max())
    x = token_labels(input_tokens, grid.shape[1])
    y = [str(l) if l < n_layers else f"{l} (out)" for l in grid.index]
    text = np.array(_token_text(tok.to_numpy().ravel(), vocab), dtype=object).reshape(tok.shape)
    final_text = np.array(_token_text(final.to_numpy().ravel(), vocab), dtype=object).reshape(tok.shape)
    custom = np.dstack([text, final_text])
    heat = go.Heatmap(z=grid.to_numpy(), x=x, y=y, text=text, texttemplate="%{text}", customdata=custom,
                      colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="p(top-1)", len=0.7),
                      hovertemplate="position %{x}<br>layer %{y}<br>lens top-1 %{customdata[0]} (p = %{z:.3f})"
                                    "<br>final top-1 %{customdata[1]}<extra></extra>")
    com = None
    if commitment is not None and len(commitment):
        com = commitment[(commitment["lens"] == lens) & (commitment["batch"] == batch)
                         & (commitment["criterion"] == criterion)].sort_values("position")
        com = com if len(com) else None
    if com is None:
        fig = go.Figure(heat)
        heat_row = None
    else:
        over = strip == "over"
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                            row_heights=[0.12, 0.88] if over else [0.88, 0.12])
        heat_row, strip_row = (2, 1) if over else (1, 2)
        fig.add_trace(heat, row=heat_row, col=1)
        layers = com.set_index("position")["layer"].reindex(grid.columns)
        label = [("" if pd.isna(v) else str(int(v))) for v in layers]
        fig.add_trace(go.Heatmap(z=[layers.to_numpy(dtype=float)], x=x, y=["commits"], text=[label],
                                 texttemplate="%{text}", colorscale="Oranges", reversescale=True, zmin=0,
                                 zmax=n_layers, showscale=False,
                                 hovertemplate=f"position %{{x}}<br>commitment layer %{{z}}<br>{_CRITERIA.get(criterion, criterion)}"
                                               "<extra></extra>"), row=strip_row, col=1)
    kw = {} if heat_row is None else dict(row=heat_row, col=1)
    rows, cols = np.nonzero(tok.to_numpy() == final.to_numpy())
    for r, c in zip(rows, cols):
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color="#d62728", width=1),
                      **kw)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    fig.update_xaxes(title_text="position", **({} if heat_row is None else dict(row=2, col=1)))
    fig.update_yaxes(title_text="layer", **kw)
    fig.update_layout(title=title, height=max(300, 90 + 30 * (grid.shape[0] + (1 if com is not None else 0))),
                      **_LAYOUT)
    return fig


_DIAG_TITLES = {"topk_agree": "model top-1 within lens top-k", "kurtosis": "excess kurtosis of lens logits",
                "autocorr": "adjacent positions with the same lens top-1", "eff_dim": "effective dimension of the map"}


@builder
def lens_diagnostics_figure(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Fidelity diagnostics per layer (2 x 2 panels), one line per lens.

    ``df``: :func:`workbench.lenses.diagnostics` output (``lens, layer, topk_agree, kurtosis, autocorr, eff_dim``).
    """
    title = title or "Lens fidelity per layer"
    if df is None or not len(df) or "lens" not in df:
        return _empty(title, 480)
    k = df.attrs.get("k")
    names = [(_DIAG_TITLES[c] if c != "topk_agree" or k is None else f"model top-1 within lens top-{k}")
             for c in _DIAG_TITLES]
    fig = make_subplots(rows=2, cols=2, subplot_titles=names, horizontal_spacing=0.1, vertical_spacing=0.16)
    for i, column in enumerate(_DIAG_TITLES):
        _lines(fig, df, column, i // 2 + 1, i % 2 + 1, i == 0)
    fig.update_xaxes(title_text="layer", dtick=1, row=2)
    fig.update_xaxes(dtick=1, row=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=2, col=1)
    fig.update_yaxes(rangemode="tozero", row=2, col=2)
    fig.update_layout(title=title, height=500, legend=dict(orientation="h", y=-0.15), **_LAYOUT)
    return fig
