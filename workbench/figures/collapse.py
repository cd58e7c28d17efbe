"""Collapse figures: NC1..NC4 over training on log scales, per-layer NC1, the class means in 3D next
to the ideal simplex, and Gram matrices against the simplex ETF.

Inputs are the tidy tables and geometry dicts of :mod:`workbench.collapse` (``CollapseTracker.table``,
``collapse.layer_metrics``, ``collapse.geometry``). No torch, no Panel, no I/O.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from .safe import builder

__all__ = ["nc_curves", "layer_curves", "minority_curve", "simplex_3d", "gram_heatmaps", "head_gram_heatmaps",
           "mixup_geometry", "FLOOR"]

_LAYOUT = dict(template="plotly_white", margin=dict(l=55, r=20, t=60, b=40))
FLOOR = 1e-5  # values at or below this (an exact 0 of NC4, say) are drawn at FLOOR on log axes

# panel -> [(metric, label)]
_PANELS = {
    "NC1: within-class variability": [("nc1", "Tr(Σ_W Σ_B⁺)/C"), ("cdnv", "CDNV")],
    "NC2: simplex ETF": [("etf_error", "ETF error (means)"), ("nc2_equinorm", "equinorm means"),
                         ("nc2_equiangular", "equiangular means"), ("nc2_equinorm_w", "equinorm W"),
                         ("nc2_equiangular_w", "equiangular W")],
    "NC3: self-duality": [("nc3", "||W/‖W‖ − M/‖M‖||²")],
    "NC4: nearest class centre": [("nc4", "NCC ≠ network"), ("train_error", "training error")],
}
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]


def _empty(title: str, height: int = 360) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, height=height, **_LAYOUT)
    fig.add_annotation(text="nothing recorded yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _final_site(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the readout-input site; adds ``train_error`` from ``train_acc``."""
    t = table[table["site"] == "features"] if "site" in table else table
    acc = t[t["metric"] == "train_acc"]
    if len(acc):
        t = pd.concat([t, acc.assign(metric="train_error", value=1 - acc["value"])], ignore_index=True)
    return t


@builder
def nc_curves(table: pd.DataFrame | None, x: str = "epoch", title: str = "Neural collapse over training",
              terminal_phase: bool = True) -> go.Figure:
    """Four log-scale panels (NC1..NC4) against ``x`` from a tracker table (site ``features``).

    A ``label`` column (e.g. "balanced", "imbalanced") draws one colour per label. With
    ``terminal_phase``, a dotted line marks the first record with zero training error.
    """
    if table is None or not len(table):
        return _empty(title, 520)
    t = _final_site(table)
    if "label" not in t:
        t = t.assign(label="")
    labels = list(dict.fromkeys(t["label"]))
    color = {m: _PALETTE[i % 10] for i, m in enumerate(m for ms in _PANELS.values() for m, _ in ms)}
    fig = make_subplots(rows=2, cols=2, subplot_titles=list(_PANELS), horizontal_spacing=0.09, vertical_spacing=0.16)
    for p, (panel, metrics) in enumerate(_PANELS.items()):
        row, col = divmod(p, 2)
        for li, label in enumerate(labels):
            for mi, (metric, name) in enumerate(metrics):
                g = t[(t["label"] == label) & (t["metric"] == metric)].sort_values(x)
                g = g[np.isfinite(g["value"])]
                if not len(g):
                    continue
                full = f"{label}: {name}" if label else name
                fig.add_trace(go.Scatter(x=g[x], y=np.maximum(g["value"].to_numpy(dtype=float), FLOOR),
                                         mode="lines", name=full, legendgroup=full,
                                         line=dict(color=color[metric] if len(labels) == 1 else _PALETTE[li % 10],
                                                   dash=_DASHES[mi % 5] if len(labels) > 1 else "solid"),
                                         hovertemplate=f"{full}<br>{x} %{{x}}<br>%{{y:.3g}}<extra></extra>"),
                              row=row + 1, col=col + 1)
        fig.update_yaxes(type="log", exponentformat="power", row=row + 1, col=col + 1)
        fig.update_xaxes(title_text=x, row=row + 1, col=col + 1)
    if terminal_phase:
        acc = t[(t["metric"] == "train_acc") & (t["label"] == labels[0])].sort_values(x)
        zero = acc[acc["value"] >= 1.0]
        if len(zero):
            fig.add_vline(x=float(zero[x].iloc[0]), line=dict(dash="dot", color="#555"), opacity=0.6,
                          annotation_text="zero training error", annotation_position="top right")
    fig.update_layout(title=title, height=560, legend=dict(orientation="h", y=-0.12, font=dict(size=10)), **_LAYOUT)
    return fig


