"""Grow page: pick a task and a growth schedule, watch loss against step and FLOPs live,
see which blocks are frozen, and add a layer while it trains. No math here."""
from __future__ import annotations

import pandas as pd
import panel as pn

from ..core import data, models
from .. import growth
from ..experiments import grow as experiment
from ..figures.growth import eta_trace
from ..core.training import TrainConfig
from .text import escape_md
from .widgets import TextUpload, config_widgets, values_from_widgets
from .page import Page
from . import examples as starter
from .task import job_monitor
from .views import GrowthView

EXPLANATION = """Grow a model in depth while it trains. A schedule is a list of stages: an operation
(**train**: none, **add_layer**: one new block, zero-initialised so the function is unchanged,
**stack**: G_stack, the trained stack repeated), the steps to train after it, what is frozen
(**old**: every block that existed before the operation, with the embedding) and a learning rate.
Loss is drawn against steps and against training FLOPs (counted from the architecture: frozen
blocks cost no backward pass), with stage boundaries dotted. The strip shows the blocks, frozen ones
grey, with their parameter counts. Every stage is saved to the run store (one entry per stage), so
the other pages can open any stage. **Add a layer now** grows the running model between two steps. The
**text** task trains on a file you upload (or a built-in corpus). Closing the tab does not lose the run: it
finishes its schedule and every stage is saved (find it under **Runs**).

**widen** (a stage operation) doubles the MLP hidden units of one block (the top one unless the code says
otherwise) keeping the function: new units with zero outgoing weights (**zero**, **orthogonal**: incoming
weights orthogonal to the old) or Net2WiderNet's **copy** (duplicated units, outgoing weights split).
**Growth by the natural criterion** lets the model decide: every few steps it scores the natural expansion
score eta = g^T F^-1 g (the gradient's size measured by the empirical diagonal Fisher) of the model and of
each candidate addition (a zero block at every position, each block widened), and takes the best one when
eta'/eta > tau. The eta trace shows every proposal, accepted ones as stars; the timeline shows depth and
width as the run grows."""

MODES = {"Schedule": "schedule", "Natural criterion (grow when eta'/eta > tau)": "natural"}

PRESET_LABELS = {   # experiments.grow.preset's names
    "One layer at a time, lower layers frozen": "layerwise",
    "G_stack at step N": "gstack",
    "Scratch": "scratch",
}
STAGE_COLUMNS = ["op", "steps", "freeze", "lr", "init"]
# Recipes (experiments.grow.RECIPES): each fills the task, its options, the model's width, the optimizer and
# the schedule's depth and steps per stage. The default is KHOP (2-hop pointer chasing, small enough that a
# schedule runs in seconds).
RECIPES = {"khop, 2 hops (recipes.KHOP)": experiment.RECIPES["khop"],
           "text, character LM (recipes.TEXT)": experiment.RECIPES["text"]}
DEFAULT_KHOP = dict(experiment.RECIPES["khop"].data_options)
# Text options with a fixed set of values get a menu; the text itself comes by upload (TextUpload); other
# text options (vocabularies) are left to the Train page / a notebook. Never a server path.
OPTION_CHOICES = {("khop", "layout"): list(data.KHOP_LAYOUTS), ("text", "corpus"): list(data.CORPORA)}


def stages_to_frame(stages) -> pd.DataFrame:
    rows = []
    for s in stages:
        s = s if isinstance(s, growth.Stage) else growth.Stage(**s)
        rows.append({"op": s.op, "steps": s.steps, "freeze": "" if s.freeze is None else str(s.freeze),
                     "lr": "" if s.lr is None else str(s.lr), "init": s.init})
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def frame_to_stages(df: pd.DataFrame) -> list[growth.Stage]:
    """The stage editor's table -> Stages; raises ValueError naming the row and field."""
    stages = []
    for k, r in enumerate(df.to_dict("records")):
        def text(key):
            v = r.get(key)
            return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).strip()

        freeze = text("freeze")
        if freeze in ("", "none", "None"):
            freeze = None
        elif freeze != "old":
            try:
                freeze = int(float(freeze))
            except ValueError:
                raise ValueError(f"stage {k}: freeze must be empty, 'old' or a number of blocks, got {freeze!r}") from None
        lr = text("lr")
        try:
            lr = float(lr) if lr else None
        except ValueError:
            raise ValueError(f"stage {k}: lr must be a number or empty, got {lr!r}") from None
        steps = text("steps")
        try:
            steps = int(float(steps))
        except ValueError:
            raise ValueError(f"stage {k}: steps must be an integer >= 1, got {steps!r}") from None
        stages.append(growth.Stage(op=text("op") or "train", steps=steps, freeze=freeze, lr=lr,
                                   init=text("init") or "zero"))
    return stages


