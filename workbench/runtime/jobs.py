"""A bounded job queue for every long computation of a server: positions, per-user shares, cancel, two backends.

One :class:`JobQueue` per server process (``apps/app_hooks.py`` makes it); every page submits its
long computations (train, grow, a connectivity pair, a collapse recipe, compose, a residual analysis
of a large model, each point of a sweep) through it::

    queue = JobQueue()                                  # settings from the environment, see below
    job = queue.submit(task, ds, cfg, user=pn.state.user or session_id, name="train digits")
    job.position()      # (k, n) while waiting;  job.status_line() -> "queued: position 2 of 5"
    job.add_listener(lambda job, event: ...)            # event: "status", "position" or "progress"
    job.cancel()        # waiting: removed at once; running: cooperative stop (the task ends early)
    job.result()        # the task's return value (re-raises the task's exception)
    queue.cancel_user(session_id)                       # a closed browser tab: its waiting jobs go

Design
------
*Admission* is decided at once: :meth:`JobQueue.submit` raises :class:`QueueFull` (a ``ValueError``)
with a message when the user already has ``jobs_per_user`` jobs waiting or running, or when every
slot is busy and ``queue_size`` jobs wait. Nothing is queued that cannot be served.

*Scheduling* is the queue's own, not the executor's: a job goes to the executor only when one of
the ``max_jobs`` slots is free, so the position a user sees is the true order of service (an
executor with its own queue -- Dask orders by submission and priority -- never holds a job back).
Waiting jobs start round-robin across users and first-in-first-out within one user: the users with
waiting jobs form a ring; the next job is the oldest one of the user at the head of the ring, who
then moves to the back (a user who had nothing waiting joins at the back). :meth:`Job.position` is
the place in exactly that order: the job at position 1 is the next to start. A position moves
forward as jobs start or are cancelled; it moves back by one when a user with nothing waiting
submits and takes a turn ahead of others' second or later jobs (round-robin). Waiting jobs'
listeners hear of every change (event ``"position"``). No slot idles while a job waits.

*The task* is any function ``fn(*args, **kwargs)``; it finds its :class:`Context` with
:func:`current` (outside a job: a context that is never stopped and reports nowhere): ``ctx.stopped``
says that Stop was pressed (the task ends early and returns what it has, e.g. a cancelled Run),
``ctx.report(progress, message, payload)`` sends progress (throttled to one report per
``report_interval`` seconds unless ``force=True``; ``progress`` in [0, 1], ``payload`` small plain data:
numbers, strings, lists, dicts). :class:`TrainProgress` connects :func:`workbench.train` to it. The
final status is ``"done"``; ``"cancelled"`` when a stop was requested; ``"diverged"`` when the task
raised :class:`Diverged` or returned something whose ``status`` (attribute or key) is ``"diverged"``
(a Run stopped on NaN); ``"failed"`` when it raised (the exception and its traceback are kept).

*Backends* (one interface, :class:`Executor`: ``start(job, report, done)``, ``stop(job)``, ``close()``):

- :class:`ThreadExecutor` (default): one thread per running job in this process; torch gets
  ``threads`` intra-op threads (``WORKBENCH_THREADS``, default ``floor(cores / max_jobs)``), so
  ``max_jobs`` trainings do not oversubscribe the cores. Stop sets a ``threading.Event``.
- :class:`DaskExecutor` (``JobQueue(executor="tcp://host:port")``, a ``distributed.Client``, or
  ``WORKBENCH_DASK=tcp://host:port`` in the environment): the task runs on a worker through
  ``_run_on_worker`` (in this package, so workers import it; the task function itself is pickled by
  reference, so it must be importable there too: keep task code in ``workbench``). Torch threads per
  task: 1 unless set. Progress comes back through Dask's event/topic mechanism (the worker calls
  ``get_worker().log_event(topic, ...)``, throttled; the client ``subscribe_topic(topic, handler)``).
  Dask cannot interrupt a running task, so Stop is cooperative through a ``distributed.Event`` (the
  worker polls it at most every ``report_interval`` seconds), and after ``cancel_grace`` seconds
  ``future.cancel()`` frees the slot (the worker may still finish the abandoned task). Results come
  back as the task returned them: return plain data or bytes (safetensors, metrics CSV, config JSON)
  and let the server -- the store's only writer -- save them in a listener. A worker that dies
  mid-task: Dask reruns the task elsewhere (``allowed-failures``), then the job fails with
  ``KilledWorker``; it is never silently lost.

*Task-to-server calls*: ``submit(..., services={"store.save": fn, ...})`` names functions the task may
run in the submitting process, ``current().call("store.save", files, name)``. On threads the call is
direct; on Dask the worker logs ``{"job", "call", "reply"}`` on the job's topic, its arguments and
the answer (``{"ok": value}`` or ``{"error": message}``) go through two ``distributed.Queue``s (a
topic keeps its last events in the scheduler: no weights there), and the server answers on its own
thread pool. Arguments and answers are plain data (bytes, str, numbers, lists, dicts). A
:class:`RemoteStore` is the server's run store seen from a worker: runs travel as their files
(``workbench.store.pack_run``) and the server's store object saves them (owners stay its business).
``submit(..., local=True)`` runs one job on this process's threads even on Dask (a job that cannot
be shipped; the pages' ``BackgroundTask`` decides).

*Budgets*: a student's job on a class server may use at most :attr:`JobQueue.student_budget`
(:class:`Budget`: training steps over every training in the job, and seconds of running time), so that
nobody holds one of the class's few slots for hours (a job goes on after its tab is closed). The UI marks
a signed-in student's queue user with :meth:`JobQueue.add_student`; their jobs get the budget current
at submission (:meth:`JobQueue.budget_for`), teachers' and a laptop's jobs none. The steps are counted in
the task's process: :func:`workbench.train` asks ``current().take_steps(1)`` before each step and stops
where the budget ends; the context then reads as stopped (so :class:`TrainProgress` and the pages' own
callbacks stop what follows) and tells the queue. The time is the queue's: a timer from the start. Either
way the queue stops the job as Stop does, with :attr:`Job.over_budget` naming the budget; the task ends
with what it has. The teacher changes the budget at run time (:meth:`JobQueue.set_student_budget`,
the Teacher page).

Listeners (:meth:`Job.add_listener`, :meth:`JobQueue.add_listener`) are called outside the
queue's lock, from whatever thread made the change (a job's thread, Dask's callback thread, the
caller of submit/cancel): keep them short and hand UI work to the UI's own loop. A listener that
raises is reported as a warning and does not break the queue.

Settings (read when a queue is made; each names its variable when it is wrong):
``WORKBENCH_MAX_JOBS`` (running at once, default ``max(1, cores - 1)``), ``WORKBENCH_QUEUE_SIZE``
(waiting jobs, default 40), ``WORKBENCH_JOBS_PER_USER`` (waiting + running per user, default 2),
``WORKBENCH_THREADS`` (torch threads per job, default ``floor(cores / max_jobs)``, at least 1;
1 on Dask), ``WORKBENCH_DASK`` (a scheduler address; unset: threads), ``WORKBENCH_STUDENT_MAX_STEPS``
and ``WORKBENCH_STUDENT_MAX_SECONDS`` (a student's job budget, default 20,000 steps and 1200 s; ``none``:
no cap).
"""
from __future__ import annotations

