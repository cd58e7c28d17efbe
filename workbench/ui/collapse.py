"""Collapse page: train a recipe into the terminal phase and watch neural collapse happen, live.
No math here: the engine computes, the figure builders draw."""
from __future__ import annotations

import panel as pn

from ..core import recipes
from ..experiments import collapse as experiment
from ..figures import collapse as figs
from .session import dataset_from_spec
from .text import escape_md
from .views import CollapseView
from .page import Page
from ..runtime.examples import COLLAPSE as EXAMPLE
from . import examples as starter
from .task import job_monitor

EXPLANATION = """Trained past zero training error (the *terminal phase*), the last-layer features of a
classifier collapse (Papyan, Han and Donoho 2020): **NC1** the features of each class shrink onto their
class mean (Tr(Σ_W Σ_B⁺)/C → 0); **NC2** the centred class means become equal-norm and equiangular, a
simplex ETF (ETF error → 0); **NC3** the classifier rows align with the means; **NC4** the network's
decision becomes "nearest class mean". All are measured in eval mode on a fixed subsample of the training
set, every few epochs, and plotted on log scales (an exact 0 is drawn at 1e-5). The 3-D view shows the
class means on their top three principal axes next to the ideal simplex, rotated onto them by orthogonal
Procrustes; the heat-maps compare their cosines with the ETF's (-1/(C-1) off the diagonal). Per layer,
NC1 falls roughly geometrically with depth (He and Su 2022). **Imbalance**: the last classes keep only a
fraction of their training examples; with strong imbalance their classifier rows drift together
(*minority collapse*, Fang et al. 2021), visible as a bright block in the classifier heat-map and as the
"minority collapse" curve. A fixed simplex-ETF classifier prevents it. **Fixed classifiers**: the head can be
*learned*, a fixed *simplex ETF* (unit rows, cosine -1/(C-1)) or fixed *equiangular basis vectors* (EBV,
Shen et al. 2023: unit rows with pairwise |cos| pushed below a threshold, cosine logits over a temperature);
only the features train, and the heat-map compares the head's Gram matrix with its target. **Mixup
geometry** (Fisher, Meng and Papyan 2024): after training, mixes λx + (1-λ)x' of training examples of three
classes go through the network and their last-layer features are drawn on the plane of those classes'
classifier rows. Trained with mixup, same-class mixes sit on their class's row whatever λ, and
different-class mixes line up between two rows, crossing the decision boundary near λ = 1/2."""

MAX_SAMPLES = 512   # training examples the tracker measures
VIEW_SAMPLES = 1024   # training examples the collapse view reads at every layer after training


def _train_job(ctx, dataset_name: str, options: dict, every: int, max_samples: int, store=None):
    """Worker thread: train a recipe (``experiments.collapse.run``), streaming the tracker's table and the
    class-mean geometry. With a ``store`` the run is saved here, in the worker, so that closing the tab
    does not lose it. Returns ``(run, run_id or None, {"head", "mixup"})``."""
    result = experiment.run(dataset_name, every=every, max_samples=max_samples, store=store, live=True,
                            monitor=job_monitor(ctx), **options)
    run = result["run"]
    # the examples the collapse view reads layer by layer, built here: the recipe's data before any imbalance
    ds = dataset_from_spec({k: v for k, v in run.dataset.items() if k != "class_counts"})
    return run, (run.run_id if store is not None else None), {"head": result["head"], "mixup": result["mixup"],
                                                              "x": ds.x_train[:VIEW_SAMPLES],
                                                              "y": ds.y_train[:VIEW_SAMPLES]}