def _grow_job(ctx, dataset_name, dataset_options, model, train, schedule, store, control, name, criterion=None):
    """``schedule`` (stages) or ``criterion`` (the keyword arguments of ``grow(criterion="natural", ...)``):
    ``experiments.grow.run`` with the page's live figures; every stage saved in the worker."""
    return experiment.run(dataset_name, dataset_options, model, train, schedule, criterion, name=name, store=store,
                          control=control, live_every=10, monitor=job_monitor(ctx))


class GrowPage(Page):
    """Task, recipe and schedule in the side column; live curves and the block strip next to them."""

    title = "Grow"
    order = 20
    explanation = EXPLANATION
    on_session_end = "finish"  # a closed tab does not discard the run: the worker saves every stage

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        tasks = sorted(data.names(), key=lambda n: data.kind_of(n) != "sequence")   # sequence tasks first
        self.recipe = pn.widgets.Select(name="recipe", options=list(RECIPES), width=300)
        self.dataset = pn.widgets.Select(name="task", options=tasks, value="khop", width=130)
        self.dataset_box = pn.FlexBox()
        self.model_box = pn.FlexBox()
        self.train_widgets = config_widgets(TrainConfig(**experiment.TRAIN_DEFAULTS), skip=("steps", "warmup"))
        self.preset = pn.widgets.Select(name="preset", options=list(PRESET_LABELS), width=280)
        self.start_layers = pn.widgets.IntInput(name="start blocks", value=1, width=100)
        self.final_layers = pn.widgets.IntInput(name="final blocks", value=3, width=100)
        self.stage_steps = pn.widgets.IntInput(name="steps per stage", value=RECIPES[next(iter(RECIPES))].steps_per_stage,
                                               width=120)
        self.apply_preset = pn.widgets.Button(name="Fill stages from preset", width=190)
        self.apply_preset.on_click(lambda _: self.fill_preset())
        self.stages = pn.widgets.Tabulator(
            stages_to_frame([]), show_index=False, height=200, width=520, layout="fit_columns",
            editors={"op": {"type": "list", "values": list(growth.OPS)},
                     "init": {"type": "list", "values": list(dict.fromkeys(growth.INITS + growth.WIDEN_INITS))},
                     "steps": {"type": "number"}, "freeze": {"type": "input"}, "lr": {"type": "input"}})
        self.add_stage = pn.widgets.Button(name="+ stage", width=80)
        self.add_stage.on_click(lambda _: self._add_row())
        self.remove_stage = pn.widgets.Button(name="- last stage", width=100)
        self.remove_stage.on_click(lambda _: self._remove_row())
        self.start_button = pn.widgets.Button(name="Grow", button_type="primary", width=100)
        self.start_button.on_click(lambda _: self.start())
        self.add_init = pn.widgets.Select(name="new block init", options=list(growth.INITS), value="zero", width=110)
        self.add_now = pn.widgets.Button(name="Add a layer now", button_type="success", width=140, disabled=True)
        self.add_now.on_click(lambda _: self.request_layer())
        self.mode = pn.widgets.RadioBoxGroup(name="growth", options=list(MODES), value="Schedule")
        self.tau = pn.widgets.FloatInput(name="tau (accept when eta'/eta > tau)", value=2.0, width=150)
        self.total_steps = pn.widgets.IntInput(name="total steps", value=300, width=110)
        self.check_every = pn.widgets.IntInput(name="check every (steps)", value=30, width=130)
        self.candidates = pn.widgets.CheckButtonGroup(name="candidates", options=list(growth.CANDIDATES),
                                                      value=list(growth.CANDIDATES))
        self.widen_factor = pn.widgets.FloatInput(name="widen factor", value=2.0, width=100)
        self.score_examples = pn.widgets.IntInput(name="examples scored", value=64, width=110)
        self.criterion_box = pn.Column(pn.Row(self.tau, self.total_steps), pn.Row(self.check_every, self.widen_factor),
                                       self.candidates, self.score_examples, visible=False, margin=0)
        self.mode.param.watch(self._on_mode, "value")
        self.upload = TextUpload()
        self.upload_box = pn.Column(margin=0)
        self.view = GrowthView()   # the figure area: the same view a notebook shows (wb.ui.explore)
        self.plot, self.strip, self.timeline = self.view.curves_pane, self.view.strip_pane, self.view.timeline_pane
        self.x_axis = self.view.x_axis
        self.eta_plot = pn.pane.Plotly(eta_trace(None), sizing_mode="stretch_width", height=360, visible=False)
        self.stage_table = pn.pane.DataFrame(pd.DataFrame(), index=False, sizing_mode="stretch_width")
        self.result = pn.pane.Markdown("")
        self.control = growth.GrowControl()
        self.metrics = None
        self.last_run = None
        self.dataset.param.watch(self._rebuild_forms, "value")
        self.recipe.param.watch(self._on_recipe, "value")
        self.apply_recipe(self.recipe.value)

    def _on_recipe(self, _=None) -> None:
        self.apply_recipe(self.recipe.value)

    def apply_recipe(self, label: str) -> None:
        """Fill every field from the recipe ``label`` (a key of :data:`RECIPES`), then the stage table."""
        r = RECIPES[label]
        self.dataset.value = r.dataset
        self._rebuild_forms()
        for key, value in r.data_options.items():
            if key in self.dataset_widgets:
                self.dataset_widgets[key].value = value
        for key, value in r.model_options().items():
            self.model_widgets[key].value = value
        tc = r.train_config()
        for key, w in self.train_widgets.items():
            w.value = getattr(tc, key)
        self.start_layers.value, self.final_layers.value = 1, r.final_layers
        self.stage_steps.value = r.steps_per_stage
        self.fill_preset()

    def side(self):
        return [self.recipe, self.dataset, self.upload_box, self.mode, self.criterion_box, self.preset,
                self.stage_steps, self.apply_preset, pn.Row(self.start_button, self.add_now), self.add_init]

    def figures(self):
        return [self.result, self.view, self.eta_plot]

    def below(self):
        return [self.stage_table]

    def advanced(self):
        return [pn.pane.Markdown("**Task options**", margin=(0, 10)), self.dataset_box,
                pn.pane.Markdown("**Model** (depth comes from the schedule)", margin=(0, 10)), self.model_box,
                pn.pane.Markdown("**Training**", margin=(0, 10)), pn.FlexBox(*self.train_widgets.values()),
                pn.pane.Markdown("**Schedule**", margin=(0, 10)), pn.Row(self.start_layers, self.final_layers),
                pn.Row(self.stages, pn.Column(self.add_stage, self.remove_stage))]

    def run_buttons(self):
        return [self.start_button]

    # ---------------------------------------------------------------- forms
    def natural(self) -> bool:
        """Whether the page grows by the natural criterion (else: by the stage table)."""
        return MODES[self.mode.value] == "natural"

    def _on_mode(self, _=None) -> None:
        natural = self.natural()
        self.criterion_box.visible = natural
        self.eta_plot.visible = natural
        for w in (self.preset, self.stage_steps, self.apply_preset):
            w.visible = not natural

    def criterion_options(self) -> dict:
        """The criterion's keyword arguments for ``growth.grow`` (checked there; ValueError names the field)."""
        return {"tau": self.tau.value, "check_every": self.check_every.value, "candidates": list(self.candidates.value),
                "widen_factor": self.widen_factor.value, "score_examples": self.score_examples.value}

    def _rebuild_forms(self, _=None) -> None:
        name = self.dataset.value
        defaults = DEFAULT_KHOP if name == "khop" else {}
        self.dataset_widgets = {}
        for key, (default, typ, lo, hi) in data.options_spec(name).items():
            value = defaults.get(key, default)
            if (name, key) in OPTION_CHOICES:
                self.dataset_widgets[key] = pn.widgets.Select(name=key, options=OPTION_CHOICES[name, key],
                                                              value=value, width=100)
                continue
            if typ is str:
                continue  # file paths and vocabularies: use the Train page / a notebook
            widget = pn.widgets.IntInput if typ is int else pn.widgets.FloatInput
            self.dataset_widgets[key] = widget(name=key, value=value, width=100)
        self.upload_box.objects = [self.upload] if name == "text" else []
        self.dataset_box.objects = list(self.dataset_widgets.values())
        sizes = experiment.model_defaults(name)   # the form's starting sizes; depth comes from the schedule
        if data.kind_of(name) == "vector":
            template = models.MLPConfig(d_in=1, n_classes=2, **sizes)
            skip = ("d_in", "n_classes", "n_layers")
        else:
            template = models.TransformerConfig(vocab_size=2, **sizes)
            skip = ("vocab_size", "context", "vocab", "glyph_font", "n_layers")
        self.model_widgets = config_widgets(template, skip=skip)
        self.model_box.objects = list(self.model_widgets.values())

    def fill_preset(self) -> None:
        """Replace the stage table with the chosen preset (start/final blocks, steps per stage)."""
        self.errors.clear()
        key = PRESET_LABELS[self.preset.value]
        start, final, steps = self.start_layers.value, self.final_layers.value, self.stage_steps.value
        try:
            stages = experiment.preset(key, steps, start_layers=start, final_layers=final)
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return
        self.stages.value = stages_to_frame(stages)

    def _add_row(self) -> None:
        df = self.stages.value
        new = pd.DataFrame([{"op": "add_layer", "steps": self.stage_steps.value, "freeze": "old", "lr": "",
                             "init": "zero"}])
        self.stages.value = pd.concat([df, new], ignore_index=True)

    def _remove_row(self) -> None:
        if len(self.stages.value):
            self.stages.value = self.stages.value.iloc[:-1].reset_index(drop=True)

    def dataset_options(self) -> dict:
        """The task's options from the form, validated; ValueError names the option and its range."""
        name = self.dataset.value
        spec = data.options_spec(name)
        opts = {}
        for key, w in self.dataset_widgets.items():
            if w.value is None or (isinstance(w.value, str) and not w.value.strip()):
                _, typ, lo, hi = spec[key]
                if (name, key) in OPTION_CHOICES:
                    raise ValueError(f"{name}.{key} must be one of {OPTION_CHOICES[name, key]}, got nothing")
                rng = f"[{lo}, {'inf' if hi is None else hi}]"
                raise ValueError(f"{name}.{key} must be {'an integer' if typ is int else 'a number'} in {rng}, "
                                 f"got nothing")
            opts[key] = w.value
        if name == "text":
            text = self.upload.text()  # ValueError: too large, or not UTF-8 text
            if text is not None:  # the upload replaces the built-in corpus
                opts["text"] = text
                opts.pop("corpus", None)
        data.shape_of(name, **opts)  # type and range of each option, and their combinations, named
        return opts

    def configs(self):
        """Validated (dataset options, model overrides, training fields, stages or the criterion's options):
        the choices of ``experiments.grow.run``; ValueError names the field."""
        name = self.dataset.value
        opts = self.dataset_options()
        ds = data.shape_of(name, **opts)  # from the options alone (the job builds the data); checks combinations
        overrides = values_from_widgets(self.model_widgets)
        start = self.start_layers.value
        key = PRESET_LABELS[self.preset.value]
        n_layers = self.final_layers.value if key == "scratch" and not self.natural() else start
        if n_layers is None:
            raise ValueError("start blocks must be an integer >= 0")
        model = {**overrides, "n_layers": n_layers}
        mc = models.config_for(ds, **model)
        values = values_from_widgets(self.train_widgets)
        if self.natural():
            if self.total_steps.value is None:
                raise ValueError("total steps must be an integer >= 1, got nothing")
            tc = TrainConfig(steps=self.total_steps.value, **values).validate()
            crit = growth.check_criterion(tc, mc.n_layers, **self.criterion_options())
            self.check_steps(tc.steps, "total steps")   # a student's job budget, refused at once
            return opts, model, {**values, "steps": tc.steps}, crit
        TrainConfig(steps=1, **values).validate()
        stages = growth.check_schedule(frame_to_stages(self.stages.value), mc.n_layers)
        self.check_steps(sum(s.steps for s in stages), "steps of the stages")
        return opts, model, values, stages

    # ---------------------------------------------------------------- actions
    def start(self, wait: bool = False) -> None:
        """Validate and start growing (``wait=True``: synchronously, for tests); refused while one runs."""
        configs = self.read_form(self.configs)
        if configs is None:
            return
        opts, model, train, stages = configs
        self.show_code(self._code(opts, model, train, stages))
        self.result.object = ""
        self.metrics = None
        self.control = growth.GrowControl()
        crit = stages if isinstance(stages, dict) else None
        args = (self.dataset.value, opts, model, train, None if crit else stages, self.datastore.store, self.control,
                f"{self.dataset.value}-grow", crit)
        self.start_task(_grow_job, *args, wait=wait)

    def _code(self, opts, model, train, stages) -> str:
        crit = stages if isinstance(stages, dict) else None   # the natural criterion's options
        return experiment.as_code(self.dataset.value, opts, model, train, None if crit else stages, crit,
                                  text_file=self.upload.filename)

    def as_code(self) -> str:
        return self._code(*self.configs())

    def request_layer(self) -> None:
        """Ask the running worker for one more block (added between two steps, never during one)."""
        if self.task.running:
            self.control.request_layer(self.add_init.value)
            self.task.message = "a new block will be added after the current step"

    def on_status(self, status: str) -> None:
        self.add_now.disabled = status != "running"

    def on_update(self, payload) -> None:
        if not isinstance(payload, dict):   # a report without a payload only moves the progress bar
            return
        self.metrics = payload["metrics"]
        self.view.show_live(self.metrics, payload["blocks"])
        if payload.get("trace") is not None:
            self.eta_plot.object = eta_trace(payload["trace"], payload.get("tau"))
        if payload.get("stage_done"):
            self.datastore.refresh()

    def show_example(self) -> bool:
        """The example growth group (G_stack, 1 block stacked to 2): its stages in the view, the form on G_stack."""
        ids = starter.example_ids(self.datastore)
        if "grow-0" not in ids or "grow-1" not in ids or self.metrics is not None or not self.fresh():
            return False
        runs = [self.datastore.load(ids[role]) for role in ("grow-0", "grow-1")]
        self.view.show_runs(runs)
        self.preset.value = "G_stack at step N"   # the example's schedule: Grow reproduces it
        self.fill_preset()
        self.show_note(starter.note("grow-1", "Its two stages are drawn (move the stage slider; FLOPs on the x "
                                              "axis); the form holds its schedule: **Grow** grows one for you."))
        return True

    def on_done(self, run) -> None:
        self.last_run = run
        self.metrics = run.metrics
        self.view.show_runs(run)   # curves, the strip at each stage, depth and width
        if "trace" in run.meta:
            self.eta_plot.object = eta_trace(growth.trace_table(run), run.meta.get("tau"))
        stages = pd.DataFrame(run.meta["stages"])
        if len(stages):
            stages = stages[["stage", "op", "steps_done", "n_layers", "freeze", "init", "interrupted", "flops"]]
            stages = stages.assign(run_id=run.meta["stage_run_ids"][:len(stages)],
                                   flops=stages["flops"].map(lambda f: f"{f:.3g}"))
        self.stage_table.object = stages
        self.datastore.refresh()
        widths = growth.width_table(run.model)["width"].tolist()
        accepted = int(growth.trace_table(run)["accepted"].sum()) if "trace" in run.meta else None
        self.result.object = (f"**{escape_md(run.status)}**: {run.model.config.n_layers} blocks (hidden units "
                              f"{escape_md(', '.join(map(str, widths)) or 'none')}"
                              + (f"; {accepted} proposals accepted" if accepted is not None else "") + "), val loss "
                              f"{run.final('loss'):.4f}, val acc {run.final('acc'):.3f}, "
                              f"{run.meta['flops']:.3g} training FLOPs; {len(run.meta['stage_run_ids'])} stages "
                              f"saved (group {escape_md(run.meta['group'])})")
