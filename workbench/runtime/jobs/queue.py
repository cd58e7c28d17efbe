"""The bounded queue: admission, round-robin scheduling across users, true positions, cancel, budgets.

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

*Budgets*: the UI marks a signed-in student's queue user with :meth:`JobQueue.add_student`; their jobs
get the budget current at submission (:meth:`JobQueue.budget_for`), teachers' and a laptop's jobs none.
Over its steps (counted by the task) or its seconds (a timer from the start), the queue stops the job as
Stop does, with :attr:`Job.over_budget` naming the budget; the task ends with what it has.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
import warnings
from collections import deque
from typing import Callable, Mapping

from ...core.checks import check_float, check_str
from ...core.monitor import MAX_MESSAGE_CHARS
from .context import _BUDGET_KEY
from .executors import DaskExecutor, Executor, ThreadExecutor
from .job import Diverged, Job, _call, _value_status
from .limits import MAX_NAME_CHARS, MAX_USER_CHARS, Budget, _check_address, settings, student_budget


class QueueFull(ValueError):
    """Admission refused: the queue or the user's share is full (the message says which and why)."""


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
