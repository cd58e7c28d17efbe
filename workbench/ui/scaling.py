"""Scaling laws page: sweep small MLPs over width, depth or training examples on a vector task (through the
page's task, progress per point), fit ``y = a x^-alpha + c`` robustly (Hestness et al. 2017) with its
bootstrap band, and show by default how well the fit of the small end predicts the largest points.
No math here: the engine (``workbench.scaling``) sweeps and fits, the figure builder draws."""
from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import panel as pn

from ..core import data
from ..core import monitor as wb_monitor
from ..studies import scaling
from ..core.checks import check_choice, check_float, check_int, check_seed
from ..figures import scaling as figs
from .text import escape_md
from .page import Page
from . import examples as starter
from .task import job_monitor
from .sweeps import parse_list

EXPLANATION = """**Scaling laws** (Hestness et al. 2017; Kaplan et al. 2020): the loss of a family of models
often falls as a power law in model size or data, `y = a x^-alpha + c`, down to an irreducible loss `c` (the
dotted asymptote). The sweep trains one small MLP per point on the chosen task (the same steps and seed for
each): **width** varies `d_model` (hidden `2 d_model`, 2 blocks, x = parameters), **depth** the number of blocks
at width 32 (x = parameters), **data** the number of training examples at width 32 (x = examples). The fit is
robust: a Huber loss on the log residual from many starts, so one bad point does not drag it. The shaded band
is the 90% bootstrap band (points resampled). **Held-out extrapolation** (on by default): the curve is fitted on
the small end only and predicts the largest points, whose relative error the result line gives: the honest
test of a scaling law is what it predicts, not how well it fits (definitions: docs/definitions.md#scaling-fit)."""

CODE = """import workbench as wb
from workbench import scaling
table = scaling.sweep({axis!r}, {values!r}, dataset={dataset!r}, steps={steps}, seed={seed}, lr={lr!r})
x, y = table[{x!r}], table[{y!r}]
fit = scaling.fit(x, y, n_starts={n_starts}, n_boot={n_boot}, seed={seed})
{plot}"""
PLOT_HELDOUT = """ext = scaling.extrapolation(x, y, n_heldout={n_heldout}, n_starts={n_starts}, n_boot={n_boot}, seed={seed})
print(ext["rel_error"])
wb.figures.scaling.power_law(x, y, ext["fit"], heldout=ext, reference=fit, xlabel={xlabel!r}, ylabel={y!r})"""
PLOT_ALL = """wb.figures.scaling.power_law(x, y, fit, xlabel={xlabel!r}, ylabel={y!r})"""

DATASETS = tuple(n for n in data.names() if data.kind_of(n) == "vector")   # the sweep trains MLPs
DEFAULT_VALUES = {"width": "4, 8, 16, 32, 64, 128", "depth": "1, 2, 3, 4, 6, 8",
                  "data": "50, 100, 200, 400, 800, 1400"}
X_CHOICES = {"parameters (width, depth) / examples (data)": "auto", "the swept value": "value"}
Y_CHOICES = ("val_loss", "train_loss")
MAX_VALUES = 24
MIN_FIT = 4   # points a 3-parameter fit needs


def x_column(axis: str, x_choice: str) -> str:
    """The table column the fit reads as ``x``."""
    if x_choice == "value":
        return "value"
    return "n_train" if axis == "data" else "params"


def fit_table(table: pd.DataFrame, x: str, y: str, n_heldout: int, n_starts: int, n_boot: int, seed: int) -> dict:
    """The page's fit of a sweep table: all points (``fit``), and with ``n_heldout > 0`` the small-end fit and
    its predictions of the ``n_heldout`` largest points (``extrapolation``); ``params`` the table shown."""
    xs, ys = table[x].to_numpy(float), table[y].to_numpy(float)
    full = scaling.fit(xs, ys, n_starts=n_starts, n_boot=n_boot, seed=seed)
    ext = (scaling.extrapolation(xs, ys, n_heldout=n_heldout, n_starts=n_starts, n_boot=n_boot, seed=seed)
           if n_heldout else None)
    return {"fit": full, "extrapolation": ext, "params": params_table(full, ext), "x": x, "y": y}


def params_table(full, ext) -> pd.DataFrame:
    """The fitted parameters with their 90% bands: the fit of all points, and the small-end fit when held out."""
    rows = []
    for name, f in [(f"all {full.n} points", full)] + ([(f"the {ext['fit'].n} smallest", ext["fit"])] if ext else []):
        row = {"fitted on": name, "a": f.a, "alpha": f.alpha, "c": f.c}
        for k in ("a", "alpha", "c"):
            lo, hi = f.band.get(k, (float("nan"), float("nan")))
            row[f"{k} 90% band"] = f"[{lo:.3g}, {hi:.3g}]"
        rows.append(row)
    return pd.DataFrame(rows)


def _fit_job(ctx, table: pd.DataFrame, fit_options: dict):
    ctx.report(progress=0.0, message="fitting")
    return {"table": table, **fit_table(table, **fit_options)}


