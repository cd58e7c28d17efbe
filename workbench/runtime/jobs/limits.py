"""What a server allows: the queue's settings from the environment and a student's job budget.

Settings (read when a queue is made; each names its variable when it is wrong):
``WORKBENCH_MAX_JOBS`` (running at once, default ``max(1, cores - 1)``), ``WORKBENCH_QUEUE_SIZE``
(waiting jobs, default 40), ``WORKBENCH_JOBS_PER_USER`` (waiting + running per user, default 2),
``WORKBENCH_THREADS`` (torch threads per job, default ``floor(cores / max_jobs)``, at least 1;
1 on Dask), ``WORKBENCH_DASK`` (a scheduler address; unset: threads).

*Budgets*: a student's job on a class server may use at most :attr:`JobQueue.student_budget`
(:class:`Budget`: training steps over every training in the job, and seconds of running time), so that
nobody holds one of the class's few slots for hours (a job goes on after its tab is closed).
``WORKBENCH_STUDENT_MAX_STEPS`` and ``WORKBENCH_STUDENT_MAX_SECONDS`` set it (default 20,000 steps and
1200 s; ``none``: no cap); the teacher changes it at run time (:meth:`JobQueue.set_student_budget`, the
Teacher page). The steps are counted in the task's process (``context.py``), the time by the queue.
"""
from __future__ import annotations

import dataclasses
import os
import re

from ...core.checks import check_float, check_int, env_limit

MAX_JOBS = 1024            # bounds of the settings
MAX_QUEUE = 100_000
MAX_PER_USER = 100_000
MAX_THREADS = 1024
MAX_USER_CHARS = 256
MAX_NAME_CHARS = 200
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://\S+$")


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
