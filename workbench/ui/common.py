"""Pieces every page shares: the run DataStore, a background task runner, headers, errors, widgets.

No math here: pages call the engine and the figure builders.
"""
from __future__ import annotations

import dataclasses
import html
import importlib
import os
import pickle
import queue as queue_module
import re
import threading
import traceback
import uuid
from typing import Any, Callable

import pandas as pd
import panel as pn
import param

from ..core import data
from .. import growth as growth_module
from ..runtime import jobs
from ..core.checks import env_limit
from ..core import models
from ..io.store import RunStore, StoreError, check_user, pack_run, unpack_run
from ..core.training import Run, TrainConfig

__all__ = ["DataStore", "UserStore", "BackgroundTask", "ErrorBox", "config_widgets", "values_from_widgets",
           "run_options", "CHOICES", "allowed_values", "RUN_COLUMNS", "escape_html", "escape_md", "code_block", "text_block", "html_labels",
           "dataset_from_spec", "short_spec", "open_run", "BUSY", "TextUpload", "UPLOAD_ENV", "job_queue", "session_user",
           "QUEUE_KEY"]


# ----------------------------------------------------------------------------- untrusted text
# Panel's Markdown, Alert, HTML *and Str* panes put their text into the page as HTML (Markdown passes raw
# HTML through; Str only wraps it in <pre>; <script> tags are even re-created so that they run), and
# Bokeh's MultiChoice renders its labels as HTML. Every string that can hold user or stored input
# (run and dataset names, error and status messages, token labels, sampled text) goes through one of
# these helpers before it reaches such a pane. Plain widgets (Select options, TextInput values,
# widget names) and Tabulator's default formatter show text as text.

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$:])")


def escape_html(text: Any) -> str:
    """``text`` (any object, via ``str``) as HTML that shows exactly those characters."""
    return html.escape(str(text), quote=True)


def escape_md(text: Any) -> str:
    """``text`` as Markdown that shows exactly those characters: HTML escaped and Markdown syntax neutralised.

    Backslash-escapes Markdown's punctuation (emphasis, links, code, headings, tables, math ``$``,
    autolinks), then HTML-escapes ``& < > " '``; newlines are kept as line breaks.
    """
    escaped = _MD_SPECIAL.sub(r"\\\1", str(text))
    return "  \n".join(html.escape(line, quote=True) for line in escaped.split("\n"))


def code_block(code: str, lang: str = "python") -> str:
    """A fenced Markdown code block that ``code`` cannot close (the fence is longer than any backtick run)."""
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{code}\n{fence}"


def text_block(text: Any) -> str:
    """HTML for a ``pn.pane.HTML``: ``text`` verbatim in a ``<pre>`` (escaped; never ``pn.pane.Str``, which is not)."""
    return f"<pre style='white-space: pre-wrap'>{escape_html(text)}</pre>"


def html_labels(options: dict) -> dict:
    """``{label: value}`` with the labels HTML-escaped, for widgets that render labels as HTML (MultiChoice)."""
    return {escape_html(label): value for label, value in options.items()}


def dataset_from_spec(spec: dict) -> "data.Dataset":
    """Rebuild a stored run's dataset for the dashboard: never from a server path.

    ``data.from_spec(spec, allow_path=False)``: a spec naming a file (``path``) is refused, since the
    browser must not make the server read its files (text comes by upload and is stored in the spec).
    """
    return data.from_spec(spec, allow_path=False)


def short_spec(spec):
    """A dataset spec for display: an uploaded text (up to megabytes) is named by its length, not shown."""
    if not isinstance(spec, dict):
        return spec
    return {k: (f"<{len(v):,} characters>" if k == "text" and isinstance(v, str) else
                [short_spec(p) for p in v] if k == "parts" and isinstance(v, list) else v) for k, v in spec.items()}


# the columns of RunStore.list(), for an empty listing when the index cannot be read
RUN_COLUMNS = ["run_id", "name", "created", "dataset", "family", "n_layers", "d_model", "steps", "status",
               "val_loss", "val_acc", "group_name", "stage", "parent", "owner", "shared"]


