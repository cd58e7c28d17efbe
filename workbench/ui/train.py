"""Train page: pick data and a model, train in the background with live curves, save to the store."""
from __future__ import annotations

import dataclasses

import panel as pn

from .. import data, models
from ..figures.training import training_curves
from ..training import Callback, TrainConfig, train
from .common import BackgroundTask, ErrorBox, config_widgets, page_header, values_from_widgets

EXPLANATION = """Train a residual MLP (vector data) or a decoder-only Transformer (sequence data) on an
offline dataset. The grey line is the loss of each minibatch; blue and red are evaluations on the
training and validation splits. Finished (or stopped) runs are saved to the run store, where every
other page can open them."""

CODE = """import workbench as wb
ds = wb.data.load({name!r}{opts})
model = wb.models.build(wb.models.config_for(ds{model}))
run = wb.train(model, ds, wb.TrainConfig({train}), callbacks=[wb.ProgressBar()])
wb.RunStore().save(run)
wb.figures.training.training_curves(run.metrics)"""

_OPTION_WIDGET = {int: pn.widgets.IntInput, float: pn.widgets.FloatInput}


def _kwargs(d: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


class _LiveReport(Callback):
    """Sends the metrics so far to the page every few steps; stops when the page's Stop is pressed."""

    def __init__(self, ctx, every: int = 10):
        self.ctx, self.every = ctx, every

    def on_step(self, state):
        if self.ctx.stopped:
            state.stop = True
        elif state.step % self.every == 0:
            self.ctx.report(list(state.rows), progress=state.step / state.config.steps,
                            message=f"step {state.step}/{state.config.steps}, loss {state.loss:.4f}")


def _train_job(ctx, dataset_name: str, dataset_options: dict, model_config, train_config: TrainConfig):
    ds = data.load(dataset_name, **dataset_options)
    model = models.build(model_config)
    return train(model, ds, train_config, callbacks=[_LiveReport(ctx)])


class TrainPage(pn.viewable.Viewer):
    """Widgets come from the dataset's option spec and the model/train config dataclasses."""

    def __init__(self, datastore, **params):
        super().__init__(**params)
        self.datastore = datastore
        self.dataset = pn.widgets.Select(name="dataset", options=data.names(), value="digits", width=140)
        self.dataset_box = pn.FlexBox()
        self.model_box = pn.FlexBox()
        self.train_widgets = config_widgets(TrainConfig(steps=300, eval_every=50, lr=3e-3))
        self.run_name = pn.widgets.TextInput(name="run name", placeholder="(automatic)", width=180)
        self.start_button = pn.widgets.Button(name="Train", button_type="primary", width=100)
        self.start_button.on_click(lambda _: self.start())
        self.errors = ErrorBox()
        self.plot = pn.pane.Plotly(training_curves(None), sizing_mode="stretch_width", height=360)
        self.result = pn.pane.Markdown("")
        self.code = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.task = BackgroundTask(on_update=self._on_update, on_done=self._on_done)
        self.task.param.watch(lambda e: setattr(self.start_button, "disabled", e.new == "running"), "status")
        self.dataset.param.watch(lambda _: self._rebuild_forms(), "value")
        self._rebuild_forms()
        self.last_run = None
        self.last_run_id = None

    # ---------------------------------------------------------------- forms
    def _rebuild_forms(self) -> None:
        name = self.dataset.value
        self.dataset_widgets = {}
        for key, (default, typ, lo, hi) in data.options_spec(name).items():
            if typ is str:
                w = pn.widgets.TextInput(name=key, value=default or "", width=160,
                                         placeholder="(built-in)" if key == "path" else "")
            else:
                w = _OPTION_WIDGET[typ](name=key, value=default, width=110)
            self.dataset_widgets[key] = w
        self.dataset_box.objects = list(self.dataset_widgets.values())
        kind = "vector" if name in ("digits", "mnist1d") else "sequence"
        if kind == "vector":
            template = models.MLPConfig(d_in=1, n_classes=2, d_model=128, n_layers=2, d_hidden=256)
            skip = ("d_in", "n_classes")
        else:
            template = models.TransformerConfig(vocab_size=2, d_model=64, n_layers=2, n_heads=4, d_mlp=256)
            skip = ("vocab_size", "context", "vocab", "glyph_font")
        self.model_widgets = config_widgets(template, skip=skip)
        self.model_box.objects = list(self.model_widgets.values())

    def _dataset_options(self) -> dict:
        opts = {}
        for key, w in self.dataset_widgets.items():
            value = w.value
            if isinstance(value, str) and value.strip() == "":
                continue  # empty text box: use the default
            opts[key] = value
        data.check_options(self.dataset.value, **opts)  # raises ValueError naming option and range
        return opts

    def configs(self):
        """Validated (dataset options, model config, train config); raises ValueError naming the field."""
        opts = self._dataset_options()
        ds_probe = data.load(self.dataset.value, **opts) if self.dataset.value != "mnist1d" else None
        overrides = values_from_widgets(self.model_widgets)
        if ds_probe is not None:
            model_config = models.config_for(ds_probe, **overrides)
        else:  # MNIST-1D is slow to generate; its shape is fixed
            model_config = models.MLPConfig(d_in=40, n_classes=10, **overrides).validate()
        train_config = TrainConfig(**values_from_widgets(self.train_widgets)).validate()
        return opts, model_config, train_config

    # ---------------------------------------------------------------- actions
    def start(self, wait: bool = False) -> None:
        """Validate the forms and start training (``wait=True`` runs synchronously, for tests)."""
        self.errors.clear()
        try:
            opts, model_config, train_config = self.configs()
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return
        self.code.object = "```python\n" + CODE.format(
            name=self.dataset.value, opts=(", " + _kwargs(opts)) if opts else "",
            model=(", " + _kwargs({k: v for k, v in dataclasses.asdict(model_config).items()
                                   if k in self.model_widgets})),
            train=_kwargs(dataclasses.asdict(train_config))) + "\n```"
        self.result.object = ""
        args = (self.dataset.value, opts, model_config, train_config)
        if wait:
            self.task.run_now(_train_job, *args)
        else:
            self.task.start(_train_job, *args)

    def _on_update(self, rows) -> None:
        import pandas as pd

        self.plot.object = training_curves(pd.DataFrame(rows))

    def _on_done(self, run) -> None:
        self.last_run = run
        self.plot.object = training_curves(run.metrics)
        if self.run_name.value.strip():
            run.name = self.run_name.value.strip()
        self.last_run_id = self.datastore.save(run)
        self.result.object = (f"**{run.status}**: val loss {run.final('loss'):.4f}, val acc {run.final('acc'):.3f}; "
                              f"saved as `{self.last_run_id}`")

    def __panel__(self):
        return pn.Column(
            page_header("Train", EXPLANATION, CODE.format(name="digits", opts="", model="", train="steps=300")),
            pn.Row(self.dataset, self.dataset_box),
            pn.pane.Markdown("**Model**", margin=(0, 10)), self.model_box,
            pn.pane.Markdown("**Training**", margin=(0, 10)), pn.FlexBox(*self.train_widgets.values()),
            pn.Row(self.run_name, self.start_button, self.task.controls()),
            self.errors, self.result, self.plot, self.code,
            sizing_mode="stretch_width",
        )
