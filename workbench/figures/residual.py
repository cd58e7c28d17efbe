"""Residual-stream figures from the tidy tables of :mod:`workbench.residual`. Pure: DataFrame -> plotly Figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .layout import LAYOUT, empty, token_labels
from .safe import builder, escape_figure, text

__all__ = ["contributions_figure", "stages_figure", "position_figure", "lens_heatmap", "skip_heatmap",
           "skip_output_figure", "attribution_figure", "token_labels", "ig_heatmap", "depth_difficulty_figure",
           "layer_map_heatmap", "patch_heatmap", "erasure_heatmap", "lens_layers_figure", "depth_report_html"]

SUBLAYER_COLORS = {"attn": "#1f77b4", "mlp": "#ff7f0e", "layer": "#2ca02c"}
_LAYOUT = LAYOUT
_empty = empty


def _highlight(fig: go.Figure, layer, row=None, col=None) -> None:
    if layer is None:
        return
    kw = {} if row is None else dict(row=row, col=col)
    fig.add_vrect(x0=layer - 0.5, x1=layer + 0.5, fillcolor="#999", opacity=0.15, line_width=0, **kw)


@builder
def contributions_figure(df: pd.DataFrame | None, highlight_layer: int | None = None, title: str = "") -> go.Figure:
    """Relative contribution (bars) and cosine with the residual (lines) per layer and sublayer.

    ``df``: :func:`workbench.residual.contributions` output (``layer, sublayer, rel_norm, cosine``).
    """
    title = title or "What each layer writes: ||out|| / ||residual||, and cos(out, residual)"
    if df is None or not len(df):
        return _empty(title, 340)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("relative contribution", "cosine with the residual"),
                        horizontal_spacing=0.1)
    for sub in [s for s in ("attn", "mlp", "layer") if s in set(df["sublayer"])]:
        sel = df[df["sublayer"] == sub]
        color = SUBLAYER_COLORS[sub]
        fig.add_trace(go.Bar(x=sel["layer"], y=sel["rel_norm"], name=sub, marker_color=color, legendgroup=sub),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=sel["layer"], y=sel["cosine"], name=sub, mode="lines+markers", line=dict(color=color),
                                 legendgroup=sub, showlegend=False), row=1, col=2)
    _highlight(fig, highlight_layer, 1, 1)
    _highlight(fig, highlight_layer, 1, 2)
    fig.add_hline(y=0, line=dict(color="#aaa", width=1), row=1, col=2)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(title=title, height=340, barmode="group", legend=dict(orientation="h", y=-0.2), **_LAYOUT)
    return fig


@builder
def stages_figure(df: pd.DataFrame | None, sublayer: str = "layer", metric: str = "rel_norm",
                  title: str = "") -> go.Figure:
    """One line per growth stage: ``metric`` of ``sublayer`` against layer (``df`` has a ``stage`` column)."""
    title = title or f"{metric} of each {sublayer} across growth stages"
    if df is None or not len(df) or "stage" not in df:
        return _empty(title, 320)
    sel = df[df["sublayer"] == sublayer]
    fig = go.Figure()
    stages = sorted(sel["stage"].unique())
    for k, stage in enumerate(stages):
        s = sel[sel["stage"] == stage].sort_values("layer")
        shade = 0.35 + 0.65 * (k + 1) / len(stages)
        fig.add_trace(go.Scatter(x=s["layer"], y=s[metric], mode="lines+markers", name=f"stage {stage}",
                                 line=dict(color=f"rgba(31,119,180,{shade:.2f})")))
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text=metric)
    fig.update_layout(title=title, height=320, **_LAYOUT)
    return fig


@builder
def position_figure(df: pd.DataFrame | None, layer: int, tokens: list[str] | None = None,
                    highlight_position: int | None = None) -> go.Figure:
    """Relative contribution of one layer's sublayers at every position (per-position contributions)."""
    title = f"Layer {layer}: relative contribution at each position"
    if df is None or not len(df) or "position" not in df:
        return _empty(title, 300)
    sel = df[df["layer"] == layer]
    if not len(sel):
        return _empty(title, 300)
    n = int(sel["position"].max()) + 1
    labels = token_labels(tokens, n)
    fig = go.Figure()
    for sub in [s for s in ("attn", "mlp", "layer") if s in set(sel["sublayer"])]:
        s = sel[sel["sublayer"] == sub].sort_values("position")
        fig.add_trace(go.Scatter(x=[labels[p] for p in s["position"]], y=s["rel_norm"], name=sub,
                                 mode="lines+markers", line=dict(color=SUBLAYER_COLORS[sub])))
    if highlight_position is not None and 0 <= highlight_position < n:
        fig.add_vrect(x0=highlight_position - 0.5, x1=highlight_position + 0.5, fillcolor="#999", opacity=0.15,
                      line_width=0)
    fig.update_xaxes(title_text="position", type="category")
    fig.update_yaxes(title_text="rel_norm")
    fig.update_layout(title=title, height=300, legend=dict(orientation="h", y=-0.35), **_LAYOUT)
    return fig