class UserStore:
    """The run store as one signed-in user sees it (classroom mode); everything else is the store's.

    ``save`` records ``owner``; ``list``, ``load``, ``read_json``, ``read_metrics`` and ``delete`` act for
    ``viewer``: a student (``viewer`` = their name) lists and opens their own runs and the shared ones and
    deletes only their own; a teacher (``viewer=None``) sees and deletes every run. Only a teacher shares
    and rebuilds the index. The arguments a caller passes for these (``owner=``, ``user=``) are ignored:
    the session decides. Nothing else of the store is reachable through the view but its locations
    (``root``, ``runs_dir``, ``index_path``) and ``index_error``.
    """

    _FORWARDED = frozenset({"root", "runs_dir", "index_path", "index_error"})

    def __init__(self, store: RunStore, owner: str, viewer: str | None):
        self._store, self.owner, self.viewer = store, owner, viewer

    def save(self, run, name: str | None = None, owner=None) -> str:
        return self._store.save(run, name=name, owner=self.owner)

    def list(self, user=None) -> pd.DataFrame:
        return self._store.list(user=self.viewer)

    def load(self, run_id: str, device=None, *, allow_nonfinite: bool = False, user=None):
        return self._store.load(run_id, device, allow_nonfinite=allow_nonfinite, user=self.viewer)

    def read_json(self, run_id: str) -> dict:
        doc = self._store.read_json(run_id)
        if self.viewer is not None and doc.get("owner") != self.viewer and not doc.get("shared", False):
            raise StoreError(f"run {run_id!r} belongs to another user and is not shared: "
                             f"{self.viewer!r} cannot open it")
        return doc

    def read_metrics(self, run_id: str, user=None) -> pd.DataFrame:
        return self._store.read_metrics(run_id, user=self.viewer)

    def rebuild_index(self) -> dict:
        if self.viewer is not None:
            raise StoreError(f"only a teacher can rebuild the run index; {self.viewer!r} is not one "
                             "(WORKBENCH_TEACHERS)")
        return self._store.rebuild_index()

    def delete(self, run_id: str, user=None) -> None:
        self._store.delete(run_id, user=self.viewer)

    def share(self, run_id: str, shared: bool = True) -> None:
        if self.viewer is not None:
            raise StoreError(f"only a teacher can share runs; {self.viewer!r} is not one (WORKBENCH_TEACHERS)")
        self._store.share(run_id, shared=shared)

    def broken(self) -> pd.DataFrame:
        """Run folders failing validation: their owner cannot be read, so only a teacher sees them."""
        broken = self._store.broken()
        return broken if self.viewer is None else broken.iloc[:0]

    def __getattr__(self, name):
        if name in UserStore._FORWARDED:
            return getattr(self._store, name)
        raise AttributeError(f"a signed-in user's view of the run store has no {name!r}")

    def __repr__(self) -> str:
        return f"UserStore({self._store!r}, owner={self.owner!r}, viewer={self.viewer!r})"


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
    index_error = param.String(default="", doc="why the run index is unusable (then ``runs`` is empty)")

    user = param.String(default=None, allow_None=True,
                        doc="the signed-in user (pn.state.user when the page was built; None without sign-in)")

    def __init__(self, store: RunStore | None = None, user: str | None = None, **params):
        if user is None and pn.state.curdoc is not None:
            user = pn.state.user or None
        if user is not None:   # untrusted (a login form, an OAuth provider): never falls back to "no sign-in"
            check_user("signed-in user", user)
        super().__init__(user=user, **params)
        self.raw_store = store if store is not None else RunStore()
        self.session_id = session_id()   # the queue's owner without sign-in
        self.session_models: dict[str, Any] = {}
        self.session_info: dict[str, dict] = {}
        self.refresh()

    @property
    def store(self):
        """The run store as this session's user sees it: the store itself without sign-in; with sign-in a
        :class:`UserStore` (saves owned by the user; a student sees their own and the shared runs, a
        teacher -- named in ``WORKBENCH_TEACHERS`` -- every run)."""
        if self.user is None:
            return self.raw_store
        return UserStore(self.raw_store, self.user, None if self.is_teacher else self.user)

    @property
    def classroom(self) -> bool:
        """Whether sign-in is on (a user is signed in): runs belong to users."""
        return self.user is not None

    @property
    def is_teacher(self) -> bool:
        """Whether the signed-in user is one of ``WORKBENCH_TEACHERS``."""
        from ..runtime import classroom

        return self.user is not None and classroom.is_teacher(self.user)

    def can_delete(self, owner) -> bool:
        """Whether this session may delete a run of ``owner`` (None: saved without sign-in)."""
        return self.user is None or self.is_teacher or owner == self.user

    @property
    def is_student(self) -> bool:
        """Whether this session is a signed-in user who is not a teacher: their jobs have a budget."""
        return self.user is not None and not self.is_teacher

    @property
    def queue_user(self) -> str:
        """Who this session's jobs belong to in the job queue: the signed-in user, else the session. A student
        is marked as one in the server's queue here (``JobQueue.add_student``: their jobs get the teacher's
        budget), so every page and the sweeps, which all submit as this user, are covered."""
        user = self.user or self.session_id
        if self.is_student:
            job_queue().add_student(user)
        return user

    def job_budget(self) -> "jobs.Budget | None":
        """The budget this session's next job gets (a student's: steps and seconds), or None (no cap)."""
        return job_queue().budget_for(self.queue_user)

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
        """Read the run list again. A corrupt or foreign ``index.sqlite`` (:class:`StoreError`) is not
        fatal: ``runs`` becomes empty, ``index_error`` says why and :meth:`rebuild_index` repairs it."""
        try:
            runs, error = self.store.list(), ""
        except StoreError as e:
            runs, error = pd.DataFrame(columns=RUN_COLUMNS), str(e)
        self.runs, self.index_error = runs, error
        self.version += 1

    @property
    def may_rebuild(self) -> bool:
        """Whether this session may rebuild the run index: no sign-in (a laptop), or a teacher."""
        return self.user is None or self.is_teacher

    def rebuild_index(self) -> dict:
        """``RunStore.rebuild_index()`` (the old file is kept aside), then :meth:`refresh`. A teacher's (or the
        laptop's) action: a student gets a StoreError saying so. Slow on a large store: the pages run it
        as a job (:class:`workbench.ui.page.IndexNotice`)."""
        if not self.may_rebuild:
            raise StoreError(f"only a teacher can rebuild the run index; {self.user!r} is not one (WORKBENCH_TEACHERS)")
        report = self.store.rebuild_index()
        self.refresh()
        return report

    def broken(self) -> pd.DataFrame:
        """Run directories that exist but fail validation (``RunStore.broken``)."""
        return self.store.broken()

    def save(self, run, name: str | None = None) -> str:
        run_id = self.store.save(run, name=name)
        self.refresh()
        return run_id

    def load(self, run_id: str):
        return self.store.load(run_id)

    def delete(self, run_id: str) -> None:
        self.store.delete(run_id)
        self.refresh()


_SERVER_PATH = re.compile(r"(?<![\w.])/[^\s:'\"]+")


