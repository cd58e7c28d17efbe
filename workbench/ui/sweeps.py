"""Sweeps page: a grid of runs of one of the engine's sweep tasks, its progress per point, the tidy table
(CSV) and a metric against a chosen key with its mean and spread over seeds. No math here: the points
run through :mod:`workbench.sweeps` on the job queue, the figure is :mod:`workbench.figures.sweeps`.
"""
from __future__ import annotations

import inspect
import io
import re
import threading

import pandas as pd
import panel as pn

from ..runtime import sweeps
from ..figures import sweeps as figs
from .session import job_queue
from .text import escape_md
from .page import Page
from . import examples as starter

EXPLANATION = """A **sweep** runs one task at every point of a grid (each value of each key, times the
seeds) and puts every number into one tidy table: one row per point and metric. **train** trains a model
per point (final loss and accuracy); **barrier** trains a pair from two seeds and measures the loss and
error barrier on the straight line between them, before and after weight matching; **collapse** runs a
neural-collapse recipe (NC1-NC4 per epoch); **grow** compares a grown model with one trained from scratch
on equal FLOPs. Each point is a job of the shared queue (it waits its turn like any training); with
`WORKBENCH_DASK` set the points run on that Dask cluster. The figure draws a metric against one key:
the line is the mean over the seeds, the band their spread. A failed point is listed with its error,
never silently missing."""

N_ROWS = 4              # grid rows in the editor
MAX_FIELD_CHARS = 4000  # what one text field of the form may hold
NONE = "(none)"

# per task: the grid it starts with, fixed options (key = value lines), the metric and key drawn
DEFAULTS = {
    "train": {"grid": [("d_model", "8, 16")], "fixed": "dataset = digits\nsteps = 20\nn_layers = 1\nd_hidden = 16",
              "metric": "val_acc", "x": "d_model", "color": None},
    "barrier": {"grid": [("d_model", "8, 16")],
                "fixed": "dataset = digits\nsteps = 30\nn_layers = 1\nd_hidden = 16\nn_alphas = 5\nmax_examples = 256",
                "metric": "loss_barrier", "x": "d_model", "color": "alignment"},
    "collapse": {"grid": [("d_model", "16, 32")], "fixed": "dataset = digits\nepochs = 3\nmax_samples = 128",
                 "metric": "nc1", "x": "epoch", "color": "d_model"},
    "grow": {"grid": [("final_layers", "2, 3")], "fixed": "recipe = khop\nsteps = 10\neval_max = 256",
             "metric": "flops_to_target", "x": "final_layers", "color": "method"},
}
_NOT_A_KEY = ("seed", "data_options")   # seeds have their own field; a dict is not typed into a cell

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

CODE = """import workbench as wb
df = wb.sweeps.run({task!r}, {grid!r}{seeds}{fixed})
wb.figures.sweeps.metric_plot(df, {x!r}, {metric!r}, color={color!r}, spread={spread!r})"""


def parse_value(text: str):
    """One typed value: an integer, a number, True/False, None, else the text itself (quotes dropped)."""
    t = text.strip()
    if t in ("True", "true"):
        return True
    if t in ("False", "false"):
        return False
    if t in ("None", "none"):
        return None
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def parse_list(where: str, text) -> list:
    """A comma-separated list of values (``where`` names the field in messages)."""
    if not isinstance(text, str):
        raise ValueError(f"{where} must be text, got {type(text).__name__}")
    if len(text) > MAX_FIELD_CHARS:
        raise ValueError(f"{where} must be at most {MAX_FIELD_CHARS} characters, got {len(text)}")
    parts = text.split(",")
    for i, p in enumerate(parts):
        if not p.strip():
            raise ValueError(f"{where}: value {i + 1} is empty (write values separated by commas, e.g. 8, 16, 32)")
    return [parse_value(p) for p in parts]


