"""Connectivity page: are two solutions linearly connected, before and after aligning their units?"""
from __future__ import annotations

import dataclasses

import pandas as pd
import panel as pn

from ..core import checks, data, models, recipes
from .. import lmc
from ..figures import lmc as figs
from ..core.training import TrainConfig
from .session import dataset_from_spec, open_run
from .text import short_spec
from .widgets import run_options
from .page import Page

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

CODE = """import dataclasses
import workbench as wb
from workbench.figures import lmc as figs
store = wb.RunStore()
run_a, run_b = store.load({run_a!r}), store.load({run_b!r})
a, b = run_a.model.eval(), run_b.model.eval()
ds = wb.data.from_spec(run_a.dataset)
curves = wb.lmc.compare(a, b, ds, n_alphas={n_alphas}, max_examples={max_examples})  # none, weights, activations, repair
figs.connectivity_curves(curves)
figs.barrier_table(wb.lmc.barrier(curves))
b_w = wb.lmc.align(a, b, method="weights")
figs.layerwise_bars(wb.lmc.layerwise(a, b_w, ds, n_alphas={n_layer_alphas}, max_examples={max_examples}))
figs.plane_contour(wb.lmc.plane(a, b, b_w, ds, resolution={resolution}, max_examples={plane_examples}))
tc = dataclasses.replace(run_a.train_config, steps={inst_steps}, eval_every={inst_steps})
figs.instability_plot(wb.lmc.instability(a.config, ds, spawn_steps={spawn!r}, train_config=tc,
                                         n_alphas={n_layer_alphas}, max_examples={max_examples}))
table, maps = wb.lmc.fusion_curve(a, b, ds, max_examples={max_examples})     # vanilla, EMD, Sinkhorn by reg
figs.fusion_vs_reg(table)
figs.transport_map(maps[("emd", None)]["res"])
lw = wb.lmc.layerwise_curves(a, b_w, ds, n_alphas={n_layer_alphas}, max_examples={max_examples})
figs.layerwise_heatmap(lw, base="A")
figs.cumulative_barriers(wb.lmc.layerwise(a, b_w, ds, mode="cumulative", max_examples={max_examples}),
                         wb.lmc.barrier_estimate(a, b_w, ds, split="val", max_examples={max_examples}))"""