def open_run(store, run_id, field: str):
    """The stored run ``run_id`` for a page's job (``store.load``, owner-checked). A run id that vanished, was
    forged or is another user's is refused as a ``ValueError`` naming the ``field`` (e.g. "model A") with
    the store's reason, server paths left out."""
    try:
        return store.load(run_id)
    except StoreError as e:
        raise ValueError(f"{field}: {_SERVER_PATH.sub('(the run store)', str(e))}") from None


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


BUSY = "still running: wait for it to finish (or press Stop) before starting another"

QUEUE_KEY = "workbench.queue"   # pn.state.cache key of the server's JobQueue (apps/app_hooks.py)
_DEFAULT_QUEUE: "jobs.JobQueue | None" = None
_DEFAULT_LOCK = threading.Lock()


def job_queue() -> "jobs.JobQueue":
    """The queue every page's long computation goes through.

    Served: the server's one queue (``pn.state.cache[QUEUE_KEY]``, made by ``apps/app_hooks.py``).
    Without a server (tests, notebooks): a module-level default queue made on first use, on threads
    (settings from the environment; torch threads per job: ``WORKBENCH_THREADS``, else the process's
    current ``torch.get_num_threads()``, so a notebook's own setting is kept).
    """
    served = pn.state.cache.get(QUEUE_KEY)
    if served is not None and not served.closed:
        return served
    global _DEFAULT_QUEUE
    with _DEFAULT_LOCK:
        if _DEFAULT_QUEUE is None or _DEFAULT_QUEUE.closed:
            threads = None
            if not os.environ.get("WORKBENCH_THREADS", "").strip():
                import torch

                threads = torch.get_num_threads()
            _DEFAULT_QUEUE = jobs.JobQueue(threads=threads, executor="threads")
        return _DEFAULT_QUEUE


def session_user() -> str:
    """Who owns this session's jobs in the queue: the signed-in user, else the browser session's id.

    Outside a session (tests, notebooks): ``"local-<random>"``, new at each call.
    """
    user = pn.state.user if pn.state.curdoc is not None else None
    return str(user) if user else session_id()


def session_id() -> str:
    """``"session-<id>"`` of the browser session; outside one ``"local-<random>"``, new at each call."""
    ctx = getattr(pn.state.curdoc, "session_context", None) if pn.state.curdoc is not None else None
    sid = getattr(ctx, "id", None)
    return f"session-{sid}" if sid else f"local-{uuid.uuid4().hex[:12]}"


class TaskContext:
    """Handed to the worker function: check ``stopped``, send results with ``report``."""

    def __init__(self, task: "BackgroundTask"):
        self._task = task
        self.stop_event = task.stop_event
        self._job = jobs.current()   # the queue job's context (teacher view's progress, its stop)

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set() or self._job.stopped

    @property
    def session_gone(self) -> bool:
        """True once the browser tab is closed: nobody sees the page any more (the job may still finish)."""
        return self._task.orphaned

    def report(self, payload: Any = None, progress: float | None = None, message: str | None = None) -> None:
        try:  # the queue sees the progress too (the teacher view); throttled there
            self._job.report(None if progress is None else max(0.0, min(1.0, float(progress))),
                             "" if message is None else str(message))
        except (ValueError, TypeError):
            pass
        if self._task.orphaned:
            return  # no page to update: do not queue updates nobody will drain
        self._task._queue.put(("update", payload, progress, message))
        if self._task._direct:
            self._task.poll()


# ----------------------------------------------------------------------------- page jobs on Dask workers
# With the server's queue on Dask (WORKBENCH_DASK), BackgroundTask ships a page job as
# _run_page_job(fn, args, kwargs): the store arguments become RemoteStores (saving and loading are
# services run by the server on its own store object), Run arguments and results travel as their
# run-folder files (pack_run), payloads as plain data (_encode_payload). See BackgroundTask.