@builder
def layer_curves(table: pd.DataFrame | None, metric: str = "nc1", max_lines: int = 8,
                 title: str | None = None, by: str = "epoch") -> go.Figure:
    """``metric`` (log scale) against layer, one line per value of ``by`` (light = early, dark = late).

    Accepts a tracker table (``by="epoch"``), a :func:`~workbench.collapse.layer_metrics` table
    (one line), or several of those with a column such as ``stage`` (``by="stage"``).
    Layer 0 enters the first block, ``l`` leaves block ``l``, the last point is the readout input.
    Straight lines on this log scale are He and Su's law of data separation.
    """
    title = title or f"{metric.upper()} across layers"
    if table is None or not len(table) or not (table["metric"] == metric).any():
        return _empty(title)
    t = table[table["metric"] == metric]
    if by not in t:
        t = t.assign(**{by: 0})
    epochs = sorted(t[by].unique())
    if len(epochs) > max_lines:
        epochs = [epochs[int(round(i))] for i in np.linspace(0, len(epochs) - 1, max_lines)]
    colors = sample_colorscale("Blues", list(np.linspace(0.35, 1.0, len(epochs))))
    fig = go.Figure()
    sites = t.drop_duplicates("layer").sort_values("layer")
    for color, epoch in zip(colors, epochs):
        g = t[t[by] == epoch].sort_values("layer")
        fig.add_trace(go.Scatter(x=g["layer"], y=np.maximum(g["value"].to_numpy(dtype=float), FLOOR),
                                 mode="lines+markers", name=f"{by} {epoch:g}", line=dict(color=color),
                                 customdata=g["site"], hovertemplate="%{customdata}<br>%{y:.3g}<extra></extra>"))
    fig.update_xaxes(title_text="layer (0 = embedding, last = readout input)", tickvals=sites["layer"].tolist())
    fig.update_yaxes(type="log", exponentformat="power", title_text=metric)
    fig.update_layout(title=title, height=380, **_LAYOUT)
    return fig


@builder
def minority_curve(table: pd.DataFrame | None, title: str = "Minority collapse") -> go.Figure:
    """Mean pairwise cosine of the minority classes' classifier rows against epoch (linear axis).

    A simplex has ``-1/(C-1)``; minority collapse (Fang et al. 2021) drives it towards 1. Needs the
    ``minority_cos`` rows a tracker records on imbalanced data (one line per ``label`` if present).
    """
    if table is None or not len(table) or not (table["metric"] == "minority_cos").any():
        return _empty(title + " (balanced classes: nothing to show)", 300)
    t = table[table["metric"] == "minority_cos"]
    if "label" not in t:
        t = t.assign(label="minority classifier rows")
    fig = go.Figure()
    for i, (label, g) in enumerate(t.groupby("label", sort=False)):
        g = g.sort_values("epoch")
        fig.add_trace(go.Scatter(x=g["epoch"], y=g["value"], mode="lines+markers", name=label,
                                 line=dict(color=_PALETTE[i % 10])))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="mean cosine", range=[-1, 1])
    fig.update_layout(title=title, height=300, **_LAYOUT)
    return fig


