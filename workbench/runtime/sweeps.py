"""Grids of runs on the job queue, on local threads or on a Dask cluster: ``run(task, grid) -> DataFrame``.

>>> df = wb.sweeps.run("train", {"d_model": [16, 32], "n_layers": [1, 2]}, seeds=[0, 1],
...                    dataset="digits", steps=100)
>>> df.columns   # point, d_model, n_layers, seed, metric, value, status, error

``task`` is one of :data:`TASKS` or an importable function (``"module:function"`` or the function
itself); ``grid`` maps argument names of the task to lists of values; ``seeds`` adds a ``seed`` key;
the other keyword arguments (``fixed``) go to every point. The result is tidy: one row per grid point
and metric, with the grid's keys, ``metric``, ``value``, the point's ``status`` (``done``,
``diverged``, ``cancelled`` or ``failed``) and ``error`` (the message of a failed point, whose one
row has metric ``"error"`` and value NaN: a point is never silently missing). Tasks may add columns
of their own (``epoch`` for collapse, ``alignment`` for barrier, ``method`` for grow).

Where the points run: ``address=None`` -- local threads through a :class:`~workbench.jobs.JobQueue`
(this sweep's own, 1 torch thread per point, ``WORKBENCH_MAX_JOBS`` at once; or ``queue=`` the
server's, sharing its slots and the user's share with everyone else); ``address="tcp://..."`` (or
a ``distributed.Client``, or a cluster object) -- that Dask cluster, one task per point at priority
-10, 1 torch thread each. The same seeds give the same numbers on both (the tasks are deterministic
given their seeds and their torch thread count).

The built-in tasks are the experiments' (:data:`workbench.experiments.SWEEP_TASKS`: :func:`train_task`,
:func:`barrier_task`, :func:`collapse_task`, :func:`grow_task` here), module-level functions that Dask
workers import; they are small by default but honest runs of the engine, the same pipelines as the
pages'. Each returns plain data, ``{"status": ..., "rows": [{"metric", "value", ...}, ...]}``. A task function of one's own may return that, a list of such rows, or a dict
``{metric: number}``; it reads :func:`workbench.jobs.current` for stop and progress if it likes.

:func:`start` is the non-blocking form (the Sweeps page): a :class:`Sweep` with per-point status,
cancel and the table so far. ``address``, ``seeds``, ``queue``, ``on_progress`` and ``user`` are this
module's own keywords, not the task's.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import math
import numbers
import re
import threading
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from ..core import checks, recipes
from ..core.models import FAMILIES
from ..core.training import TrainConfig
from .. import experiments
from . import jobs

__all__ = ["TASKS", "run", "start", "Sweep", "points", "train_task", "barrier_task", "collapse_task", "grow_task",
           "MAX_POINTS", "MAX_VALUES", "MAX_SEEDS"]

TASKS = tuple(experiments.SWEEP_TASKS)   # a view of the experiments' tasks: train, barrier, collapse, grow
MAX_POINTS = 1000          # grid points (seeds included) of one sweep
MAX_VALUES = 1000          # values of one grid key
MAX_SEEDS = 100
MAX_STEPS = 100_000        # the built-in tasks are small: steps per run
MAX_EPOCHS = 10_000
RESERVED = ("address", "seeds", "queue", "on_progress", "user")


# ----------------------------------------------------------------------------- built-in tasks
# The experiments' own tasks (workbench.experiments.SWEEP_TASKS): module-level functions there, so Dask
# workers import them by name; the names below are where the sweeps' callers and the Sweeps page find them.

train_task = experiments.train.task
barrier_task = experiments.connectivity.task
collapse_task = experiments.collapse.task
grow_task = experiments.grow.task
_TASK_FUNCTIONS = dict(experiments.SWEEP_TASKS)


# ----------------------------------------------------------------------------- argument checks


def _opt(check):
    """A check that also lets None through (an option left at its default)."""
    return lambda name, v: None if v is None else check(name, v)


def _int(lo, hi):
    return lambda name, v: checks.check_int(name, v, lo, hi)


def _float(lo, hi, lo_open=False):
    return lambda name, v: checks.check_float(name, v, lo, hi, lo_open=lo_open)


def _size(field: str) -> checks.Interval:
    """The bound the model families declare on ``field``, the tightest where both declare it (a sweep's
    size option is checked before its dataset, hence its family, is known)."""
    found = [checks.constraints(f.config)[field] for f in FAMILIES.values() if field in checks.constraints(f.config)]
    return checks.Interval(int, max(c.lo for c in found), min(c.hi for c in found))


def _dataset_name(name, v):
    from ..core import data

    return checks.check_choice(name, v, data.names())


def _options(name, v):
    if v is not None and not isinstance(v, Mapping):
        raise ValueError(f"{name} must be a dict of dataset options or None, got {type(v).__name__}")


# Bounds a config declares are read from it (workbench.checks.constraints); the tasks' own limits are this module's.
_TRAIN = checks.constraints(TrainConfig)
_SIZE_CHECKS = {k: _opt(_size(k).check) for k in ("d_model", "n_layers", "d_hidden", "n_heads", "d_mlp")}
_TRAIN_CHECKS = {"dataset": _dataset_name, "seed": checks.check_seed, "steps": _int(1, MAX_STEPS),
                 "lr": _TRAIN["lr"].check, "batch_size": _TRAIN["batch_size"].check,
                 "eval_max": _TRAIN["eval_max"].check, "data_options": _options, "effective_depth": checks.check_bool, **_SIZE_CHECKS}
_CHECKS: dict[str, dict[str, Callable]] = {
    "train": _TRAIN_CHECKS,
    "barrier": {**{k: v for k, v in _TRAIN_CHECKS.items() if k not in ("eval_max", "effective_depth")}, "seed_b": _opt(checks.check_seed),
                "n_alphas": _int(2, 1001),
                "split": lambda n, v: checks.check_choice(n, v, ("train", "val")), "max_examples": _int(0, None)},
    "collapse": {"dataset": lambda n, v: checks.check_choice(n, v, tuple(recipes.COLLAPSE)), "seed": checks.check_seed,
                 "epochs": _int(1, MAX_EPOCHS), "every": _int(1, MAX_EPOCHS),
                 "record": lambda n, v: checks.check_choice(n, v, ("all", "final")),
                 "max_samples": _int(2, 1_000_000), "d_model": _SIZE_CHECKS["d_model"],
                 "n_layers": _SIZE_CHECKS["n_layers"], "lr": _opt(_TRAIN["lr"].check),
                 "weight_decay": _opt(_TRAIN["weight_decay"].check), "batch_size": _opt(_TRAIN["batch_size"].check),
                 "mixup": _float(0, 100), "etf_classifier": checks.check_bool,
                 "imbalance": _opt(_float(0, 1, lo_open=True))},
    "grow": {"recipe": lambda n, v: checks.check_choice(n, v, ("khop", "text")), "seed": checks.check_seed,
             "steps": _opt(_int(1, MAX_STEPS)),
             "schedule": lambda n, v: checks.check_choice(n, v, ("gstack", "layerwise")),
             "final_layers": _opt(_int(1, 64)), "d_model": _SIZE_CHECKS["d_model"], "n_heads": _SIZE_CHECKS["n_heads"],
             "d_mlp": _SIZE_CHECKS["d_mlp"], "eval_every": _opt(_int(1, MAX_STEPS)),
             "eval_max": _opt(_TRAIN["eval_max"].check), "data_options": _options},
}

_FUNCTION_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def _resolve(task) -> tuple[str, Callable]:
    """``(label, function)`` of a task name, a ``"module:function"`` reference or a callable."""
    if isinstance(task, str):
        if task in _TASK_FUNCTIONS:
            return task, _TASK_FUNCTIONS[task]
        if not _FUNCTION_REF.match(task) or len(task) > 300:
            raise ValueError(f"task must be one of {list(TASKS)}, a 'module:function' reference or a function, "
                             f"got {task[:80]!r}")
        module, _, attr = task.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task {task!r} cannot be imported: {type(e).__name__}: {e}") from None
        if not callable(fn):
            raise ValueError(f"task {task!r} is not a function")
        return _resolve(fn)[0] if fn in _TASK_FUNCTIONS.values() else task, fn
    if callable(task):
        named = next((name for name, fn in _TASK_FUNCTIONS.items() if fn is task), None)
        return named or getattr(task, "__name__", type(task).__name__), task
    raise ValueError(f"task must be one of {list(TASKS)}, a 'module:function' reference or a function, "
                     f"got {type(task).__name__}")


def _arguments(label: str, fn: Callable) -> tuple[list[str], bool]:
    """The keyword-passable argument names of ``fn`` and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise ValueError(f"task {label!r}: its arguments cannot be read (inspect.signature failed)") from None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_value(where: str, v) -> None:
    if v is None or isinstance(v, (bool, str)):
        return
    if isinstance(v, numbers.Real) and not isinstance(v, np.bool_):
        if not math.isfinite(float(v)):
            raise ValueError(f"{where} must be finite, got {v!r}")
        return
    raise ValueError(f"{where} must be a number, a string, True/False or None, got {type(v).__name__}")