class _PackedRun:
    """A Run as its run folder's files (safetensors, run.json, metrics.csv), to cross to or from a worker."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files


class _SavedRun:
    """A Run the job saved through its RemoteStore: the server opens it from its store by id."""

    def __init__(self, run_id: str):
        self.run_id = run_id


def _walk(value, fn, depth: int = 0):
    """``value`` with ``fn`` applied to every leaf of its tuples, lists and dict values (same containers)."""
    if depth > 20:
        return fn(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_walk(v, fn, depth + 1) for v in value)
    if isinstance(value, list):
        return [_walk(v, fn, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, fn, depth + 1) for k, v in value.items()}
    return fn(value)


def _importable(fn) -> bool:
    """Whether workers can import ``fn`` by name: a module-level function of an importable module (the
    pages' jobs live in ``workbench``; the workers must have the same package)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not isinstance(module, str) or module == "__main__" or "<" in qualname or "." in qualname:
        return False
    try:
        return getattr(importlib.import_module(module), qualname) is fn
    except (ImportError, AttributeError):
        return False


def remote_plan(fn, args: tuple, kwargs: dict):
    """How a page job would be shipped to a Dask worker: ``(args, kwargs, store)`` with the store
    arguments replaced by one :class:`workbench.jobs.RemoteStore` and Runs by their files, or a
    string saying why it runs on the server's threads instead.

    A :class:`~workbench.growth.GrowControl` (the Grow page's "add a block now") becomes a
    :class:`_RemoteGrowControl` that asks the page's own control through the job's services; the
    fourth element of the plan is those services (``{}`` without one).

    Runs on the server's threads: a function that is not a module-level function of a module
    (a bound method talks to its page: the Residual page's analysis), one marked ``fn.remote = False``,
    arguments holding a model object (``torch.nn.Module``: the Residual page's models may be
    Hugging Face models of gigabytes, held by the session), two different stores or controls, or
    anything else that cannot be pickled.
    """
    import torch

    from .. import growth

    if not _importable(fn):
        return f"{getattr(fn, '__qualname__', fn)!r} is not a module-level function (workers import it by name)"
    if getattr(fn, "remote", True) is False:
        return f"{fn.__qualname__} is marked remote = False"
    stores, controls, why = [], [], []

    def swap(v):
        if isinstance(v, (RunStore, UserStore)):
            if not any(v is s for s in stores):
                stores.append(v)
            return jobs.RemoteStore()
        if isinstance(v, Run):
            return _PackedRun(pack_run(v))
        if isinstance(v, torch.nn.Module):
            why.append(f"it takes a model object ({type(v).__name__}), which stays in this process")
        elif isinstance(v, growth.GrowControl):
            if not any(v is c for c in controls):
                controls.append(v)
            return _RemoteGrowControl()
        return v

    try:
        new_args, new_kwargs = _walk(tuple(args), swap), _walk(dict(kwargs), swap)
    except (StoreError, ValueError) as e:   # a Run that cannot be packed
        return f"an argument cannot be sent as a run folder ({e})"
    if why:
        return why[0]
    if len(stores) > 1:
        return "it takes two different run stores"
    if len(controls) > 1:
        return "it takes two different GrowControls"
    try:
        pickle.dumps((new_args, new_kwargs))
    except Exception as e:  # noqa: BLE001 -- whatever pickle refuses
        return f"an argument cannot be sent to a worker ({type(e).__name__}: {e})"[:300]
    services = _RemoteGrowControl.services(controls[0]) if controls else {}
    return new_args, new_kwargs, (stores[0] if stores else None), services


def _encode_payload(value, depth: int = 0):
    """A page payload as plain data for Dask's topic (never pickle): DataFrames, numpy arrays and scalars,
    tensors and tuples become tagged dicts and lists; ``TypeError`` for anything else."""
    import numpy as np
    import torch

    if depth > 30:
        raise TypeError("payload nested too deeply")
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return {"__list__": _encode_payload(value.tolist(), depth + 1)}
        return {"__ndarray__": np.ascontiguousarray(value).tobytes(), "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if isinstance(value, pd.DataFrame):
        return {"__frame__": {"columns": [_encode_payload(c, depth + 1) for c in value.columns],
                              "dtypes": [str(t) for t in value.dtypes],
                              "index": _encode_payload(value.index.tolist(), depth + 1),
                              "data": [_encode_payload(value[c].tolist(), depth + 1) for c in value.columns]}}
    if isinstance(value, pd.Series):
        return {"__series__": _encode_payload(value.to_frame(name=value.name), depth + 1)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_payload(v, depth + 1) for v in value]}
    if isinstance(value, list):
        return [_encode_payload(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("payload dict keys must be strings")
        return {("\\" + k if k.startswith("__") or k.startswith("\\") else k): _encode_payload(v, depth + 1)
                for k, v in value.items()}
    raise TypeError(f"a page payload cannot hold {type(value).__name__}")


def _decode_payload(value):
    """The inverse of :func:`_encode_payload` (on the server)."""
    import numpy as np

    if isinstance(value, list):
        return [_decode_payload(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        return np.frombuffer(value["__ndarray__"], dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if "__list__" in value:
        return np.array(_decode_payload(value["__list__"]), dtype=object)
    if "__tuple__" in value:
        return tuple(_decode_payload(v) for v in value["__tuple__"])
    if "__series__" in value:
        frame = _decode_payload(value["__series__"])
        return frame[frame.columns[0]]
    if "__frame__" in value:
        f = value["__frame__"]
        columns = [_decode_payload(c) for c in f["columns"]]
        df = pd.DataFrame({i: _decode_payload(col) for i, col in enumerate(f["data"])},
                          index=_decode_payload(f["index"]) or None)
        if not len(columns):
            df = pd.DataFrame(index=_decode_payload(f["index"]))
        df.columns = columns
        for c, t in zip(columns, f["dtypes"]):
            try:
                df[c] = df[c].astype(t)
            except (TypeError, ValueError):
                pass
        if list(df.index) == list(range(len(df))):
            df.index = pd.RangeIndex(len(df))
        return df
    return {(k[1:] if k.startswith("\\") else k): _decode_payload(v) for k, v in value.items()}


class _RemoteGrowControl(growth_module.GrowControl):
    """A page's :class:`~workbench.growth.GrowControl` seen from a Dask worker: :func:`workbench.growth.grow`
    asks ``pending()`` between steps, which here asks the page's control on the server through the job's
    ``control.pending`` service at most every ``poll_interval`` seconds (one scheduler round trip), and
    ``take()`` takes the request there. Stop comes through the job's stop signal (``ctx.stop_event``)."""

    poll_interval = 0.5

    def __init__(self):   # no lock, no local requests: the page's control keeps them
        self.stop_event = threading.Event()   # replaced by the job's ctx.stop_event
        self._checked, self._pending = None, False

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    @staticmethod
    def services(control: "growth_module.GrowControl") -> dict:
        """The server side: the page's own control answers."""
        return {"control.pending": control.pending, "control.take": control.take}

    def request_layer(self, init: str = "zero") -> None:
        raise RuntimeError("a block is requested on the page's own GrowControl, not on a worker")

    def pending(self) -> bool:
        import time

        now = time.monotonic()
        if self._checked is None or now - self._checked >= self.poll_interval:
            self._checked = now
            self._pending = bool(jobs.current().call("control.pending"))
        return self._pending

    def take(self) -> str | None:
        self._pending = False
        return jobs.current().call("control.take")


class _RemoteStopEvent:
    """``ctx.stop_event`` on a worker: ``is_set()`` asks the job's Dask stop signal (polled, throttled)."""

    def __init__(self, ctx: "_RemoteTaskContext"):
        self._ctx, self._set = ctx, False

    def is_set(self) -> bool:
        return self._set or self._ctx._job.stopped

    def set(self) -> None:
        self._set = True

    def wait(self, timeout: float | None = None) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


class _RemoteTaskContext:
    """The :class:`TaskContext` API of a page job on a Dask worker (no browser session here)."""

    session_gone = False

    def __init__(self):
        self._job = jobs.current()
        self.stop_event = _RemoteStopEvent(self)

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def report(self, payload: Any = None, progress: float | None = None, message: str | None = None) -> None:
        if progress is not None:
            progress = max(0.0, min(1.0, float(progress)))
        try:
            encoded = _encode_payload(payload)
        except TypeError as e:   # shown as a note; the job goes on
            encoded, message = None, f"{message or ''} (payload not sendable: {e})".strip()
        wrapped = {"__page__": encoded, "has_payload": payload is not None, "progress": progress,
                   "message": message}
        self._job.report(progress, "" if message is None else str(message), payload=wrapped,
                         force=payload is not None)


def _run_page_job(fn, args, kwargs):
    """A page job on a Dask worker: ``fn(ctx, *args, **kwargs)`` with a worker-side context; Run
    arguments unpacked; Runs in the result sent back by id (saved through the job's RemoteStore) or
    as their files."""
    def unpack(v):
        return unpack_run(v.files, allow_nonfinite=True) if isinstance(v, _PackedRun) else v

    args, kwargs = _walk(tuple(args), unpack), _walk(dict(kwargs), unpack)
    stores = []
    _walk((args, kwargs), lambda v: stores.append(v) if isinstance(v, jobs.RemoteStore) else None)
    result = fn(_RemoteTaskContext(), *args, **kwargs)

    def pack(v):
        if isinstance(v, Run):
            saved = next((s.saved_id(v) for s in stores if s.saved_id(v) is not None), None)
            return _SavedRun(saved) if saved is not None else _PackedRun(pack_run(v))
        return v

    return _walk(result, pack)


def _open_result(value, store):
    """A remote job's result on the server: saved runs opened from ``store``, packed ones unpacked."""
    def open_(v):
        if isinstance(v, _SavedRun):
            if store is None:
                raise RuntimeError(f"the job returned the saved run {v.run_id!r} but had no store")
            return store.load(v.run_id, allow_nonfinite=True)
        if isinstance(v, _PackedRun):
            return unpack_run(v.files, allow_nonfinite=True)
        return v

    return _walk(value, open_)


class BackgroundTask(param.Parameterized):
    """Runs ``fn(ctx, *args)`` as a job of the :func:`job_queue`; UI updates happen in ``poll`` on the
    session's thread.

    ``start`` submits the job (owner: ``user``, a string or a function giving one, default
    :func:`session_user`); while it waits its status line reads ``queued: position k of n``
    (:meth:`workbench.jobs.Job.status_line`) and follows the queue. A refused admission
    (:class:`workbench.jobs.QueueFull`) is shown as the notice and ``start`` returns False.
    ``stop()`` cancels a waiting job (removed from the queue) or stops a running one cooperatively
    (sets the Event the worker checks). ``on_update(payload)`` is called for each
    ``ctx.report(payload)``, ``on_done(result)`` once with the return value. Under a served page a
    periodic callback calls ``poll`` (``pn.state.curdoc`` is a ContextVar that worker threads do not
    inherit); without a server (tests, plain Python) the worker calls ``poll`` itself. ``run_now``
    submits and waits, for tests.

    Starting while a job runs or waits is refused with a visible notice (:data:`BUSY`, in
    :meth:`controls`), never an exception: a page's start handler begins with ``if self.task.busy(): return``.

    Closing the browser tab (:meth:`session_destroyed`): a waiting job is cancelled; a running one
    is stopped with ``on_session_end="stop"`` and runs to its end with ``"finish"``. Either way
    ``on_done`` is not called any more (no session, no poll), so a job whose result must outlive the
    tab (a training run) saves it in the worker itself, before it returns.

    On Dask (the queue's executor is a :class:`workbench.jobs.DaskExecutor`: ``WORKBENCH_DASK``) a
    page job runs on a worker as ``_run_page_job(fn, args, kwargs)`` (``fn`` is imported there by
    name): every ``RunStore``/``UserStore`` argument becomes a :class:`workbench.jobs.RemoteStore`
    whose saves and loads are services run here, on the session's own store object (so owners and
    viewers stay the server's: a student's job saves as that student and opens only what they may),
    also after the tab was closed; Run arguments travel as their run-folder files
    (:func:`workbench.store.pack_run`). On the worker ``ctx`` has the same API (``stopped``,
    ``stop_event``, ``session_gone`` -- always False there --, ``report``); payloads cross Dask's topic
    as plain data (DataFrames, arrays and tuples tagged, never pickle) and reach ``on_update`` here.
    A Run in the job's result comes back by id when the job saved it through its store (``on_done``
    gets the run opened from the server's store: exactly what was saved), else as its files. A job
    that cannot be shipped (:func:`remote_plan` says why: a bound method, a model object, a
    ``GrowControl``) runs on the server's threads (``local=True``), with the reason in
    :attr:`where`.
    """

    status = param.Selector(default="idle", objects=["idle", "running", "done", "cancelled", "error"])
    progress = param.Number(default=0.0, bounds=(0, 1))
    message = param.String(default="")
    error = param.String(default="")
    notice = param.String(default="", doc="a refused start and the like; cleared by the next start")

    def __init__(self, on_update: Callable | None = None, on_done: Callable | None = None, period: int = 250,
                 on_session_end: str = "stop", user: str | Callable[[], str] | None = None,
                 queue: "jobs.JobQueue | None" = None, job_name: str = "task",
                 student: Callable[[], bool] | None = None, **params):
        super().__init__(**params)
        self.student = student   # whether the owner is a student (their jobs get the queue's budget)
        if on_session_end not in ("stop", "finish"):
            raise ValueError(f"on_session_end must be one of ['stop', 'finish'], got {on_session_end!r}")
        self.on_update, self.on_done, self.period = on_update, on_done, period
        self.on_session_end = on_session_end
        self.user, self.queue, self.job_name = user, queue, job_name
        self.orphaned = False  # the session (browser tab) is gone
        self.job: jobs.Job | None = None
        self._queue: queue_module.Queue = queue_module.Queue()
        self.stop_event = threading.Event()
        self._callback = None
        self._direct = False
        self._lock = threading.RLock()
        self._default_user = session_user()   # read in the session (the page is built there)
        self.where = ""   # where the last job runs: "threads", "dask", or "threads (why not Dask)"
        self._box: dict | None = None
        if pn.state.curdoc is not None:
            pn.state.on_session_destroyed(self.session_destroyed)

    @property
    def running(self) -> bool:
        """Whether a job is waiting in the queue or running (status ``"running"`` covers both)."""
        return self.status == "running"

    @property
    def waiting(self) -> bool:
        """Whether the job waits in the queue."""
        return self.job is not None and self.job.status == "waiting"

    def busy(self) -> bool:
        """True, with the notice :data:`BUSY` shown, when a job is running (so a second start is refused)."""
        if self.running:
            self.notice = BUSY
            return True
        return False

    def owner(self) -> str:
        """The queue user this task's jobs belong to."""
        user = self.user() if callable(self.user) else self.user
        return str(user) if user else self._default_user

    def session_destroyed(self, session_context) -> None:
        """The browser tab is closed: a waiting job is cancelled; a running one is stopped or finishes
        (``on_session_end``); no more UI updates."""
        self.orphaned = True
        job = self.job
        if job is not None and job.status == "waiting":
            job.cancel()
        elif self.on_session_end == "stop":
            self.stop()

    def _work(self, fn, args, kwargs, box: dict):
        ctx = TaskContext(self)
        try:
            result = fn(ctx, *args, **kwargs)
            item = ("done", result, None, None)
        except Exception as e:  # shown to the user; the server keeps serving
            item = ("error", e, None, traceback.format_exc())
        box["delivered"] = True
        if self.orphaned:
            box["final"].set()
            return  # nobody polls any more; whatever had to persist was saved by fn itself
        self._queue.put(item)
        box["final"].set()
        if self._direct:
            self.poll()

    def _remote_news(self, job, box: dict) -> bool:
        """A remote job's progress report (a page payload) or its end: queue the update; True if handled."""
        if job.done:
            if box["delivered"]:
                return True
            box["delivered"] = True
            if self.orphaned:
                box["final"].set()
                return True
            if job.has_value:
                try:
                    item = ("done", _open_result(job.value, box.get("store")), None, None)
                except Exception as e:  # noqa: BLE001 -- e.g. the saved run cannot be opened: say so
                    item = ("error", e, None, traceback.format_exc())
            elif job.status == "cancelled":
                item = ("cancelled", "stopped" if job.started is not None else "waiting", None, None)
            else:
                item = ("error", job.error or RuntimeError(job.status_line()), None, job.traceback)
            self._queue.put(item)
            box["final"].set()
            return True
        payload = job.payload
        if isinstance(payload, dict) and "__page__" in payload and job.status == "running":
            if box.get("seen") is payload:
                return False   # a status event after it: the status line, not the update again
            box["seen"] = payload
            if not self.orphaned:
                update = _decode_payload(payload["__page__"]) if payload.get("has_payload") else None
                self._queue.put(("update", update, payload.get("progress"), payload.get("message")))
            return True
        return False

    def _on_job(self, job, event, box: dict) -> None:
        """The queue's news of our job (any thread): the status line, a stop from elsewhere, a job that
        ended without running our worker (cancelled while waiting, refused by the backend)."""
        if job.status == "running" and job.stop_requested:
            self.stop_event.set()   # stopped from elsewhere (the teacher view, the server closing)
        if box.get("remote") and self._remote_news(job, box):
            if self._direct and not self.orphaned:
                self.poll()
            return
        if self.orphaned:
            box["final"].set()
            return
        if job.done:
            if box["delivered"]:
                return
            box["delivered"] = True
            if job.status == "cancelled":
                self._queue.put(("cancelled", None, None, None))
            else:
                self._queue.put(("error", job.error or RuntimeError(job.status_line()), None, job.traceback))
            box["final"].set()
        else:
            self._queue.put(("queue", job, None, job.status_line()))
        if self._direct:
            self.poll()

    def _submit(self, fn, args, kwargs, direct: bool) -> bool:
        if self.busy():
            return False
        self.stop_event.clear()
        self.status, self.progress, self.message, self.error, self.notice = "running", 0.0, "", "", ""
        self._direct = direct
        box = {"delivered": False, "final": threading.Event()}
        self._box = box
        try:
            queue_ = self.queue if self.queue is not None else job_queue()
            if self.student is not None and self.student():
                queue_.add_student(self.owner())
            if isinstance(queue_.executor, jobs.DaskExecutor):
                plan = remote_plan(fn, args, kwargs)
                if isinstance(plan, tuple):
                    remote_args, remote_kwargs, store, services = plan
                    box.update(remote=True, store=store)
                    if store is not None:
                        services = {**services, **jobs.RemoteStore.services(store)}
                    self.where = "dask"
                    job = queue_.submit(_run_page_job, fn, remote_args, remote_kwargs, user=self.owner(),
                                        name=self.job_name, services=services)
                else:
                    self.where = f"threads ({plan})"
                    job = queue_.submit(self._work, fn, args, kwargs, box, user=self.owner(), name=self.job_name,
                                        local=True)
            else:
                self.where = "threads"
                job = queue_.submit(self._work, fn, args, kwargs, box, user=self.owner(), name=self.job_name)
        except jobs.QueueFull as e:   # refused at once: say why, start nothing
            self.status, self.notice = "idle", str(e)
            return False
        self.job = job
        if not direct:
            self._callback = pn.state.add_periodic_callback(self.poll, period=self.period)
        if job.status == "waiting" and self.status == "running":
            self.message = job.status_line()
        job.add_listener(lambda j, event, box=box: self._on_job(j, event, box))   # at once if it has finished
        if not job.done:
            self._on_job(job, "status", box)   # what changed between submit and add_listener
        return True

    def start(self, fn: Callable, *args, **kwargs) -> bool:
        """Submit ``fn(ctx, *args, **kwargs)`` to the queue; refused (False, with a notice) while one runs
        or when the queue refuses it."""
        return self._submit(fn, args, kwargs, direct=pn.state.curdoc is None)

    def run_now(self, fn: Callable, *args, **kwargs) -> bool:
        """Submit and wait until it has finished (tests, notebooks); refused like :meth:`start`."""
        if not self._submit(fn, args, kwargs, direct=True):
            return False
        self.wait()
        self.poll()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (or ``timeout`` s) and its final item is queued (a remote job's
        result is queued by a listener just after the job ends); returns whether it has. No UI update."""
        if self.job is None:
            return True
        if not self.job.wait(timeout):
            return False
        box = getattr(self, "_box", None)
        if box is not None:
            box["final"].wait(60)
        return True

    def join(self, timeout: float | None = None) -> None:
        """Wait for the job (up to ``timeout`` s), then apply its updates (:meth:`poll`)."""
        self.wait(timeout)
        self.poll()

    def stop(self) -> None:
        """Stop: a waiting job leaves the queue, a running one is asked to stop (cooperatively)."""
        self.stop_event.set()
        job = self.job
        if job is not None and not job.done:
            job.cancel()

    def poll(self) -> None:
        """Drain the worker's queue and apply updates (call on the session's thread)."""
        with self._lock:
            while True:
                try:
                    kind, payload, progress, message = self._queue.get_nowait()
                except queue_module.Empty:
                    break
                if kind == "queue":   # the status line of a waiting job, or of one just started or stopping
                    job = payload
                    if job is self.job and self.status == "running" and (
                            job.status == "waiting" or (job.status == "running" and (
                                job.stop_requested or not self.message or self.message.startswith("queued:")))):
                        self.message = message
                    continue
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
                self.notice = ""
                if kind == "cancelled":   # left the queue before it ran (or, on Dask, returned nothing)
                    self.status = "cancelled"
                    self.message = ("stopped: the worker returned nothing in time" if payload == "stopped"
                                    else "cancelled before it started")
                elif kind == "done":
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
                if self.job is not None and self.job.over_budget:   # stopped by the teacher's budget: say which
                    self.notice = self.job.over_budget

    def status_text(self) -> str:
        """What the status line says (plain text): the error, else the notice and the message or status."""
        if self.error:
            return f"Error: {self.error}"
        state = self.message or self.status
        return f"{self.notice} ({state})" if self.notice else state

    def controls(self) -> pn.Row:
        """Progress bar, stop button and status text bound to this task (the text shown escaped)."""
        bar = pn.indicators.Progress(value=0, max=100, width=220, bar_color="primary")
        stop = pn.widgets.Button(name="Stop", button_type="warning", width=80, disabled=True)
        stop.on_click(lambda _: self.stop())
        text = pn.pane.Markdown("", margin=(0, 10))

        def sync(*_):
            bar.value = int(round(self.progress * 100)) if self.status != "running" or self.progress else -1
            bar.active = self.status == "running"
            stop.disabled = self.status != "running"
            state = escape_md(self.message or self.status)
            text.object = (f"**Error:** {escape_md(self.error)}" if self.error else
                           f"**{escape_md(self.notice)}** ({state})" if self.notice else state)

        self.param.watch(sync, ["status", "progress", "message", "error", "notice"])
        sync()
        return pn.Row(bar, stop, text)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, RuntimeError)) else f"{type(exc).__name__}: {exc}"


class ErrorBox(pn.viewable.Viewer):
    """A red box for messages such as "d_model must be an integer in [1, 8192], got 0"; hidden when empty.

    The message is shown as text (escaped: it may echo what the user typed); ``text`` is the message.
    """

    def __init__(self, **params):
        super().__init__(**params)
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False)
        self._text = ""

    def show(self, error: BaseException | str) -> None:
        self._text = error if isinstance(error, str) else _describe(error)
        self._alert.object = escape_md(self._text)
        self._alert.visible = True

    def clear(self) -> None:
        self._text = ""
        self._alert.object, self._alert.visible = "", False

    @property
    def text(self) -> str:
        return self._text if self._alert.visible else ""

    @property
    def html(self) -> str:
        """The Markdown the box renders (for tests of the escaping)."""
        return self._alert.object

    def __panel__(self):
        return self._alert


UPLOAD_ENV = "WORKBENCH_MAX_UPLOAD_MB"
UPLOAD_ACCEPT = ".txt,.text,.md,.csv,.tsv,.json,.py"


class TextUpload(pn.viewable.Viewer):
    """A text file sent from the browser, for the ``text`` dataset: the dashboard never reads a server path.

    At most ``$WORKBENCH_MAX_UPLOAD_MB`` megabytes (default 2), decoded as UTF-8 (a leading byte-order
    mark is dropped). :meth:`text` is ``None`` when nothing was uploaded (the built-in corpus is used).

    An upload is checked the moment it arrives, at the widget: one too large or not UTF-8 text is dropped
    at once (the widget's value here and the copy the page's document keeps are cleared, and the
    browser's input reset), and the note under the widget says why; :meth:`text` then raises that
    message (so Train refuses rather than falling back to the built-in corpus) until another file comes.
    """

    def __init__(self, **params):
        super().__init__(**params)
        self.file = pn.widgets.FileInput(accept=UPLOAD_ACCEPT, multiple=False, width=260)
        self.note = pn.pane.Markdown(self._note(), margin=(0, 10), styles={"font-size": "90%"})
        self.refused = ""   # why the last upload was dropped ("" when none was)
        self._dropping = False
        self.file.param.watch(self._arrived, "value")

    @staticmethod
    def limit_mb() -> float:
        return env_limit(UPLOAD_ENV, 2.0)

    def _note(self) -> str:
        return (f"**text file** (upload, UTF-8, at most {self.limit_mb():g} MB; none: the built-in corpus)")

    @property
    def filename(self) -> str | None:
        return self.file.filename if self.file.value is not None else None

    def _decode(self, raw) -> str:
        if not isinstance(raw, bytes):
            raise ValueError("text file: upload one plain-text file")
        limit = self.limit_mb()
        if len(raw) > limit * 2**20:
            raise ValueError(f"text file must be at most {limit:g} MB ({UPLOAD_ENV}), got {len(raw) / 2**20:.1f} MB")
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {self.file.filename!r} is not UTF-8 text (byte {e.start}); "
                             "upload a plain-text file such as .txt") from None

    def _arrived(self, event) -> None:
        """A file came from the browser: keep it if it is small UTF-8 text, else drop it now and say why."""
        if self._dropping:
            return
        if event.new is None:
            self.refused = ""
            self.note.object = self._note()
            return
        try:
            self._decode(event.new)
        except ValueError as e:
            self.refused = str(e)
            self._drop()
            self.note.object = f"{self._note()}  \n**Refused:** {escape_md(self.refused)}"
        else:
            self.refused = ""
            self.note.object = self._note()

    def _drop(self) -> None:
        """Forget the upload: the value here, the base64 copy on the document's model, the browser's input."""
        self._dropping = True
        try:
            self.file.param.update(value=None, filename=None, mime_type=None)
            for model, _ in list(self.file._models.values()):
                for prop in ("value", "filename", "mime_type"):   # read-only for Python: set as a client would
                    model.set_from_json(prop, "")
            if self.file._models:
                self.file.clear()
        finally:
            self._dropping = False

    def text(self) -> str | None:
        """The uploaded file's text, or ``None``; ValueError when it is too large or not UTF-8 text (also when
        such an upload was just dropped at the widget)."""
        raw = self.file.value
        if raw is None:
            if self.refused:
                raise ValueError(self.refused)
            return None
        return self._decode(raw)

    def clear(self) -> None:
        self.refused = ""
        self.note.object = self._note()
        self.file.clear() if hasattr(self.file, "clear") else setattr(self.file, "value", None)

    def __panel__(self):
        return pn.Column(self.note, self.file, margin=0)


def allowed_values(config, field: str) -> list:
    """The values ``config`` accepts for the string ``field``: its class's ``CHOICES`` (what ``validate()`` checks)."""
    return list(type(config).CHOICES[field])


def _engine_choices() -> dict[str, list]:
    mlp, tf = models.MLPConfig(d_in=1, n_classes=2), models.TransformerConfig(vocab_size=2)
    return {"norm": allowed_values(mlp, "norm"), "activation": allowed_values(mlp, "activation"),
            "embedding": allowed_values(tf, "embedding"), "schedule": allowed_values(TrainConfig(), "schedule")}


# Allowed values of string fields, for Select widgets, read from the configs' validation (which has no
# public constant); config_widgets asks each config for its own (a Transformer takes fewer norms).
CHOICES = _engine_choices()


def config_widgets(config, skip: tuple[str, ...] = (), choices: dict | None = None) -> dict[str, pn.widgets.Widget]:
    """One widget per dataclass field of ``config`` (an instance, whose values are the defaults).

    Integers and floats get free-entry inputs on purpose: out-of-range values are caught by the
    config's ``validate()``, whose message names the field and the range.
    """
    given = dict(choices or {})
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
        elif f.name in given or f.name in CHOICES:
            options = list(given[f.name]) if f.name in given else allowed_values(config, f.name)
            w = pn.widgets.Select(name=f.name, options=options, value=value, width=130)
        else:
            continue
        widgets[f.name] = w
    return widgets


def values_from_widgets(widgets: dict[str, pn.widgets.Widget]) -> dict[str, Any]:
    """``{field: value}``; an emptied number box gives ``None`` (caught by validation with the range)."""
    return {name: w.value for name, w in widgets.items()}
