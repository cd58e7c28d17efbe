"""Connectivity page: are two solutions linearly connected, before and after aligning their units?"""
from __future__ import annotations

import pandas as pd
import panel as pn

from ..core import checks, data, models
from ..core import monitor as wb_monitor
from ..experiments import connectivity
from .. import lmc
from ..figures import lmc as figs
from ..core.training import TrainConfig
from .session import dataset_from_spec, open_run
from .text import short_spec
from .widgets import run_options
from .page import Page
from . import examples as starter
from .task import job_monitor
from .views import ConnectivityView

EXPLANATION = """Two networks trained from different seeds reach similar accuracy, yet the straight line
between their weights usually crosses a loss *barrier*. Much of it comes from the arbitrary order of hidden
units: permuting B's units to match A's (weight matching or activation matching, Git Re-Basin) lowers it,
and REPAIR (rescaling the hidden units of the interpolated model to the interpolated statistics) lowers it
further. Barriers are given both ways: over the endpoints' mean (Git Re-Basin) and over the straight line
between the endpoints (Entezari, Frankle). Layer-wise bars interpolate one layer at a time on the
weight-matched pair (the rest from A, or from B); the contour shows the loss over the plane through A, B and
weight-matched B; instability spawns two children from one parent at step k (Frankle et al. 2020).
Optimal-transport fusion transports B's units onto A's with a hard (EMD) or soft (Sinkhorn) map before
averaging; the layer-wise heat-maps interpolate one layer at a time from base A or base B, with cumulative
barriers from the input and from the output and the first-order barrier estimate (Adilova et al. 2024)."""

def _dataset_of(run) -> data.Dataset:
    return dataset_from_spec(run.dataset)  # never a server path


def open_pair(store, id_a: str, id_b: str):
    """Runs A and B from the store, in the job: the same architecture and data, or a ValueError saying why (a
    run id that vanished, was forged or is another user's is refused naming "model A" or "model B")."""
    ra, rb = open_run(store, id_a, "model A"), open_run(store, id_b, "model B")
    lmc.check_same_architecture(ra.model, rb.model)  # ValueError naming the differing fields
    if ra.dataset != rb.dataset:
        raise ValueError(f"the runs were trained on different data ({short_spec(ra.dataset)} vs "
                         f"{short_spec(rb.dataset)}); connectivity compares two solutions of the same task")
    return ra, rb


def _analysis_job(ctx, store, id_a: str, id_b: str, n_alphas: int, resolution: int, max_examples: int):
    """Curves for every method, barriers, layer-wise barriers and the plane (worker thread)."""
    ctx.report(progress=0.0, message="loading the runs")
    run_a, run_b = open_pair(store, id_a, id_b)
    return connectivity.analysis(run_a.model.eval(), run_b.model.eval(), _dataset_of(run_a), n_alphas=n_alphas,
                                 resolution=resolution, max_examples=max_examples, monitor=job_monitor(ctx))


MAX_EXAMPLES = 1_000_000          # "examples per split" (0: all of them)
MAX_INSTABILITY_STEPS = 100_000   # "total steps" of the instability children
MAX_SPAWNS = 16                   # spawn steps (two children trained at each)
FUSION_REGS = connectivity.FUSION_REGS   # the reg slider's stops


def _fusion_job(ctx, store, id_a: str, id_b: str, ground: str, qk: str, max_examples: int):
    """Fused models for vanilla, EMD and every Sinkhorn reg of the slider, and their couplings (worker thread)."""
    run_a, run_b = open_pair(store, id_a, id_b)
    return connectivity.fusion(run_a.model.eval(), run_b.model.eval(), _dataset_of(run_a), ground=ground, qk=qk,
                               max_examples=max_examples, monitor=job_monitor(ctx))


def _layerwise_job(ctx, store, id_a: str, id_b: str, n_alphas: int, max_examples: int):
    """Single-layer curves, cumulative barriers and the barrier estimate, before and after weight matching."""
    run_a, run_b = open_pair(store, id_a, id_b)
    return connectivity.layerwise(run_a.model.eval(), run_b.model.eval(), _dataset_of(run_a), n_alphas=n_alphas,
                                  max_examples=max_examples, monitor=job_monitor(ctx))