@builder
def simplex_3d(view: pd.DataFrame | None, title: str = "Class means (PCA) and the ideal simplex",
               class_names: list[str] | None = None, counts=None) -> go.Figure:
    """3-D scatter of the class means next to the Procrustes-aligned simplex (``collapse.simplex_view``).

    Filled markers: class means; open diamonds: the simplex vertex each is matched to; grey
    segments join them (they shrink to points as collapse completes). ``counts`` sizes the
    markers by class frequency (minority classes smaller).
    """
    if view is None or not len(view):
        return _empty(title, 460)
    means = view[view["kind"] == "means"].sort_values("class")
    ideal = view[view["kind"] == "simplex"].sort_values("class")
    names = class_names or [str(c) for c in means["class"]]
    fig = go.Figure()
    seg = {k: [] for k in ("x", "y", "z")}
    for (_, m), (_, s) in zip(means.iterrows(), ideal.iterrows()):
        for k, col in zip(("x", "y", "z"), ("pc1", "pc2", "pc3")):
            seg[k] += [m[col], s[col], None]
    fig.add_trace(go.Scatter3d(**seg, mode="lines", line=dict(color="#999", width=2), name="distance to ideal",
                               hoverinfo="skip"))
    fig.add_trace(go.Scatter3d(x=ideal["pc1"], y=ideal["pc2"], z=ideal["pc3"], mode="markers", name="ideal simplex",
                               marker=dict(symbol="diamond-open", size=6, color="#333")))
    size = 8 if counts is None else 5 + 7 * np.sqrt(np.asarray(counts, float) / np.max(counts))
    fig.add_trace(go.Scatter3d(x=means["pc1"], y=means["pc2"], z=means["pc3"], mode="markers+text", text=names,
                               name="class means", textposition="top center",
                               marker=dict(size=size, color=[_PALETTE[i % 10] for i in range(len(means))])))
    fig.update_layout(title=title, height=480, scene=dict(aspectmode="data", xaxis_title="PC1", yaxis_title="PC2",
                                                         zaxis_title="PC3"),
                      uirevision="keep-camera", legend=dict(orientation="h", y=-0.05), **_LAYOUT)
    return fig


