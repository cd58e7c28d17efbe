"""One submitted computation (:class:`Job`), its statuses and the exceptions of its outcome.

The final status is ``"done"``; ``"cancelled"`` when a stop was requested; ``"diverged"`` when the task
raised :class:`Diverged` or returned something whose ``status`` (attribute or key) is ``"diverged"``
(a Run stopped on NaN); ``"failed"`` when it raised (the exception and its traceback are kept).
Listeners are called outside the queue's lock, from whatever thread made the change (a job's thread,
Dask's callback thread, the caller of submit/cancel): keep them short and hand UI work to the UI's own
loop. A listener that raises is reported as a warning and does not break the queue.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Mapping

from ...core.monitor import MAX_MESSAGE_CHARS, Stopped
from .limits import Budget

STATUSES = ("waiting", "running", "done", "cancelled", "failed", "diverged")
FINAL_STATUSES = frozenset({"done", "cancelled", "failed", "diverged"})


class JobCancelled(Stopped):
    """The job was cancelled before it returned anything (a :class:`workbench.monitor.Stopped`)."""


class Diverged(RuntimeError):
    """Raised by a task whose run diverged (the job's status becomes ``"diverged"``)."""


# ----------------------------------------------------------------------------- jobs


class Job:
    """One submitted computation. Made by :meth:`JobQueue.submit`; read its fields, never set them.

    ``id``, ``user``, ``name``, ``status`` (:data:`STATUSES`), ``progress`` (None or [0, 1]),
    ``message``, ``payload`` (the last report's), ``error`` and ``traceback`` (failed jobs),
    ``submitted``/``started``/``finished`` (``time.time()``), ``stop_requested``, ``budget`` (a
    :class:`Budget` for a student's job, else None) and ``over_budget`` (the message naming the budget when
    the queue stopped it for going over, else "").
    """

    def __init__(self, queue, seq: int, fn: Callable, args: tuple, kwargs: dict, user: str, name: str):
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