def points(task, grid, *, seeds=None, **fixed) -> list[dict]:
    """The grid's points (dicts of the grid's keys, ``seed`` last when ``seeds`` is given), all checked.

    Refused with a message: a grid that is not a dict of non-empty lists of plain values (numbers,
    strings, booleans, None; no repeats), a key or fixed argument the task does not take, a key both
    in the grid and fixed, more than :data:`MAX_POINTS` points, and (for the built-in tasks) any value
    out of its range.
    """
    label, fn = _resolve(task)
    names, var_kw = _arguments(label, fn)
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid must be a dict mapping argument names to lists of values, got {type(grid).__name__}")
    grid = dict(grid)
    for k in grid:
        if not isinstance(k, str):
            raise ValueError(f"grid keys must be argument names (strings), got {k!r}")
    if seeds is not None:
        if "seed" in grid or "seed" in fixed:
            raise ValueError("give the seeds either as seeds=[...] or as a 'seed' grid key or argument, not both")
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range)) \
                or not 1 <= len(seeds) <= MAX_SEEDS:
            raise ValueError(f"seeds must be a list of 1 to {MAX_SEEDS} seeds, got {seeds!r:.80}")
        grid["seed"] = [checks.check_seed("seeds[]", s) for s in seeds]
    for k, values in grid.items():
        if k in RESERVED:
            raise ValueError(f"grid key {k!r} is a keyword of sweeps.run itself, not of the task")
        if k not in names and not var_kw:
            raise ValueError(f"grid key {k!r} is not an argument of task {label!r}; its arguments: {names}")
        if k in fixed:
            raise ValueError(f"{k!r} is both a grid key and a fixed argument; give it once")
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, range)) \
                or not 1 <= len(values) <= MAX_VALUES:
            raise ValueError(f"grid[{k!r}] must be a non-empty list of at most {MAX_VALUES} values, "
                             f"got {values!r:.80}")
        values = list(values)
        for i, v in enumerate(values):
            _check_value(f"grid[{k!r}][{i}]", v)
        seen = []
        for v in values:
            if any(type(v) is type(s) and v == s for s in seen):
                raise ValueError(f"grid[{k!r}] repeats the value {v!r}; each value once")
            seen.append(v)
        grid[k] = values
    for k in fixed:
        if k not in names and not var_kw:
            raise ValueError(f"{k!r} is not an argument of task {label!r}; its arguments: {names}")
    sizes = [len(v) for v in grid.values()]
    total = math.prod(sizes)
    if total > MAX_POINTS:
        raise ValueError(f"the grid has {' x '.join(map(str, sizes))} = {total} points; at most {MAX_POINTS} "
                         f"are allowed (split the sweep, or take fewer values)")
    checks_ = _CHECKS.get(label) if fn is _TASK_FUNCTIONS.get(label) else None
    if checks_:
        for k, v in fixed.items():
            if k in checks_:
                checks_[k](k, v)
        for k, values in grid.items():
            for i, v in enumerate(values):
                if k in checks_:
                    checks_[k](f"grid[{k!r}][{i}]", v)
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]


