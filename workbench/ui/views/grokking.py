"""The grokking progress measures of one run: train and validation curves with the three phases, the Fourier
heat-map of the embedding, the spectrum at a chosen step with its key frequencies, and the restricted and
excluded losses (Nanda et al. 2023).

Bound to a grokking run's metrics (``GrokkingView(run.metrics)``, or the Run): the figures are built once per
frame and a copy with a step marker is drawn when ``step`` moves, so moving it rebuilds none of them. The
Grokking page embeds the same view and hands it the live metrics (:meth:`GrokkingView.show_metrics`).
Definitions: ``docs/definitions.md#grok-measures``, ``#grok-phases``.
"""
from __future__ import annotations

import pandas as pd
import panel as pn
import plotly.graph_objects as go
import param

from ...core import checks
from ...studies import grokking
from ...figures import grokking as figs
from ..text import escape_md
from .base import Explorer

__all__ = ["GrokkingView", "is_grokking_frame"]


def is_grokking_frame(frame) -> bool:
    """Whether ``frame`` is a grokking run's metrics (it holds the progress measures' Fourier norms)."""
    return (isinstance(frame, pd.DataFrame) and {"step", "split", "metric", "value"} <= set(frame.columns)
            and bool(((frame["split"] == "measure") & frame["metric"].astype(str).str.startswith("fourier_")).any()))


def _step_line(fig: go.Figure, step: int, axes=("x",)) -> go.Figure:
    """A copy of ``fig`` with a dashed vertical line at ``step`` on each of ``axes`` (``"x"``, ``"x2"``)."""
    out = go.Figure(fig)
    for ax in axes:
        out.add_shape(type="line", xref=ax, yref=f"y{ax[1:]} domain", x0=step, x1=step, y0=0, y1=1,
                      line=dict(color="#333", width=1.5, dash="dash"))
    return out


class GrokkingView(Explorer):
    """Progress measures of a grokking run, with ``step`` (a measured step) in focus.

    :meth:`at_step` gives the numbers at the focus: accuracies, restricted and excluded loss, key frequencies.
    """

    step = param.Integer(default=0, doc="the measured step in focus")

    title = "Grokking progress measures"
    choices = ("step",)

    def __init__(self, metrics: pd.DataFrame | None = None, **params):
        super().__init__(**params)
        self.metrics: pd.DataFrame | None = None
        self.phases: dict | None = None
        self.steps: list[int] = []
        self.step_slider = pn.widgets.DiscreteSlider(name="step", options=[0], value=0, width=420, disabled=True)
        self.step_slider.param.watch(lambda e: setattr(self, "step", int(e.new)), "value")
        self.param.watch(lambda e: setattr(self.step_slider, "value", e.new) if e.new in self.steps else None, "step")
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.loss_pane = pn.pane.Plotly(figs.loss_curves(None), sizing_mode="stretch_width", height=460)
        self.fourier_pane = pn.pane.Plotly(figs.fourier_heatmap(None), sizing_mode="stretch_width", height=420)
        self.spectrum_pane = pn.pane.Plotly(figs.fourier_spectrum(None), sizing_mode="stretch_width", height=320)
        self.measure_pane = pn.pane.Plotly(figs.measure_curves(None), sizing_mode="stretch_width", height=420)
        self._figs: dict = {}
        if metrics is not None:
            if not is_grokking_frame(metrics):
                raise ValueError("metrics must be a grokking run's metrics (wb.grokking.run(config).metrics, with "
                                 "its progress measures: GrokConfig(every > 0))")
            self.show_metrics(metrics)

    # ---------------------------------------------------------------- results
    def show_metrics(self, metrics: pd.DataFrame | None, phases: dict | None = None) -> None:
        """Draw a run's metrics (live or final); the focus moves to the last measured step when it was there."""
        self.metrics = metrics
        self.phases = phases if phases is not None or metrics is None else grokking.phases(metrics)
        measured = metrics[metrics["split"] == "measure"] if metrics is not None and len(metrics) else None
        at_end = not self.steps or self.step == self.steps[-1]
        self.steps = sorted(int(s) for s in measured["step"].unique()) if measured is not None else []
        self._figs = {}
        if metrics is not None and len(metrics):
            self._figs = {"loss": figs.loss_curves(metrics, self.phases), "heat": figs.fourier_heatmap(metrics),
                          "measure": figs.measure_curves(metrics, self.phases)}
        with pn.io.hold():
            self.step_slider.options = self.steps or [0]
            self.step_slider.disabled = not self.steps
            step = self.steps[-1] if self.steps and (at_end or self.step not in self.steps) else self.step
            self._reverting = True
            try:
                self.step = step if self.steps else 0
            finally:
                self._reverting = False
            self._accepted["step"] = self.step
            self.draw()

    # ---------------------------------------------------------------- choices
    def check(self) -> None:
        if self.steps:
            checks.check_choice("step", self.step, self.steps)

    def update(self, changed: set[str]) -> None:
        self.draw()

    def at_step(self, step: int | None = None) -> dict:
        """The numbers at ``step`` (default the focus): ``train_acc`` and ``val_acc`` of the last evaluation at or
        before it, ``restricted_loss``, ``excluded_loss``, ``sum_sq_weights`` and the key frequencies ``keys``."""
        if self.metrics is None or not self.steps:
            raise ValueError("no progress measures yet: give the view a grokking run's metrics")
        step = checks.check_choice("step", self.step if step is None else step, self.steps)
        m = self.metrics
        out = {"step": step}
        acc = m[(m["metric"] == "acc") & (m["step"] <= step)].sort_values("step")
        for split in ("train", "val"):
            s = acc[acc["split"] == split]
            out[f"{split}_acc"] = float(s["value"].iloc[-1]) if len(s) else float("nan")
        here = m[(m["split"] == "measure") & (m["step"] == step)].set_index("metric")["value"]
        for name in ("restricted_loss", "excluded_loss", "sum_sq_weights"):
            out[name] = float(here.get(name, float("nan")))
        ranks = sorted((int(k.rsplit("_", 1)[1]), int(v)) for k, v in here.items() if k.startswith("key_rank_"))
        out["keys"] = [k for _, k in ranks]
        return out

    def draw(self) -> None:
        if not self._figs:
            return
        step, f = self.step, self._figs
        self.loss_pane.object = _step_line(f["loss"], max(step, 1), ("x", "x2"))
        self.fourier_pane.object = _step_line(f["heat"], step)
        self.measure_pane.object = _step_line(f["measure"], step, ("x", "x2"))
        self.spectrum_pane.object = figs.fourier_spectrum(self.metrics, step)
        if self.steps:
            a = self.at_step()
            ph = {k: ("not reached" if v is None else v) for k, v in (self.phases or {}).items()}
            self.status.object = escape_md(
                f"step {step}: train accuracy {a['train_acc']:.3f}, validation {a['val_acc']:.3f}; restricted loss "
                f"{a['restricted_loss']:.3g}, excluded loss {a['excluded_loss']:.3g}; key frequencies "
                f"{', '.join(map(str, a['keys']))}. Train 0.99 at step {ph.get('memorised')}, validation 0.99 at "
                f"step {ph.get('grokked')}")

    # ---------------------------------------------------------------- layout
    def __panel__(self):
        return pn.Column(self.errors, self.step_slider, self.status, self.loss_pane,
                         pn.Row(self.fourier_pane, self.spectrum_pane, sizing_mode="stretch_width"),
                         self.measure_pane, sizing_mode="stretch_width")
