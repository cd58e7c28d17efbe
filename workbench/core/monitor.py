"""The one progress-and-stop protocol of every long-running engine function.

A long computation (a training, a sweep of models, a lens fit, a search) takes ``monitor=None``: an
object with ``stopped`` (True once the user pressed Stop: return early with what you have) and
``report(progress, message, payload)`` (``progress`` in [0, 1] or None), and ``take_steps(n)`` (False once a
budgeted job's training steps are used up; :func:`workbench.train` asks before each step). ``None`` means
:func:`current`: the context of the job running this thread (:mod:`workbench.jobs` sets it), or a
silent, never-stopped one outside a job. So a notebook call, a page job and a Dask worker run the same
code. :class:`workbench.jobs.TrainProgress` (``workbench.core.progress``) adapts a monitor to
:func:`workbench.train`'s callbacks.

``stop`` means one thing everywhere: the monitor's ``stopped``. A function that can return a useful
partial result returns it; one that cannot (a curve half-evaluated) raises :class:`Stopped`
(:func:`check`). :class:`Monitor` is a monitor of one's own (a notebook, a test, a dashboard page's
job): ``stop()`` it from another thread, read its reports with ``on_report``. :func:`part` gives a
stage of a longer computation its share of the progress bar.
"""
from __future__ import annotations

import contextvars
import threading
import time
from typing import Any, Callable

from .checks import check_float

__all__ = ["Context", "current", "resolve", "Stopped", "check", "Monitor", "part", "MAX_MESSAGE_CHARS"]

MAX_MESSAGE_CHARS = 1000


class Context:
    """What a running task sees (:func:`current`): whether it should stop, and a way to report progress.

    This base class is the context outside any job: never stopped, reports go nowhere.
    """

    def __init__(self, threads: int = 1, report_interval: float = 0.25):
        self.threads = threads
        self.report_interval = report_interval
        self._last_report: float | None = None

    @property
    def stopped(self) -> bool:
        """True once Stop was pressed for this job: end early (e.g. set ``state.stop`` in a training callback)."""
        return False

    def report(self, progress: float | None = None, message: str = "", payload: Any = None, *,
               force: bool = False) -> bool:
        """Send progress (``progress`` in [0, 1] or None, a short ``message``, small plain-data ``payload``).

        Throttled: a report within ``report_interval`` seconds of the last one sent is dropped, unless
        ``force`` or ``progress >= 1``. Returns whether it was sent.
        """
        if progress is not None:
            progress = check_float("progress", progress, 0.0, 1.0)
        if not isinstance(message, str):
            raise ValueError(f"message must be a string, got {type(message).__name__}")
        message = message[:MAX_MESSAGE_CHARS]
        now = time.monotonic()
        if not force and (progress is None or progress < 1) and self._last_report is not None \
                and now - self._last_report < self.report_interval:
            return False
        self._last_report = now
        self._send(progress, message, payload)
        return True

    def _send(self, progress, message, payload) -> None:
        pass

    def take_steps(self, n: int = 1) -> bool:
        """Whether the job may take ``n`` more training steps: False once they would exceed its step budget
        (a student's job on a class server, :class:`workbench.jobs.Budget`; the job is then being stopped).
        :func:`workbench.train` asks before every step. Outside a budgeted job: always True."""
        return True

    def call(self, service: str, *args) -> Any:
        """Run the named *service* in the process that submitted the job and return its answer.

        The submitter names its services (``JobQueue.submit(..., services={"store.save": fn})``);
        a task on a Dask worker reaches the server's run store this way (:class:`RemoteStore`).
        Arguments and answers must be plain data (bytes, str, numbers, bools, None, lists, dicts).
        On Dask a failing or unknown service raises ``RuntimeError`` with the server's message (the
        worker never waits forever: ``call_timeout``); on threads the call is direct and the service's
        own exception propagates. Outside a job there is nobody to ask: ``RuntimeError``.
        """
        raise RuntimeError(f"Context.call({service!r}) works only inside a job of a workbench.jobs.JobQueue "
                           "(this code runs outside one, so there is no server to ask)")