# ----------------------------------------------------------------------------- rows


def _rows_of(value) -> tuple[str | None, list[dict]]:
    """``(status or None, rows)`` from a task's return value (see the module docstring)."""
    status = None
    if isinstance(value, Mapping) and "rows" in value:
        status, rows = value.get("status"), value["rows"]
    elif isinstance(value, Mapping):
        rows = [{"metric": k, "value": v} for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        rows = list(value)
    else:
        raise ValueError(f"a task must return a dict of metrics, a list of rows or {{'status', 'rows'}}, "
                         f"got {type(value).__name__}")
    out = []
    for r in rows:
        if not isinstance(r, Mapping) or "metric" not in r or "value" not in r:
            raise ValueError(f"each row a task returns must be a dict with 'metric' and 'value', got {r!r:.80}")
        v = r["value"]
        if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)):
            raise ValueError(f"metric {r['metric']!r}: the value must be a number, got {v!r:.80}")
        out.append({**r, "metric": str(r["metric"]), "value": float("nan") if v is None else float(v)})
    return (str(status) if status is not None else None), out


def _error_text(job: jobs.Job | None) -> str:
    if job is None or job.error is None:
        return ""
    return f"{type(job.error).__name__}: {job.error}"[:1000]


# ----------------------------------------------------------------------------- the sweep


