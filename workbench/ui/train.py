"""Train page: pick data and a model, train in the background with live curves, save to the store."""
from __future__ import annotations

import dataclasses

import panel as pn

from ..core import data, models
from ..experiments import train as experiment
from ..figures.training import training_curves
from ..io.store import check_run_name
from ..core.training import TrainConfig
from .text import escape_md
from .widgets import TextUpload, config_widgets, values_from_widgets
from .page import Page
from . import examples as starter
from .task import job_monitor

EXPLANATION = """Train a residual MLP (vector data) or a decoder-only Transformer (sequence data) on an
offline dataset. The grey line is the loss of each minibatch; blue and red are evaluations on the
training and validation splits. Finished (or stopped) runs are saved to the run store, where every
other page can open them. The **text** dataset trains on a file you upload (or a built-in corpus); a run
keeps training and is saved even if you close the tab (find it under **Runs**)."""

# Presets fill every field: the quick default, and the growth recipes' task and model (at their final depth)
PRESETS = experiment.PRESETS

_OPTION_WIDGET = {int: pn.widgets.IntInput, float: pn.widgets.FloatInput}
# Options the form never offers as a text box: a server path (the browser must not name server files) and
# the text itself (it comes by upload, TextUpload).
_NOT_TYPED = ("path", "text")
_MENUS = {("text", "corpus"): list(data.CORPORA), ("khop", "layout"): list(data.KHOP_LAYOUTS)}


def _train_job(ctx, dataset_name: str, dataset_options: dict, model: dict, train: dict, store, name: str | None):
    """Train and save in the worker, so that the run is kept even when the tab is closed meanwhile."""
    run = experiment.run(dataset_name, dataset_options, model, train, name=name, store=store, live_every=10,
                         monitor=job_monitor(ctx))
    return run, run.run_id


