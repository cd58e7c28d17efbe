"""Jobs on Dask workers that use the server: its run store, and the dashboard's page jobs.

``submit(..., services={"store.save": fn, ...})`` names functions a task may run in the submitting
process (``current().call("store.save", files, name)``). A :class:`RemoteStore` is the server's run store
seen from a worker: runs travel as their files (:func:`workbench.io.store.pack_run`) and the server's store
object saves them (owners stay its business).

A dashboard page's job is ``fn(ctx, *args, **kwargs)`` with the UI's task context (``ctx.stopped``,
``ctx.stop_event``, ``ctx.session_gone``, ``ctx.report(payload, progress, message)``). On Dask the UI asks
:func:`plan` whether it can be shipped and submits :func:`run_page_job` (workers import ``fn`` by name);
on the worker the page job gets a context with the same API, whose reports cross Dask's topic as plain
data (DataFrames, arrays and tuples tagged, never pickle) and come back through :func:`page_update`; the
result's Runs come back by id (:func:`open_result` opens them from the server's store) or as their files.
A job that cannot be shipped runs on the server's threads (``submit(..., local=True)``), :func:`plan`
says why. Nothing here imports the UI: the runtime layer stays below it.
"""
from __future__ import annotations

import importlib
import pickle
import threading
from typing import Any, Callable, NamedTuple

import pandas as pd

from ...core.checks import check_str
from ...core.monitor import current
from ...core.training import Run
from ...growth import GrowControl
from ...io.store import RunStore, StoreError, pack_run, unpack_run


# ----------------------------------------------------------------------------- the server's store, from a worker


class RemoteStore:
    """A picklable stand-in for the server's run store, for a job that runs on a Dask worker.

    ``save(run, name=None, owner=None) -> run_id`` sends the run's files (:func:`workbench.store.pack_run`:
    safetensors, run.json, metrics.csv; no pickle) to the server's ``"store.save"`` service, which
    saves them in its store (the store's only writer); ``load(run_id)`` and ``read_json(run_id)``
    ask ``"store.load"`` / ``"store.read_json"``. Who owns a saved run and who may open which run
    is the server's store object's business (a ``UserStore`` in classroom mode): ``owner`` and
    ``user`` given here are ignored. :meth:`services` makes the three services for a store object.
    """

    def __init__(self, label: str = "the server's run store"):
        self.label = label
        self._saved: dict[int, tuple[Any, str]] = {}   # id(run) -> (run, run_id): runs saved from this process

    def __getstate__(self):
        return {"label": self.label}

    def __setstate__(self, state):
        self.label, self._saved = state["label"], {}

    def save(self, run, name: str | None = None, owner=None) -> str:
        from ...io.store import pack_run

        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a non-empty str or None, got {name!r}")
        run_id = current().call("store.save", pack_run(run), name)
        if not isinstance(run_id, str):
            raise RuntimeError(f"store.save answered {type(run_id).__name__}, not a run id")
        run.run_id = run_id
        self._saved[id(run)] = (run, run_id)
        return run_id

    def saved_id(self, run) -> str | None:
        """The id ``run`` (this very object) was saved under through this stand-in, or None."""
        entry = self._saved.get(id(run))
        return entry[1] if entry is not None and entry[0] is run else None

    def load(self, run_id: str, device=None, *, allow_nonfinite: bool = False, user=None):
        from ...io.store import unpack_run

        check_str("run_id", run_id, 1000)
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        run = unpack_run(current().call("store.load", run_id, allow_nonfinite), device,
                         allow_nonfinite=allow_nonfinite)
        run.run_id = run_id
        return run

    def read_json(self, run_id: str) -> dict:
        check_str("run_id", run_id, 1000)
        return current().call("store.read_json", run_id)

    @staticmethod
    def services(store) -> dict[str, Callable]:
        """``{"store.save", "store.load", "store.read_json": function}`` acting on ``store`` (a ``RunStore``
        or ``UserStore``), for ``JobQueue.submit(services=...)``; they do not need a browser session."""
        from ...io.store import pack_run, unpack_run

        def save(files, name=None):
            # what the worker trained, as it trained it (a diverged run's NaN weights are saved, as locally)
            return store.save(unpack_run(files, allow_nonfinite=True), name=name)

        def load(run_id, allow_nonfinite=False):
            return pack_run(store.load(run_id, allow_nonfinite=bool(allow_nonfinite)))

        def read_json(run_id):
            return store.read_json(run_id)

        return {"store.save": save, "store.load": load, "store.read_json": read_json}

    def __repr__(self) -> str:
        return f"RemoteStore({self.label!r})"


# ----------------------------------------------------------------------------- page jobs on Dask workers
# With the server's queue on Dask (WORKBENCH_DASK), the UI's BackgroundTask ships a page job as
# run_page_job(fn, args, kwargs) after plan(...): the store arguments become RemoteStores (saving and
# loading are services run by the server on its own store object), Run arguments and results travel as
# their run-folder files (pack_run), payloads as plain data (_encode_payload, read back by page_update).


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


class Plan(NamedTuple):
    """A page job ready for a worker: what :func:`run_page_job` is submitted with."""

    args: tuple          # the job's arguments, stores and GrowControls swapped for their stand-ins, Runs packed
    kwargs: dict
    store: Any           # the one run store among the arguments (its saved runs are opened from it), or None
    services: dict       # what the stand-ins ask of the server: ``JobQueue.submit(services=...)``