@builder
def gram_heatmaps(geometry: dict | None, title: str = "Gram matrices against the simplex ETF") -> go.Figure:
    """Heat-maps of the means' cosine Gram matrix, the ideal ETF's, and (if present) the classifier rows'.

    ``geometry``: ``collapse.geometry(...)`` (keys ``gram``, ``ideal``, optional ``classifier_cos``).
    One colour scale from -1 to 1; off-diagonal ``-1/(C-1)`` is the simplex.
    """
    if geometry is None:
        return _empty(title, 340)
    panels = [("class means", geometry["gram"]), ("ideal simplex ETF", geometry["ideal"])]
    if geometry.get("classifier_cos") is not None:
        panels.append(("classifier rows", geometry["classifier_cos"]))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p for p, _ in panels], horizontal_spacing=0.06)
    for i, (name, mat) in enumerate(panels):
        mat = np.asarray(mat, dtype=float)
        fig.add_trace(go.Heatmap(z=mat, zmin=-1, zmax=1, colorscale="RdBu_r", showscale=i == len(panels) - 1,
                                 hovertemplate=f"{name}<br>%{{y}} · %{{x}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i + 1}" if i else "x", row=1, col=i + 1)
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig


_HEAD_NAMES = {"learned": "learned head", "etf": "fixed simplex-ETF head", "ebv": "fixed EBV head"}
_TARGET_NAMES = {"learned": "simplex ETF (collapse target)", "etf": "simplex ETF", "ebv": "identity (|cos| ≤ threshold)"}


@builder
def head_gram_heatmaps(head: dict | None, title: str | None = None) -> go.Figure:
    """The classifier rows' cosines next to the Gram matrix the head aims at, and their difference.

    ``head``: ``collapse.head_gram(model)`` (keys ``kind``, ``gram``, ``target``, ``error``, ``max_abs_cos``,
    ``threshold``). One colour scale from -1 to 1.
    """
    if head is None:
        return _empty(title or "Classifier head against its target", 340)
    kind = head["kind"]
    gram, target = np.asarray(head["gram"], dtype=float), np.asarray(head["target"], dtype=float)
    panels = [(_HEAD_NAMES.get(kind, kind), gram), (_TARGET_NAMES.get(kind, "target"), target),
              ("difference", gram - target)]
    extra = f", max |cos| {head['max_abs_cos']:.3f}"
    if head.get("threshold") is not None:
        extra += f" (threshold {head['threshold']:g})"
    title = title or f"Classifier head against its target: ‖G − target‖_F = {head['error']:.3g}{extra}"
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p for p, _ in panels], horizontal_spacing=0.06)
    for i, (name, mat) in enumerate(panels):
        fig.add_trace(go.Heatmap(z=mat, zmin=-1, zmax=1, colorscale="RdBu_r", showscale=i == 2,
                                 hovertemplate=f"{name}<br>%{{y}} · %{{x}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i + 1}" if i else "x", row=1, col=i + 1)
    fig.update_layout(title=title, height=360, **_LAYOUT)
    return fig


@builder
def mixup_geometry(table: pd.DataFrame | None, title: str = "Features of mixed examples on the plane of "
                   "three classifier rows") -> go.Figure:
    """Fisher, Meng and Papyan's (2024) view from a ``collapse.mixup_geometry`` table.

    Cross-class mixes coloured by ``lam`` (one colour scale), same-class mixes in their class's colour
    (crosses), the three classifier rows as lines from the origin (scaled to the largest feature) and
    labelled by class.
    """
    if table is None or not len(table):
        return _empty(title, 520)
    rows = table[table["pair_kind"] == "classifier"]
    mixes = table[table["pair_kind"] != "classifier"]
    fig = go.Figure()
    cross = mixes[mixes["pair_kind"] == "cross"]
    if len(cross):
        text = [f"classes {a}×{b}, λ={lam:.2f}" for a, b, lam in zip(cross["class_a"], cross["class_b"], cross["lam"])]
        fig.add_trace(go.Scatter(x=cross["x"], y=cross["y"], mode="markers", name="different-class mixes",
                                 text=text, hovertemplate="%{text}<extra></extra>",
                                 marker=dict(size=5, color=cross["lam"], colorscale="Viridis", cmin=0, cmax=1,
                                             colorbar=dict(title="λ", len=0.6), opacity=0.8)))
    same = mixes[mixes["pair_kind"] == "same"]
    for i, (c, grp) in enumerate(same.groupby("class_a")):
        fig.add_trace(go.Scatter(x=grp["x"], y=grp["y"], mode="markers", name=f"same-class mixes, class {c}",
                                 text=[f"class {c}×{c}, λ={lam:.2f}" for lam in grp["lam"]],
                                 hovertemplate="%{text}<extra></extra>",
                                 marker=dict(size=6, symbol="x", color=_PALETTE[int(c) % len(_PALETTE)])))
    if len(rows):
        reach = float(np.hypot(mixes["x"], mixes["y"]).max()) if len(mixes) else 1.0
        scale = reach / max(float(np.hypot(rows["x"], rows["y"]).max()), 1e-12)
        for _, r in rows.iterrows():
            c = int(r["class_a"])
            fig.add_trace(go.Scatter(x=[0, r["x"] * scale], y=[0, r["y"] * scale], mode="lines+text",
                                     text=["", f"w_{c}"], textposition="top center", showlegend=False,
                                     line=dict(color=_PALETTE[c % len(_PALETTE)], width=3),
                                     hoverinfo="skip"))
    fig.update_xaxes(title="e₁", zeroline=True)
    fig.update_yaxes(title="e₂", zeroline=True, scaleanchor="x")
    fig.update_layout(title=title, height=520, **_LAYOUT)
    return fig