import contextvars
import dataclasses
import os
import re
import threading
import time
import traceback
import uuid
import warnings
from collections import deque
from typing import Any, Callable, Mapping

from ..core.checks import check_float, check_int, check_str, env_limit
from ..core.monitor import MAX_MESSAGE_CHARS, Context, current, _CURRENT
from ..core.training import Callback

__all__ = ["JobQueue", "Job", "Context", "current", "QueueFull", "JobCancelled", "Diverged", "Executor",
           "ThreadExecutor", "DaskExecutor", "TrainProgress", "RemoteStore", "settings", "STATUSES", "FINAL_STATUSES",
           "cores", "Budget", "student_budget", "STUDENT_STEPS_ENV", "STUDENT_SECONDS_ENV"]

STATUSES = ("waiting", "running", "done", "cancelled", "failed", "diverged")
FINAL_STATUSES = frozenset({"done", "cancelled", "failed", "diverged"})

MAX_JOBS = 1024            # bounds of the settings
MAX_QUEUE = 100_000
MAX_PER_USER = 100_000
MAX_THREADS = 1024
MAX_USER_CHARS = 256
MAX_NAME_CHARS = 200
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://\S+$")


class QueueFull(ValueError):
    """Admission refused: the queue or the user's share is full (the message says which and why)."""


class JobCancelled(RuntimeError):
    """The job was cancelled before it returned anything."""


class Diverged(RuntimeError):
    """Raised by a task whose run diverged (the job's status becomes ``"diverged"``)."""


# ----------------------------------------------------------------------------- settings


def cores() -> int:
    """CPU cores this process may use (the affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_int(variable: str, default: int, hi: int) -> int:
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    env_limit(variable, default)                      # a positive number, or a message naming the variable
    if not re.fullmatch(r"\s*\+?\d+\s*", raw):
        raise ValueError(f"{variable} must be a positive integer, got {raw!r}")
    return check_int(variable, int(raw), 1, hi)


def settings(max_jobs: int | None = None, queue_size: int | None = None, jobs_per_user: int | None = None,
             threads: int | None = None, *, default_threads: int | None = None) -> dict[str, int]:
    """The queue's settings: each argument, else its environment variable, else its default (see the module).

    ``default_threads``: the backend's default torch threads per job (Dask: 1) instead of
    ``floor(cores / max_jobs)``. Raises ``ValueError`` naming the argument or the variable.
    """
    n = cores()
    out = {}
    out["max_jobs"] = (check_int("max_jobs", max_jobs, 1, MAX_JOBS) if max_jobs is not None
                       else _env_int("WORKBENCH_MAX_JOBS", max(1, n - 1), MAX_JOBS))
    out["queue_size"] = (check_int("queue_size", queue_size, 1, MAX_QUEUE) if queue_size is not None
                         else _env_int("WORKBENCH_QUEUE_SIZE", 40, MAX_QUEUE))
    out["jobs_per_user"] = (check_int("jobs_per_user", jobs_per_user, 1, MAX_PER_USER) if jobs_per_user is not None
                            else _env_int("WORKBENCH_JOBS_PER_USER", 2, MAX_PER_USER))
    if default_threads is None:
        default_threads = max(1, n // out["max_jobs"])
    out["threads"] = (check_int("threads", threads, 1, MAX_THREADS) if threads is not None
                      else _env_int("WORKBENCH_THREADS", default_threads, MAX_THREADS))
    return out


STUDENT_STEPS_ENV = "WORKBENCH_STUDENT_MAX_STEPS"
STUDENT_SECONDS_ENV = "WORKBENCH_STUDENT_MAX_SECONDS"
STUDENT_STEPS = 20_000          # defaults of a student's job: a class's slots are free again within minutes
STUDENT_SECONDS = 20 * 60
MAX_BUDGET_STEPS = 10**9
MAX_BUDGET_SECONDS = 7 * 24 * 3600


def _minutes(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:.3g} min"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one job may use: at most ``max_steps`` training steps (over every training in the job) and
    ``max_seconds`` of running time (waiting does not count); None: no cap. A student's jobs on a class
    server get the queue's :attr:`JobQueue.student_budget`; teachers and the laptop have none."""

    max_steps: int | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1, MAX_BUDGET_STEPS)
        if self.max_seconds is not None:
            object.__setattr__(self, "max_seconds",
                               check_float("max_seconds", self.max_seconds, 1.0, float(MAX_BUDGET_SECONDS)))

    @property
    def capped(self) -> bool:
        return self.max_steps is not None or self.max_seconds is not None

    def describe(self) -> str:
        """``"20,000 steps, 20 min"``, or ``"no limit"``."""
        parts = ([f"{self.max_steps:,} steps"] if self.max_steps is not None else []) + \
            ([_minutes(self.max_seconds)] if self.max_seconds is not None else [])
        return ", ".join(parts) or "no limit"

    def over(self, kind: str) -> str:
        """The message of a job stopped by this budget (``kind``: ``"steps"`` or ``"seconds"``)."""
        if kind == "steps":
            what = f"the step budget: a student's job may take at most {self.max_steps:,} training steps"
        else:
            what = f"the time budget: a student's job may run at most {_minutes(self.max_seconds)}"
        return (f"stopped at {what} (the teacher sets it on the Teacher page); it ended there as a Stop does, "
                "keeping what it had")


def _env_budget(variable: str, default, cast, hi):
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = cast(raw.strip())
    except ValueError:
        raise ValueError(f"{variable} must be a positive number (or 'none' for no limit), got {raw!r}") from None
    if not 1 <= value <= hi:
        raise ValueError(f"{variable} must be in [1, {hi}] (or 'none' for no limit), got {raw!r}")
    return value