class CollapsePage(Page):
    """Choose a recipe (dataset, epochs, weight decay, imbalance, mixup, ETF classifier) and train it live."""

    title = "Collapse"
    order = 50
    explanation = EXPLANATION
    on_session_end = "finish"  # a closed tab does not discard the run (saved in the worker when asked to)

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        # the recipe is the preset: choosing a dataset fills epochs and weight decay from recipes.COLLAPSE
        self.dataset = pn.widgets.Select(name="dataset (recipe)", options=sorted(recipes.COLLAPSE), value="digits",
                                         width=160)
        self.epochs = pn.widgets.IntInput(name="epochs", start=1, end=5000, width=90)   # both from the recipe
        self.weight_decay = pn.widgets.FloatInput(name="weight decay (AdamW)", start=0.0, step=0.01, width=150)
        self.every = pn.widgets.IntInput(name="record every N epochs", value=2, start=1, end=1000, width=150)
        self.minority_ratio = pn.widgets.FloatSlider(name="minority ratio (1 = balanced)", start=0.01, end=1.0,
                                                     step=0.01, value=1.0, width=220)
        self.n_minority = pn.widgets.IntSlider(name="minority classes", start=1, end=9, value=5, width=160)
        self.mixup = pn.widgets.FloatInput(name="mixup alpha (0 = off)", value=0.0, start=0.0, step=0.1, width=140)
        self.classifier = pn.widgets.Select(name="classifier head", options=["learned", "etf", "ebv"],
                                            value="learned", width=120)
        self.ebv_tau = pn.widgets.FloatInput(name="EBV temperature τ", value=0.1, start=1e-4, end=100.0, step=0.01,
                                             width=130)
        self.save = pn.widgets.Checkbox(name="save the run", value=True)
        self.train_button = pn.widgets.Button(name="Train", button_type="primary", width=120)
        self.train_button.on_click(lambda _: self.train())

        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.view = CollapseView()   # the figure area: the same view a notebook shows (wb.ui.explore)
        v = self.view
        self.nc_plot, self.simplex_plot, self.layer_plot = v.nc_pane, v.simplex_pane, v.layer_pane
        self.gram_plot, self.minority_plot = v.gram_pane, v.minority_pane
        self.head_plot = pn.pane.Plotly(figs.head_gram_heatmaps(None), sizing_mode="stretch_width", height=380)
        self.mixup_plot = pn.pane.Plotly(figs.mixup_geometry(None), sizing_mode="stretch_width", height=540)
        self.table = None        # the tracker's table of the last run
        self.run = None
        self.dataset.param.watch(self._fill_from_recipe, "value")
        self._fill_from_recipe()

    def _fill_from_recipe(self, _=None) -> None:
        """The chosen recipe's epochs and weight decay (the preset fills every field; balanced, no mixup)."""
        r = recipes.COLLAPSE[self.dataset.value]
        self.epochs.value, self.weight_decay.value = r.epochs, r.weight_decay
        self.minority_ratio.value, self.mixup.value, self.classifier.value = 1.0, 0.0, "learned"

    def side(self):
        return [self.dataset, self.epochs, self.save, self.train_button]

    def figures(self):
        return [self.status, self.view, self.head_plot, self.mixup_plot]

    def advanced(self):
        return [pn.Row(self.weight_decay, self.every), pn.Row(self.minority_ratio, self.n_minority),
                pn.Row(self.mixup, self.classifier, self.ebv_tau)]

    def run_buttons(self):
        return [self.train_button]

    def as_code(self) -> str:
        return experiment.as_code(self.dataset.value, every=self.every.value, max_samples=MAX_SAMPLES,
                                  **self.options())

    def options(self) -> dict:
        """The recipe options the widgets describe (for :func:`workbench.collapse.recipe`)."""
        opts = {"epochs": self.epochs.value, "weight_decay": self.weight_decay.value}
        if self.minority_ratio.value < 1.0:
            opts.update(imbalance=float(self.minority_ratio.value), n_minority=int(self.n_minority.value))
        if self.mixup.value:
            opts["mixup"] = float(self.mixup.value)
        if self.classifier.value != "learned":
            opts["classifier"] = self.classifier.value
        if self.classifier.value == "ebv":
            opts["ebv_tau"] = self.ebv_tau.value
        return opts

    def train(self, wait: bool = False) -> None:
        """Validate the options and train in the background (``wait=True``: synchronously, for tests).

        Refused, with a notice next to the progress bar, while a run is training.
        """
        if self.task.busy():
            return
        self.errors.clear()
        opts = self.options()
        try:
            for name, v in (("epochs", opts["epochs"]), ("record every N epochs", self.every.value)):
                if not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
            for name, v in (("weight decay", opts["weight_decay"]), ("mixup alpha", self.mixup.value)):
                if v is None or v < 0:
                    raise ValueError(f"{name} must be a number >= 0 (0 switches it off), got {v!r}")
            if "ebv_tau" in opts and (opts["ebv_tau"] is None or not 1e-4 <= opts["ebv_tau"] <= 100):
                raise ValueError(f"EBV temperature must be a number in [0.0001, 100], got {opts['ebv_tau']!r}")
        except ValueError as e:
            self.errors.show(e)
            return
        self.table, self.run = None, None
        self.view.unbind()
        self.show_code()
        store = self.datastore.store if self.save.value else None
        self.start_task(_train_job, self.dataset.value, opts, int(self.every.value), MAX_SAMPLES, store, wait=wait)

    # ---------------------------------------------------------------- results
    def show_example(self) -> bool:
        """The example collapse run: its tracked NC1-NC4, the view bound to its model layer by layer, the head and
        mixup geometry stored with it; the form set to its recipe (30 epochs, recorded every 2)."""
        run_id, stored = starter.stored(self.datastore, "collapse", "collapse")
        if stored is None or self.run is not None or self.table is not None or not self.fresh():
            return False
        run = self.datastore.load(run_id)
        m = run.metrics
        tracked = m[m["epoch"].notna()] if "epoch" in m and "site" in m else None
        ds = dataset_from_spec({k: v for k, v in run.dataset.items() if k != "class_counts"})
        with pn.io.hold():
            if tracked is not None and len(tracked):
                self.view.table = tracked   # drawn once, by bind (show_record would draw it a first time)
            self.view.bind(run.model, ds.x_train[:VIEW_SAMPLES], ds.y_train[:VIEW_SAMPLES])
            self.head_plot.object = figs.head_gram_heatmaps(stored["head"])
            self.mixup_plot.object = figs.mixup_geometry(stored["mixup"])
            self.epochs.value, self.every.value = EXAMPLE["epochs"], EXAMPLE["every"]
        self.status.object = (f"validation accuracy {run.final('acc'):.3f} after {int(m['step'].max())} steps.")
        self.show_note(starter.note("collapse", "Its NC1-NC4 over training and its class means layer by layer are "
                                                "drawn; **Train** trains the recipe of the form for you, live."))
        return True

    def on_update(self, payload) -> None:
        if not isinstance(payload, dict) or "table" not in payload:
            return
        self.table = payload["table"]
        with pn.io.hold():
            self.view.show_record(self.table, payload["geometry"], counts=payload["counts"], epoch=payload["epoch"])

    def on_done(self, result) -> None:
        run, run_id, after = result  # saved by the worker (if asked to)
        self.run = run
        with pn.io.hold():
            self.head_plot.object = figs.head_gram_heatmaps(after["head"])
            self.mixup_plot.object = figs.mixup_geometry(after["mixup"])
            try:   # the trained model, every layer: the view's layer choice opens
                self.view.bind(run.model, after["x"], after["y"])
            except ValueError as e:
                self.errors.show(e)
        meta = run.meta.get("collapse", {})
        share = meta.get("track_seconds", 0) / max(meta.get("total_seconds", 1e-9), 1e-9)
        text = (f"**{escape_md(run.status)}** after {int(run.metrics['step'].max())} steps; validation accuracy "
                f"{run.final('acc'):.3f}; tracking took {share:.0%} of the training time.")
        if run_id is not None:
            self.datastore.refresh()
            text += f" Saved as {escape_md(run_id)}."
        self.status.object = text
