"""The collapse geometry of a classifier: the class means at a chosen layer on their top principal axes next to
the ideal simplex, their cosines against the simplex ETF's, a collapse measure across layers, and NC1-NC4
over training when the run tracked them (Papyan, Han and Donoho 2020).

Bound to a model and labelled inputs (``CollapseView(model, x, y)``, or a Run: its model on its training data,
its tracked collapse rows), one forward pass records every layer (:func:`workbench.collapse.collect`); choosing
a layer or a measure then only recomputes the class means' geometry from the recorded features. The Collapse
page embeds the same view: while training it hands it the tracker's table and geometry
(:meth:`CollapseView.show_record`), and binds it to the trained model at the end.
Definitions: ``docs/definitions.md#neural-collapse``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import panel as pn
import param

from ...core import checks
from ... import collapse
from ...figures import collapse as figs
from .base import Explorer

__all__ = ["CollapseView", "MEASURES", "FEATURES"]

MEASURES = ("nc1", "etf_error", "nc2_equinorm", "nc2_equiangular", "nc4", "cdnv")   # layer curve choices
FEATURES = -1   # ``layer`` of the readout input (the default)
MAX_SAMPLES = 4096


class CollapseView(Explorer):
    """Class-mean geometry at ``layer`` (-1: the readout input) and ``measure`` across layers.

    Bound views hold the recorded features of every layer; unbound (a page while training) the last record.
    ``geometry`` is what the 3-D view and the heat-maps show (:func:`workbench.collapse.geometry`);
    :meth:`measure_at` reads one number.
    """

    layer = param.Integer(default=FEATURES, doc="the layer whose class means are drawn (-1: the readout input)")
    measure = param.String(default="nc1", doc="the collapse measure drawn across layers")

    title = "Collapse geometry"
    choices = ("layer", "measure")

    def __init__(self, model=None, x=None, y=None, *, table: pd.DataFrame | None = None, n_classes: int | None = None,
                 max_samples: int = 1024, **params):
        super().__init__(**params)
        self.model, self.table, self.geometry = None, None, None
        self.layers: list[tuple[int, str]] = []        # (layer, site) recorded
        self._features: dict = {}
        self._labels = None
        self.counts = None
        self.layer_select = pn.widgets.Select(name="layer", options={"readout input": FEATURES}, value=FEATURES,
                                              width=170, disabled=True)
        pn.bind(lambda v: setattr(self, "layer", v), self.layer_select, watch=True)
        self.param.watch(lambda e: self._sync_select(e.new), "layer")
        self.measure_select = pn.widgets.Select.from_param(self.param.measure, options=list(MEASURES), width=150,
                                                           name="across layers")
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.nc_pane = pn.pane.Plotly(figs.nc_curves(None), sizing_mode="stretch_width", height=580)
        self.simplex_pane = pn.pane.Plotly(figs.simplex_3d(None), sizing_mode="stretch_width", height=500)
        self.layer_pane = pn.pane.Plotly(figs.layer_curves(None), sizing_mode="stretch_width", height=400)
        self.gram_pane = pn.pane.Plotly(figs.gram_heatmaps(None), sizing_mode="stretch_width", height=380)
        self.minority_pane = pn.pane.Plotly(figs.minority_curve(None), sizing_mode="stretch_width", height=320)
        if table is not None:
            self.show_record(table)
        if model is not None:
            self.bind(model, x, y, n_classes=n_classes, max_samples=max_samples)
        elif x is not None or y is not None:
            raise ValueError("give the model with its inputs x and labels y (CollapseView(model, x, y))")

    # ---------------------------------------------------------------- binding
    def bind(self, model, x, y, *, n_classes: int | None = None, max_samples: int = 1024) -> None:
        """Record the features of every layer of ``model`` on ``x`` (at most ``max_samples`` examples, the first
        ones) with labels ``y``; then the layer choice offers every layer."""
        checks.check_model("model", model)
        if x is None or y is None:
            raise ValueError("give the inputs x and their labels y of the model (e.g. ds.x_train, ds.y_train)")
        n = checks.check_int("max_samples", max_samples, 2, MAX_SAMPLES)
        x, y = checks.as_tensor("x", x)[:n], checks.as_tensor("y", y)[:n]
        pairs = collapse.sites(model)
        feats, labels, preds = collapse.collect(model, x, y, [s for _, s in pairs])
        self.model, self.layers = model, pairs
        self._features, self._labels, self._preds, self._n_classes = feats, labels, preds, n_classes
        self._layer_table = pd.concat(
            [pd.DataFrame([{"layer": layer, "site": site, "metric": k, "value": v} for k, v in collapse.metrics(
                feats[site], labels, model.readout if site == "features" else None, preds, n_classes=n_classes).items()])
             for layer, site in pairs], ignore_index=True)
        options = {("readout input" if site == "features" else f"layer {layer} ({site})"): (
            FEATURES if site == "features" else layer) for layer, site in pairs}
        with pn.io.hold():
            self.layer_select.options = options
            self.layer_select.disabled = False
            self.refresh()

    def unbind(self) -> None:
        """Forget the bound model and its features (a page about to train another one): back to the records."""
        self.model, self.layers, self._features, self._labels = None, [], {}, None
        self.table, self.geometry, self.counts = None, None, None
        with pn.io.hold():
            self.layer_select.options = {"readout input": FEATURES}
            self.layer_select.disabled = True
            self._reverting = True
            try:
                self.layer = FEATURES
            finally:
                self._reverting = False
            self._accepted["layer"] = FEATURES
            self.status.object = ""
            self.draw()

    def _sync_select(self, value) -> None:
        if value in self.offered("layer", self.layer_select):
            self.layer_select.value = value

    @property
    def bound(self) -> bool:
        return self.model is not None

    # ---------------------------------------------------------------- choices
    def check(self) -> None:
        checks.check_choice("layer", self.layer, self.offered("layer", self.layer_select))
        checks.check_choice("across layers", self.measure, MEASURES)

    def update(self, changed: set[str]) -> None:
        if self.bound and "layer" in changed:
            self.geometry = self._geometry(self.layer)
        self.draw()

    def _site(self, layer: int) -> str:
        return "features" if layer == FEATURES else dict(self.layers)[layer]

    def _geometry(self, layer: int) -> dict:
        site = self._site(layer)
        classes, means, counts = collapse.class_means(self._features[site], self._labels)
        self.counts = counts.cpu().numpy()
        classifier = self.model.readout.weight.detach().double().cpu().numpy()[classes.cpu().numpy()] \
            if site == "features" else None
        return collapse.geometry(means.cpu().numpy(), classifier)

    def measure_at(self, measure: str | None = None, layer: int | None = None) -> float:
        """``measure`` (default the one chosen) at ``layer`` (default the focus) of the bound model."""
        if not self.bound:
            raise ValueError("bind the view to a model and its data first (CollapseView(model, x, y))")
        measure = checks.check_choice("measure", self.measure if measure is None else measure, MEASURES)
        layer = checks.check_choice("layer", self.layer if layer is None else layer,
                                    self.offered("layer", self.layer_select))
        t = self._layer_table
        site = self._site(layer)
        return float(t[(t["site"] == site) & (t["metric"] == measure)]["value"].iloc[0])

    # ---------------------------------------------------------------- results
    def show_record(self, table: pd.DataFrame, geometry: dict | None = None, counts=None, epoch=None) -> None:
        """A tracker's table so far (``CollapseTracker.table``, or a tracked run's collapse rows) and, while
        unbound, the last record's class-mean ``geometry`` (:func:`workbench.collapse.geometry`)."""
        self.table = table
        if geometry is not None and not self.bound:
            self.geometry, self.counts, self._epoch = geometry, counts, epoch
        self.draw()

    def draw(self) -> None:
        t = self.table
        tracked = t is not None and len(t) > 0
        self.nc_pane.object = figs.nc_curves(t if tracked else None)
        self.minority_pane.object = figs.minority_curve(t if tracked else None)
        self.nc_pane.visible = self.minority_pane.visible = tracked or not self.bound
        if self.geometry is None:
            self.simplex_pane.object, self.gram_pane.object = figs.simplex_3d(None), figs.gram_heatmaps(None)
        layers = t if tracked else (self._layer_table if self.bound else None)   # over epochs when tracked
        self.layer_pane.object = figs.layer_curves(layers, metric=self.measure)
        if self.geometry is not None:
            where = ("the readout input" if self.layer == FEATURES else f"layer {self.layer}") if self.bound else \
                f"the readout input, epoch {getattr(self, '_epoch', None) or 0:g}"
            self.simplex_pane.object = figs.simplex_3d(self.geometry["view"], counts=self.counts,
                                                       title=f"Class means (PCA) at {where} and the ideal simplex")
            self.gram_pane.object = figs.gram_heatmaps(self.geometry)
        if self.bound:
            gram = np.asarray(self.geometry["gram"])
            off = gram[~np.eye(len(gram), dtype=bool)]
            self.status.object = (f"{len(self._labels)} examples, {len(gram)} classes; at this layer NC1 "
                                  f"{self.measure_at('nc1'):.3g}, ETF error {self.measure_at('etf_error'):.3g}, "
                                  f"mean cosine of the class means {off.mean():.3f} (simplex: {-1 / (len(gram) - 1):.3f})")

    # ---------------------------------------------------------------- layout
    def widgets(self) -> list:
        return [self.layer_select, self.measure_select]

    def __panel__(self):
        return pn.Column(self.errors, pn.Row(*self.widgets()), self.status, self.nc_pane,
                         pn.Row(self.simplex_pane, self.layer_pane, sizing_mode="stretch_width"),
                         self.gram_pane, self.minority_pane, sizing_mode="stretch_width")