def plan(fn, args: tuple, kwargs: dict, stores: tuple[type, ...] = ()) -> Plan | str:
    """How a page job ``fn(ctx, *args, **kwargs)`` would be shipped to a Dask worker: a :class:`Plan`, or a
    string saying why it runs on the server's threads instead.

    Every run store among the arguments (a :class:`~workbench.io.store.RunStore`, or an instance of one
    of ``stores``: the UI's per-user view) is replaced by one :class:`RemoteStore`, whose saves and loads
    the plan's services run on that store object here; Runs travel as their run-folder files. A
    :class:`~workbench.growth.GrowControl` (the Grow page's "add a block now") becomes a
    :class:`_RemoteGrowControl` that asks the page's own control through the job's services.

    Runs on the server's threads: a function that is not a module-level function of a module
    (a bound method talks to its page: the Residual page's analysis), one marked ``fn.remote = False``,
    arguments holding a model object (``torch.nn.Module``: the Residual page's models may be
    Hugging Face models of gigabytes, held by the session), two different stores or controls, or
    anything else that cannot be pickled.
    """
    import torch

    if not _importable(fn):
        return f"{getattr(fn, '__qualname__', fn)!r} is not a module-level function (workers import it by name)"
    if getattr(fn, "remote", True) is False:
        return f"{fn.__qualname__} is marked remote = False"
    found, controls, why = [], [], []

    def swap(v):
        if isinstance(v, (RunStore, *stores)):
            if not any(v is s for s in found):
                found.append(v)
            return RemoteStore()
        if isinstance(v, Run):
            return _PackedRun(pack_run(v))
        if isinstance(v, torch.nn.Module):
            why.append(f"it takes a model object ({type(v).__name__}), which stays in this process")
        elif isinstance(v, GrowControl):
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
    if len(found) > 1:
        return "it takes two different run stores"
    if len(controls) > 1:
        return "it takes two different GrowControls"
    try:
        pickle.dumps((new_args, new_kwargs))
    except Exception as e:  # noqa: BLE001 -- whatever pickle refuses
        return f"an argument cannot be sent to a worker ({type(e).__name__}: {e})"[:300]
    store = found[0] if found else None
    services = {**(_RemoteGrowControl.services(controls[0]) if controls else {}),
                **(RemoteStore.services(store) if store is not None else {})}
    return Plan(new_args, new_kwargs, store, services)


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


class _RemoteGrowControl(GrowControl):
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
    def services(control: "GrowControl") -> dict:
        """The server side: the page's own control answers."""
        return {"control.pending": control.pending, "control.take": control.take}

    def request_layer(self, init: str = "zero") -> None:
        raise RuntimeError("a block is requested on the page's own GrowControl, not on a worker")

    def pending(self) -> bool:
        import time

        now = time.monotonic()
        if self._checked is None or now - self._checked >= self.poll_interval:
            self._checked = now
            self._pending = bool(current().call("control.pending"))
        return self._pending

    def take(self) -> str | None:
        self._pending = False
        return current().call("control.take")


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


_PAGE_KEY = "__page__"   # a job report whose payload is a page's update (ctx.report on a worker)


def is_page_report(payload) -> bool:
    """Whether a remote page job's report (``Job.payload``) carries a page update (:func:`page_update`)."""
    return isinstance(payload, dict) and _PAGE_KEY in payload


def page_update(payload) -> tuple[Any, float | None, str | None]:
    """``(update, progress, message)`` of a page report (on the server): what the job's ``ctx.report`` sent,
    its payload decoded (DataFrames, arrays, tuples as they were; None when it sent none)."""
    update = _decode_payload(payload[_PAGE_KEY]) if payload.get("has_payload") else None
    return update, payload.get("progress"), payload.get("message")


class _RemoteTaskContext:
    """The ``TaskContext`` API (``workbench.ui.task``) of a page job on a Dask worker (no browser session here)."""

    session_gone = False

    def __init__(self):
        self._job = current()
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
        wrapped = {_PAGE_KEY: encoded, "has_payload": payload is not None, "progress": progress,
                   "message": message}
        self._job.report(progress, "" if message is None else str(message), payload=wrapped,
                         force=payload is not None)


def run_page_job(fn, args, kwargs):
    """A page job on a Dask worker: ``fn(ctx, *args, **kwargs)`` with a worker-side context; Run
    arguments unpacked; Runs in the result sent back by id (saved through the job's RemoteStore) or
    as their files."""
    def unpack(v):
        return unpack_run(v.files, allow_nonfinite=True) if isinstance(v, _PackedRun) else v

    args, kwargs = _walk(tuple(args), unpack), _walk(dict(kwargs), unpack)
    stores = []
    _walk((args, kwargs), lambda v: stores.append(v) if isinstance(v, RemoteStore) else None)
    result = fn(_RemoteTaskContext(), *args, **kwargs)

    def pack(v):
        if isinstance(v, Run):
            saved = next((s.saved_id(v) for s in stores if s.saved_id(v) is not None), None)
            return _SavedRun(saved) if saved is not None else _PackedRun(pack_run(v))
        return v

    return _walk(result, pack)


def open_result(value, store):
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