def student_budget() -> Budget:
    """A student's job budget from the environment: ``WORKBENCH_STUDENT_MAX_STEPS`` (default 20,000) and
    ``WORKBENCH_STUDENT_MAX_SECONDS`` (default 1200); ``none`` lifts a cap. ValueError names the variable."""
    return Budget(_env_budget(STUDENT_STEPS_ENV, STUDENT_STEPS, int, MAX_BUDGET_STEPS),
                  _env_budget(STUDENT_SECONDS_ENV, STUDENT_SECONDS, float, MAX_BUDGET_SECONDS))


def _check_address(name: str, address) -> str:
    if not isinstance(address, str) or not _ADDRESS.match(address) or len(address) > 1000:
        shown = address if not isinstance(address, str) else address[:60]
        raise ValueError(f"{name} must be a Dask scheduler address like 'tcp://host:8786', got {shown!r}")
    return address


# ----------------------------------------------------------------------------- the task's context


def _run_service(services: Mapping | None, service, args) -> Any:
    """``services[service](*args)``, with a message naming what is wrong (the thread context, the server side)."""
    if not isinstance(service, str) or not service:
        raise RuntimeError(f"service must be a non-empty string, got {service!r}")
    known = dict(services or {})
    if service not in known:
        raise RuntimeError(f"unknown service {service[:80]!r}: this job was submitted with "
                           f"{sorted(known) or 'no services'}")
    return known[service](*args)


_PLAIN_ATOMS = (str, bytes, bool, int, float, type(None))


def _check_plain(name: str, value, depth: int = 0) -> None:
    """Raise ``TypeError`` unless ``value`` is msgpack-able plain data (no pickle crosses the topic)."""
    if depth > 50:
        raise TypeError(f"{name} is nested too deeply")
    if isinstance(value, _PLAIN_ATOMS):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(name, v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{name}: dict keys must be str or int, got {type(k).__name__}")
            _check_plain(name, v, depth + 1)
        return
    raise TypeError(f"{name} must be plain data (bytes, str, numbers, lists, dicts), got {type(value).__name__}")


_BUDGET_KEY = "__budget__"   # a report whose payload is {_BUDGET_KEY: kind}: the job went over its budget


class _Steps:
    """A job's step budget, counted in the task's process (``take_steps``); ``send(kind)`` tells the queue once."""

    def __init__(self, max_steps: int | None, send: Callable):
        self.max_steps, self.done, self.over, self._send = max_steps, 0, False, send

    def take(self, n: int) -> bool:
        if self.max_steps is None:
            return True
        if self.over or self.done + n > self.max_steps:
            if not self.over:
                self.over = True
                self._send("steps")
            return False
        self.done += n
        return True


class _ThreadContext(Context):
    def __init__(self, stop: threading.Event, report: Callable, threads: int, report_interval: float,
                 services: Mapping | None = None, max_steps: int | None = None):
        super().__init__(threads, report_interval)
        self._stop, self._report, self._services = stop, report, services
        self._steps = _Steps(max_steps, lambda kind: self._report(None, "over budget", {_BUDGET_KEY: kind}))

    def call(self, service: str, *args) -> Any:
        return _run_service(self._services, service, args)   # same process: a direct call

    @property
    def stopped(self) -> bool:
        return self._stop.is_set() or self._steps.over

    def take_steps(self, n: int = 1) -> bool:
        return self._steps.take(n)

    def _send(self, progress, message, payload) -> None:
        self._report(progress, message, payload)


class TrainProgress(Callback):
    """Connects :func:`workbench.train` (and the growth and pair trainers) to the job: stops the training
    when the job is stopped (by Stop, or once its step budget is used up: ``train`` itself asks the job
    before each step), reports the steps done.

    Steps are counted over every training the callback is given to (the stages of a growth schedule,
    both models of a pair), out of ``total_steps`` (default: the first training's ``config.steps``).
    Each evaluation is sent as the payload ``{"step", "rows": [{split, metric, value}, ...]}``.
    ``ctx``: the context to use (default: :func:`current` at each call).
    """

    def __init__(self, ctx: Context | None = None, total_steps: int | None = None, label: str = "step"):
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        self.ctx, self.total, self.label = ctx, total_steps, label
        self.steps_done = 0

    def _context(self) -> Context:
        return self.ctx if self.ctx is not None else current()

    def _progress(self) -> tuple[float, str]:
        total = max(self.total or 1, 1)
        return min(1.0, self.steps_done / total), f"{self.label} {self.steps_done}/{total}"

    def on_start(self, state) -> None:
        if self.total is None:
            self.total = state.config.steps
        if self._context().stopped:
            state.stop = True

    def on_step(self, state) -> None:
        self.steps_done += 1
        ctx = self._context()
        if ctx.stopped:
            state.stop = True
            return
        ctx.report(*self._progress())

    def on_eval(self, state, rows) -> None:
        payload = {"step": int(state.step), "rows": [{"split": str(r["split"]), "metric": str(r["metric"]),
                                                      "value": float(r["value"])} for r in rows]}
        self._context().report(*self._progress(), payload, force=True)


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
        from ..io.store import pack_run

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
        from ..io.store import unpack_run

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
        from ..io.store import pack_run, unpack_run

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


# ----------------------------------------------------------------------------- jobs


class Job:
    """One submitted computation. Made by :meth:`JobQueue.submit`; read its fields, never set them.

    ``id``, ``user``, ``name``, ``status`` (:data:`STATUSES`), ``progress`` (None or [0, 1]),
    ``message``, ``payload`` (the last report's), ``error`` and ``traceback`` (failed jobs),
    ``submitted``/``started``/``finished`` (``time.time()``), ``stop_requested``, ``budget`` (a
    :class:`Budget` for a student's job, else None) and ``over_budget`` (the message naming the budget when
    the queue stopped it for going over, else "").
    """

    def __init__(self, queue: "JobQueue", seq: int, fn: Callable, args: tuple, kwargs: dict, user: str, name: str):
        self.queue, self.seq, self.id = queue, seq, str(seq)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.user, self.name = user, name
        self.status = "waiting"
        self.progress: float | None = None
        self.message = ""
        self.payload: Any = None
        self.value: Any = None
        self.has_value = False
        self.error: BaseException | None = None
        self.traceback = ""
        self.submitted, self.started, self.finished = time.time(), None, None
        self.stop_requested = False
        self.threads = 1
        self.stop_event = threading.Event()   # the thread executor's stop signal
        self._done = threading.Event()
        self._listeners: list[Callable] = []
        self.executor_state: Any = None       # the executor's own bookkeeping (a Dask future, ...)
        self.services: dict[str, Callable] = {}   # what the task may ask of the submitter (Context.call)
        self.local = False                    # run on this process's threads even when the queue is on Dask
        self.budget: Budget | None = None     # a student's job: its step and time caps (None: none)
        self.over_budget = ""                 # why the queue stopped it, naming the budget ("" otherwise)
        self._timer: threading.Timer | None = None

    # -- reading

    @property
    def done(self) -> bool:
        """Whether the job has finished (done, cancelled, failed or diverged)."""
        return self.status in FINAL_STATUSES

    def position(self) -> tuple[int, int] | None:
        """``(k, n)``: k-th of the n waiting jobs in the order they will start; None unless waiting."""
        return self.queue._position(self)

    def status_line(self) -> str:
        """One line for a status bar: ``queued: position k of n``, ``running: 40% step 80/200``, ``done`` ..."""
        pos = self.position()
        if pos is not None:
            return f"queued: position {pos[0]} of {pos[1]}"
        if self.status == "running":
            parts = [("stopping (over budget)" if self.over_budget else "stopping") if self.stop_requested
                     else "running"]
            detail = " ".join(p for p in (f"{100 * self.progress:.0f}%" if self.progress is not None else "",
                                          self.message) if p)
            return f"{parts[0]}: {detail}" if detail else parts[0]
        if self.status == "failed":
            return f"failed: {type(self.error).__name__}: {self.error}"[:MAX_MESSAGE_CHARS]
        return self.status

    def to_dict(self) -> dict:
        """Plain fields for a table (the teacher view): id, user, name, status, position, progress, message, times."""
        pos = self.position()
        return {"id": self.id, "user": self.user, "name": self.name, "status": self.status,
                "position": pos[0] if pos else None, "progress": self.progress, "message": self.message,
                "submitted": self.submitted, "started": self.started, "finished": self.finished,
                "budget": self.budget.describe() if self.budget is not None else "", "over_budget": self.over_budget}

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, user={self.user!r}, name={self.name!r}, status={self.status!r})"

    # -- acting

    def cancel(self) -> bool:
        """Waiting: removed from the queue (status ``cancelled``). Running: a cooperative stop is requested.

        Returns False when the job had already finished (or a stop was already requested).
        """
        return self.queue._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished or ``timeout`` seconds passed; returns whether it finished."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value (also of a stopped or diverged task that returned one).

        Re-raises the task's exception for a failed (or raising diverged) job; raises
        :class:`JobCancelled` for a job cancelled before it returned, ``TimeoutError`` if not finished.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"job {self.name!r} has not finished within {timeout} s")
        if self.has_value:
            return self.value
        if self.error is not None and self.status in ("failed", "diverged"):
            raise self.error
        raise JobCancelled(f"job {self.name!r} was cancelled before it returned")

    def add_listener(self, callback: Callable) -> Callable:
        """Call ``callback(job, event)`` on each change: ``"status"``, ``"position"`` or ``"progress"``.

        Added to a finished job, it is called once at once with ``"status"`` (so a listener that
        saves a finished run sees the end exactly once, however late it was added).
        """
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        with self.queue._lock:
            finished = self.done
            if not finished:
                self._listeners.append(callback)
        if finished:
            _call(callback, self, "status")
        return callback

    def remove_listener(self, callback: Callable) -> None:
        with self.queue._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)