_LENS_TITLES = {"kl_to_final": "KL(final || lens) [nats]", "top1_agree": "lens top-1 = final top-1",
                "top5_overlap": "top-5 overlap with the final output", "loss": "lens loss [nats]"}


@builder
def lens_heatmap(df: pd.DataFrame | None, metric: str = "kl_to_final", tokens: list[str] | None = None,
                 highlight: tuple[int, int] | None = None) -> go.Figure:
    """Logit lens over positions (x) and layers (y); ``df`` is ``logit_lens(..., per_position=True)``.

    Layer ``l`` reads the residual entering block ``l``; the top row is the model's output.
    ``highlight = (layer, position)`` draws a box around one cell.
    """
    title = f"Logit lens: {_LENS_TITLES.get(metric, metric)}"
    if df is None or not len(df) or "position" not in df:
        return _empty(title, 340)
    grid = df.pivot(index="layer", columns="position", values=metric).sort_index()
    n_layers = int(grid.index.max())
    labels = token_labels(tokens, grid.shape[1])
    ylabels = [f"{l}" if l < n_layers else f"{l} (out)" for l in grid.index]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=labels, y=ylabels, colorscale="Viridis",
                               reversescale=metric in ("top1_agree", "top5_overlap"), colorbar=dict(title=metric, len=0.9),
                               hovertemplate="position %{x}<br>layer %{y}<br>%{z:.3f}<extra></extra>"))
    if highlight is not None:
        layer, pos = highlight
        fig.add_shape(type="rect", x0=pos - 0.5, x1=pos + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line=dict(color="red", width=2))
    fig.update_xaxes(title_text="position", type="category")
    fig.update_yaxes(title_text="layer (residual entering it)", type="category")
    fig.update_layout(title=title, height=max(260, 60 + 28 * grid.shape[0]), **_LAYOUT)
    return fig


@builder
def skip_heatmap(heatmap: pd.DataFrame | None, n_layers: int | None = None, highlight_layer: int | None = None,
                 title: str = "") -> go.Figure:
    """Skipped layer (y) x affected later layer (x): relative change of the later layer's contribution."""
    title = title or "Skip a layer: relative change ||d_l - d~_l|| / ||d_l|| of later layers"
    if heatmap is None or not len(heatmap):
        return _empty(title, 340)
    L = n_layers or int(max(heatmap["skipped"].max(), heatmap["affected"].max())) + 1
    z = np.full((L, L), np.nan)
    for r in heatmap.itertuples():
        z[int(r.skipped), int(r.affected)] = r.effect
    fig = go.Figure(go.Heatmap(z=z, x=list(range(L)), y=list(range(L)), colorscale="Magma", reversescale=True,
                               colorbar=dict(title="effect"),
                               hovertemplate="skipped %{y}<br>affected %{x}<br>%{z:.3f}<extra></extra>"))
    if highlight_layer is not None:
        fig.add_shape(type="rect", x0=-0.5, x1=L - 0.5, y0=highlight_layer - 0.5, y1=highlight_layer + 0.5,
                      line=dict(color="red", width=2))
    fig.update_xaxes(title_text="affected layer", dtick=1)
    fig.update_yaxes(title_text="skipped layer", dtick=1, autorange="reversed")
    fig.update_layout(title=title, height=max(280, 80 + 30 * L), **_LAYOUT)
    return fig