PAIR_CODE = """import workbench as wb
ds = wb.data.load({dataset!r}{options})
config = wb.models.config_for(ds, {model})
runs = wb.lmc.train_pair(config, ds, seeds=(0, 1), train_config=wb.TrainConfig({train}))
store = wb.RunStore()
RUN_A, RUN_B = [store.save(r) for r in runs]      # then compare them (pick them as model A and B)"""



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
    import torch

    ctx.report(progress=0.0, message="loading the runs")
    run_a, run_b = open_pair(store, id_a, id_b)
    with torch.no_grad():
        ds = _dataset_of(run_a)
        a, b = run_a.model.eval(), run_b.model.eval()

        def progress(stage_start, stage_span):
            return lambda done, total, msg: ctx.report(progress=stage_start + stage_span * done / max(total, 1),
                                                       message=msg)

        curves = lmc.compare(a, b, ds, n_alphas=n_alphas, max_examples=max_examples,
                             progress=progress(0.0, 0.6), stop=ctx.stop_event)
        ctx.report({"curves": curves}, progress=0.6, message="layer-wise barriers")
        b_w = lmc.align(a, b, method="weights")
        layer = lmc.layerwise(a, b_w, ds, n_alphas=max(5, n_alphas // 2), max_examples=max_examples,
                              progress=progress(0.6, 0.25), stop=ctx.stop_event)
        ctx.report({"layerwise": layer}, progress=0.85, message="loss plane")
        if ctx.stopped:
            raise lmc.Cancelled("cancelled")
        plane = lmc.plane(a, b, b_w, ds, resolution=resolution, max_examples=min(max_examples, 1024))
    return {"curves": curves, "layerwise": layer, "plane": plane}


MAX_EXAMPLES = 1_000_000          # "examples per split" (0: all of them)
MAX_INSTABILITY_STEPS = 100_000   # "total steps" of the instability children
MAX_SPAWNS = 16                   # spawn steps (two children trained at each)
FUSION_REGS = (0.01, 0.03, 0.08, 0.3, 1.0)   # the reg slider's stops (Imfeld et al.'s default 0.08 among them)


def _fusion_job(ctx, store, id_a: str, id_b: str, ground: str, qk: str, max_examples: int):
    """Fused models for vanilla, EMD and every Sinkhorn reg of the slider, and their couplings (worker thread)."""
    run_a, run_b = open_pair(store, id_a, id_b)
    ds = _dataset_of(run_a)
    a, b = run_a.model.eval(), run_b.model.eval()
    table, maps = lmc.fusion_curve(a, b, ds, regs=list(FUSION_REGS), ground=ground, qk=qk, max_examples=max_examples,
                                   progress=lambda d, t, m: ctx.report(progress=d / max(t, 1), message=m),
                                   stop=ctx.stop_event)
    return {"fusion": table, "maps": maps}


def _layerwise_job(ctx, store, id_a: str, id_b: str, n_alphas: int, max_examples: int):
    """Single-layer curves, cumulative barriers and the barrier estimate, before and after weight matching."""
    run_a, run_b = open_pair(store, id_a, id_b)
    ds = _dataset_of(run_a)
    a, b = run_a.model.eval(), run_b.model.eval()
    pairs = (("none", b), ("weights", lmc.align(a, b, method="weights")))
    curves, cumulative, estimate = [], [], []
    for i, (alignment, other) in enumerate(pairs):
        def progress(d, t, m, i=i):
            ctx.report(progress=(i + 0.8 * d / max(t, 1)) / 2, message=f"{m} ({alignment})")

        curves.append(lmc.layerwise_curves(a, other, ds, n_alphas=n_alphas, max_examples=max_examples,
                                           progress=progress, stop=ctx.stop_event).assign(alignment=alignment))
        cumulative.append(lmc.layerwise(a, other, ds, n_alphas=n_alphas, max_examples=max_examples, mode="cumulative",
                                        stop=ctx.stop_event).assign(alignment=alignment))
        if ctx.stopped:
            raise lmc.Cancelled("cancelled")
        estimate.append(lmc.barrier_estimate(a, other, ds, split="val", max_examples=max_examples,
                                             n_alphas=n_alphas).assign(alignment=alignment))
    return {"layer_curves": pd.concat(curves, ignore_index=True),
            "cumulative": pd.concat(cumulative, ignore_index=True),
            "estimate": pd.concat(estimate, ignore_index=True)}


def _pair_options(dataset_name: str) -> dict:
    """Data options of "train a pair": the Transformer pair's recipe for its task, else the defaults."""
    return dict(recipes.TRANSFORMER_PAIR.data_options) if dataset_name == recipes.TRANSFORMER_PAIR.dataset else {}


def _pair_job(ctx, dataset_name: str, model_config, train_config: TrainConfig):
    ds = data.load(dataset_name, **_pair_options(dataset_name))
    ctx.report(progress=0.0, message="training model A")
    from ..core.training import StopOnEvent

    runs = []
    for i, seed in enumerate((0, 1)):
        runs += lmc.train_pair(model_config, ds, seeds=(seed,), train_config=train_config,
                               callbacks=[StopOnEvent(ctx.stop_event)])
        ctx.report(progress=(i + 1) / 2, message="training model B" if i == 0 else "saving")
        if runs[-1].status == "cancelled":
            raise lmc.Cancelled("cancelled")
    return runs


def _instability_job(ctx, store, id_a: str, id_b: str, spawn_steps: list[int], steps: int, n_alphas: int,
                     max_examples: int):
    run_a, _ = open_pair(store, id_a, id_b)
    ds = _dataset_of(run_a)
    tc = dataclasses.replace(run_a.train_config, steps=steps, eval_every=steps)
    return lmc.instability(run_a.model.config, ds, spawn_steps, train_config=tc, n_alphas=n_alphas,
                           max_examples=max_examples, stop=ctx.stop_event,
                           progress=lambda d, t, m: ctx.report(progress=d / max(t, 1), message=m))


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
        self.pair_width = pn.widgets.IntInput(name="d_model", value=128, start=4, end=2048, width=100)
        self.pair_layers = pn.widgets.IntInput(name="n_layers", value=2, start=1, end=12, width=100)
        self.pair_steps = pn.widgets.IntInput(name="steps", value=300, start=10, end=100_000, width=100)
        self.pair_button = pn.widgets.Button(name="Train a pair (seeds 0, 1)", width=200)
        self.pair_button.on_click(lambda _: self.train_pair())
        # instability
        self.spawn_steps = pn.widgets.TextInput(name="spawn steps", value="0, 25, 50, 100", width=160)
        self.inst_steps = pn.widgets.IntInput(name="total steps", value=300, start=2, width=110)
        self.inst_button = pn.widgets.Button(name="Run instability (trains)", width=190)
        self.inst_button.on_click(lambda _: self.run_instability())

        self.curves_plot = pn.pane.Plotly(figs.connectivity_curves(None), sizing_mode="stretch_width", height=400)
        self.barriers = pn.pane.DataFrame(None, sizing_mode="stretch_width", index=False)
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
        self._refresh_runs()

    def _fill_pair(self, _=None) -> None:
        """The pair's preset: recipes.TRANSFORMER_PAIR for its task (width, depth, steps), else an MLP pair."""
        r = recipes.TRANSFORMER_PAIR
        if self.pair_dataset.value == r.dataset:
            self.pair_width.value, self.pair_layers.value = r.model_options["d_model"], r.model_options["n_layers"]
            self.pair_steps.value = r.steps
        else:
            self.pair_width.value, self.pair_layers.value, self.pair_steps.value = 128, 2, 300

    def side(self):
        return [self.run_a, self.run_b, self.compute_button]

    def figures(self):
        return [self.curves_plot,
                pn.pane.Markdown("**Barriers (validation split)**: loss and error, both definitions; "
                                 "peak alpha of the linear ones."),
                self.barriers, pn.Row(self.layer_plot, self.plane_plot, sizing_mode="stretch_width"),
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

    def _pair_config(self):
        """(dataset options, model config, train config) of "train a pair"; ValueError names the field."""
        name = self.pair_dataset.value
        overrides = dict(d_model=self.pair_width.value, n_layers=self.pair_layers.value)
        if name == recipes.TRANSFORMER_PAIR.dataset:
            overrides = {**recipes.TRANSFORMER_PAIR.model_options, **overrides}
        config = models.config_for(data.shape_of(name, **_pair_options(name)), **overrides)   # no data built
        steps = self.pair_steps.value
        tc = TrainConfig(steps=steps, lr=3e-3, eval_every=steps if isinstance(steps, int) and steps > 0 else 1)
        tc = tc.validate()
        self.check_steps(2 * tc.steps, "steps (x 2 models)")   # a student's job budget, refused at once
        return _pair_options(name), config, tc

    def as_code(self) -> str:
        if self.run_a.value and self.run_b.value:
            try:
                spawn = sorted({int(s) for s in self.spawn_steps.value.replace(",", " ").split()})
            except ValueError:
                spawn = [0]
            n = int(self.n_alphas.value or 25)
            return CODE.format(run_a=self.run_a.value, run_b=self.run_b.value, n_alphas=n,
                               n_layer_alphas=max(5, n // 2), max_examples=int(self.max_examples.value or 0),
                               plane_examples=min(int(self.max_examples.value or 0), 1024),
                               resolution=int(self.resolution.value or 15), inst_steps=int(self.inst_steps.value or 2),
                               spawn=spawn)
        opts, config, tc = self._pair_config()
        model = {k: getattr(config, k) for k in ("d_model", "n_layers") + (
            ("n_heads", "d_mlp") if config.family == "transformer" else ())}
        return PAIR_CODE.format(dataset=self.pair_dataset.value,
                                options="".join(f", {k}={v!r}" for k, v in opts.items()),
                                model=", ".join(f"{k}={v!r}" for k, v in model.items()),
                                train=f"steps={tc.steps}, lr={tc.lr!r}, eval_every={tc.eval_every}")

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
        configs = self.read_form(self._pair_config)
        if configs is not None:
            _, config, tc = configs
            self._start(_pair_job, self.pair_dataset.value, config, tc, wait=wait)

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
            self.curves_plot.object = figs.connectivity_curves(payload["curves"])
            self.barriers.object = figs.barrier_table(self.results["barriers"])
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