def _call(callback, *args) -> None:
    try:
        callback(*args)
    except Exception as e:  # a listener must never break the queue
        warnings.warn(f"a job listener raised {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def _value_status(value) -> str | None:
    status = value.get("status") if isinstance(value, Mapping) else getattr(value, "status", None)
    return status if isinstance(status, str) else None


# ----------------------------------------------------------------------------- executors


class Executor:
    """The interface of a backend. The queue calls ``start`` only when a slot is free.

    ``start(job, report, done)`` runs ``job.fn(*job.args, **job.kwargs)`` with a :class:`Context`
    set for :func:`current` (``job.threads`` torch threads), calls ``report(progress, message,
    payload)`` for progress and exactly once ``done(value=..., has_value=True)`` or
    ``done(error=exc, tb="...")`` (or ``done(cancelled=True)`` when the backend dropped the task).
    ``stop(job)`` requests a cooperative stop (it may come before ``start`` has run); ``close()``
    releases resources.
    """

    default_threads: int | None = None     # torch threads per job unless set; None: floor(cores / max_jobs)

    def slots(self) -> int | None:
        """How many tasks the backend can run at once, if it knows (the default of ``max_jobs``)."""
        return None

    def start(self, job: Job, report: Callable, done: Callable) -> None:
        raise NotImplementedError

    def stop(self, job: Job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _set_torch_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class ThreadExecutor(Executor):
    """One daemon thread per running job in this process (the default backend)."""

    def __init__(self, report_interval: float = 0.25):
        self.report_interval = check_float("report_interval", report_interval, 0.0, 60.0)

    def start(self, job: Job, report: Callable, done: Callable) -> None:
        threading.Thread(target=self._run, args=(job, report, done), name=f"workbench-job-{job.id}",
                         daemon=True).start()

    def _run(self, job: Job, report: Callable, done: Callable) -> None:
        ctx = _ThreadContext(job.stop_event, report, job.threads, self.report_interval, job.services,
                             job.budget.max_steps if job.budget is not None else None)
        token = _CURRENT.set(ctx)
        try:
            _set_torch_threads(job.threads)
            value = job.fn(*job.args, **job.kwargs)
        except BaseException as e:  # noqa: BLE001 -- a job's failure is reported, never lost with its slot
            done(error=e, tb=traceback.format_exc())
        else:
            done(value=value, has_value=True)
        finally:
            _CURRENT.reset(token)

    def stop(self, job: Job) -> None:
        job.stop_event.set()


def _close_queues(*queues) -> None:
    """Close a call's two ``distributed.Queue``s; one already gone with the scheduler is no error."""
    for q in queues:
        try:
            q.close()
        except Exception:
            pass


class _DaskContext(Context):
    def __init__(self, key: str, topic: str, event_name: str, threads: int, report_interval: float,
                 call_timeout: float = 300.0, max_steps: int | None = None):
        super().__init__(threads, report_interval)
        self.key, self.topic, self.event_name = key, topic, event_name
        self.call_timeout = call_timeout
        self._stopped, self._checked, self._event = False, None, None
        self._steps = _Steps(max_steps, self._over_budget)

    def _over_budget(self, kind: str) -> None:
        self._stopped = True   # at once here; the server stops the job when the report arrives
        self._send(None, "over budget", {_BUDGET_KEY: kind})

    def take_steps(self, n: int = 1) -> bool:
        return self._steps.take(n)

    def call(self, service: str, *args) -> Any:
        """Ask the submitting server: the call goes through the job's topic, its arguments and the answer
        through two ``distributed.Queue``s (a topic's events stay in the scheduler's log, the last
        ``distributed.admin.low-level-log-length`` of them: no weights there)."""
        from distributed import Queue, get_worker

        service = check_str("service", service, MAX_NAME_CHARS)
        args = list(args)
        _check_plain(f"the arguments of {service!r}", args)
        reply = f"{self.key}-call-{uuid.uuid4().hex[:12]}"
        inbox, outbox = Queue(f"{reply}-args"), Queue(reply)
        try:
            inbox.put(args)
            get_worker().log_event(self.topic, {"job": self.key, "call": service, "reply": reply})
            try:
                answer = outbox.get(timeout=self.call_timeout)
            except TimeoutError:
                raise RuntimeError(f"the server did not answer {service!r} within {self.call_timeout:g} s "
                                   "(is it still running?)") from None
        finally:
            _close_queues(inbox, outbox)
        if isinstance(answer, dict) and "ok" in answer:
            return answer["ok"]
        message = answer.get("error") if isinstance(answer, dict) else None
        raise RuntimeError(f"{service}: {message or f'a malformed answer {type(answer).__name__}'}")

    @property
    def stopped(self) -> bool:
        if self._stopped:
            return True
        now = time.monotonic()
        if self._checked is None or now - self._checked >= self.report_interval:   # one scheduler round trip
            self._checked = now
            from distributed import Event

            if self._event is None:
                self._event = Event(self.event_name)
            self._stopped = bool(self._event.is_set())
        return self._stopped

    def _send(self, progress, message, payload) -> None:
        from distributed import get_worker

        msg = {"job": self.key, "progress": progress, "message": message, "payload": payload}
        try:
            get_worker().log_event(self.topic, msg)
        except TypeError:   # the payload is not msgpack-serialisable: send the rest
            get_worker().log_event(self.topic, {**msg, "payload": None,
                                                "message": f"{message} (payload not sendable)".strip()})


def _run_on_worker(fn, args, kwargs, key: str, topic: str, event_name: str, threads: int, report_interval: float,
                   call_timeout: float = 300.0, max_steps: int | None = None):
    """The Dask task: set torch threads and the job's context, then run ``fn``. Runs on a worker."""
    _set_torch_threads(threads)
    token = _CURRENT.set(_DaskContext(key, topic, event_name, threads, report_interval, call_timeout, max_steps))
    try:
        return fn(*args, **kwargs)
    finally:
        _CURRENT.reset(token)


class DaskExecutor(Executor):
    """Jobs as tasks on a Dask cluster: ``DaskExecutor("tcp://host:8786")`` or ``DaskExecutor(client)``.

    ``threads``: torch threads per task unless the queue sets them (``JobQueue(threads=...)`` or
    ``WORKBENCH_THREADS``); default 1, as a worker runs several tasks, one per worker thread.
    ``priority``: Dask priority of our tasks against other clients' (sweeps: -10).
    ``cancel_grace``: seconds after a stop request before ``future.cancel()`` frees the slot.
    ``call_timeout``: how long a task waits for the server to answer a :meth:`Context.call`.
    Calls are answered on a small pool of this process's threads (never on Dask's event loop); a
    task whose future was cancelled (Stop, then the grace) may still call for ``late_calls``
    seconds, so a stopped training that returns late still saves what it has.
    A client made here (from an address) is synchronous, runs its own event loop thread and is
    closed by :meth:`close`; a client passed in is left open and must be synchronous (the queue
    is called from plain threads: an ``asynchronous=True`` client is refused).
    """

    def __init__(self, client_or_address, *, threads: int = 1, priority: int = 0, cancel_grace: float = 10.0,
                 report_interval: float = 0.5, timeout: float = 30.0, call_timeout: float = 300.0,
                 late_calls: float = 600.0):
        from concurrent.futures import ThreadPoolExecutor

        from distributed import Client

        self.default_threads = check_int("threads", threads, 1, MAX_THREADS)
        self.priority = check_int("priority", priority, -1_000_000, 1_000_000)
        self.cancel_grace = check_float("cancel_grace", cancel_grace, 0.0, 3600.0)
        self.report_interval = check_float("report_interval", report_interval, 0.0, 60.0)
        check_float("timeout", timeout, 0.0, 3600.0, lo_open=True)
        self.call_timeout = check_float("call_timeout", call_timeout, 0.0, 86400.0, lo_open=True)
        self.late_calls = check_float("late_calls", late_calls, 0.0, 86400.0)
        if isinstance(client_or_address, Client):
            if client_or_address.asynchronous:
                raise ValueError("the Dask client must be synchronous (the job queue calls it from plain threads); "
                                 "pass the scheduler address instead and the executor makes its own")
            self.client, self._own = client_or_address, False
        else:
            address = _check_address("address", client_or_address)
            self.client, self._own = Client(address, timeout=timeout, set_as_default=False), True
        self.topic = f"workbench-progress-{uuid.uuid4().hex}"
        self._active: dict[str, tuple[Job, Callable, Callable]] = {}
        self._lock = threading.Lock()
        self._events = ThreadPoolExecutor(1, thread_name_prefix="workbench-dask-events")
        self._calls = ThreadPoolExecutor(4, thread_name_prefix="workbench-dask-calls")
        self._services: dict[str, tuple[dict, float | None]] = {}   # key -> (services, expiry of a cancelled one)
        self.client.subscribe_topic(self.topic, self._on_event)

    def slots(self) -> int | None:
        try:
            workers = self.client.scheduler_info().get("workers", {})
            return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values())) if workers else None
        except Exception:
            return None

    # runs on the client's event loop: hand the work to our own thread at once
    def _on_event(self, event) -> None:
        _, msg = event
        self._events.submit(self._deliver, msg)

    def _deliver(self, msg) -> None:
        if isinstance(msg, dict) and "call" in msg:
            self._calls.submit(self._answer, msg)
            return
        with self._lock:
            entry = self._active.get(msg.get("job")) if isinstance(msg, dict) else None
        if entry is not None:
            entry[1](msg.get("progress"), msg.get("message", ""), msg.get("payload"))

    def _answer(self, msg) -> None:
        """A task's :meth:`Context.call`: fetch its arguments, run the service here, put the answer.

        Every failure is an ``{"error": ...}`` answer (the worker never waits for nothing); a reply
        name that is not one of our jobs' is ignored (the worker times out with a message)."""
        from distributed import Queue

        key, reply = msg.get("job"), msg.get("reply")
        if not isinstance(reply, str) or not isinstance(key, str) or not reply.startswith(f"{key}-call-"):
            return
        now = time.monotonic()
        with self._lock:
            for k, (_, expiry) in list(self._services.items()):
                if expiry is not None and expiry < now:
                    del self._services[k]
            entry = self._services.get(key)
        inbox, outbox = Queue(f"{reply}-args", client=self.client), Queue(reply, client=self.client)
        try:
            try:
                args = inbox.get(timeout=30)
                if entry is None:
                    raise RuntimeError(f"job {key!r} is not running here any more (finished, or cancelled over "
                                       f"{self.late_calls:g} s ago)")
                value = _run_service(entry[0], msg.get("call"), args if isinstance(args, list) else [args])
                _check_plain(f"the answer of {msg.get('call')!r}", value)
                answer = {"ok": value}
            except Exception as e:  # noqa: BLE001 -- the worker hears of every failure
                answer = {"error": f"{type(e).__name__}: {e}"[:MAX_MESSAGE_CHARS]}
            outbox.put(answer)
        except Exception as e:   # the scheduler is gone: nothing to answer to
            warnings.warn(f"answering {msg.get('call')!r} of job {key!r} failed: {type(e).__name__}: {e}",
                          RuntimeWarning)
        finally:
            _close_queues(inbox, outbox)

    def _event_name(self, job: Job) -> str:
        if job.executor_state is None:
            job.executor_state = {"key": f"workbench-{re.sub(r'[^A-Za-z0-9_.-]', '_', job.name)[:60]}-"
                                         f"{job.id}-{uuid.uuid4().hex[:8]}", "future": None}
        return f"{job.executor_state['key']}-stop"

    def start(self, job: Job, report: Callable, done: Callable) -> None:
        event_name = self._event_name(job)
        key = job.executor_state["key"]
        with self._lock:
            self._active[key] = (job, report, done)
            self._services[key] = (dict(job.services), None)
        future = self.client.submit(_run_on_worker, job.fn, job.args, job.kwargs, key, self.topic, event_name,
                                    job.threads, self.report_interval, self.call_timeout,
                                    job.budget.max_steps if job.budget is not None else None, key=key, pure=False,
                                    priority=self.priority)
        job.executor_state["future"] = future
        future.add_done_callback(lambda f, key=key: self._on_done(key, f))

    def _on_done(self, key: str, future) -> None:
        with self._lock:
            entry = self._active.pop(key, None)
            if future.status == "cancelled" and key in self._services:   # the task may still be running
                self._services[key] = (self._services[key][0], time.monotonic() + self.late_calls)
            else:
                self._services.pop(key, None)
        if entry is None:
            return
        job, _, done = entry
        try:
            if future.status == "finished":
                done(value=future.result(), has_value=True)
            elif future.status == "cancelled":
                done(cancelled=True)
            else:
                exc = future.exception()
                tb = future.traceback()
                done(error=exc, tb="".join(traceback.format_tb(tb)) if tb is not None else "")
        except BaseException as e:  # noqa: BLE001 -- e.g. the result could not be deserialised
            done(error=e, tb=traceback.format_exc())

    def stop(self, job: Job) -> None:
        from distributed import Event

        Event(self._event_name(job), client=self.client).set()
        key = job.executor_state["key"]
        timer = threading.Timer(self.cancel_grace, self._force_cancel, args=(key,))
        timer.daemon = True
        timer.start()

    def _force_cancel(self, key: str) -> None:
        with self._lock:
            entry = self._active.get(key)
        if entry is not None:
            future = entry[0].executor_state.get("future")
            if future is not None:
                future.cancel()

    def close(self) -> None:
        with self._lock:
            entries = list(self._active.values())
        for job, _, _ in entries:
            future = (job.executor_state or {}).get("future")
            if future is not None:
                future.cancel()
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:
            pass
        self._events.shutdown(wait=False)
        self._calls.shutdown(wait=False)
        if self._own:
            self.client.close()