class Sweep:
    """A running sweep (:func:`start`): ``points`` (the grid's), ``jobs`` (one per point once submitted),
    :meth:`status` (per point), :meth:`cancel`, :meth:`wait`, :meth:`frame` (rows so far), :meth:`result`."""

    def __init__(self, label: str, fn: Callable, pts: list[dict], fixed: dict, queue: jobs.JobQueue, own_queue: bool,
                 user: str, on_progress: Callable | None):
        self.task, self.points, self.fixed = label, pts, fixed
        self.jobs: list[jobs.Job | None] = [None] * len(pts)
        self.queue, self._own_queue, self.user = queue, own_queue, user
        self._fn, self._on_progress = fn, on_progress
        self._lock = threading.RLock()
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._submit_error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name=f"workbench-sweep-{label}", daemon=True)

    def _listener(self, i: int) -> Callable:
        def on_event(job, event, i=i):
            if self._on_progress is not None:
                self._on_progress(i, job)
        return on_event

    def _feed(self) -> None:
        try:
            n = len(self.points)
            for i, point in enumerate(self.points):
                call = functools.partial(self._fn, **{**self.fixed, **point})
                while not self._cancelled.is_set():
                    if self.queue.closed:
                        raise RuntimeError("the job queue was closed during the sweep")
                    if not self.queue.wait_for_room(self.user, 0.25):
                        continue
                    with self._lock:
                        if self._cancelled.is_set():
                            break
                        try:
                            job = self.queue.submit(call, user=self.user, name=f"{self.task} {i + 1}/{n}")
                        except jobs.QueueFull:
                            continue          # someone else took the room first: wait again
                        self.jobs[i] = job
                    job.add_listener(self._listener(i))
                    break
                if self._cancelled.is_set():
                    break
            for job in list(self.jobs):
                if job is not None:
                    job.wait()
        except BaseException as e:  # noqa: BLE001 -- reported by result(), never lost in a thread
            self._submit_error = e
            self.cancel()
            for job in list(self.jobs):
                if job is not None:
                    job.wait()
        finally:
            if self._own_queue:
                self.queue.close()
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Stop the sweep: points not yet started are dropped (reported ``cancelled``), running ones stop."""
        with self._lock:
            self._cancelled.set()
            current = [j for j in self.jobs if j is not None]
        for job in current:
            job.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every point has finished (or ``timeout`` s); returns whether the sweep is over."""
        return self._finished.wait(timeout)

    def status(self) -> pd.DataFrame:
        """One row per point: ``point``, the grid's keys, ``status``, ``progress``, ``message`` (``queued: ...``)."""
        rows = []
        for i, (p, job) in enumerate(zip(self.points, list(self.jobs))):
            if job is None:
                st = "cancelled" if self._cancelled.is_set() or self.done else "pending"
                rows.append({"point": i, **p, "status": st, "progress": None, "message": ""})
            else:
                rows.append({"point": i, **p, "status": job.status, "progress": job.progress,
                             "message": job.status_line()})
        return pd.DataFrame(rows)

    def frame(self) -> pd.DataFrame:
        """The tidy table of the points that have finished (all of them once :meth:`wait` returned)."""
        keys = list(self.points[0]) if self.points else []
        rows: list[dict] = []
        extra: list[str] = []
        for i, (p, job) in enumerate(zip(self.points, list(self.jobs))):
            if job is not None and not job.done:
                continue
            if job is None and not self.done:
                continue
            base = {"point": i, **p}
            if job is None or (job.status == "cancelled" and not job.has_value):
                rows.append({**base, "metric": "error", "value": float("nan"), "status": "cancelled",
                             "error": "cancelled before it ran"})
                continue
            if not job.has_value:
                rows.append({**base, "metric": "error", "value": float("nan"), "status": job.status,
                             "error": _error_text(job)})
                continue
            try:
                status, point_rows = _rows_of(job.value)
                clash = [c for r in point_rows for c in r if c in base]
                if clash:
                    raise ValueError(f"the task's rows reuse the grid's column names {sorted(set(clash))}")
            except ValueError as e:
                rows.append({**base, "metric": "error", "value": float("nan"), "status": "failed",
                             "error": f"ValueError: {e}"[:1000]})
                continue
            st = job.status
            if st == "done" and status in ("cancelled", "diverged", "failed"):
                st = status
            if not point_rows:
                rows.append({**base, "metric": "error", "value": float("nan"), "status": st,
                             "error": "" if st != "done" else "the task returned no metrics"})
                continue
            for r in point_rows:
                for c in r:
                    if c not in ("metric", "value") and c not in extra:
                        extra.append(c)
                rows.append({**base, **r, "status": st, "error": ""})
        columns = ["point", *keys, *extra, "metric", "value", "status", "error"]
        return pd.DataFrame(rows, columns=columns)

    def result(self, timeout: float | None = None) -> pd.DataFrame:
        """Wait for every point, then the tidy table (re-raises an error that stopped the sweep itself)."""
        if not self.wait(timeout):
            raise TimeoutError(f"the sweep has not finished within {timeout} s")
        if self._submit_error is not None:
            raise self._submit_error
        return self.frame()

    def __repr__(self) -> str:
        counts = self.status()["status"].value_counts().to_dict() if self.points else {}
        return f"Sweep(task={self.task!r}, points={len(self.points)}, {counts})"