@builder
def skip_output_figure(output: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Per skipped layer: KL (and ``||softmax - softmax'||_2`` when the table has ``l2``) of the output
    distribution, and share of changed top-1 predictions."""
    title = title or "Skip a layer: change of the output distribution"
    if output is None or not len(output):
        return _empty(title, 300)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=output["skipped"], y=output["kl"], name="KL(full || skipped)", marker_color="#9467bd"))
    if "l2" in output:
        fig.add_trace(go.Bar(x=output["skipped"], y=output["l2"], name="||p - p'||_2", marker_color="#8c564b"))
    fig.add_trace(go.Scatter(x=output["skipped"], y=output["top1_changed"], name="top-1 changed", mode="lines+markers",
                             line=dict(color="#d62728")), secondary_y=True)
    fig.update_xaxes(title_text="skipped layer", dtick=1)
    fig.update_yaxes(title_text="KL [nats]", secondary_y=False)
    fig.update_yaxes(title_text="share", range=[0, 1.02], secondary_y=True)
    fig.update_layout(title=title, height=300, legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


@builder
def attribution_figure(df: pd.DataFrame | None, position: int = 0, batch: int = 0, target_label: str | None = None,
                       title: str = "") -> go.Figure:
    """Direct logit attribution of each component to the target token at one position (horizontal bars).

    ``df``: :func:`workbench.residual.logit_attribution` output.
    """
    if df is None or not len(df):
        return _empty(title or "Direct logit attribution", 360)
    sel = df[(df["position"] == position) & (df["batch"] == batch)]
    if not len(sel):
        return _empty(title or "Direct logit attribution", 360)
    tgt = target_label if target_label is not None else str(int(sel["target"].iloc[0]))
    title = title or f"Direct logit attribution to {tgt!r} at position {position} (sum = logit {sel.attribution.sum():.2f})"
    colors = ["#d62728" if v < 0 else "#1f77b4" for v in sel["attribution"]]
    fig = go.Figure(go.Bar(x=sel["attribution"], y=sel["component"], orientation="h", marker_color=colors,
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text="contribution to the logit")
    fig.update_layout(title=title, height=max(260, 60 + 18 * len(sel)), **_LAYOUT)
    return fig


def _grid(df: pd.DataFrame, index: str, columns: str, values: str, title: str, xtitle: str, ytitle: str,
          colorscale: str = "Viridis", zmid: float | None = None, x_labels: list[str] | None = None,
          height_per_row: int = 28) -> go.Figure:
    grid = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean").sort_index()
    x = x_labels if x_labels is not None else [str(c) for c in grid.columns]
    kw = dict(zmid=zmid) if zmid is not None else {}
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=x, y=[str(i) for i in grid.index], colorscale=colorscale,
                               colorbar=dict(title=values, len=0.9), **kw,
                               hovertemplate=f"{xtitle} %{{x}}<br>{ytitle} %{{y}}<br>%{{z:.4g}}<extra></extra>"))
    fig.update_xaxes(title_text=xtitle, type="category")
    fig.update_yaxes(title_text=ytitle, type="category")
    fig.update_layout(title=title, height=max(260, 80 + height_per_row * grid.shape[0]), **_LAYOUT)
    return fig


@builder
def ig_heatmap(df: pd.DataFrame | None, tokens: list[str] | None = None, title: str = "") -> go.Figure:
    """Per-layer integrated gradients: layer (y) x position (x); ``df`` is ``integrated_gradients`` output."""
    title = title or "Integrated gradients per layer (baseline: the sequence mean)"
    if df is None or not len(df):
        return _empty(title, 340)
    n = int(df["position"].max()) + 1
    return _grid(df, "layer", "position", "attribution", title, "position", "layer", "RdBu", 0.0,
                 token_labels(tokens, n))


@builder
def depth_difficulty_figure(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Depth score (y) against difficulty (x); ``df`` is ``depth_vs_difficulty`` output."""
    title = title or "Depth score against problem difficulty"
    if df is None or not len(df):
        return _empty(title, 300)
    fig = go.Figure(go.Scatter(x=[str(d) for d in df["difficulty"]], y=df["depth_score"], mode="lines+markers",
                               hovertemplate="difficulty %{x}<br>depth score %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="difficulty", type="category")
    fig.update_yaxes(title_text="depth score (layer)")
    fig.update_layout(title=title, height=300, **_LAYOUT)
    return fig


@builder
def layer_map_heatmap(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Relative error of the linear map from layer ``layer_a`` (y) of A to ``layer_b`` (x) of B."""
    title = title or "Layer map A -> B: relative error of a linear map (low: corresponding depth)"
    if df is None or not len(df):
        return _empty(title, 340)
    return _grid(df, "layer_a", "layer_b", "rel_error", title, "layer of B", "layer of A", "Viridis")


@builder
def patch_heatmap(df: pd.DataFrame | None, tokens: list[str] | None = None, site: str = "resid_pre",
                  title: str = "") -> go.Figure:
    """Activation patching: recovery per layer (y) and position (x); ``df`` is ``patch`` output."""
    title = title or f"Activation patching ({site}): recovery of the clean answer"
    if df is None or not len(df):
        return _empty(title, 340)
    n = int(df["position"].max()) + 1
    return _grid(df, "layer", "position", "recovery", title, "position", "layer", "RdBu", 0.0, token_labels(tokens, n))


@builder
def erasure_heatmap(df: pd.DataFrame | None, tokens: list[str] | None = None, title: str = "") -> go.Figure:
    """Token erasure: relative change of the residual per later layer (y) and position (x)."""
    title = title or "Token erasure: relative change of the residual downstream"
    if df is None or not len(df):
        return _empty(title, 340)
    n = int(df["position"].max()) + 1
    return _grid(df, "layer", "position", "rel_change", title, "position", "layer", "Magma", None,
                 token_labels(tokens, n))


def depth_report_html(report, tokens: list[str] | None = None, vocab: list[str] | None = None) -> str:
    """One self-contained HTML page (plotly.js inline, no CDN) of a ``workbench.residual.DepthReport``.

    ``report``: any object with the DataFrame attributes of a DepthReport (``contributions, lens,
    skip, skip_output, ig, erasure, patching, depth_vs_difficulty``), ``depth_score``, ``n_layers``
    and ``title``; when it has them, the lens comparison (``lenses``: logit and tuned per layer), the lens
    heat-map of the first prompt with its commitment strip (``lens_tokens``, ``commitment``), the head-type
    score map (``head_scores``) and the attention pattern of one layer (``attention``). ``vocab``: token
    strings by id for the heat-map cells. Every text is HTML-escaped."""
    import html as _html

    from . import attention as attention_figs
    from . import lenses as lens_figs

    figs = [contributions_figure(report.contributions),
            lens_layers_figure(report.lens)]
    lenses = getattr(report, "lenses", None)
    if lenses is not None and len(lenses):
        figs.append(lens_figs.lens_comparison_figure(lenses, perplexity=True))
    lens_tokens = getattr(report, "lens_tokens", None)
    if lens_tokens is not None and len(lens_tokens):
        lens = "tuned" if "tuned" in set(lens_tokens["lens"]) else "logit"
        figs.append(lens_figs.lens_token_heatmap(
            lens_tokens, getattr(report, "commitment", None), lens=lens, vocab=vocab, input_tokens=tokens,
            title=f"{lens} lens: top-1 token per layer (outlined: the final prediction); commitment layer under"))
    figs += [skip_heatmap(report.skip, report.n_layers),
             skip_output_figure(report.skip_output),
             ig_heatmap(report.ig, tokens),
             erasure_heatmap(report.erasure, tokens)]
    if len(report.patching):
        figs.append(patch_heatmap(report.patching, tokens))
    if len(report.depth_vs_difficulty):
        figs.append(depth_difficulty_figure(report.depth_vs_difficulty))
    layer_maps = getattr(report, "layer_map", None)
    if layer_maps is not None and len(layer_maps):
        figs.append(layer_map_heatmap(layer_maps))
    scores = getattr(report, "head_scores", None)
    if scores is not None and len(scores):
        figs.append(attention_figs.score_map(scores, title="Head-type scores (repeated random tokens)"))
    pattern = getattr(report, "attention", None)
    if pattern is not None and len(pattern):
        figs.append(attention_figs.pattern_figure(pattern))
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    title = _html.escape(str(report.title))
    score = float(report.depth_score)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + title + "</title></head><body>"
            f"<h1>{title}</h1><p>{report.n_layers} layers; depth score (centre of mass of the skip effect on "
            f"the output, ||p - p'||_2): {score:.3f}</p>" + "".join(f"<div>{p}</div>" for p in parts)
            + "</body></html>")


def save_depth_report(report, path, tokens: list[str] | None = None, vocab: list[str] | None = None) -> str:
    """Write :func:`depth_report_html` of ``report`` to ``path`` (UTF-8); returns the path as a string."""
    from pathlib import Path

    p = Path(path)
    p.write_text(depth_report_html(report, tokens, vocab), encoding="utf-8")
    return str(p)


@builder
def lens_layers_figure(df: pd.DataFrame | None, title: str = "") -> go.Figure:
    """Logit lens per layer (averaged over tokens): KL to the final output, top-1 and top-5 agreement."""
    title = title or "Logit lens per layer"
    if df is None or not len(df):
        return _empty(title, 300)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=df["layer"], y=df["kl_to_final"], name="KL(final || lens)", marker_color="#1f77b4"))
    for col, color in (("top1_agree", "#d62728"), ("top5_overlap", "#2ca02c")):
        if col in df:
            fig.add_trace(go.Scatter(x=df["layer"], y=df[col], name=col, mode="lines+markers",
                                     line=dict(color=color)), secondary_y=True)
    fig.update_xaxes(title_text="layer (residual entering it)", dtick=1)
    fig.update_yaxes(title_text="KL [nats]", secondary_y=False)
    fig.update_yaxes(title_text="share", range=[0, 1.02], secondary_y=True)
    fig.update_layout(title=title, height=300, legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


# ----------------------------------------------------------------------------- fast updates
# A page builds each figure once per analysis (``fig.to_dict()``) and, when a layer or token
# is chosen, only swaps highlight shapes or data arrays in that dict: no Figure is rebuilt.


def layer_band(layer: int, xref: str = "x", yref: str = "y domain") -> dict:
    """A grey band over one layer of a bar/line chart (for :func:`with_shapes`)."""
    return dict(type="rect", xref=xref, yref=yref, x0=layer - 0.5, x1=layer + 0.5, y0=0, y1=1,
                fillcolor="#999", opacity=0.15, line=dict(width=0), layer="below")


def cell_box(x: float, y: float, xref: str = "x", yref: str = "y") -> dict:
    """A red box around one heat-map cell (category axes take integer coordinates)."""
    return dict(type="rect", xref=xref, yref=yref, x0=x - 0.5, x1=x + 0.5, y0=y - 0.5, y1=y + 0.5,
                line=dict(color="red", width=2))


def row_box(row: int, n_cols: int, xref: str = "x", yref: str = "y") -> dict:
    """A red box around one heat-map row."""
    return dict(type="rect", xref=xref, yref=yref, x0=-0.5, x1=n_cols - 0.5, y0=row - 0.5, y1=row + 0.5,
                line=dict(color="red", width=2))


def with_shapes(fig: dict, shapes: list[dict], title: str | None = None) -> dict:
    """A shallow copy of a figure dict with extra shapes (and optionally a new title, escaped as text)."""
    layout = dict(fig["layout"])
    layout["shapes"] = list(fig["layout"].get("shapes", ())) + list(shapes)
    if title is not None:
        layout["title"] = dict(layout.get("title") or {}, text=text(title))
    return {"data": fig["data"], "layout": layout}


def with_traces(fig: dict, updates: list[dict]) -> dict:
    """A shallow copy of a figure dict whose i-th trace is updated with ``updates[i]`` (its strings escaped)."""
    data = [dict(trace, **escape_figure(dict(upd))) for trace, upd in zip(fig["data"], updates)] \
        + list(fig["data"][len(updates):])
    return {"data": data, "layout": fig["layout"]}