_NULL_CONTEXT = Context()
_CURRENT: contextvars.ContextVar[Context] = contextvars.ContextVar("workbench_job_context", default=_NULL_CONTEXT)


def current() -> Context:
    """The context of the job running in this thread (a never-stopped, silent one outside a job).

    Threads started by a task do not inherit it: pass the context on to them.
    """
    return _CURRENT.get()


def resolve(monitor: "Context | None") -> Context:
    """``monitor`` itself, or :func:`current` when it is None (the argument every long function takes)."""
    if monitor is None:
        return current()
    if not hasattr(monitor, "stopped") or not callable(getattr(monitor, "report", None)):
        raise ValueError(f"monitor must be None or an object with .stopped and .report(progress, message, payload) "
                         f"(a workbench.monitor.Context), got {type(monitor).__name__}")
    return monitor


class Stopped(RuntimeError):
    """A long computation ended early because its monitor was stopped, with nothing whole to return
    (``lmc.Cancelled`` and ``jobs.JobCancelled`` are this exception, or a kind of it)."""


def check(monitor: Context) -> None:
    """Raise :class:`Stopped` when ``monitor`` is stopped (between two steps of a computation that has no
    partial result)."""
    if monitor.stopped:
        raise Stopped("stopped")


class Monitor(Context):
    """A monitor of one's own: ``stop()`` it (from any thread) and the computation ends at its next check;
    every report sent goes to ``on_report(progress, message, payload)``.

    ``stopped``: a function read as well (``lambda: event.is_set()``, a page's Stop button).
    ``report_interval``: seconds between two reports passed on (0: every one; a report with a payload
    worth keeping is sent with ``force=True`` and always passes).

    >>> m = wb.monitor.Monitor(lambda p, msg, payload: print(p, msg))
    >>> wb.lmc.compare(a, b, ds, monitor=m)
    """

    def __init__(self, on_report: Callable | None = None, *, stopped: Callable[[], bool] | None = None,
                 report_interval: float = 0.0):
        super().__init__(report_interval=report_interval)
        for name, fn in (("on_report", on_report), ("stopped", stopped)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a function or None, got {type(fn).__name__}")
        self._on_report, self._stopped_fn = on_report, stopped
        self._event = threading.Event()

    def stop(self) -> None:
        """Ask the computation to stop (it ends at its next check)."""
        self._event.set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set() or bool(self._stopped_fn is not None and self._stopped_fn())

    def _send(self, progress, message, payload) -> None:
        if self._on_report is not None:
            self._on_report(progress, message, payload)


class _Part(Context):
    """``monitor`` seen by one stage of a longer computation: its progress in [0, 1] is mapped onto
    ``[start, start + span]``; stop, step budget and services are the whole computation's."""

    def __init__(self, monitor: Context, start: float, span: float):
        super().__init__(getattr(monitor, "threads", 1), getattr(monitor, "report_interval", 0.0))
        self.monitor, self.start, self.span = monitor, start, span

    @property
    def stopped(self) -> bool:
        return self.monitor.stopped

    def report(self, progress: float | None = None, message: str = "", payload: Any = None, *,
               force: bool = False) -> bool:
        if progress is not None:
            progress = min(1.0, self.start + self.span * check_float("progress", progress, 0.0, 1.0))
        return self.monitor.report(progress, message, payload, force=force)

    def take_steps(self, n: int = 1) -> bool:
        return self.monitor.take_steps(n)

    def call(self, service: str, *args) -> Any:
        return self.monitor.call(service, *args)


def part(monitor: "Context | None", start: float, span: float) -> Context:
    """The monitor of a stage that takes the share ``[start, start + span]`` of the whole progress
    (``monitor`` None: :func:`current`). A stage reporting 0.5 with ``part(m, 0.6, 0.2)`` shows 0.7."""
    start = check_float("start", start, 0.0, 1.0)
    span = check_float("span", span, 0.0, 1.0)
    if start + span > 1.0 + 1e-9:
        raise ValueError(f"start + span must be at most 1 (the whole progress), got {start:g} + {span:g}")
    return _Part(resolve(monitor), start, span)
