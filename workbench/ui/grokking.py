"""Grokking page: edit a :class:`~workbench.grokking.GrokConfig`, train it through the page's task with
live loss/accuracy curves, then the Fourier heat-map of the embedding and the progress measures (Nanda
et al. 2023). No math here: the engine (``workbench.grokking``) computes, the figure builders draw."""
from __future__ import annotations

import dataclasses

import pandas as pd
import panel as pn

from .. import grokking
from ..figures import grokking as figs
from ..training import Callback, StopOnEvent
from .common import escape_md
from .page import Page

EXPLANATION = """**Grokking** (Power et al. 2022; Nanda et al. 2023): a one-layer Transformer without
LayerNorm, trained full-batch with AdamW and strong weight decay on a + b mod p, first memorises the
training pairs (train accuracy near 1, validation near chance), then, long after, generalises. Nanda et
al.'s progress measures show why: the embedding concentrates on a few key Fourier frequencies (the
heat-map), the *restricted loss* (only those frequencies kept) falls before the validation loss does, the
*excluded loss* (those frequencies removed, on the training set) rises as the memorising part is cleaned up,
and the sum of squared weights shrinks. The shaded phases are memorisation, circuit formation and
clean-up (definitions: docs/definitions.md#grok-phases)."""

CODE = """import workbench as wb
from workbench import grokking
run = grokking.run(grokking.GrokConfig({fields}))
ph = grokking.phases(run.metrics)
wb.figures.grokking.loss_curves(run.metrics, ph)
wb.figures.grokking.fourier_heatmap(run.metrics)
wb.figures.grokking.measure_curves(run.metrics, ph)"""

# the fields the form edits, in order (all of GrokConfig)
FIELDS = [f.name for f in dataclasses.fields(grokking.GrokConfig)]
FLOAT_FIELDS = {"train_fraction", "lr", "weight_decay", "beta1", "beta2", "grad_clip"}


class _Live(Callback):
    """Send the metrics rows so far to the page after each evaluation (live curves)."""

    def __init__(self, ctx, steps: int):
        self.ctx, self.steps = ctx, steps

    def on_eval(self, state, rows):
        shown = [r for r in state.rows if r["split"] != "batch"]  # rows already hold this evaluation's
        self.ctx.report({"metrics": pd.DataFrame(shown)},
                        progress=state.step / self.steps, message=f"step {state.step} / {self.steps}")


def _grok_job(ctx, config: grokking.GrokConfig):
    """Worker thread: train the run, reporting the curves as it goes."""
    ctx.report(progress=0.0, message="training")
    run = grokking.run(config, callbacks=[_Live(ctx, config.steps), StopOnEvent(ctx.stop_event)])
    return {"metrics": run.metrics, "phases": grokking.phases(run.metrics), "run": run}


class GrokkingPage(Page):
    """A GrokConfig editor, a Train button (the page's task), live curves, the Fourier heat-map, the measures."""

    title = "Grokking"
    order = 69
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        default = grokking.GrokConfig()
        self.inputs = {}
        for name in FIELDS:
            value = getattr(default, name)
            widget = pn.widgets.FloatInput if name in FLOAT_FIELDS else pn.widgets.IntInput
            self.inputs[name] = widget(name=name, value=value, width=110)
        self.train_button = pn.widgets.Button(name="Train", button_type="primary", width=120)
        self.train_button.on_click(lambda _: self.train())
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.loss_plot = pn.pane.Plotly(figs.loss_curves(None), sizing_mode="stretch_width", height=460)
        self.fourier_plot = pn.pane.Plotly(figs.fourier_heatmap(None), sizing_mode="stretch_width", height=420)
        self.measure_plot = pn.pane.Plotly(figs.measure_curves(None), sizing_mode="stretch_width", height=420)
        self.results: dict = {}

    # ---------------------------------------------------------------- layout
    def side(self):
        main = ["p", "train_fraction", "d_model", "n_heads", "d_mlp", "lr", "weight_decay", "steps"]
        return [pn.Column(*[self.inputs[n] for n in main]), self.train_button]

    def advanced(self):
        main = {"p", "train_fraction", "d_model", "n_heads", "d_mlp", "lr", "weight_decay", "steps"}
        return [pn.Row(*[self.inputs[n] for n in FIELDS if n not in main])]

    def figures(self):
        return [self.status, self.loss_plot, self.fourier_plot, self.measure_plot]

    def run_buttons(self):
        return [self.train_button]

    # ---------------------------------------------------------------- choices
    def config(self) -> grokking.GrokConfig:
        """The form as a validated GrokConfig (ValueError naming the field otherwise)."""
        return grokking.GrokConfig(**{n: w.value for n, w in self.inputs.items()}).validate()

    def as_code(self) -> str:
        c = self.config()
        default = grokking.GrokConfig()
        fields = ", ".join(f"{n}={getattr(c, n)!r}" for n in FIELDS if getattr(c, n) != getattr(default, n))
        return CODE.format(fields=fields)

    # ---------------------------------------------------------------- actions
    def train(self, wait: bool = False) -> None:
        """Validate the form and start training (``wait=True``: synchronously, for tests)."""
        if self.task.busy():
            return
        self.errors.clear()
        try:
            config = self.config()
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return
        self.results = {}
        self.show_code()
        self.start_task(_grok_job, config, wait=wait)

    # ---------------------------------------------------------------- results
    def on_update(self, payload) -> None:
        if isinstance(payload, dict):
            self._show(payload)

    def on_done(self, result) -> None:
        if isinstance(result, dict):
            self._show(result)

    def _show(self, payload: dict) -> None:
        self.results.update(payload)
        metrics, phases = payload.get("metrics"), payload.get("phases")
        if metrics is None:
            return
        self.loss_plot.object = figs.loss_curves(metrics, phases)
        self.fourier_plot.object = figs.fourier_heatmap(metrics)
        self.measure_plot.object = figs.measure_curves(metrics, phases)
        if phases is not None:
            acc = metrics[metrics["metric"] == "acc"].sort_values("step").groupby("split")["value"].last()
            shown = {k: ("not reached" if v is None else v) for k, v in phases.items()}
            self.status.object = escape_md(
                f"final train accuracy {acc.get('train', float('nan')):.3f}, validation {acc.get('val', float('nan')):.3f}; "
                f"train 0.99 at step {shown['memorised']}, validation 0.99 at step {shown['grokked']}")