def task_arguments(task: str) -> list[str]:
    """The keyword arguments of a built-in sweep task (the keys a grid row may take)."""
    fn = getattr(sweeps, f"{task}_task")
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class SweepsPage(Page):
    """Task menu (``sweeps.TASKS`` only), grid editor, fixed options, seeds; progress per point; table, CSV, figure."""

    title = "Sweeps"
    order = 65
    explanation = EXPLANATION
    on_session_end = None   # the sweep is not a BackgroundTask: its points are jobs of the queue themselves

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.task_select = pn.widgets.Select(name="task", options=list(sweeps.TASKS), value="train", width=140)
        self.keys = [pn.widgets.Select(name=f"key {i + 1}" if i == 0 else "", options=[NONE], width=120)
                     for i in range(N_ROWS)]
        self.values = [pn.widgets.TextInput(name="values (comma-separated)" if i == 0 else "", width=200,
                                            placeholder="e.g. 8, 16, 32", max_length=MAX_FIELD_CHARS)
                       for i in range(N_ROWS)]
        self.seeds = pn.widgets.TextInput(name="seeds (comma-separated)", value="0, 1", width=200,
                                          max_length=MAX_FIELD_CHARS)
        self.fixed = pn.widgets.TextAreaInput(name="fixed options (key = value, one a line)", width=320, height=140,
                                              max_length=MAX_FIELD_CHARS)
        self.run_button = pn.widgets.Button(name="Run sweep", button_type="primary", width=110)
        self.cancel_button = pn.widgets.Button(name="Cancel", button_type="warning", width=80, disabled=True)
        self.run_button.on_click(lambda _: self.run_sweep())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.bar = pn.indicators.Progress(value=0, max=100, width=200, bar_color="primary", active=False)
        self.status_line = pn.pane.Markdown("", margin=(0, 10))
        # figure
        self.metric = pn.widgets.Select(name="metric", options=[], width=160)
        self.x = pn.widgets.Select(name="against", options=[], width=140)
        self.color = pn.widgets.Select(name="one line per", options=[NONE], width=140)
        self.spread = pn.widgets.Select(name="spread over seeds", options=list(figs.SPREADS), width=120)
        self.plot = pn.pane.Plotly(figs.metric_plot(None, "x", "metric"), sizing_mode="stretch_width", height=400)
        self.figure_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        # tables
        self.progress_table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, height=220,
                                                   sizing_mode="stretch_width", pagination="local", page_size=8)
        self.table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, height=300,
                                          sizing_mode="stretch_width", pagination="local", page_size=10)
        self.download = pn.widgets.FileDownload(callback=self._csv, filename="sweep.csv", label="Export CSV",
                                                button_type="default", disabled=True)
        # state
        self.sweep: sweeps.Sweep | None = None
        self.result = pd.DataFrame()
        self._lock = threading.RLock()
        self._callback = None
        self._dirty = False
        self._direct = True
        self.apply_defaults()
        self.task_select.param.watch(lambda _: self.apply_defaults(), "value")
        for w in (self.metric, self.x, self.color, self.spread):
            w.param.watch(lambda _: self._draw(), "value")
        self._draw()
        if pn.state.curdoc is not None:
            pn.state.on_session_destroyed(self._session_destroyed)

    # ---------------------------------------------------------------- layout
    def side(self):
        rows = [pn.Row(k, v, margin=0) for k, v in zip(self.keys, self.values)]
        return [self.task_select, pn.pane.Markdown("**Grid**", margin=(0, 10)), *rows, self.seeds, self.fixed,
                pn.Row(self.run_button, self.cancel_button, margin=0), pn.Row(self.bar, margin=0), self.status_line]

    def figures(self):
        return [pn.Row(self.metric, self.x, self.color, self.spread), self.figure_note, self.plot]

    def below(self):
        return [pn.pane.Markdown("**Points**", margin=(0, 10)), self.progress_table,
                pn.Row(pn.pane.Markdown("**Results** (one row per point and metric)", margin=(0, 10)),
                       self.download), self.table]

    def advanced(self):
        return [pn.pane.Markdown(
            "Values are typed as numbers (`8`, `0.5`, `1e-3`), `True`/`False`, `None` or text (`digits`). "
            "Each task's arguments: " + "; ".join(
                f"**{t}**: " + ", ".join(f"`{a}`" for a in task_arguments(t)) for t in sweeps.TASKS),
            sizing_mode="stretch_width")]

    def run_buttons(self):
        return [self.run_button]

    # ---------------------------------------------------------------- the form
    def apply_defaults(self) -> None:
        """Fill the grid, fixed options and figure choices with the task's defaults (:data:`DEFAULTS`)."""
        task = self.task_select.value
        if task not in DEFAULTS:   # not from the menu (a crafted message): refused by spec() when run
            self.errors.show(f"task must be one of {list(sweeps.TASKS)}, got {str(task)[:80]!r}")
            return
        d = DEFAULTS[task]
        options = [NONE] + [a for a in task_arguments(task) if a not in _NOT_A_KEY]
        for i, (key, values) in enumerate(zip(self.keys, self.values)):
            key.options = options
            key.value, values.value = d["grid"][i] if i < len(d["grid"]) else (NONE, "")
        self.fixed.value = d["fixed"]
        self._figure_options(pd.DataFrame())
        self.show_code()

    def spec(self) -> tuple[str, dict, dict, list | None]:
        """``(task, grid, fixed, seeds)`` from the form; ValueError naming the row, line or field.

        The values' own checks (ranges, keys the task takes) are the engine's (:func:`workbench.sweeps.points`).
        """
        task = self.task_select.value
        if task not in sweeps.TASKS:    # the menu's value only: never a function named by the browser
            raise ValueError(f"task must be one of {list(sweeps.TASKS)}, got {task!r}")
        grid: dict = {}
        for i, (key, values) in enumerate(zip(self.keys, self.values)):
            where = f"grid row {i + 1}"
            k, text = key.value, values.value or ""
            if k in (None, NONE):
                if text.strip():
                    raise ValueError(f"{where}: choose a key for the values {text[:40]!r}")
                continue
            if k not in key.options:
                raise ValueError(f"{where}: key must be one of {key.options[1:]}, got {k!r}")
            if k in grid:
                raise ValueError(f"{where}: key {k!r} is already in an earlier row; give each key once")
            if not text.strip():
                raise ValueError(f"{where} ({k}): type its values, separated by commas")
            grid[k] = parse_list(f"{where} ({k})", text)
        fixed = self._fixed_options()
        text = self.seeds.value or ""
        seeds = parse_list("seeds", text) if text.strip() else None
        return task, grid, fixed, seeds

    def _fixed_options(self) -> dict:
        text = self.fixed.value or ""
        if len(text) > MAX_FIELD_CHARS:
            raise ValueError(f"fixed options must be at most {MAX_FIELD_CHARS} characters, got {len(text)}")
        out = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, eq, value = line.partition("=")
            key = key.strip()
            if not eq or not _KEY.match(key):
                raise ValueError(f"fixed options, line {n}: write key = value, got {line[:60]!r}")
            if key in out:
                raise ValueError(f"fixed options, line {n}: {key!r} is given twice")
            if not value.strip():
                raise ValueError(f"fixed options, line {n} ({key}): the value is empty")
            out[key] = parse_value(value)
        return out

    def checked_spec(self):
        """:meth:`spec`, with every point checked by the engine (messages name the key and the value's place)."""
        task, grid, fixed, seeds = self.spec()
        sweeps.points(task, grid, seeds=seeds, **fixed)
        return task, grid, fixed, seeds

    def as_code(self) -> str:
        task, grid, fixed, seeds = self.checked_spec()
        color = None if self.color.value in (None, NONE) else self.color.value
        x = self.x.value or DEFAULTS[task]["x"]
        return CODE.format(task=task, grid=grid, seeds=f", seeds={seeds!r}" if seeds else "",
                           fixed="".join(f", {k}={v!r}" for k, v in fixed.items()), x=x,
                           metric=self.metric.value or DEFAULTS[task]["metric"], color=color,
                           spread=self.spread.value)

    # ---------------------------------------------------------------- running
    @property
    def running(self) -> bool:
        return self.sweep is not None and not self.sweep.done

    def run_sweep(self, wait: bool = False) -> bool:
        """Check the form and start the sweep (``wait=True``: until it has finished, for tests).

        Points go to the server's job queue as this session's user (the queue runs them on the Dask
        cluster named by ``WORKBENCH_DASK`` when that is set). Returns whether it started.
        """
        if self.running:
            self.status_line.object = "**a sweep is running: wait for it or press Cancel**"
            return False
        self.errors.clear()
        try:
            task, grid, fixed, seeds = self.checked_spec()
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return False
        # the server's queue: on Dask already when WORKBENCH_DASK is set, and its caps hold for sweeps too
        where = {"queue": job_queue(), "user": self.datastore.queue_user}
        self._direct = pn.state.curdoc is None
        box: dict = {}
        try:
            box["sweep"] = sweeps.start(task, grid, seeds=seeds, on_progress=self._on_progress, **where, **fixed)
        except Exception as e:  # noqa: BLE001 -- a backend that refuses: say so, keep the page
            box["error"] = e
        if "error" in box:
            self.errors.show(box["error"])
            return False
        sweep = box["sweep"]
        with self._lock:
            self.sweep, self.result = sweep, pd.DataFrame()
        self.show_code()
        self.run_button.disabled, self.cancel_button.disabled = True, False
        self.bar.active = True
        if not self._direct:
            self._callback = pn.state.add_periodic_callback(self._tick, period=500)
        self._sync()
        if wait:
            self.wait()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sweep has finished (or ``timeout`` s), then show it; returns whether it finished."""
        if self.sweep is None:
            return True
        finished = self.sweep.wait(timeout)
        self._sync()
        return finished

    def cancel(self) -> None:
        """Cancel the sweep: waiting points leave the queue, running ones stop."""
        if self.sweep is not None:
            self.sweep.cancel()
            self._sync()

    def _session_destroyed(self, session_context) -> None:
        # nobody sees the results any more (a sweep saves no runs): its points all go
        if self.sweep is not None:
            self.sweep.cancel()

    def _on_progress(self, i, job) -> None:   # any thread
        self._dirty = True
        if self._direct:
            self._sync()

    def _tick(self) -> None:                  # the session's periodic callback (served)
        if self._dirty or (self.sweep is not None and self.sweep.done):
            self._dirty = False
            self._sync()

    def _sync(self) -> None:
        """Show the per-point status, the table so far and the figure (the session's thread, or any without a server)."""
        with self._lock:
            sweep = self.sweep
            if sweep is None:
                return
            done = sweep.done
            status = sweep.status()
            self.progress_table.value = status
            counts = status["status"].value_counts().to_dict()
            finished = sum(counts.get(s, 0) for s in ("done", "failed", "cancelled", "diverged"))
            n = len(status)
            self.bar.value = int(round(100 * finished / max(n, 1)))
            parts = ", ".join(f"{v} {k}" for k, v in counts.items())
            self.status_line.object = escape_md(f"{'finished' if done else 'running'}: {finished} of {n} points "
                                                f"finished ({parts})")
            frame = sweep.frame()
            if len(frame) != len(self.result) or done:
                self.result = frame
                self.table.value = frame
                self.download.disabled = frame.empty
                self._figure_options(frame)
                self._draw()
            if done:
                if sweep._submit_error is not None:
                    self.errors.show(sweep._submit_error)
                self.bar.active = False
                self.run_button.disabled, self.cancel_button.disabled = False, True
                if self._callback is not None:
                    self._callback.stop()
                    self._callback = None

    def show_example(self) -> bool:
        """The stored result of the page's first sweep (its form as it opens), run once with the examples."""
        _, stored = starter.stored(self.datastore, "pair-a", "sweeps")
        if stored is None or self.sweep is not None or not self.result.empty or stored["task"] != self.task_select.value:
            return False
        table = stored["table"]
        self.result = table
        self.table.value = table
        self.download.disabled = table.empty
        self._figure_options(table)
        self._draw()
        self.show_note("**Example**: this is the stored result of the sweep in the form (made with the example runs "
                       "at the first start); press **Run sweep** to run it, or change the grid first.")
        return True

    # ---------------------------------------------------------------- figure and export
    def _figure_options(self, frame: pd.DataFrame) -> None:
        task = self.task_select.value if self.task_select.value in DEFAULTS else "train"
        d = DEFAULTS[task]
        if frame.empty:
            keys = [k.value for k in self.keys if k.value not in (None, NONE)]
            extra = ["epoch"] if task == "collapse" else []
            metrics = [d["metric"]]
            lines = keys + [c for c in ("alignment", "method") if c == d["color"]]
        else:
            bookkeeping = ("point", "metric", "value", "status", "error", "seed")
            cols = [c for c in frame.columns if c not in bookkeeping]
            point = self.sweep.points[0] if self.sweep is not None else {}
            keys = [c for c in cols if pd.api.types.is_numeric_dtype(frame[c]) or c in point]
            extra = []
            metrics = sorted(m for m in frame["metric"].unique() if m != "error") or [d["metric"]]
            lines = cols
        xs = list(dict.fromkeys(keys + extra))
        x = self.x.value if self.x.value in xs else (d["x"] if d["x"] in xs else (xs[0] if xs else None))
        self.x.options = xs
        self.x.value = x
        self.metric.options = metrics
        self.metric.value = self.metric.value if self.metric.value in metrics else (
            d["metric"] if d["metric"] in metrics else metrics[0])
        colors = [NONE] + [c for c in dict.fromkeys(lines) if c != x]
        default = d["color"] if d["color"] in colors and d["color"] != x else (colors[1] if len(colors) > 1 else NONE)
        self.color.options = colors
        self.color.value = self.color.value if self.color.value in colors and self.color.value != NONE else default

    def _draw(self) -> None:
        color = None if self.color.value in (None, NONE) else self.color.value
        self.figure_note.object = ""
        if self.result.empty or not self.x.value or not self.metric.value:
            self.plot.object = figs.metric_plot(None, self.x.value or "x", self.metric.value or "metric")
            return
        try:
            self.plot.object = figs.metric_plot(self.result, self.x.value, self.metric.value, color=color,
                                                spread=self.spread.value)
        except ValueError as e:   # e.g. another key varies within a point: the message says how to fix it
            self.figure_note.object = f"**Cannot draw this choice**: {escape_md(e)}"
            self.plot.object = figs.metric_plot(None, self.x.value, self.metric.value)
        self.show_code()

    def _csv(self):
        return io.StringIO(self.result.to_csv(index=False))
