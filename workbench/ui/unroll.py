"""Unroll & learngene page: how far a trained residual stack is from its first-order (parallel) model, and
how linear in depth its blocks are (the TLEG learngene), plus descendants of any depth from one learngene.
No math here: the engine (``workbench.unroll``, ``workbench.learngene``) computes, the figure builders draw."""
from __future__ import annotations

import panel as pn

from ..core import data, models
from ..studies import learngene, unroll
from ..figures import learngene as lg_figs
from ..figures import unroll as figs
from ..core import monitor as wb_monitor
from ..core.progress import TrainProgress
from ..core.training import TrainConfig, train
from .session import dataset_from_spec, open_run
from .text import escape_md
from .widgets import run_options
from .page import Page
from . import examples as starter
from .task import job_monitor

EXPLANATION = """A residual stack computes (I + F_L)...(I + F_1) x0. To first order that is
x0 + Σ F_i(x0): every block reading the start of the stream, their outputs summed (Bermeitinger et al.
2023, "Make Deep Networks Shallow Again"). The **gap** is E‖y − y_par‖ / E‖y − x0‖ per depth prefix (0: the
blocks do not depend on each other; 1: as far off as the whole update); the second-order term
Σ_{i<j} J_{F_j}(x0) F_i(x0) is computed with Jacobian-vector products, and its *share* says how much of the
gap it explains. The bars put the deep model, its unrolled copy and the unrolled copy after a short
fine-tuning side by side. **Learngene** (Xia et al. 2024, TLEG): fit W_l = W_base + (l/L) W_slope to every
block parameter; r² says how linear in depth the trained weights are. The expansion experiment trains one
learngene in a constrained auxiliary model (as deep as the deepest descendant, as in TLEG), builds
descendants of several depths from it (inheriting embeddings, norm and readout too), and compares them
with random initialisation after the same short training. Measured on digits: the learngene wins after
few descendant steps and random initialisation catches up and passes it with longer training."""

CODE = """import workbench as wb
from workbench import unroll, learngene
{load}
x, y = ds.split("val")
wb.figures.unroll.gap_curve(unroll.gap(model, x, y, unit={unit!r}, max_examples={max_examples}))
wb.figures.unroll.compare_bars(unroll.compare(model, ds, wb.TrainConfig(steps={finetune}, eval_every={finetune}),
                                              unit={unit!r}))
wb.figures.learngene.r2_bars(learngene.fit(model).table())"""
LOAD_RUN = """run = wb.RunStore().load({run_id!r})
model, ds = run.model.eval(), wb.data.from_spec(run.dataset)"""
LOAD_TRAIN = """ds = wb.data.load({dataset!r}{options})
model = wb.models.build(wb.models.config_for(ds, d_model={d_model}, n_layers={n_layers}))
wb.train(model, ds, wb.TrainConfig(steps={steps}, lr=3e-3, eval_every={steps}))"""
EXPANSION_CODE = """ds = wb.data.load({dataset!r}{options})
gene, table = learngene.experiment(ds, depths={depths!r}, aux_layers={aux}, d_model={d_model},
                                   learngene_train=wb.TrainConfig(steps={aux_steps}, lr=3e-3, eval_every={aux_steps}),
                                   train_config=wb.TrainConfig(steps={steps}, lr=3e-3, eval_every={steps}))
wb.figures.learngene.expansion_curves(table)"""

DATASETS = ("digits", "mnist1d", "text")
# small data options so the page stays quick; the character LM is the grammar corpus
DATA_OPTIONS = {"digits": {}, "mnist1d": {"num_samples": 2000}, "text": {"corpus_chars": 20000, "context": 32}}
SOURCES = ("stored run", "train a model")


def _load(name: str):
    return data.load(name, **DATA_OPTIONS[name])