def _pair_job(ctx, dataset_name: str, data_options: dict, model: dict, train: dict):
    """Train the pair (seeds 0 and 1); a stopped pair is not returned (nothing half-trained is saved)."""
    ctx.report(progress=0.0, message="training models A and B")
    runs = connectivity.pair(dataset_name, data_options, model, train, seeds=(0, 1), monitor=job_monitor(ctx))
    if any(r.status == "cancelled" for r in runs):
        raise wb_monitor.Stopped("cancelled")
    return runs


def _instability_job(ctx, store, id_a: str, id_b: str, spawn_steps: list[int], steps: int, n_alphas: int,
                     max_examples: int):
    run_a, _ = open_pair(store, id_a, id_b)
    return connectivity.instability(run_a, _dataset_of(run_a), spawn_steps=spawn_steps, steps=steps, n_alphas=n_alphas,
                                    max_examples=max_examples, monitor=job_monitor(ctx))


class ConnectivityPage(Page):
    """Pick two stored runs (or train a pair); compute curves, barriers, layer-wise bars, plane, instability."""

    title = "Connectivity"
    order = 40
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.run_a = pn.widgets.Select(name="model A", width=320)
        self.run_b = pn.widgets.Select(name="model B", width=320)
        self.n_alphas = pn.widgets.IntInput(name="alphas", value=25, start=3, end=101, width=90)
        self.resolution = pn.widgets.IntInput(name="plane resolution", value=15, start=3, end=61, width=120)
        self.max_examples = pn.widgets.IntInput(name="examples per split", value=1024, start=0, width=130)
        self.compute_button = pn.widgets.Button(name="Compare A and B", button_type="primary", width=160)
        self.compute_button.on_click(lambda _: self.compute())
        # train a pair
        self.pair_dataset = pn.widgets.Select(name="dataset", options=[n for n in data.names() if n != "text"],
                                              value="digits", width=120)
        self.pair_width = pn.widgets.IntInput(name="d_model", start=4, end=2048, width=100)
        self.pair_layers = pn.widgets.IntInput(name="n_layers", start=1, end=12, width=100)
        self.pair_steps = pn.widgets.IntInput(name="steps", start=10, end=100_000, width=100)
        self.pair_button = pn.widgets.Button(name="Train a pair (seeds 0, 1)", width=200)
        self.pair_button.on_click(lambda _: self.train_pair())
        # instability
        self.spawn_steps = pn.widgets.TextInput(name="spawn steps", value="0, 25, 50, 100", width=160)
        self.inst_steps = pn.widgets.IntInput(name="total steps", value=300, start=2, width=110)
        self.inst_button = pn.widgets.Button(name="Run instability (trains)", width=190)
        self.inst_button.on_click(lambda _: self.run_instability())

        self.view = ConnectivityView()   # curves and barriers: the same view a notebook shows (wb.ui.explore)
        self.curves_plot, self.barriers = self.view.curves_pane, self.view.table
        self.layer_plot = pn.pane.Plotly(figs.layerwise_bars(None), sizing_mode="stretch_width", height=330)
        self.plane_plot = pn.pane.Plotly(figs.plane_contour(None), sizing_mode="stretch_width", height=430)
        self.inst_plot = pn.pane.Plotly(figs.instability_plot(None), sizing_mode="stretch_width", height=330)
        # OT fusion
        self.fusion_method = pn.widgets.Select(name="fusion map", options=["vanilla", "emd", "sinkhorn"],
                                               value="sinkhorn", width=110)
        self.fusion_reg = pn.widgets.DiscreteSlider(name="Sinkhorn reg (soft <-> hard)", options=list(FUSION_REGS),
                                                    value=0.08, width=220)
        self.fusion_layer = pn.widgets.Select(name="layer", options=[], width=120)
        self.fusion_ground = pn.widgets.Select(name="ground metric", options=["activations", "weights"],
                                               value="activations", width=120)
        self.fusion_qk = pn.widgets.Select(name="Q and K", options=["joint", "separate"], value="joint", width=100)
        self.fusion_button = pn.widgets.Button(name="Fuse A and B (optimal transport)", width=240)
        self.fusion_button.on_click(lambda _: self.run_fusion())
        self.fusion_plot = pn.pane.Plotly(figs.fusion_vs_reg(None), sizing_mode="stretch_width", height=370)
        self.map_plot = pn.pane.Plotly(figs.transport_map(None), sizing_mode="stretch_width", height=390)
        for w in (self.fusion_method, self.fusion_reg, self.fusion_layer):
            w.param.watch(lambda _: self._show_map(), "value")
        # layer-wise LMC
        self.layerwise_button = pn.widgets.Button(name="Layer-wise LMC + barrier estimate", width=250)
        self.layerwise_button.on_click(lambda _: self.run_layerwise())
        self.base_heat = {base: pn.pane.Plotly(figs.layerwise_heatmap(None, base), sizing_mode="stretch_width",
                                               height=370) for base in ("A", "B")}
        self.base_cum = {base: pn.pane.Plotly(figs.cumulative_barriers(None), sizing_mode="stretch_width",
                                              height=370) for base in ("A", "B")}
        self.base_tabs = pn.Tabs(*[(f"base {base}", pn.Column(self.base_heat[base], self.base_cum[base],
                                                              sizing_mode="stretch_width")) for base in ("A", "B")],
                                 sizing_mode="stretch_width")
        self.results: dict = {}
        self.pair_dataset.param.watch(self._fill_pair, "value")
        self._fill_pair()
        self._refresh_runs()

    def _fill_pair(self, _=None) -> None:
        """The pair's preset for its dataset (width, depth, steps: ``experiments.connectivity.pair_choices``)."""
        preset = connectivity.pair_choices(self.pair_dataset.value)
        self.pair_width.value, self.pair_layers.value = preset["model"]["d_model"], preset["model"]["n_layers"]
        self.pair_steps.value = preset["train"]["steps"]

    def side(self):
        return [self.run_a, self.run_b, self.compute_button]

    def figures(self):
        return [self.view, pn.Row(self.layer_plot, self.plane_plot, sizing_mode="stretch_width"),
                pn.Row(self.spawn_steps, self.inst_steps, self.inst_button), self.inst_plot,
                pn.pane.Markdown("**Optimal-transport fusion** (Imfeld et al. 2024): B's units transported onto "
                                 "A's, then averaged; hard (EMD) or soft (Sinkhorn) maps."),
                pn.Row(self.fusion_ground, self.fusion_qk, self.fusion_button),
                pn.Row(self.fusion_method, self.fusion_reg, self.fusion_layer),
                pn.Row(self.map_plot, self.fusion_plot, sizing_mode="stretch_width"),
                pn.pane.Markdown("**Layer-wise LMC** (Adilova et al. 2024): one layer interpolated, the rest "
                                 "from the base; cumulative from the input and from the output; crosses: the "
                                 "first-order estimate; before and after weight matching."),
                self.layerwise_button, self.base_tabs]

    def advanced(self):
        return [pn.Row(self.n_alphas, self.resolution, self.max_examples),
                pn.pane.Markdown("**No pair stored? Train one** (seeds 0 and 1)", margin=(0, 10)),
                pn.Row(self.pair_dataset, self.pair_width, self.pair_layers, self.pair_steps, self.pair_button)]

    def run_buttons(self):
        return [self.compute_button, self.pair_button, self.inst_button, self.fusion_button, self.layerwise_button]

    def on_store_change(self) -> None:
        self._refresh_runs()

    def pair_choices(self) -> dict:
        """The choices of "train a pair" (``dataset``, ``data_options``, ``model``, ``train`` for
        ``experiments.connectivity.pair``): the dataset's preset with the form's width, depth and steps,
        checked without building any data; ValueError names the field."""
        name = self.pair_dataset.value
        preset = connectivity.pair_choices(name)
        model = {**preset["model"], "d_model": self.pair_width.value, "n_layers": self.pair_layers.value}
        steps = self.pair_steps.value
        train = {**preset["train"], "steps": steps, "eval_every": steps if isinstance(steps, int) and steps > 0 else 1}
        models.config_for(data.shape_of(name, **preset["data_options"]), **model)   # no data built
        TrainConfig(**train).validate()
        self.check_steps(2 * steps, "steps (x 2 models)")   # a student's job budget, refused at once
        return {"dataset": name, "data_options": preset["data_options"], "model": model, "train": train}

    def as_code(self) -> str:
        if self.run_a.value and self.run_b.value:
            try:
                spawn = sorted({int(s) for s in self.spawn_steps.value.replace(",", " ").split()})
            except ValueError:
                spawn = [0]
            return connectivity.as_code(run_a=self.run_a.value, run_b=self.run_b.value,
                                        n_alphas=int(self.n_alphas.value or 25),
                                        max_examples=int(self.max_examples.value or 0),
                                        resolution=int(self.resolution.value or 15),
                                        inst_steps=int(self.inst_steps.value or 2), spawn=spawn)
        return connectivity.as_code(**self.pair_choices())

    # ---------------------------------------------------------------- state
    def _refresh_runs(self) -> None:
        options = run_options(self.datastore.runs)
        for w, pick in ((self.run_a, 0), (self.run_b, 1)):
            current = w.value
            w.options = options
            if current in options.values():
                w.value = current
            elif len(options) > pick:
                w.value = list(options.values())[pick]

    def _start(self, fn, *args, wait: bool = False) -> None:
        self.show_code()
        self.start_task(fn, *args, wait=wait)

    def _pair(self):
        """``(store, id A, id B)`` of the chosen pair, checked without opening them (the job opens them)."""
        if not self.run_a.value or not self.run_b.value:
            raise ValueError("pick two stored runs (or train a pair first)")
        if self.run_a.value == self.run_b.value:
            raise ValueError("model A and model B are the same run; pick two different runs")
        return self.datastore.store, self.run_a.value, self.run_b.value

    def _numbers(self) -> dict:
        """The numeric fields, checked (an emptied or forged field is named with its range)."""
        return {"n_alphas": checks.check_int("alphas", self.n_alphas.value, 3, 101),
                "resolution": checks.check_int("plane resolution", self.resolution.value, 3, 61),
                "max_examples": checks.check_int("examples per split", self.max_examples.value, 0, MAX_EXAMPLES)}

    def _pair_and_numbers(self):
        return self._pair(), self._numbers()

    # ---------------------------------------------------------------- actions
    def compute(self, wait: bool = False) -> None:
        """Check the pair and start the analysis (``wait=True`` runs synchronously, for tests).

        Refused, with a notice next to the progress bar, while a computation runs (so for the other buttons).
        """
        form = self.read_form(self._pair_and_numbers)
        if form is None:
            return
        pair, n = form
        self.results = {}
        self._start(_analysis_job, *pair, n["n_alphas"], n["resolution"], n["max_examples"], wait=wait)

    def train_pair(self, wait: bool = False) -> None:
        choices = self.read_form(self.pair_choices)
        if choices is not None:
            self._start(_pair_job, choices["dataset"], choices["data_options"], choices["model"], choices["train"],
                        wait=wait)

    def run_instability(self, wait: bool = False) -> None:
        if self.task.busy():
            return
        self.errors.clear()
        try:
            text = self.spawn_steps.value or ""
            if len(text) > 200:
                raise ValueError(f"spawn steps: at most 200 characters, got {len(text)}")
            steps = sorted({int(s) for s in text.replace(",", " ").split()})
            pair, n = self._pair_and_numbers()
            total = checks.check_int("total steps", self.inst_steps.value, 2, MAX_INSTABILITY_STEPS)
        except ValueError as e:
            self.errors.show(e if "invalid literal" not in str(e) else
                             "spawn steps: give whole numbers separated by commas, e.g. 0, 25, 50")
            return
        if not steps or steps[0] < 0 or steps[-1] >= total:
            self.errors.show(f"spawn steps must lie in [0, {total - 1}] (total steps {total})")
            return
        if len(steps) > MAX_SPAWNS:
            self.errors.show(f"spawn steps: at most {MAX_SPAWNS} (each trains two children), got {len(steps)}")
            return
        self._start(_instability_job, *pair, steps, total, max(5, n["n_alphas"] // 2), n["max_examples"], wait=wait)

    def run_fusion(self, wait: bool = False) -> None:
        """Fuse A and B by every method of the page (vanilla, EMD, Sinkhorn at each reg of the slider)."""
        form = self.read_form(self._pair_and_numbers)
        if form is not None:
            pair, n = form
            try:
                ground, qk = (checks.check_choice(w.name, w.value, w.options) for w in (self.fusion_ground,
                                                                                      self.fusion_qk))
            except ValueError as e:   # a forged value: named, nothing started
                self.errors.show(e)
                return
            self._start(_fusion_job, *pair, ground, qk, n["max_examples"], wait=wait)

    def run_layerwise(self, wait: bool = False) -> None:
        """Layer-wise curves (base A and B), cumulative barriers and the estimate, before and after alignment."""
        form = self.read_form(self._pair_and_numbers)
        if form is not None:
            pair, n = form
            self._start(_layerwise_job, *pair, max(3, n["n_alphas"] // 2), n["max_examples"], wait=wait)

    def _show_map(self) -> None:
        maps = self.results.get("maps")
        if not maps:
            return
        method = self.fusion_method.value
        key = (method, float(self.fusion_reg.value) if method == "sinkhorn" else None)
        layer = self.fusion_layer.value
        chosen = maps.get(key, {})
        if layer in chosen:
            label = f"{method}" + (f", reg {self.fusion_reg.value:g}" if method == "sinkhorn" else "")
            self.map_plot.object = figs.transport_map(chosen[layer], title=f"transport map {layer} ({label})")

    # ---------------------------------------------------------------- results
    def show_example(self) -> bool:
        """The example pair chosen as A and B, with its curves, layer-wise barriers and plane (stored with A)."""
        id_a, stored = starter.stored(self.datastore, "pair-a", "connectivity")
        id_b = starter.example_id(self.datastore, "pair-b")
        if stored is None or id_b is None or self.results or not self.fresh():
            return False
        self.run_a.value, self.run_b.value = id_a, id_b
        self.show(stored)
        self.show_code()
        self.show_note(starter.note("pair-a", "With its seed-1 twin as B: the curves, layer-wise barriers and plane "
                                              "are the stored result of *Compare A and B*; pick your own pair and "
                                              "press it."))
        return True

    def on_done(self, result) -> None:
        if isinstance(result, list):  # a trained pair
            ids = [self.datastore.save(r) for r in result]
            self.run_a.value, self.run_b.value = ids
        elif isinstance(result, pd.DataFrame):  # instability
            self.results["instability"] = result
            self.inst_plot.object = figs.instability_plot(result)
        elif isinstance(result, dict):
            self.show(result)

    def show(self, payload: dict) -> None:
        self.results.update(payload)
        if "curves" in payload:
            self.results["barriers"] = lmc.barrier(payload["curves"])
            self.view.show_curves(payload["curves"])
        if "layerwise" in payload:
            self.layer_plot.object = figs.layerwise_bars(payload["layerwise"])
        if "plane" in payload:
            self.plane_plot.object = figs.plane_contour(payload["plane"])
        if "fusion" in payload:
            self.fusion_plot.object = figs.fusion_vs_reg(payload["fusion"])
            layers = list(next(iter(payload["maps"].values())))
            self.fusion_layer.options = layers
            if self.fusion_layer.value not in layers:
                self.fusion_layer.value = layers[0]
            self._show_map()
        if "layer_curves" in payload:
            for base in ("A", "B"):
                self.base_heat[base].object = figs.layerwise_heatmap(payload["layer_curves"], base)
                self.base_cum[base].object = figs.cumulative_barriers(
                    payload["cumulative"], payload["estimate"] if base == "A" else None, base=base)
