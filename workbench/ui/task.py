"""A page's background job: :class:`BackgroundTask` submits ``fn(ctx, *args)`` to the server's job queue and
applies its updates on the session's thread; ``ctx`` is a :class:`TaskContext`.

On Dask the job is shipped by the runtime's transport (``workbench.runtime.jobs.remote``); this module only
asks it for a plan and reads the job's reports back.
"""
from __future__ import annotations

import queue as queue_module
import threading
import traceback
from typing import Any, Callable

import panel as pn
import param

from ..core import monitor
from ..runtime import jobs
from ..runtime.jobs import remote
from .session import UserStore, job_queue, session_user
from .text import describe_error, escape_md

__all__ = ["BackgroundTask", "TaskContext", "BUSY", "job_monitor"]


BUSY = "still running: wait for it to finish (or press Stop) before starting another"


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


def job_monitor(ctx, key: str | None = None, report_interval: float = 0.25) -> monitor.Monitor:
    """A page job's ``ctx`` (a :class:`TaskContext`, or its Dask worker twin) as the monitor the engine and
    the experiments take (:mod:`workbench.monitor`): stopped when the page's Stop is pressed (or the job
    is stopped), each report passed on as ``ctx.report(payload, progress, message)`` -- with ``key`` the
    payload arrives wrapped as ``{key: payload}``. Reports closer than ``report_interval`` seconds are
    dropped unless forced (a payload worth keeping is sent forced)."""
    def send(progress, message, payload):
        if key is not None and payload is not None:
            payload = {key: payload}
        ctx.report(payload, progress, message or None)

    return monitor.Monitor(send, stopped=lambda: ctx.stopped, report_interval=report_interval)


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
    page job runs on a worker as ``remote.run_page_job(fn, args, kwargs)`` (``fn`` is imported there by
    name): every ``RunStore``/``UserStore`` argument becomes a :class:`workbench.jobs.RemoteStore`
    whose saves and loads are services run here, on the session's own store object (so owners and
    viewers stay the server's: a student's job saves as that student and opens only what they may),
    also after the tab was closed; Run arguments travel as their run-folder files
    (:func:`workbench.store.pack_run`). On the worker ``ctx`` has the same API (``stopped``,
    ``stop_event``, ``session_gone`` -- always False there --, ``report``); payloads cross Dask's topic
    as plain data (DataFrames, arrays and tuples tagged, never pickle) and reach ``on_update`` here.
    A Run in the job's result comes back by id when the job saved it through its store (``on_done``
    gets the run opened from the server's store: exactly what was saved), else as its files. A job
    that cannot be shipped (:func:`workbench.runtime.jobs.remote.plan` says why: a bound method, a model
    object, two different stores) runs on the server's threads (``local=True``), with the reason in
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
                    item = ("done", remote.open_result(job.value, box.get("store")), None, None)
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
        if remote.is_page_report(payload) and job.status == "running":
            if box.get("seen") is payload:
                return False   # a status event after it: the status line, not the update again
            box["seen"] = payload
            if not self.orphaned:
                self._queue.put(("update", *remote.page_update(payload)))
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
                plan = remote.plan(fn, args, kwargs, stores=(UserStore,))
                if isinstance(plan, remote.Plan):
                    box.update(remote=True, store=plan.store)
                    self.where = "dask"
                    job = queue_.submit(remote.run_page_job, fn, plan.args, plan.kwargs, user=self.owner(),
                                        name=self.job_name, services=plan.services)
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
                    self.error, self.status = describe_error(payload), "error"
                if self.job is not None and self.job.over_budget:   # stopped by the teacher's budget: say which
                    self.notice = self.job.over_budget

    def status_text(self) -> str:
        """What the status line says (plain text): the error, else the notice and the message or status."""
        if self.error:
            return f"Error: {self.error}"
        state = self.message or self.status
        return f"{self.notice} ({state})" if self.notice else state

    def controls(self) -> pn.Column:
        """Progress bar and stop button, the status text under them (escaped), bound to this task.

        The text has a line of its own, as wide as the column: beside the bar and the button in a
        340-pixel side column it had about 20 pixels left and showed "id" of "idle" or "st" of "stopped".
        """
        bar = pn.indicators.Progress(value=0, max=100, width=220, bar_color="primary")
        stop = pn.widgets.Button(name="Stop", button_type="warning", width=80, disabled=True)
        stop.on_click(lambda _: self.stop())
        text = pn.pane.Markdown("", margin=(0, 10), sizing_mode="stretch_width", css_classes=["wb-task-status"])

        def sync(*_):
            bar.value = int(round(self.progress * 100)) if self.status != "running" or self.progress else -1
            bar.active = self.status == "running"
            stop.disabled = self.status != "running"
            state = escape_md(self.message or self.status)
            text.object = (f"**Error:** {escape_md(self.error)}" if self.error else
                           f"**{escape_md(self.notice)}** ({state})" if self.notice else state)

        self.param.watch(sync, ["status", "progress", "message", "error", "notice"])
        sync()
        return pn.Column(pn.Row(bar, stop, margin=0), text, sizing_mode="stretch_width", margin=0)