def _analysis_job(ctx, store, run_id: str | None, dataset_name: str, overrides: dict, steps: int, unit: str,
                  finetune: int, max_examples: int):
    """Worker thread: (train a model, or open the stored run ``run_id``), then gap, compare and learngene fit."""
    run, monitor = None, job_monitor(ctx)
    if run_id is not None:
        ctx.report(progress=0.0, message="loading the stored run")
        run = open_run(store, run_id, "stored run")   # vanished, forged or another user's: refused naming the field
        if getattr(getattr(run.model, "config", None), "family", None) not in models.FAMILIES:
            raise ValueError("stored run: not a native ResidualMLP or Transformer")
    if run is None:
        ds = _load(dataset_name)
        model = models.build(models.config_for(ds, **overrides))
        ctx.report(progress=0.0, message=f"training a {overrides['n_layers']}-block model")
        run = train(model, ds, TrainConfig(steps=steps, lr=3e-3, eval_every=steps),
                    callbacks=[TrainProgress(wb_monitor.part(monitor, 0.0, 0.4), payload=False)])
    else:
        ds = dataset_from_spec(run.dataset)  # never a server path
    model = run.model.eval()
    x, y = ds.split("val")
    ctx.report(progress=0.4, message="gap against depth")
    gap = unroll.gap(model, x, y, unit=unit, max_examples=max_examples)
    ctx.report({"gap": gap}, progress=0.5, message="fine-tuning the unrolled model")
    bars = unroll.compare(model, ds, TrainConfig(steps=finetune, lr=1e-3, eval_every=finetune), unit=unit,
                          callbacks=[TrainProgress(wb_monitor.part(monitor, 0.5, 0.45), payload=False)])
    fit = learngene.fit(model).table() if len(model.blocks) >= 2 else None
    return {"gap": gap, "compare": bars, "r2": fit, "name": run.name}


def _expansion_job(ctx, dataset_name: str, d_model: int, depths: list[int], aux: int, aux_steps: int, steps: int):
    ds = _load(dataset_name)
    ctx.report(progress=0.0, message=f"training the learngene ({aux} blocks)")
    _, table = learngene.experiment(
        ds, depths=depths, aux_layers=aux, d_model=d_model,
        learngene_train=TrainConfig(steps=aux_steps, lr=3e-3, eval_every=aux_steps),
        train_config=TrainConfig(steps=steps, lr=3e-3, eval_every=steps),
        callbacks=[TrainProgress(job_monitor(ctx), total_steps=aux_steps + 2 * len(depths) * steps,   # gene, then
                                 label="expansion: step", payload=False)])                    # 2 arms a depth
    return {"expansion": table}


