"""A bounded job queue for every long computation of a server: positions, per-user shares, cancel, two backends.

One :class:`JobQueue` per server process (``apps/app_hooks.py`` makes it); every page submits its
long computations (train, grow, a connectivity pair, a collapse recipe, compose, a residual analysis
of a large model, each point of a sweep) through it::

    queue = JobQueue()                                  # settings from the environment (limits.py)
    job = queue.submit(task, ds, cfg, user=pn.state.user or session_id, name="train digits")
    job.position()      # (k, n) while waiting;  job.status_line() -> "queued: position 2 of 5"
    job.add_listener(lambda job, event: ...)            # event: "status", "position" or "progress"
    job.cancel()        # waiting: removed at once; running: cooperative stop (the task ends early)
    job.result()        # the task's return value (re-raises the task's exception)
    queue.cancel_user(session_id)                       # a closed browser tab: its waiting jobs go

The task finds its :class:`Context` with :func:`current` (``ctx.stopped``, ``ctx.report(...)``,
``ctx.call(service, ...)``); it runs on this process's threads or on a Dask worker, the same code.
Each file holds one part, with its design notes in its docstring:

- ``limits.py``: the settings (``WORKBENCH_MAX_JOBS``, ``WORKBENCH_QUEUE_SIZE``, ``WORKBENCH_JOBS_PER_USER``,
  ``WORKBENCH_THREADS``, ``WORKBENCH_DASK``) and a student's job :class:`Budget`
  (``WORKBENCH_STUDENT_MAX_STEPS``, ``WORKBENCH_STUDENT_MAX_SECONDS``);
- ``context.py``: the task's side: :class:`Context` and :func:`current` (from ``workbench.core.monitor``),
  the step budget as the task counts it, :class:`TrainProgress`;
- ``job.py``: :class:`Job`, its statuses and outcomes (:class:`JobCancelled`, :class:`Diverged`);
- ``queue.py``: :class:`JobQueue`: admission (:class:`QueueFull`), round-robin scheduling, true positions,
  cancel, budgets;
- ``executors.py``: :class:`ThreadExecutor` and :class:`DaskExecutor` (task-to-server calls on Dask);
- ``remote.py``: what crosses to a Dask worker: :class:`RemoteStore` (the server's run store seen from a
  worker) and the dashboard's page jobs (``remote.plan``, ``remote.run_page_job``).
"""
from __future__ import annotations

from .context import Context, TrainProgress, current
from .executors import DaskExecutor, Executor, ThreadExecutor
from .job import FINAL_STATUSES, STATUSES, Diverged, Job, JobCancelled
# the settings' bounds and the address check are module attributes too (the Teacher page, the sweeps)
from .limits import (MAX_BUDGET_SECONDS, MAX_BUDGET_STEPS, MAX_JOBS, MAX_NAME_CHARS, MAX_PER_USER, MAX_QUEUE,
                     MAX_THREADS, MAX_USER_CHARS, STUDENT_SECONDS, STUDENT_SECONDS_ENV, STUDENT_STEPS,
                     STUDENT_STEPS_ENV, Budget, _check_address, cores, settings, student_budget)
from .queue import JobQueue, QueueFull
from .remote import RemoteStore

__all__ = ["JobQueue", "Job", "Context", "current", "QueueFull", "JobCancelled", "Diverged", "Executor",
           "ThreadExecutor", "DaskExecutor", "TrainProgress", "RemoteStore", "settings", "STATUSES", "FINAL_STATUSES",
           "cores", "Budget", "student_budget", "STUDENT_STEPS_ENV", "STUDENT_SECONDS_ENV"]