# ----------------------------------------------------------------------------- the queue


class JobQueue:
    """The bounded queue (see the module docstring). Arguments override the environment's settings.

    ``executor``: None (``WORKBENCH_DASK`` if set, else threads), ``"threads"``, a scheduler address
    ``"tcp://host:port"``, a ``distributed.Client``, or an :class:`Executor`. With Dask and no
    ``max_jobs`` (argument or variable), the slots are the cluster's worker threads.
    """

    def __init__(self, max_jobs: int | None = None, queue_size: int | None = None, jobs_per_user: int | None = None,
                 threads: int | None = None, executor=None, *, report_interval: float = 0.25):
        check_float("report_interval", report_interval, 0.0, 60.0)
        # validate every argument before anything is connected
        settings(max_jobs, queue_size, jobs_per_user, threads)
        self.executor = self._make_executor(executor, report_interval)
        self._report_interval = report_interval
        self._local_executor: ThreadExecutor | None = None   # made for the first ``local`` job on Dask
        if max_jobs is None and not os.environ.get("WORKBENCH_MAX_JOBS", "").strip():
            max_jobs = self.executor.slots()
        s = settings(max_jobs, queue_size, jobs_per_user, threads, default_threads=self.executor.default_threads)
        self.max_jobs, self.queue_size = s["max_jobs"], s["queue_size"]
        self.jobs_per_user, self.threads = s["jobs_per_user"], s["threads"]
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)
        self._waiting: dict[str, deque[Job]] = {}     # the ring: insertion order = round-robin order
        self._running: dict[str, Job] = {}
        self._seq = 0
        self._closed = False
        self._listeners: list[Callable] = []
        self._student_budget = student_budget()   # WORKBENCH_STUDENT_MAX_STEPS / _SECONDS; the teacher may change it
        self._students: set[str] = set()         # users whose jobs get it (signed-in students: workbench.ui)

    @staticmethod
    def _make_executor(executor, report_interval: float) -> Executor:
        if isinstance(executor, Executor):
            return executor
        if executor is None:
            address = os.environ.get("WORKBENCH_DASK", "").strip()
            if address:
                return DaskExecutor(_check_address("WORKBENCH_DASK", address))
            return ThreadExecutor(report_interval)
        if executor == "threads":
            return ThreadExecutor(report_interval)
        if isinstance(executor, str):
            return DaskExecutor(_check_address("executor", executor))
        try:
            from distributed import Client
        except ImportError:
            Client = ()
        if Client and isinstance(executor, Client):
            return DaskExecutor(executor)
        raise ValueError(f"executor must be None, 'threads', a Dask scheduler address, a distributed.Client or "
                         f"a workbench.jobs.Executor, got {type(executor).__name__}")

    # -- reading

    def _order(self) -> list[Job]:
        """Waiting jobs in the order they will start: round r takes the r-th job of each user in ring order."""
        queues = list(self._waiting.values())
        out, r = [], 0
        while True:
            row = [q[r] for q in queues if len(q) > r]
            if not row:
                return out
            out += row
            r += 1

    def _position(self, job: Job) -> tuple[int, int] | None:
        with self._lock:
            if job.status != "waiting":
                return None
            order = self._order()
            return order.index(job) + 1, len(order)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (new jobs are refused)."""
        return self._closed

    @property
    def n_waiting(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._waiting.values())

    @property
    def n_running(self) -> int:
        with self._lock:
            return len(self._running)

    def jobs(self, user: str | None = None) -> list[Job]:
        """Unfinished jobs: running ones (oldest first), then waiting ones in the order they will start."""
        with self._lock:
            out = sorted(self._running.values(), key=lambda j: j.seq) + self._order()
        return [j for j in out if user is None or j.user == user]

    def find(self, job_id: str) -> Job | None:
        """The unfinished job with this id, or None."""
        return next((j for j in self.jobs() if j.id == job_id), None)

    def snapshot(self) -> list[dict]:
        """``Job.to_dict()`` of every unfinished job (the teacher view's table)."""
        return [j.to_dict() for j in self.jobs()]

    def active(self, user: str) -> int:
        """How many of ``user``'s jobs wait or run."""
        with self._lock:
            return len(self._waiting.get(user, ())) + sum(j.user == user for j in self._running.values())

    # -- budgets

    @property
    def student_budget(self) -> Budget:
        """What each job of a student may use (:class:`Budget`): from the environment, then the teacher's."""
        return self._student_budget

    def set_student_budget(self, max_steps: int | None = None, max_seconds: float | None = None) -> Budget:
        """The teacher's budget for students' jobs submitted from now on (None: no cap); ValueError names the
        argument. Running and waiting jobs keep the budget they were submitted with."""
        budget = Budget(max_steps, max_seconds)
        with self._lock:
            self._student_budget = budget
        return budget

    def add_student(self, user: str) -> None:
        """Give ``user``'s jobs the student budget from now on (the UI calls it for a signed-in student)."""
        user = check_str("user", user, MAX_USER_CHARS)
        with self._lock:
            self._students.add(user)

    def budget_for(self, user: str) -> Budget | None:
        """The budget a job of ``user`` would get now: the student budget for a student, else None."""
        with self._lock:
            budget = self._student_budget if user in self._students else None
        return budget if budget is not None and budget.capped else None

    def add_listener(self, callback: Callable) -> Callable:
        """Call ``callback(queue, job, event)`` on every change of any job (the teacher view)."""
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        with self._lock:
            self._listeners.append(callback)
        return callback

    def remove_listener(self, callback: Callable) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # -- admission

    def _refusal(self, user: str) -> str | None:
        if self._closed:
            return "the job queue is closed (the server is shutting down)"
        mine = self.active(user)
        if mine >= self.jobs_per_user:
            return (f"you already have {mine} job{'s' if mine != 1 else ''} waiting or running, the most allowed "
                    f"per user (WORKBENCH_JOBS_PER_USER = {self.jobs_per_user}); wait for one to finish or stop one")
        waiting = self.n_waiting
        if len(self._running) >= self.max_jobs and waiting >= self.queue_size:
            return (f"the queue is full: {waiting} jobs are waiting, the most allowed (WORKBENCH_QUEUE_SIZE = "
                    f"{self.queue_size}), and all {self.max_jobs} slots are busy; try again in a little while")
        return None

    def submit(self, fn: Callable, *args, user: str = "local", name: str | None = None,
               on_progress: Callable | None = None, services: Mapping[str, Callable] | None = None,
               local: bool = False, **kwargs) -> Job:
        """Queue ``fn(*args, **kwargs)`` for ``user``; it starts as soon as a slot is free and its turn comes.

        Raises :class:`QueueFull` at once (with the reason) when the user's share or the queue is
        full. ``on_progress(job)`` is called on each progress report. ``services``: ``{name: function}``
        the task may run here, in this process, through :meth:`Context.call` (on Dask: a worker asks
        the server, e.g. to save a run in the server's store). ``local=True``: run on this process's
        threads even when the queue's executor is Dask (a job that cannot be shipped); it takes one
        of the same ``max_jobs`` slots. (``user``, ``name``, ``on_progress``, ``services`` and ``local``
        are the queue's own keywords: pass a ``functools.partial`` if ``fn`` takes them.)
        """
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {fn!r}")
        user = check_str("user", user, MAX_USER_CHARS)
        if not user.strip():
            raise ValueError("user must be a non-empty string")
        if name is None:
            name = getattr(fn, "__name__", type(fn).__name__)
        name = check_str("name", name, MAX_NAME_CHARS)
        if on_progress is not None and not callable(on_progress):
            raise ValueError(f"on_progress must be callable or None, got {on_progress!r}")
        if services is None:
            services = {}
        if not isinstance(services, Mapping) or not all(
                isinstance(k, str) and k and callable(v) for k, v in services.items()):
            raise ValueError(f"services must be a dict of non-empty names to functions, got {services!r}"[:300])
        if not isinstance(local, bool):
            raise ValueError(f"local must be True or False, got {local!r}")
        with self._lock:
            why = self._refusal(user)
            if why:
                raise QueueFull(why)
            self._seq += 1
            job = Job(self, self._seq, fn, args, kwargs, user, name)
            job.threads = self.threads
            job.services, job.local = dict(services), local
            job.budget = self.budget_for(user)
            if on_progress is not None:
                job._listeners.append(lambda j, event: on_progress(j) if event == "progress" else None)
            self._waiting.setdefault(user, deque()).append(job)
            events = [self._ev(job, "status")] + self._dispatch()
            if job.status == "waiting":
                events += [self._ev(j, "position") for j in self._order() if j is not job]
        self._fire(events)
        return job

    def wait_for_room(self, user: str = "local", timeout: float | None = None) -> bool:
        """Block until ``user`` could submit a job (or ``timeout`` seconds passed); returns whether they can."""
        with self._room:
            return self._room.wait_for(lambda: self._refusal(user) is None or self._closed, timeout) \
                and not self._closed

    # -- scheduling

    def _dispatch(self) -> list:
        """Start waiting jobs while slots are free (under the lock); returns the events to fire."""
        started = []
        while len(self._running) < self.max_jobs and self._waiting:
            user = next(iter(self._waiting))
            q = self._waiting.pop(user)
            job = q.popleft()
            if q:
                self._waiting[user] = q          # back of the ring
            job.status, job.started = "running", time.time()
            self._running[job.id] = job
            started.append(job)
        events = [self._ev(j, "status") for j in started]
        if started:
            events += [self._ev(j, "position") for j in self._order()]
            # start outside the lock would race with cancel; the executors only spawn/submit here
            for job in started:
                self._start(job)
        return events

    def _start(self, job: Job) -> None:
        def report(progress, message, payload, job=job):
            self._report(job, progress, message, payload)

        def done(value=None, has_value=False, error=None, tb="", cancelled=False, job=job):
            self._complete(job, value, has_value, error, tb, cancelled)

        if job.budget is not None and job.budget.max_seconds is not None:
            job._timer = threading.Timer(job.budget.max_seconds, self._over_budget, args=(job, "seconds"))
            job._timer.daemon = True
            job._timer.start()
        try:
            self._executor_of(job).start(job, report, done)
        except Exception as e:  # the backend refused (cluster gone, ...): the job fails, its slot is freed
            tb = traceback.format_exc()
            threading.Thread(target=done, kwargs={"error": e, "tb": tb}, daemon=True).start()

    def _over_budget(self, job: Job, kind: str) -> None:
        """``job`` used up its budget (``kind``: ``"steps"``, counted by the task; ``"seconds"``, the timer):
        record the message naming the budget, then stop it as Stop does (the task ends with what it has)."""
        with self._lock:
            if job.budget is None or job.over_budget or job.status == "waiting":
                return
            job.over_budget = job.budget.over(kind)   # also when a worker's report comes after its result
            running = job.status == "running"
        if running:
            self._cancel(job)

    def _report(self, job: Job, progress, message, payload) -> None:
        if isinstance(payload, dict) and set(payload) == {_BUDGET_KEY} and payload[_BUDGET_KEY] in ("steps",
                                                                                                  "seconds"):
            self._over_budget(job, payload[_BUDGET_KEY])
            return
        with self._lock:
            if job.status != "running":
                return
            if progress is not None:
                job.progress = float(progress)
            job.message = str(message)[:MAX_MESSAGE_CHARS]
            job.payload = payload
            events = [self._ev(job, "progress")]
        self._fire(events)

    def _complete(self, job: Job, value, has_value: bool, error, tb: str, cancelled: bool) -> None:
        if job._timer is not None:
            job._timer.cancel()
        with self._lock:
            if job.done:
                return
            self._running.pop(job.id, None)
            job.value, job.has_value = value, has_value
            job.error, job.traceback = error, tb
            if cancelled or job.stop_requested:
                job.status = "cancelled"
            elif isinstance(error, Diverged) or (has_value and _value_status(value) == "diverged"):
                job.status = "diverged"
            elif error is not None:
                job.status = "failed"
            else:
                job.status = "done"
            job.finished = time.time()
            events = [self._ev(job, "status")] + self._dispatch()
            job._done.set()
            self._room.notify_all()
        self._fire(events)

    # -- cancelling

    def _cancel(self, job: Job) -> bool:
        with self._lock:
            if job.status == "waiting":
                q = self._waiting[job.user]
                q.remove(job)
                if not q:
                    del self._waiting[job.user]
                job.status, job.finished = "cancelled", time.time()
                job._done.set()
                self._room.notify_all()
                events = [self._ev(job, "status")] + [self._ev(j, "position") for j in self._order()]
                stop = False
            elif job.status == "running" and not job.stop_requested:
                job.stop_requested = True
                events, stop = [self._ev(job, "status")], True
            else:
                return False
        if stop:
            try:
                self._executor_of(job).stop(job)
            except Exception as e:
                warnings.warn(f"stopping job {job.name!r} failed: {type(e).__name__}: {e}", RuntimeWarning)
        self._fire(events)
        return True

    def cancel_user(self, user: str, running: bool = False) -> int:
        """Cancel ``user``'s waiting jobs (a closed tab; its running jobs finish and are saved), and with
        ``running=True`` stop their running ones too. Returns how many jobs were cancelled or stopped."""
        user = check_str("user", user, MAX_USER_CHARS)
        with self._lock:
            targets = list(self._waiting.get(user, ()))
            if running:
                targets += [j for j in self._running.values() if j.user == user]
        return sum(j.cancel() for j in targets)

    def close(self, wait: float | None = 0) -> None:
        """Refuse new jobs, cancel the waiting ones, stop the running ones (waiting up to ``wait`` s for them),
        close the backend."""
        with self._lock:
            self._closed = True
            waiting = self._order()
            running = list(self._running.values())
            self._room.notify_all()
        for j in waiting + running:
            j.cancel()
        if wait:
            deadline = time.monotonic() + wait
            for j in running:
                j.wait(max(0.0, deadline - time.monotonic()))
        self.executor.close()

    def _executor_of(self, job: Job) -> Executor:
        """The job's backend: the queue's executor, or this process's threads for a ``local`` job."""
        if not job.local or isinstance(self.executor, ThreadExecutor):
            return self.executor
        with self._lock:
            if self._local_executor is None:
                self._local_executor = ThreadExecutor(self._report_interval)
            return self._local_executor

    def __enter__(self) -> "JobQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- notifications

    def _ev(self, job: Job, event: str) -> tuple:
        """An event to fire once the lock is released, with the listeners registered now (under the lock)."""
        return job, event, tuple(job._listeners), tuple(self._listeners)

    def _fire(self, events: list) -> None:
        for job, event, job_listeners, queue_listeners in events:
            for cb in job_listeners:
                _call(cb, job, event)
            for cb in queue_listeners:
                _call(cb, self, job, event)

    def __repr__(self) -> str:
        return (f"JobQueue(max_jobs={self.max_jobs}, queue_size={self.queue_size}, jobs_per_user="
                f"{self.jobs_per_user}, threads={self.threads}, running={self.n_running}, waiting={self.n_waiting}, "
                f"executor={type(self.executor).__name__})")