class UnrollPage(Page):
    """Pick a stored run (or train one): gap against depth, deep / unrolled / fine-tuned bars, learngene r2;
    and the learngene expansion experiment."""

    title = "Unroll & learngene"
    order = 68
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.source = pn.widgets.RadioButtonGroup(name="model", options=list(SOURCES), value=SOURCES[0])
        self.run = pn.widgets.Select(name="stored run", width=320)
        self.dataset = pn.widgets.Select(name="dataset", options=list(DATASETS), value="digits", width=120)
        self.d_model = pn.widgets.IntInput(name="d_model", value=64, start=4, end=1024, width=90)
        self.n_layers = pn.widgets.IntInput(name="n_layers", value=6, start=1, end=24, width=90)
        self.steps = pn.widgets.IntInput(name="steps", value=300, start=1, end=100_000, width=90)
        self.unit = pn.widgets.Select(name="F_i is a", options=list(unroll.UNITS), value="block", width=120)
        self.finetune = pn.widgets.IntInput(name="fine-tune steps", value=200, start=1, end=100_000, width=120)
        self.max_examples = pn.widgets.IntInput(name="examples for the gap", value=512, start=1, end=100_000, width=140)
        self.analyse_button = pn.widgets.Button(name="Analyse", button_type="primary", width=120)
        self.analyse_button.on_click(lambda _: self.analyse())
        # expansion experiment
        self.min_depth = pn.widgets.IntInput(name="depths from", value=2, start=1, end=16, width=90)
        self.max_depth = pn.widgets.IntInput(name="to", value=8, start=1, end=16, width=80)
        # TLEG: the auxiliary model is as deep as the deepest descendant (it then inherits W_l exactly);
        # the field follows "to" until the user sets it
        self.aux_layers = pn.widgets.IntInput(name="learngene depth", value=self.max_depth.value, start=1, end=16,
                                              width=110)
        self.max_depth.param.watch(self._follow_max_depth, "value")
        self.aux_steps = pn.widgets.IntInput(name="learngene steps", value=300, start=1, end=100_000, width=110)
        self.child_steps = pn.widgets.IntInput(name="descendant steps", value=50, start=1, end=100_000, width=120)
        self.expand_button = pn.widgets.Button(name="Run expansion experiment", width=210)
        self.expand_button.on_click(lambda _: self.expand())

        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.gap_plot = pn.pane.Plotly(figs.gap_curve(None), sizing_mode="stretch_width", height=340)
        self.compare_plot = pn.pane.Plotly(figs.compare_bars(None), sizing_mode="stretch_width", height=320)
        self.r2_plot = pn.pane.Plotly(lg_figs.r2_bars(None), sizing_mode="stretch_width", height=320)
        self.expansion_plot = pn.pane.Plotly(lg_figs.expansion_curves(None), sizing_mode="stretch_width", height=340)
        self.results: dict = {}
        self._refresh_runs()

    # ---------------------------------------------------------------- layout

    def _follow_max_depth(self, event) -> None:
        if self.aux_layers.value == event.old:
            self.aux_layers.value = event.new
    def side(self):
        return [self.source, self.run, self.dataset, pn.Row(self.d_model, self.n_layers, self.steps),
                self.analyse_button]

    def figures(self):
        return [self.status, self.gap_plot, pn.Row(self.compare_plot, self.r2_plot, sizing_mode="stretch_width"),
                pn.pane.Markdown("**Learngene expansion** (on the dataset chosen on the left)", margin=(0, 10)),
                pn.Row(self.min_depth, self.max_depth, self.aux_layers, self.aux_steps, self.child_steps),
                self.expand_button, self.expansion_plot]

    def advanced(self):
        return [pn.Row(self.unit, self.finetune, self.max_examples)]

    def run_buttons(self):
        return [self.analyse_button, self.expand_button]

    def on_store_change(self) -> None:
        self._refresh_runs()

    def _refresh_runs(self) -> None:
        options = run_options(self.datastore.runs)
        current = self.run.value
        self.run.options = options
        if current in options.values():
            self.run.value = current
        elif options:
            self.run.value = list(options.values())[0]

    # ---------------------------------------------------------------- choices
    @staticmethod
    def _int(label: str, value, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"{label} must be an integer in [{lo}, {hi}], got {value!r}")
        return value

    def _train_choices(self) -> dict:
        c = {"d_model": self._int("d_model", self.d_model.value, 4, 1024),
             "n_layers": self._int("n_layers", self.n_layers.value, 1, 24),
             "steps": self._int("steps", self.steps.value, 1, 100_000)}
        name = self.dataset.value
        if name not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {str(name)[:80]!r}")
        # the model the job would build, from the data's options alone: a bad width is named now, not in the job
        models.config_for(data.shape_of(name, **DATA_OPTIONS[name]), d_model=c["d_model"], n_layers=c["n_layers"])
        return c

    def _expansion_choices(self) -> dict:
        lo = self._int("depths from", self.min_depth.value, 1, 16)
        hi = self._int("depths to", self.max_depth.value, 1, 16)
        if hi < lo:
            raise ValueError(f"depths: 'to' ({hi}) must be at least 'from' ({lo})")
        return {"depths": list(range(lo, hi + 1)), "aux": self._int("learngene depth", self.aux_layers.value, 1, 16),
                "aux_steps": self._int("learngene steps", self.aux_steps.value, 1, 100_000),
                "steps": self._int("descendant steps", self.child_steps.value, 1, 100_000),
                "d_model": self._int("d_model", self.d_model.value, 4, 1024)}

    def _options_code(self) -> str:
        return "".join(f", {k}={v!r}" for k, v in DATA_OPTIONS[self.dataset.value].items())

    def as_code(self) -> str:
        unit, finetune = self.unit.value, self.finetune.value
        if self.source.value == "stored run" and self.run.value:
            load = LOAD_RUN.format(run_id=self.run.value)
        else:
            c = self._train_choices()
            load = LOAD_TRAIN.format(dataset=self.dataset.value, options=self._options_code(), **c)
        code = CODE.format(load=load, unit=unit, max_examples=self.max_examples.value, finetune=finetune)
        e = self._expansion_choices()
        return code + "\n" + EXPANSION_CODE.format(dataset=self.dataset.value, options=self._options_code(), **e)

    # ---------------------------------------------------------------- actions
    def analyse(self, wait: bool = False) -> None:
        """Validate the choices and start the analysis (``wait=True``: synchronously, for tests)."""
        def read():
            c = self._train_choices()
            finetune = self._int("fine-tune steps", self.finetune.value, 1, 100_000)
            max_examples = self._int("examples for the gap", self.max_examples.value, 1, 100_000)
            run_id = None
            if self.source.value == "stored run":
                if not self.run.value:
                    raise ValueError("no stored run to analyse: train a model here (or on the Train page) first")
                run_id = self.run.value   # opened in the job
            return c, finetune, max_examples, run_id

        choices = self.read_form(read)
        if choices is None:
            return
        c, finetune, max_examples, run_id = choices
        self.results = {}
        self.show_code()
        self.start_task(_analysis_job, self.datastore.store, run_id, self.dataset.value,
                        {"d_model": c["d_model"], "n_layers": c["n_layers"]}, c["steps"], self.unit.value, finetune,
                        max_examples, wait=wait)

    def expand(self, wait: bool = False) -> None:
        e = self.read_form(self._expansion_choices)
        if e is None:
            return
        self.show_code()
        self.start_task(_expansion_job, self.dataset.value, e["d_model"], e["depths"], e["aux"], e["aux_steps"],
                        e["steps"], wait=wait)

    # ---------------------------------------------------------------- results
    def show_example(self) -> bool:
        """The example MLP's gap, unrolled bars and learngene r2, stored with it."""
        run_id, stored = starter.stored(self.datastore, "pair-a", "unroll")
        if stored is None or self.results or not self.fresh() or run_id not in self.run.options.values():
            return False
        self.source.value, self.run.value = SOURCES[0], run_id
        self.show(stored)
        self.show_code()
        self.show_note(starter.note("pair-a", "Its gap, unrolled copies and learngene fit are drawn (stored with "
                                              "it); pick your own run and press **Analyse**."))
        return True

    def show(self, payload: dict) -> None:
        self.results.update(payload)
        if "gap" in payload:
            self.gap_plot.object = figs.gap_curve(payload["gap"])
        if "compare" in payload:
            self.compare_plot.object = figs.compare_bars(payload["compare"])
            acc = payload["compare"].query("metric == 'acc'").set_index("model")["value"]
            self.status.object = (f"**{escape_md(payload.get('name', 'model'))}**: validation accuracy deep "
                                  f"{acc['deep']:.3f}, unrolled {acc['unrolled']:.3f}, unrolled + fine-tuned "
                                  f"{acc['unrolled + fine-tuned']:.3f}.")
        if "r2" in payload:
            self.r2_plot.object = lg_figs.r2_bars(payload["r2"])
        if "expansion" in payload:
            self.expansion_plot.object = lg_figs.expansion_curves(payload["expansion"])

