"""Grokking page: edit a :class:`~workbench.grokking.GrokConfig`, train it through the page's task with
live loss/accuracy curves, then the Fourier heat-map of the embedding and the progress measures (Nanda
et al. 2023); and Tian's (2025) training-fraction threshold, swept through the same task. No math here: the engine (``workbench.grokking``) computes, the figure builders draw."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pandas as pd
import panel as pn

from ..studies import grokking
from ..core.checks import check_choice, check_float, check_int, check_seed
from ..figures import grokking as figs
from ..core.progress import TrainProgress
from .text import escape_md
from .page import Page
from . import examples as starter
from .task import job_monitor
from .sweeps import parse_list
from .views import GrokkingView

EXPLANATION = """**Grokking** (Power et al. 2022; Nanda et al. 2023): a one-layer Transformer without
LayerNorm, trained full-batch with AdamW and strong weight decay on a + b mod p, first memorises the
training pairs (train accuracy near 1, validation near chance), then, long after, generalises. Nanda et
al.'s progress measures show why: the embedding concentrates on a few key Fourier frequencies (the
heat-map), the *restricted loss* (only those frequencies kept) falls before the validation loss does, the
*excluded loss* (those frequencies removed, on the training set) rises as the memorising part is cleaned up,
and the sum of squared weights shrinks. The shaded phases are memorisation, circuit formation and
clean-up (definitions: docs/definitions.md#grok-phases).

**Training-fraction threshold** (Tian 2025): in his two-layer model (frozen one-hot inputs, quadratic
activation, y = V (W [e_a; e_b])^2) generalisation needs about n ≈ 2.75 M ln M training pairs: below, the
model memorises and tests at chance; above, the features it learns are Fourier features and it generalises.
The sweep trains one model per ratio n / (M ln M) (full batch, Adam with an L2 weight-decay term, as in his
code) and draws test accuracy against the ratio with his critical line and his reported points
(docs/definitions.md#grok-threshold)."""

CODE = """import workbench as wb
from workbench import grokking
run = grokking.run(grokking.GrokConfig({fields}))
ph = grokking.phases(run.metrics)
wb.figures.grokking.loss_curves(run.metrics, ph)
wb.figures.grokking.fourier_heatmap(run.metrics)
wb.figures.grokking.measure_curves(run.metrics, ph)"""
THRESHOLD_CODE = """table = grokking.tian_threshold(ratios={ratios!r}, M={M}, epochs={epochs}, hidden={hidden}, lr={lr!r},
                                weight_decay={weight_decay!r}, seed={seed}, optimizer={optimizer!r})
wb.figures.grokking.threshold_curve(table, critical=grokking.TIAN_CRITICAL, reported=grokking.TIAN_REPORTED)"""
THRESHOLD_RATIOS = "1.67, 2.75, 4.16, 5.0"

# the fields the form edits, in order (all of GrokConfig)
FIELDS = [f.name for f in dataclasses.fields(grokking.GrokConfig)]
FLOAT_FIELDS = {"train_fraction", "lr", "weight_decay", "beta1", "beta2", "grad_clip"}


def _defaults(fn) -> dict:
    """The default of each keyword of an engine function (a form starts from the engine's own settings)."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not v.empty}


def _evaluated_rows(state) -> dict:
    """The live curves' payload: the metrics rows so far, without the per-step batch losses."""
    return {"metrics": pd.DataFrame([r for r in state.rows if r["split"] != "batch"])}


def _grok_job(ctx, config: grokking.GrokConfig):
    """Worker thread: train the run, reporting the curves after each evaluation."""
    ctx.report(progress=0.0, message="training")
    progress = TrainProgress(job_monitor(ctx), every=None, payload=_evaluated_rows)
    run = grokking.run(config, callbacks=[progress])
    return {"metrics": run.metrics, "phases": grokking.phases(run.metrics), "run": run}


def _threshold_job(ctx, options: dict):
    """Worker thread: Tian's sweep, one ratio at a time (the table reported after each)."""
    ctx.report(progress=0.0, message=f"ratio 1 / {len(options['ratios'])}")
    return {"threshold": grokking.tian_threshold(**options, monitor=job_monitor(ctx, "threshold"))}


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
        self.view = GrokkingView()   # the figure area: the same view a notebook shows (wb.ui.explore)
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.loss_plot, self.fourier_plot = self.view.loss_pane, self.view.fourier_pane
        self.measure_plot = self.view.measure_pane
        self.results: dict = {}
        # Tian's training-fraction threshold
        self.t_ratios = pn.widgets.TextInput(name="ratios n ÷ (M ln M)", value=THRESHOLD_RATIOS, width=200)
        tian = _defaults(grokking.tian_threshold)   # Tian's settings, as the engine holds them
        self.t_epochs = pn.widgets.IntInput(name="epochs", value=tian["epochs"], width=100)
        self.t_M = pn.widgets.IntInput(name="M", value=tian["M"], width=80)
        self.t_hidden = pn.widgets.IntInput(name="hidden", value=tian["hidden"], width=90)
        self.t_lr = pn.widgets.FloatInput(name="lr", value=tian["lr"], width=90)
        self.t_weight_decay = pn.widgets.FloatInput(name="weight decay", value=tian["weight_decay"], width=100)
        self.t_optimizer = pn.widgets.Select(name="optimizer", options=list(grokking.TIAN_OPTIMIZERS),
                                             value=tian["optimizer"], width=90)
        self.t_seed = pn.widgets.IntInput(name="seed", value=0, width=80)
        self.threshold_button = pn.widgets.Button(name="Run threshold sweep", width=180)
        self.threshold_button.on_click(lambda _: self.run_threshold())
        self.threshold_status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.threshold_plot = pn.pane.Plotly(figs.threshold_curve(None), sizing_mode="stretch_width", height=380)
        self.threshold: pd.DataFrame | None = None

    # ---------------------------------------------------------------- layout
    def side(self):
        main = ["p", "train_fraction", "d_model", "n_heads", "d_mlp", "lr", "weight_decay", "steps"]
        return [pn.Column(*[self.inputs[n] for n in main]), self.train_button]

    def advanced(self):
        main = {"p", "train_fraction", "d_model", "n_heads", "d_mlp", "lr", "weight_decay", "steps"}
        return [pn.Row(*[self.inputs[n] for n in FIELDS if n not in main])]

    def figures(self):
        return [self.status, self.view,
                pn.pane.Markdown("### Training-fraction threshold (Tian 2025)", margin=(0, 10)),
                pn.Row(self.t_ratios, self.t_epochs, self.t_M, self.t_hidden),
                pn.Row(self.t_lr, self.t_weight_decay, self.t_optimizer, self.t_seed),
                self.threshold_button, self.threshold_status, self.threshold_plot]

    def run_buttons(self):
        return [self.train_button, self.threshold_button]

    # ---------------------------------------------------------------- choices
    def config(self) -> grokking.GrokConfig:
        """The form as a validated GrokConfig (ValueError naming the field otherwise)."""
        config = grokking.GrokConfig(**{n: w.value for n, w in self.inputs.items()}).validate()
        self.check_steps(config.steps, "steps")   # a student's job budget, refused at once
        return config

    def threshold_options(self) -> dict:
        """The threshold sweep's arguments from its widgets (ValueError naming the field otherwise)."""
        M = check_int("M", self.t_M.value, 3, 211)
        hi = M / math.log(M)
        raw = parse_list("ratios", self.t_ratios.value)
        if len(raw) > 24:
            raise ValueError(f"ratios must hold at most 24 numbers, got {len(raw)}")
        ratios = [check_float(f"ratios: value {i + 1}", r, 0, math.floor(hi * 1000) / 1000, lo_open=True, hi_open=True)
                  for i, r in enumerate(raw)]
        return {"ratios": ratios, "M": M, "epochs": check_int("epochs", self.t_epochs.value, 1, 100_000),
                "hidden": check_int("hidden", self.t_hidden.value, 1, 4096),
                "lr": check_float("lr", self.t_lr.value, 0, 1, lo_open=True),
                "weight_decay": check_float("weight decay", self.t_weight_decay.value, 0, 10),
                "seed": check_seed("seed", self.t_seed.value),
                "optimizer": check_choice("optimizer", self.t_optimizer.value, grokking.TIAN_OPTIMIZERS)}

    def as_code(self) -> str:
        c = self.config()
        default = grokking.GrokConfig()
        fields = ", ".join(f"{n}={getattr(c, n)!r}" for n in FIELDS if getattr(c, n) != getattr(default, n))
        return CODE.format(fields=fields) + "\n" + THRESHOLD_CODE.format(**self.threshold_options())

    # ---------------------------------------------------------------- actions
    def train(self, wait: bool = False) -> None:
        """Validate the form and start training (``wait=True``: synchronously, for tests)."""
        config = self.read_form(self.config)
        if config is None:
            return
        self.results = {}
        self.show_code()
        self.start_task(_grok_job, config, wait=wait)

    def run_threshold(self, wait: bool = False) -> None:
        """Validate the threshold widgets and start Tian's sweep (``wait=True``: synchronously, for tests)."""
        options = self.read_form(self.threshold_options)
        if options is None:
            return
        self.threshold = None
        self.threshold_status.object = ""
        self.show_code()
        self.start_task(_threshold_job, options, wait=wait)

    # ---------------------------------------------------------------- results
    def _show_threshold(self, table: pd.DataFrame) -> None:
        self.threshold = table
        self.threshold_plot.object = figs.threshold_curve(table, critical=grokking.TIAN_CRITICAL,
                                                          reported=grokking.TIAN_REPORTED)
        if len(table):
            here = ", ".join(f"{a:.2f} at {r:g}" for r, a in zip(table["ratio"], table["test_acc"]))
            tian = ", ".join(f"{a:.2f} at {r:g}" for r, a in grokking.TIAN_REPORTED.items())
            self.threshold_status.object = escape_md(
                f"test accuracy here: {here} (train accuracy {table['train_acc'].min():.2f} or more); "
                f"Tian 2025 (M = 71, 3000 epochs): {tian}; predicted critical ratio {grokking.TIAN_CRITICAL:g}")

    def show_example(self) -> bool:
        """The example grokking run's curves and progress measures (its stored metrics), its config in the form."""
        run_id = starter.example_id(self.datastore, "grokking")
        if run_id is None or self.results or not self.fresh():
            return False
        metrics = self.datastore.store.read_metrics(run_id)
        config = self.datastore.store.read_json(run_id).get("meta", {}).get("grok", {})
        for name, widget in self.inputs.items():
            if name in config:
                widget.value = config[name]
        metrics = metrics[metrics["split"] != "batch"].reset_index(drop=True)
        self.show({"metrics": metrics, "phases": grokking.phases(metrics)})
        self.show_code()
        self.show_note(starter.note("grokking", "Its curves and progress measures are drawn and its settings are in "
                                                "the form; **Train** trains it (or your own settings) live."))
        return True

    def show(self, payload: dict) -> None:
        if "threshold" in payload:
            self._show_threshold(payload["threshold"])
            return
        self.results.update(payload)
        metrics, phases = payload.get("metrics"), payload.get("phases")
        if metrics is None:
            return
        self.view.show_metrics(metrics, phases)
        if phases is not None:
            acc = metrics[metrics["metric"] == "acc"].sort_values("step").groupby("split")["value"].last()
            shown = {k: ("not reached" if v is None else v) for k, v in phases.items()}
            self.status.object = escape_md(
                f"final train accuracy {acc.get('train', float('nan')):.3f}, validation {acc.get('val', float('nan')):.3f}; "
                f"train 0.99 at step {shown['memorised']}, validation 0.99 at step {shown['grokked']}")