class TrainPage(Page):
    """Widgets come from the dataset's option spec and the model/train config dataclasses."""

    title = "Train"
    order = 10
    explanation = EXPLANATION
    on_session_end = "finish"  # a closed tab does not discard the run: the worker finishes and saves it

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.preset = pn.widgets.Select(name="preset", options=list(PRESETS), width=300)
        self.dataset = pn.widgets.Select(name="dataset", options=data.names(), value="digits", width=140)
        self.dataset_box = pn.FlexBox()
        self.model_box = pn.FlexBox()
        self.train_widgets = config_widgets(TrainConfig(**experiment.DEFAULTS["train"]))
        self.train_box = pn.FlexBox(*[w for k, w in self.train_widgets.items() if k != "steps"])
        self.run_name = pn.widgets.TextInput(name="run name", placeholder="(automatic)", width=180)
        self.upload = TextUpload()
        self.upload_box = pn.Column(margin=0)
        self.start_button = pn.widgets.Button(name="Train", button_type="primary", width=100)
        self.start_button.on_click(lambda _: self.start())
        self.plot = pn.pane.Plotly(training_curves(None), sizing_mode="stretch_width", height=420)
        self.result = pn.pane.Markdown("")
        self.last_run = None
        self.last_run_id = None
        self._rebuild_forms()
        self.dataset.param.watch(self._on_dataset, "value")
        self.preset.param.watch(self._on_preset, "value")

    def _on_dataset(self, _=None) -> None:
        self._rebuild_forms()

    def _on_preset(self, _=None) -> None:
        self.apply_preset(self.preset.value)

    def apply_preset(self, label: str) -> None:
        """Fill every field from the preset ``label`` (a key of :data:`PRESETS`)."""
        p = PRESETS[label]
        self.dataset.value = p["dataset"]  # rebuilds the forms with the defaults
        self._rebuild_forms()
        for key, value in p["data_options"].items():
            if key in self.dataset_widgets:
                self.dataset_widgets[key].value = value
        for key, value in p["model"].items():
            if key in self.model_widgets:
                self.model_widgets[key].value = value
        defaults = dataclasses.asdict(TrainConfig())
        for key, w in self.train_widgets.items():
            w.value = p["train"].get(key, defaults[key])
        self.show_code()

    def side(self):
        return [self.preset, self.dataset, self.upload_box, self.train_widgets["steps"], self.run_name,
                self.start_button]

    def figures(self):
        return [self.result, self.plot]

    def advanced(self):
        return [pn.pane.Markdown("**Data options**", margin=(0, 10)), self.dataset_box,
                pn.pane.Markdown("**Model**", margin=(0, 10)), self.model_box,
                pn.pane.Markdown("**Training**", margin=(0, 10)), self.train_box]

    def run_buttons(self):
        return [self.start_button]

    # ---------------------------------------------------------------- forms
    def _rebuild_forms(self) -> None:
        name = self.dataset.value
        self.dataset_widgets = {}
        for key, (default, typ, lo, hi) in data.options_spec(name).items():
            if key in _NOT_TYPED:
                continue
            if (name, key) in _MENUS:
                w = pn.widgets.Select(name=key, options=_MENUS[name, key], value=default, width=130)
            elif typ is str:
                w = pn.widgets.TextInput(name=key, value=default or "", width=160)
            else:
                w = _OPTION_WIDGET[typ](name=key, value=default, width=110)
            self.dataset_widgets[key] = w
        self.upload_box.objects = [self.upload] if name == "text" else []
        self.dataset_box.objects = list(self.dataset_widgets.values())
        sizes = experiment.model_defaults(name)   # the form's starting sizes (the fields that fit the data are skipped)
        if data.kind_of(name) == "vector":
            template = models.MLPConfig(d_in=1, n_classes=2, **sizes)
            skip = ("d_in", "n_classes")
        else:
            template = models.TransformerConfig(vocab_size=2, **sizes)
            skip = ("vocab_size", "context", "vocab", "glyph_font")
        if getattr(self, "model_widgets", None):  # keep what the user set where the field still exists
            for key, w in self.model_widgets.items():
                if hasattr(template, key) and key != "norm":
                    template = dataclasses.replace(template, **{key: w.value})
        self.model_widgets = config_widgets(template, skip=skip)
        self.model_box.objects = list(self.model_widgets.values())

    def _dataset_options(self) -> dict:
        opts = {}
        for key, w in self.dataset_widgets.items():
            value = w.value
            if isinstance(value, str) and value.strip() == "":
                continue  # empty text box: use the default
            opts[key] = value
        if self.dataset.value == "text":
            text = self.upload.text()  # ValueError: too large, or not UTF-8 text
            if text is not None:  # the upload replaces the built-in corpus
                opts["text"] = text
                opts.pop("corpus", None)
        return opts

    def configs(self):
        """Validated (dataset options, model overrides, training fields): the choices of
        ``experiments.train.run``; raises ValueError naming the field.

        From the options alone (``data.shape_of``): the data is built in the job, never at the click."""
        opts = self._dataset_options()
        overrides = values_from_widgets(self.model_widgets)
        models.config_for(data.shape_of(self.dataset.value, **opts), **overrides)
        train_config = TrainConfig(**values_from_widgets(self.train_widgets)).validate()
        self.check_steps(train_config.steps, "steps")          # a student's job budget, refused at once
        if isinstance(self.run_name.value, str) and self.run_name.value.strip():
            check_run_name(self.run_name.value.strip(), "run name")
        return opts, overrides, dataclasses.asdict(train_config)

    # ---------------------------------------------------------------- actions
    def start(self, wait: bool = False) -> None:
        """Validate the forms and start training (``wait=True`` runs synchronously, for tests).

        Refused, with a notice next to the progress bar, while a run is training (a double click).
        """
        if self.task.busy():
            return
        self.errors.clear()
        try:
            opts, model, train = self.configs()
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return
        self.show_code(self._code(opts, model, train))
        self.result.object = ""
        args = (self.dataset.value, opts, model, train, self.datastore.store, self.run_name.value.strip() or None)
        self.start_task(_train_job, *args, wait=wait)

    def _code(self, opts, model, train) -> str:
        return experiment.as_code(self.dataset.value, opts, model, train, text_file=self.upload.filename)

    def as_code(self) -> str:
        return self._code(*self.configs())

    def on_update(self, rows) -> None:
        import pandas as pd

        if rows is not None:   # a report without a payload only moves the progress bar
            self.plot.object = training_curves(pd.DataFrame(rows))

    def show_example(self) -> bool:
        """The example MLP's training curves (its stored metrics), until this page trains a run of its own."""
        run_id = starter.example_id(self.datastore, "pair-a")
        if run_id is None or self.last_run is not None or not self.fresh():
            return False
        self.plot.object = training_curves(self.datastore.store.read_metrics(run_id),
                                           title="The example: a residual MLP on digits")
        self.show_note(starter.note("pair-a", "Its training curves are drawn; **Train** with the quick preset "
                                              "trains a model like it for you."))
        return True

    def on_done(self, result) -> None:
        run, run_id = result  # saved by the worker
        self.last_run, self.last_run_id = run, run_id
        self.plot.object = training_curves(run.metrics)
        self.datastore.refresh()
        self.result.object = (f"**{escape_md(run.status)}**: val loss {run.final('loss'):.4f}, "
                              f"val acc {run.final('acc'):.3f}; saved as {escape_md(run_id)}")
