"""The backends that run a job: this process's threads, or a Dask cluster.

One interface, :class:`Executor`: ``start(job, report, done)``, ``stop(job)``, ``close()``.

- :class:`ThreadExecutor` (default): one thread per running job in this process; torch gets
  ``threads`` intra-op threads, so ``max_jobs`` trainings do not oversubscribe the cores. Stop sets a
  ``threading.Event``.
- :class:`DaskExecutor` (``JobQueue(executor="tcp://host:port")``, a ``distributed.Client``, or
  ``WORKBENCH_DASK``): the task runs on a worker through ``_run_on_worker`` (in this package, so workers
  import it; the task function itself is pickled by reference, so it must be importable there too: keep
  task code in ``workbench``). Progress comes back through Dask's event/topic mechanism (the worker calls
  ``get_worker().log_event(topic, ...)``, throttled; the client ``subscribe_topic(topic, handler)``).
  Dask cannot interrupt a running task, so Stop is cooperative through a ``distributed.Event`` (the
  worker polls it at most every ``report_interval`` seconds), and after ``cancel_grace`` seconds
  ``future.cancel()`` frees the slot (the worker may still finish the abandoned task). Results come back
  as the task returned them: return plain data or bytes and let the server -- the store's only writer --
  save them. A worker that dies mid-task: Dask reruns the task elsewhere (``allowed-failures``), then the
  job fails with ``KilledWorker``; it is never silently lost.

*Task-to-server calls* on Dask: the worker logs ``{"job", "call", "reply"}`` on the job's topic; the
arguments and the answer (``{"ok": value}`` or ``{"error": message}``) go through two
``distributed.Queue``s (a topic keeps its last events in the scheduler: no weights there), and the server
answers on its own thread pool. Arguments and answers are plain data (bytes, str, numbers, lists, dicts).
"""
from __future__ import annotations

import re
import threading
import time
import traceback
import uuid
import warnings
from typing import Any, Callable

from ...core.checks import check_float, check_int, check_str
from ...core.monitor import _CURRENT, MAX_MESSAGE_CHARS, Context
from .context import _BUDGET_KEY, _check_plain, _run_service, _Steps, _ThreadContext
from .job import Job
from .limits import MAX_NAME_CHARS, MAX_THREADS, _check_address


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
