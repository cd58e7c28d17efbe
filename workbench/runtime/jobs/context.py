"""The task's side of a job: its context and the services it may call (TrainProgress comes from core).

A task is any function ``fn(*args, **kwargs)``; it finds its :class:`Context` with :func:`current`
(outside a job: a context that is never stopped and reports nowhere): ``ctx.stopped`` says that Stop
was pressed (the task ends early and returns what it has, e.g. a cancelled Run),
``ctx.report(progress, message, payload)`` sends progress (throttled to one report per
``report_interval`` seconds unless ``force=True``; ``progress`` in [0, 1], ``payload`` small plain data:
numbers, strings, lists, dicts). :class:`TrainProgress` connects :func:`workbench.train` to it.

A student's step budget is counted here, in the task's process: :func:`workbench.train` asks
``current().take_steps(1)`` before each step and stops where the budget ends; the context then reads as
stopped (so :class:`TrainProgress` stops what follows) and tells the queue
once (a report whose payload is ``{_BUDGET_KEY: "steps"}``). :class:`TrainProgress`, the adapter of a
monitor to training callbacks, lives in ``workbench.core.progress`` (experiments below the runtime use it).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from ...core.monitor import Context, current  # noqa: F401 (current: jobs.current)
from ...core.progress import TrainProgress  # noqa: F401 (jobs.TrainProgress: the adapter lives in core)


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
