"""Pieces every page shares: the run DataStore, a background task runner, headers, errors, widgets.

No math here: pages call the engine and the figure builders.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import traceback
from typing import Any, Callable

import pandas as pd
import panel as pn
import param

from ..store import RunStore

__all__ = ["DataStore", "BackgroundTask", "page_header", "ErrorBox", "config_widgets", "values_from_widgets",
           "run_options", "CHOICES"]


class DataStore(param.Parameterized):
    """Owns the run store for one browser session; pages read ``runs`` and call ``save``/``load``.

    ``session_models`` holds models that live only in this session and are not in the store
    (e.g. a logit mixture built on the Compose page, for the Residual stream page):
    ``{name: model}``, with what a page needs to feed them in ``session_info[name]``
    (``vocab``, ``members`` (names), ``datasets`` (``{domain: dataset spec}``)). Nothing is
    saved; another browser session has its own DataStore and does not see them.
    """

    runs = param.DataFrame(default=None, doc="RunStore.list() as of the last refresh")
    version = param.Integer(default=0, doc="bumped on every change so pages can watch it")

    def __init__(self, store: RunStore | None = None, **params):
        super().__init__(**params)
        self.store = store if store is not None else RunStore()
        self.session_models: dict[str, Any] = {}
        self.session_info: dict[str, dict] = {}
        self.refresh()

    def add_session_model(self, name: str, model, **info) -> str:
        """Register ``model`` under ``name`` for this session only (replacing one of that name); bumps ``version``.

        ``info``: keyword metadata kept in ``session_info[name]`` (see the class docstring).
        """
        self.session_models.pop(name, None)  # a replaced model moves to the end: the newest
        self.session_models[name] = model
        self.session_info[name] = dict(info)
        self.version += 1
        return name

    def refresh(self) -> None:
        self.runs = self.store.list()
        self.version += 1

    def save(self, run, name: str | None = None) -> str:
        run_id = self.store.save(run, name=name)
        self.refresh()
        return run_id

    def load(self, run_id: str):
        return self.store.load(run_id)

    def delete(self, run_id: str) -> None:
        self.store.delete(run_id)
        self.refresh()


def run_options(runs: pd.DataFrame | None, family: str | None = None) -> dict[str, str]:
    """``{label: run_id}`` for a Select widget, newest first; optionally one model family only."""
    if runs is None or not len(runs):
        return {}
    if family is not None:
        runs = runs[runs["family"] == family]
    labels = {}
    for r in runs.itertuples():
        acc = "" if pd.isna(r.val_acc) else f", val acc {r.val_acc:.3f}"
        stage = "" if r.stage is None or pd.isna(r.stage) else f", stage {int(r.stage)}"
        labels[f"{r.name} [{r.dataset}, {r.family} x{r.n_layers}{stage}{acc}] {r.run_id[-6:]}"] = r.run_id
    return labels


class TaskContext:
    """Handed to the worker function: check ``stopped``, send results with ``report``."""

    def __init__(self, task: "BackgroundTask"):
        self._task = task
        self.stop_event = task.stop_event

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def report(self, payload: Any = None, progress: float | None = None, message: str | None = None) -> None:
        self._task._queue.put(("update", payload, progress, message))
        if self._task._direct:
            self._task.poll()


class BackgroundTask(param.Parameterized):
    """Runs ``fn(ctx, *args)`` on a worker thread; UI updates happen in ``poll`` on the session's thread.

    ``on_update(payload)`` is called for each ``ctx.report(payload)``, ``on_done(result)`` once with
    the return value. Under a served page a periodic callback calls ``poll`` (``pn.state.curdoc`` is a
    ContextVar that worker threads do not inherit); without a server (tests, plain Python) the worker
    calls ``poll`` itself. ``run_now`` runs synchronously, for tests. ``stop()`` sets the Event the
    worker checks; closing the browser tab stops the worker too.
    """

    status = param.Selector(default="idle", objects=["idle", "running", "done", "cancelled", "error"])
    progress = param.Number(default=0.0, bounds=(0, 1))
    message = param.String(default="")
    error = param.String(default="")

    def __init__(self, on_update: Callable | None = None, on_done: Callable | None = None, period: int = 250,
                 **params):
        super().__init__(**params)
        self.on_update, self.on_done, self.period = on_update, on_done, period
        self._queue: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._callback = None
        self._direct = False
        self._lock = threading.Lock()
        if pn.state.curdoc is not None:
            pn.state.on_session_destroyed(lambda ctx: self.stop())

    @property
    def running(self) -> bool:
        return self.status == "running"

    def _work(self, fn, args, kwargs):
        ctx = TaskContext(self)
        try:
            result = fn(ctx, *args, **kwargs)
            self._queue.put(("done", result, None, None))
        except Exception as e:  # shown to the user; the server keeps serving
            self._queue.put(("error", e, None, traceback.format_exc()))
        if self._direct:
            self.poll()

    def start(self, fn: Callable, *args, **kwargs) -> None:
        """Start ``fn(ctx, *args, **kwargs)`` in the background (refused while one is running)."""
        if self.running:
            raise RuntimeError("a computation is already running on this page; stop it first")
        self.stop_event.clear()
        self.status, self.progress, self.message, self.error = "running", 0.0, "", ""
        self._direct = pn.state.curdoc is None
        if not self._direct:
            self._callback = pn.state.add_periodic_callback(self.poll, period=self.period)
        self._thread = threading.Thread(target=self._work, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def run_now(self, fn: Callable, *args, **kwargs) -> None:
        """Run synchronously in this thread (tests, notebooks)."""
        self.stop_event.clear()
        self.status, self.progress, self.message, self.error = "running", 0.0, "", ""
        self._direct = True
        self._work(fn, args, kwargs)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self.poll()

    def stop(self) -> None:
        self.stop_event.set()

    def poll(self) -> None:
        """Drain the worker's queue and apply updates (call on the session's thread)."""
        with self._lock:
            while True:
                try:
                    kind, payload, progress, message = self._queue.get_nowait()
                except queue.Empty:
                    break
                if kind == "update":
                    if progress is not None:
                        self.progress = max(0.0, min(1.0, float(progress)))
                    if message is not None:
                        self.message = message
                    if self.on_update is not None:
                        self.on_update(payload)
                    continue
                if self._callback is not None:
                    self._callback.stop()
                    self._callback = None
                if kind == "done":
                    self.status = "cancelled" if self.stop_event.is_set() else "done"
                    if self.status == "done":
                        self.progress = 1.0
                    if self.on_done is not None:
                        try:
                            self.on_done(payload)
                        except Exception as e:  # a failing display must not kill the session
                            self.error, self.status = f"{type(e).__name__}: {e}", "error"
                else:
                    self.error, self.status = _describe(payload), "error"

    def controls(self) -> pn.Row:
        """Progress bar, stop button and status text bound to this task."""
        bar = pn.indicators.Progress(value=0, max=100, width=220, bar_color="primary")
        stop = pn.widgets.Button(name="Stop", button_type="warning", width=80, disabled=True)
        stop.on_click(lambda _: self.stop())
        text = pn.pane.Markdown("", margin=(0, 10))

        def sync(*_):
            bar.value = int(round(self.progress * 100)) if self.status != "running" or self.progress else -1
            bar.active = self.status == "running"
            stop.disabled = self.status != "running"
            text.object = self.error and f"**Error:** {self.error}" or self.message or self.status

        self.param.watch(sync, ["status", "progress", "message", "error"])
        sync()
        return pn.Row(bar, stop, text)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, RuntimeError)) else f"{type(exc).__name__}: {exc}"


class ErrorBox(pn.viewable.Viewer):
    """A red box for messages such as "d_model must be an integer in [1, 8192], got 0"; hidden when empty."""

    def __init__(self, **params):
        super().__init__(**params)
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False)

    def show(self, error: BaseException | str) -> None:
        self._alert.object = error if isinstance(error, str) else _describe(error)
        self._alert.visible = True

    def clear(self) -> None:
        self._alert.object, self._alert.visible = "", False

    @property
    def text(self) -> str:
        return self._alert.object if self._alert.visible else ""

    def __panel__(self):
        return self._alert


def page_header(title: str, explanation: str, code: str) -> pn.Column:
    """Title, a short explanation of what the page measures, and the engine calls that reproduce it."""
    return pn.Column(
        pn.pane.Markdown(f"## {title}\n\n{explanation}", sizing_mode="stretch_width"),
        pn.Card(pn.pane.Markdown(f"```python\n{code.strip()}\n```", sizing_mode="stretch_width"),
                title="As code (run this in a notebook to get the same figure)", collapsed=True,
                sizing_mode="stretch_width"),
        sizing_mode="stretch_width",
    )


# Allowed values of string fields, for Select widgets (the configs validate the same sets).
CHOICES = {
    "norm": ["pre", "peri", "none"],
    "activation": ["relu", "gelu"],
    "embedding": ["trainable", "frozen-random", "glyph"],
    "schedule": ["constant", "cosine"],
}


def config_widgets(config, skip: tuple[str, ...] = (), choices: dict | None = None) -> dict[str, pn.widgets.Widget]:
    """One widget per dataclass field of ``config`` (an instance, whose values are the defaults).

    Integers and floats get free-entry inputs on purpose: out-of-range values are caught by the
    config's ``validate()``, whose message names the field and the range.
    """
    choices = {**CHOICES, **(choices or {})}
    widgets = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        if isinstance(value, bool):
            w = pn.widgets.Checkbox(name=f.name, value=value)
        elif isinstance(value, int):
            w = pn.widgets.IntInput(name=f.name, value=value, width=130)
        elif isinstance(value, float):
            w = pn.widgets.FloatInput(name=f.name, value=value, width=130)
        elif f.name in choices:
            w = pn.widgets.Select(name=f.name, options=list(choices[f.name]), value=value, width=130)
        else:
            continue
        widgets[f.name] = w
    return widgets


def values_from_widgets(widgets: dict[str, pn.widgets.Widget]) -> dict[str, Any]:
    """``{field: value}``; an emptied number box gives ``None`` (caught by validation with the range)."""
    return {name: w.value for name, w in widgets.items()}