def _sweep_job(ctx, sweep_options: dict, fit_options: dict):
    """Worker thread: the sweep (one point at a time, the table reported as it grows), then the fit."""
    n = len(sweep_options["values"])
    ctx.report(progress=0.0, message=f"point 1 / {n}")
    monitor = job_monitor(ctx, "table")
    table = scaling.sweep(**sweep_options, monitor=wb_monitor.part(monitor, 0.0, n / (n + 1)))
    monitor.report(n / (n + 1), "fitting")
    if len(table) < MIN_FIT + fit_options["n_heldout"]:
        return {"table": table, "stopped": f"stopped after {len(table)} of {n} points: too few to fit"}
    return {"table": table, **fit_table(table, **fit_options)}


class ScalingPage(Page):
    """Axis, values, dataset, steps, seed; a sweep through the task; the power-law figure, the fitted
    parameters and the held-out extrapolation error."""

    title = "Scaling laws"
    order = 66
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.axis = pn.widgets.Select(name="axis", options=list(scaling.SWEEP_AXES), value="width", width=110)
        self.values = pn.widgets.TextInput(name="values (comma-separated)", value=DEFAULT_VALUES["width"], width=300)
        self.dataset = pn.widgets.Select(name="dataset", options=list(DATASETS), value="digits", width=110)
        sweep = {k: v.default for k, v in inspect.signature(scaling.sweep).parameters.items()}   # the engine's
        self.steps = pn.widgets.IntInput(name="steps", value=sweep["steps"], width=100)
        self.seed = pn.widgets.IntInput(name="seed", value=0, width=90)
        self.run_button = pn.widgets.Button(name="Run sweep", button_type="primary", width=120)
        self.run_button.on_click(lambda _: self.run_sweep())
        # advanced
        self.lr = pn.widgets.FloatInput(name="lr", value=sweep["lr"], width=100)
        self.x_choice = pn.widgets.Select(name="x", options=dict(X_CHOICES), value="auto", width=300)
        self.y_choice = pn.widgets.Select(name="y", options=list(Y_CHOICES), value="val_loss", width=120)
        self.n_heldout = pn.widgets.IntInput(name="held-out largest points (0: none)", value=2, width=220)
        self.n_starts = pn.widgets.IntInput(name="fit starts", value=16, width=100)
        self.n_boot = pn.widgets.IntInput(name="bootstrap resamples", value=100, width=140)
        self.refit_button = pn.widgets.Button(name="Refit the last sweep", width=180)
        self.refit_button.on_click(lambda _: self.refit())
        self.axis.param.watch(self._axis_changed, "value")

        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.plot = pn.pane.Plotly(figs.power_law([], []), sizing_mode="stretch_width", height=420)
        self.params_table = pn.pane.DataFrame(None, index=False, sizing_mode="stretch_width")
        self.points_table = pn.pane.DataFrame(None, index=False, sizing_mode="stretch_width")
        self.results: dict = {}

    # ---------------------------------------------------------------- layout
    def side(self):
        return [pn.Row(self.axis, self.dataset), self.values, pn.Row(self.steps, self.seed), self.run_button]

    def figures(self):
        return [self.status, self.plot, self.params_table]

    def below(self):
        return [self.points_table]

    def advanced(self):
        return [pn.Row(self.lr, self.x_choice, self.y_choice),
                pn.Row(self.n_heldout, self.n_starts, self.n_boot), self.refit_button]

    def run_buttons(self):
        return [self.run_button, self.refit_button]

    def _axis_changed(self, event) -> None:
        """A new axis gets its own default values, unless the user had typed others."""
        if self.values.value.strip() == DEFAULT_VALUES.get(event.old, ""):
            self.values.value = DEFAULT_VALUES[event.new]

    # ---------------------------------------------------------------- choices
    def sweep_options(self) -> dict:
        """The sweep's arguments from the form (ValueError naming the field otherwise)."""
        axis = check_choice("axis", self.axis.value, scaling.SWEEP_AXES)
        dataset = check_choice("dataset", self.dataset.value, DATASETS)
        raw = parse_list("values", self.values.value)
        if len(raw) > MAX_VALUES:
            raise ValueError(f"values must hold at most {MAX_VALUES} numbers, got {len(raw)}")
        values = [check_int(f"values: value {i + 1}", v, 1, 100_000) for i, v in enumerate(raw)]
        if len(set(values)) != len(values):
            raise ValueError(f"values must be distinct, got {self.values.value!r}")
        lr = check_float("lr", self.lr.value, 0, 1, lo_open=True)
        return {"axis": axis, "values": values, "dataset": dataset,
                "steps": check_int("steps", self.steps.value, 1, 100_000), "seed": check_seed("seed", self.seed.value),
                "lr": lr}

    def fit_options(self, n_points: int) -> dict:
        """The fit's arguments from the form, for a table of ``n_points`` points."""
        check_choice("x", self.x_choice.value, list(X_CHOICES.values()))
        y = check_choice("y", self.y_choice.value, Y_CHOICES)
        hi = max(0, n_points - MIN_FIT)
        n_heldout = check_int("held-out largest points", self.n_heldout.value, 0, None)
        if n_points < MIN_FIT + n_heldout:
            raise ValueError(f"values must hold at least {MIN_FIT + n_heldout} points to fit {MIN_FIT} and hold out "
                             f"{n_heldout} (held-out largest points in [0, {hi}] for {n_points} values), got {n_points}")
        return {"x": x_column(self.axis.value, self.x_choice.value), "y": y, "n_heldout": n_heldout,
                "n_starts": check_int("fit starts", self.n_starts.value, 1, 1000),
                "n_boot": check_int("bootstrap resamples", self.n_boot.value, 0, 2000),
                "seed": check_seed("seed", self.seed.value)}

    def as_code(self) -> str:
        s = self.sweep_options()
        f = self.fit_options(len(s["values"]))
        xlabel = {"params": "parameters", "n_train": "training examples", "value": s["axis"]}[f["x"]]
        plot = (PLOT_HELDOUT if f["n_heldout"] else PLOT_ALL).format(xlabel=xlabel, **f)
        return CODE.format(plot=plot, **{**s, **f})

    # ---------------------------------------------------------------- actions
    def run_sweep(self, wait: bool = False) -> None:
        """Validate the form and start the sweep and fit (``wait=True``: synchronously, for tests)."""
        def read():
            s = self.sweep_options()
            return s, self.fit_options(len(s["values"]))

        options = self.read_form(read)
        if options is None:
            return
        s, f = options
        self.results = {}
        self.status.object = ""
        self.show_code()
        self.start_task(_sweep_job, s, f, wait=wait)

    def fit_table(self, table: pd.DataFrame, wait: bool = False) -> None:
        """Fit ``table`` (columns of :data:`workbench.scaling.SWEEP_COLUMNS`) with the form's fit options."""
        def read():
            missing = [c for c in scaling.SWEEP_COLUMNS if c not in getattr(table, "columns", ())]
            if missing:
                raise ValueError(f"table must have the columns {scaling.SWEEP_COLUMNS}, missing {missing}")
            return self.fit_options(len(table))

        f = self.read_form(read)
        if f is None:
            return
        self.results = {}
        self.start_task(_fit_job, table, f, wait=wait)

    def refit(self, wait: bool = False) -> None:
        """Fit the last sweep's table again with the current fit options (no training)."""
        table = self.results.get("table")
        if table is None or not len(table):
            self.errors.clear()
            self.errors.show(ValueError("no sweep to refit yet: press Run sweep first"))
            return
        self.fit_table(table, wait=wait)

    # ---------------------------------------------------------------- results
    def show_example(self) -> bool:
        """The stored result of the page's first sweep and fit (its form as it opens), made with the examples."""
        _, stored = starter.stored(self.datastore, "pair-a", "scaling")
        if stored is None or self.results or not self.fresh():
            return False
        self.show({"table": stored["table"], "fit": stored["fit"], "extrapolation": stored["extrapolation"],
                   "x": stored["x"], "y": stored["y"], "params": params_table(stored["fit"], stored["extrapolation"])})
        self.show_note("**Example**: the stored result of the width sweep in the form and its fit (made with the "
                       "example runs at the first start); press **Run sweep** to run it yourself.")
        return True

    def show(self, payload: dict) -> None:
        self.results.update(payload)
        table = payload.get("table")
        if table is not None:
            self.points_table.object = table
        if "stopped" in payload:
            self.status.object = escape_md(payload["stopped"])
        if "fit" not in payload:
            if table is not None and len(table):
                axis = str(table["axis"].iloc[0])
                col = x_column(axis, self.x_choice.value)
                self.plot.object = figs.power_law(table[col], table[self.y_choice.value], xlabel=col,
                                                  ylabel=self.y_choice.value, title="Sweep so far")
            return
        full, ext, x, y = payload["fit"], payload["extrapolation"], payload["x"], payload["y"]
        xlabel = {"params": "parameters", "n_train": "training examples"}.get(x, str(table["axis"].iloc[0]))
        xs, ys = table[x].to_numpy(float), table[y].to_numpy(float)
        title = f"{y} against {xlabel}"
        if ext is not None:
            self.plot.object = figs.power_law(xs, ys, ext["fit"], heldout=ext, reference=full, xlabel=xlabel,
                                              ylabel=y, title=title)
        else:
            self.plot.object = figs.power_law(xs, ys, full, xlabel=xlabel, ylabel=y, title=title)
        self.params_table.object = payload["params"]
        lo, hi = full.band.get("alpha", (np.nan, np.nan))
        line = (f"all {full.n} points: {y} = {full.a:.3g} x^-{full.alpha:.3f} + {full.c:.3g} "
                f"(alpha 90% band [{lo:.3g}, {hi:.3g}])")
        if ext is not None:
            errs = ", ".join(f"{e:.1%}" for e in ext["rel_error"])
            shown = ", ".join(f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}" for v in ext["x"])
            line += (f"; fitted on the {ext['fit'].n} smallest, the largest ({xlabel} {shown}) predicted with "
                     f"relative error {errs}")
        self.status.object = escape_md(line)