def _own_dask_queue(address, n: int) -> jobs.JobQueue:
    from distributed import Client

    if not isinstance(address, (str, Client)) and isinstance(getattr(address, "scheduler_address", None), str):
        address = address.scheduler_address            # a LocalCluster or another cluster object
    if not isinstance(address, (str, Client)):
        raise ValueError(f"address must be a Dask scheduler address 'tcp://host:port', a distributed.Client or a "
                         f"cluster, got {type(address).__name__}")
    executor = jobs.DaskExecutor(address if isinstance(address, Client) else jobs._check_address("address", address),
                                 threads=1, priority=-10)
    try:
        return jobs.JobQueue(queue_size=n, jobs_per_user=n, executor=executor)
    except BaseException:
        executor.close()
        raise


def start(task, grid, *, address=None, seeds=None, queue: jobs.JobQueue | None = None,
          on_progress: Callable | None = None, user: str = "sweep", **fixed) -> Sweep:
    """Start a sweep and return at once (see :func:`run`). ``on_progress(point_index, job)`` is called on
    every change of a point's job (status, position, progress); ``user`` owns the jobs in a shared queue."""
    label, fn = _resolve(task)
    pts = points(task, grid, seeds=seeds, **fixed)
    if on_progress is not None and not callable(on_progress):
        raise ValueError(f"on_progress must be callable or None, got {on_progress!r}")
    checks.check_str("user", user, jobs.MAX_USER_CHARS)
    if queue is not None and address is not None:
        raise ValueError("give either queue (a JobQueue) or address (a Dask cluster), not both")
    if queue is not None and not isinstance(queue, jobs.JobQueue):
        raise ValueError(f"queue must be a workbench.jobs.JobQueue or None, got {type(queue).__name__}")
    if queue is not None:
        q, own = queue, False
    elif address is not None:
        q, own = _own_dask_queue(address, len(pts)), True
    else:
        q, own = jobs.JobQueue(queue_size=len(pts), jobs_per_user=len(pts), threads=1, executor="threads"), True
    sweep = Sweep(label, fn, pts, dict(fixed), q, own, user, on_progress)
    sweep._thread.start()
    return sweep


def run(task, grid, *, address=None, seeds=None, queue: jobs.JobQueue | None = None,
        on_progress: Callable | None = None, user: str = "sweep", **fixed) -> pd.DataFrame:
    """Run ``task`` at every point of ``grid`` (times ``seeds``) and return the tidy table (module docstring).

    ``address=None``: local threads (this sweep's own queue, or ``queue``); an address, a
    ``distributed.Client`` or a cluster: Dask. Interrupting it (Ctrl-C) cancels the sweep.
    """
    sweep = start(task, grid, address=address, seeds=seeds, queue=queue, on_progress=on_progress, user=user, **fixed)
    try:
        return sweep.result()
    except BaseException:
        sweep.cancel()
        raise
