"""The job queue: admission caps, round-robin across users, FIFO within one, true positions, cancel, failures,
settings from the environment; a hypothesis state machine over the queue; the thread and Dask executors."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from workbench import jobs
from workbench.runtime.jobs import JobQueue, QueueFull


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class ManualExecutor(jobs.Executor):
    """A backend that runs nothing: the test finishes each started job by hand (instant, deterministic)."""

    def __init__(self, on_start=None):
        self.started: list[jobs.Job] = []
        self.handles: dict[str, tuple] = {}
        self.stopped: list[jobs.Job] = []
        self.on_start = on_start

    def start(self, job, report, done):
        if self.on_start is not None:
            self.on_start(job)
        self.started.append(job)
        self.handles[job.id] = (report, done)

    def stop(self, job):
        self.stopped.append(job)

    def finish(self, job, value=None, error=None):
        report, done = self.handles.pop(job.id)
        if error is None:
            done(value=value, has_value=True)
        else:
            done(error=error, tb="Traceback: made up")

    def report(self, job, *args):
        self.handles[job.id][0](*args)


def noop():
    return None


def make(max_jobs=1, queue_size=10, jobs_per_user=3):
    ex = ManualExecutor()
    return JobQueue(max_jobs=max_jobs, queue_size=queue_size, jobs_per_user=jobs_per_user, threads=1, executor=ex), ex


# ============================================================================ settings


@pytest.mark.parametrize("variable", ["WORKBENCH_MAX_JOBS", "WORKBENCH_QUEUE_SIZE", "WORKBENCH_JOBS_PER_USER",
                                      "WORKBENCH_THREADS"])
@pytest.mark.parametrize("raw", ["0", "-1", "abc", "2.5", "nan", "1e3", "5000000"])
def test_bad_environment_settings_name_the_variable(monkeypatch, variable, raw):
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValueError, match=variable):
        JobQueue(executor=ManualExecutor())


def test_environment_settings_and_defaults(monkeypatch):
    for v in ("WORKBENCH_MAX_JOBS", "WORKBENCH_QUEUE_SIZE", "WORKBENCH_JOBS_PER_USER", "WORKBENCH_THREADS",
              "WORKBENCH_DASK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(jobs.limits, "cores", lambda: 8)
    q = JobQueue(executor=ManualExecutor())
    assert (q.max_jobs, q.queue_size, q.jobs_per_user, q.threads) == (7, 40, 2, 1)   # max(1, 8-1); floor(8/7)
    monkeypatch.setenv("WORKBENCH_MAX_JOBS", "2")
    q = JobQueue(executor=ManualExecutor())
    assert (q.max_jobs, q.threads) == (2, 4)                                         # floor(8/2)
    monkeypatch.setattr(jobs.limits, "cores", lambda: 1)
    monkeypatch.delenv("WORKBENCH_MAX_JOBS")
    q = JobQueue(executor=ManualExecutor())
    assert (q.max_jobs, q.threads) == (1, 1)
    for v, raw in (("WORKBENCH_QUEUE_SIZE", " 5 "), ("WORKBENCH_JOBS_PER_USER", "3"), ("WORKBENCH_THREADS", "2")):
        monkeypatch.setenv(v, raw)
    q = JobQueue(executor=ManualExecutor())
    assert (q.queue_size, q.jobs_per_user, q.threads) == (5, 3, 2)
    q = JobQueue(max_jobs=3, queue_size=1, jobs_per_user=1, threads=1, executor=ManualExecutor())  # arguments win
    assert (q.max_jobs, q.queue_size, q.jobs_per_user, q.threads) == (3, 1, 1, 1)


@pytest.mark.parametrize("kwargs, name", [({"max_jobs": 0}, "max_jobs"), ({"max_jobs": True}, "max_jobs"),
                                          ({"queue_size": 1.5}, "queue_size"), ({"jobs_per_user": "2"}, "jobs_per_user"),
                                          ({"threads": -1}, "threads"), ({"executor": 3}, "executor"),
                                          ({"executor": "localhost:8786"}, "executor")])
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        JobQueue(**kwargs)


def test_bad_dask_address_in_the_environment(monkeypatch):
    monkeypatch.setenv("WORKBENCH_DASK", "not an address")
    with pytest.raises(ValueError, match="WORKBENCH_DASK"):
        JobQueue(max_jobs=1)


def test_bad_submissions_are_refused():
    q, _ = make()
    with pytest.raises(ValueError, match="fn must be callable"):
        q.submit(3)
    with pytest.raises(ValueError, match="user"):
        q.submit(noop, user="")
    with pytest.raises(ValueError, match="user"):
        q.submit(noop, user=7)
    with pytest.raises(ValueError, match="name"):
        q.submit(noop, name="x" * 1000)
    with pytest.raises(ValueError, match="on_progress"):
        q.submit(noop, on_progress="yes")
    assert q.n_waiting == q.n_running == 0


# ============================================================================ scheduling (manual executor)


def test_caps_hold_and_refusals_say_why():
    q, ex = make(max_jobs=1, queue_size=2, jobs_per_user=2)
    a1 = q.submit(noop, user="a")
    q.submit(noop, user="a")
    with pytest.raises(QueueFull, match="WORKBENCH_JOBS_PER_USER = 2"):
        q.submit(noop, user="a")
    q.submit(noop, user="b")
    with pytest.raises(QueueFull, match="WORKBENCH_QUEUE_SIZE = 2"):
        q.submit(noop, user="c")
    assert (q.n_running, q.n_waiting) == (1, 2)
    ex.finish(a1)                                   # a slot frees, the queue moves: c gets in
    q.submit(noop, user="c")
    assert (q.n_running, q.n_waiting) == (1, 2)
    assert len(ex.started) == 2 and all(j.status == "running" for j in ex.started[1:])


def test_round_robin_across_users_fifo_within_one_and_true_positions():
    q, ex = make(max_jobs=1, queue_size=10, jobs_per_user=3)
    a1 = q.submit(noop, user="a", name="a1")
    a2, a3 = q.submit(noop, user="a", name="a2"), q.submit(noop, user="a", name="a3")
    b1, b2 = q.submit(noop, user="b", name="b1"), q.submit(noop, user="b", name="b2")
    c1 = q.submit(noop, user="c", name="c1")
    # a1 runs; ring a, b, c: one job per user per round, each user's own in order
    expected = [a2, b1, c1, a3, b2]
    assert a1.status == "running" and a1.position() is None
    assert [j.position() for j in expected] == [(k, 5) for k in range(1, 6)]
    assert [j.status_line() for j in expected][:2] == ["queued: position 1 of 5", "queued: position 2 of 5"]
    assert [j.name for j in q.jobs()] == ["a1", "a2", "b1", "c1", "a3", "b2"]
    running = a1
    for n_left, nxt in zip(range(4, -1, -1), expected):
        ex.finish(running)
        assert nxt.status == "running" and ex.started[-1] is nxt      # the job at position 1 started
        rest = expected[expected.index(nxt) + 1:]
        assert [j.position() for j in rest] == [(k, n_left) for k in range(1, n_left + 1)]
        running = nxt
    ex.finish(running)
    assert [j.name for j in ex.started] == ["a1", "a2", "b1", "c1", "a3", "b2"]
    assert all(j.status == "done" for j in expected) and q.n_running == 0


def test_position_events_reach_waiting_listeners():
    q, ex = make(max_jobs=1)
    first = q.submit(noop, user="a")
    waiting = q.submit(noop, user="b")
    lines = []
    waiting.add_listener(lambda job, event: lines.append((event, job.status_line())))
    q.submit(noop, user="c")
    assert lines[-1] == ("position", "queued: position 1 of 2")
    ex.finish(first)
    assert ("status", "running") in lines


def test_no_slot_idles_while_jobs_wait():
    q, ex = make(max_jobs=2, queue_size=10, jobs_per_user=10)
    js = [q.submit(noop, user=u) for u in "aabbc"]
    assert q.n_running == 2 and q.n_waiting == 3
    for _ in range(3):
        ex.finish(next(j for j in js if j.status == "running"))
        assert q.n_running == 2
    ex.finish(next(j for j in js if j.status == "running"))
    assert (q.n_running, q.n_waiting) == (1, 0)


def test_cancel_waiting_removes_it_and_the_executor_never_sees_it():
    q, ex = make(max_jobs=1)
    first = q.submit(noop, user="a")
    w1, w2, w3 = (q.submit(noop, user=u) for u in "bcd")
    assert w2.cancel() is True and w2.status == "cancelled" and w2.done
    assert w2.cancel() is False
    assert (w1.position(), w3.position()) == ((1, 2), (2, 2))
    with pytest.raises(jobs.JobCancelled):
        w2.result(0)
    ex.finish(first)
    ex.finish(w1)
    ex.finish(w3)
    assert w2 not in ex.started and [j.status for j in (w1, w3)] == ["done", "done"]


def test_cancel_running_is_cooperative_and_keeps_the_slot_until_the_task_returns():
    q, ex = make(max_jobs=1)
    run = q.submit(noop, user="a")
    nxt = q.submit(noop, user="b")
    assert run.cancel() is True and ex.stopped == [run]
    assert run.status == "running" and run.stop_requested and run.status_line().startswith("stopping")
    assert nxt.status == "waiting"                  # the slot is still busy until the task returns
    ex.finish(run, value="partial run")
    assert run.status == "cancelled" and run.result() == "partial run" and nxt.status == "running"


def test_cancel_user_cancels_waiting_jobs_only_unless_asked():
    q, ex = make(max_jobs=1, jobs_per_user=3)
    a1 = q.submit(noop, user="a")
    a2, a3 = q.submit(noop, user="a"), q.submit(noop, user="a")
    b1 = q.submit(noop, user="b")
    assert q.cancel_user("a") == 2
    assert (a1.status, a2.status, a3.status) == ("running", "cancelled", "cancelled") and not a1.stop_requested
    assert b1.position() == (1, 1)
    assert q.cancel_user("a", running=True) == 1 and a1.stop_requested
    assert q.cancel_user("nobody") == 0


def test_failures_are_reported_and_the_queue_moves_on():
    q, ex = make(max_jobs=1)
    bad = q.submit(noop, user="a")
    nxt = q.submit(noop, user="b")
    ex.finish(bad, error=ValueError("steps must be an integer in [1, 10], got 0"))
    assert bad.status == "failed" and "steps must be" in bad.status_line() and bad.traceback
    with pytest.raises(ValueError, match="steps must be"):
        bad.result()
    assert nxt.status == "running"


def test_diverged_results_are_marked_and_the_queue_moves_on():
    q, ex = make(max_jobs=1)
    a, b, c = (q.submit(noop, user=u) for u in "abc")
    ex.finish(a, value={"status": "diverged", "rows": []})
    ex.finish(b, error=jobs.Diverged("loss is NaN at step 3"))
    assert (a.status, b.status, c.status) == ("diverged", "diverged", "running")
    assert a.result() == {"status": "diverged", "rows": []}


def test_a_backend_that_refuses_to_start_fails_the_job_not_the_queue():
    class Refusing(ManualExecutor):
        def start(self, job, report, done):
            if job.name == "doomed":
                raise ConnectionError("scheduler gone")
            super().start(job, report, done)

    ex = Refusing()
    q = JobQueue(max_jobs=1, queue_size=5, jobs_per_user=5, threads=1, executor=ex)
    doomed = q.submit(noop, name="doomed")
    after = q.submit(noop, name="after")
    assert doomed.wait(5) and doomed.status == "failed" and isinstance(doomed.error, ConnectionError)
    deadline = time.monotonic() + 5
    while after.status == "waiting" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert after.status == "running"


def test_listeners_progress_and_a_raising_listener():
    q, ex = make(max_jobs=1)
    seen, queue_events = [], []
    q.add_listener(lambda queue, job, event: queue_events.append(event))
    job = q.submit(noop, user="a", on_progress=lambda j: seen.append((j.progress, j.message, j.payload)))
    job.add_listener(lambda j, e: 1 / 0)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        ex.report(job, 0.5, "half way", {"step": 5})
    assert seen == [(0.5, "half way", {"step": 5})] and job.status_line() == "running: 50% half way"
    with pytest.warns(RuntimeWarning):
        ex.finish(job, value=1)
    late = []
    job.add_listener(lambda j, e: late.append(e))   # added after the end: told once, at once
    assert late == ["status"] and "progress" in queue_events and q.snapshot() == []


def test_close_refuses_new_jobs_and_cancels_waiting_ones():
    q, ex = make(max_jobs=1)
    run, wait = q.submit(noop, user="a"), q.submit(noop, user="b")
    q.close()
    assert wait.status == "cancelled" and run.stop_requested and q.closed
    with pytest.raises(QueueFull, match="closed"):
        q.submit(noop)
    assert q.wait_for_room("a", 0) is False


# ============================================================================ state machine


class QueueMachine(RuleBasedStateMachine):
    """Random submissions, finishes, failures, cancels and stops against a queue with a manual backend.

    Checked against facts the test counts itself: the caps, admission refused exactly when a cap is
    reached, no idle slot while jobs wait, positions a permutation of 1..n, the job at position 1 is
    the one that starts when one slot frees, FIFO within a user, and round-robin fairness (between two
    starts of one user, every other user who was waiting throughout got a start).
    """

    USERS = ("a", "b", "c")

    @initialize(max_jobs=st.integers(1, 3), queue_size=st.integers(1, 4), per_user=st.integers(1, 3))
    def setup(self, max_jobs, queue_size, per_user):
        self.all: list[jobs.Job] = []
        self.starts: list[tuple[jobs.Job, frozenset]] = []
        self.ex = ManualExecutor(on_start=self._on_start)
        self.q = JobQueue(max_jobs=max_jobs, queue_size=queue_size, jobs_per_user=per_user, threads=1,
                          executor=self.ex)
        self.max_jobs, self.queue_size, self.per_user = max_jobs, queue_size, per_user

    def _on_start(self, job):
        waiting = frozenset(j.id for j in self.all if j.status == "waiting")
        k = len(self.starts)
        prev = next((i for i in range(k - 1, -1, -1) if self.starts[i][0].user == job.user), None)
        if prev is not None:
            between = {j.user for j, _ in self.starts[prev + 1:]}
            for wid in self.starts[prev][1] & waiting:
                other = next(j for j in self.all if j.id == wid)
                if other.user != job.user:
                    assert other.user in between, (f"user {job.user} started twice while {other.user} "
                                                   f"waited throughout")
        self.starts.append((job, waiting))

    def _status(self, status):
        return [j for j in self.all if j.status == status]

    def _head(self):
        return next((j for j in self._status("waiting") if j.position()[0] == 1), None)

    @rule(user=st.sampled_from(USERS))
    def submit(self, user):
        mine = sum(j.user == user and not j.done for j in self.all)
        full = len(self._status("running")) >= self.max_jobs and len(self._status("waiting")) >= self.queue_size
        try:
            job = self.q.submit(noop, user=user)
        except QueueFull:
            assert mine >= self.per_user or full
            return
        assert not (mine >= self.per_user or full)
        self.all.append(job)

    @precondition(lambda self: self.ex.handles)
    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data, fail):
        job = data.draw(st.sampled_from([j for j in self.ex.started if j.id in self.ex.handles]))
        head = self._head()
        self.ex.finish(job, error=RuntimeError("boom") if fail else None, value=None if fail else job.id)
        expected = "cancelled" if job.stop_requested else "failed" if fail else "done"
        assert job.status == expected
        if head is not None:
            assert head.status == "running" and self.ex.started[-1] is head

    @precondition(lambda self: any(j.status == "waiting" for j in self.all))
    @rule(data=st.data())
    def cancel_waiting(self, data):
        job = data.draw(st.sampled_from(self._status("waiting")))
        n = self.q.n_waiting
        assert job.cancel() and job.status == "cancelled" and job not in self.ex.started
        assert self.q.n_waiting == n - 1

    @precondition(lambda self: any(j.status == "running" and not j.stop_requested for j in self.all))
    @rule(data=st.data())
    def stop_running(self, data):
        job = data.draw(st.sampled_from([j for j in self._status("running") if not j.stop_requested]))
        assert job.cancel() and job.status == "running" and job in self.ex.stopped

    @rule(user=st.sampled_from(USERS))
    def cancel_user(self, user):
        waiting = [j for j in self._status("waiting") if j.user == user]
        assert self.q.cancel_user(user) == len(waiting)
        assert all(j.status == "cancelled" for j in waiting)

    @invariant()
    def caps_and_positions(self):
        if not hasattr(self, "q"):
            return
        running, waiting = self._status("running"), self._status("waiting")
        assert len(running) <= self.max_jobs and len(running) == len(self.ex.handles) == self.q.n_running
        assert len(waiting) <= self.queue_size and len(waiting) == self.q.n_waiting
        if len(running) < self.max_jobs:
            assert not waiting, "a slot idles while jobs wait"
        for u in self.USERS:
            assert sum(j.user == u and not j.done for j in self.all) <= self.per_user
        positions = sorted(j.position() for j in waiting)
        assert positions == [(k, len(waiting)) for k in range(1, len(waiting) + 1)]
        for u in self.USERS:
            seqs = [j.seq for j in self.ex.started if j.user == u]
            assert seqs == sorted(seqs), "jobs of one user must start in the order they came"


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(max_examples=500, stateful_step_count=20, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ thread executor


def _gated(gate: threading.Event, started: threading.Event | None = None):
    """A task that reports until ``gate`` is set or it is stopped; returns how it ended."""
    ctx = jobs.current()
    if started is not None:
        started.set()
    for i in range(10_000):
        if ctx.stopped:
            return {"status": "cancelled", "i": i, "threads": torch.get_num_threads()}
        ctx.report(min(1.0, i / 100), f"i={i}")
        if gate.wait(0.005):
            return {"status": "done", "i": i, "threads": ctx.threads}
    return {"status": "timeout"}


def test_threads_run_jobs_with_progress_cooperative_stop_and_torch_threads():
    q = JobQueue(max_jobs=1, queue_size=5, jobs_per_user=5, threads=1, executor="threads", report_interval=0)
    gate, started = threading.Event(), threading.Event()
    progress = []
    a = q.submit(_gated, gate, started, user="a", on_progress=lambda j: progress.append(j.progress))
    b = q.submit(_gated, gate, user="b")
    assert started.wait(10)
    deadline = time.monotonic() + 10
    while not progress and time.monotonic() < deadline:
        time.sleep(0.01)
    assert progress and b.position() == (1, 1)
    a.cancel()
    out = a.result(10)
    assert a.status == "cancelled" and out["status"] == "cancelled" and out["threads"] == 1
    gate.set()
    assert b.result(10)["status"] == "done" and b.status == "done"
    assert jobs.current().stopped is False          # outside a job: a silent context
    q.close()


def test_threads_never_run_more_than_max_jobs_at_once():
    gate, lock, active, peak = threading.Event(), threading.Lock(), [0], [0]

    def task():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        gate.wait(30)
        with lock:
            active[0] -= 1
        return True

    q = JobQueue(max_jobs=2, queue_size=10, jobs_per_user=2, threads=1, executor="threads")
    js = [q.submit(task, user=u) for u in "aabbcc"]
    deadline = time.monotonic() + 30
    while active[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (active[0], q.n_running, q.n_waiting) == (2, 2, 4)
    gate.set()
    assert all(j.result(30) for j in js) and peak[0] == 2
    q.close()


def test_threads_report_failures_with_their_traceback():
    def broken():
        raise KeyError("no such layer")

    with JobQueue(max_jobs=1, queue_size=2, jobs_per_user=2, threads=1, executor="threads") as q:
        job = q.submit(broken)
        assert job.wait(10) and job.status == "failed"
        assert "broken" in job.traceback and "KeyError" in job.status_line()
        with pytest.raises(KeyError):
            job.result()


def test_train_progress_stops_a_training_run():
    import workbench as wb

    ds = wb.data.load("digits")
    gate = threading.Event()

    def train_until_stopped():
        model = wb.models.build(wb.models.config_for(ds, d_model=8, n_layers=1, d_hidden=8))
        cb = jobs.TrainProgress()

        class Wait(wb.Callback):
            def on_step(self, state):
                if state.step == 3:
                    gate.set()
                    deadline = time.monotonic() + 10
                    while not jobs.current().stopped and time.monotonic() < deadline:
                        time.sleep(0.01)
        return wb.train(model, ds, wb.TrainConfig(steps=10_000, eval_every=10_000), callbacks=[Wait(), cb])

    with JobQueue(max_jobs=1, queue_size=2, jobs_per_user=2, threads=1, executor="threads", report_interval=0) as q:
        job = q.submit(train_until_stopped)
        assert gate.wait(30)
        job.cancel()
        run = job.result(30)
        assert job.status == "cancelled" and run.status == "cancelled" and int(run.metrics["step"].max()) <= 5
        assert job.progress is not None and job.message.startswith("step ")


# ============================================================================ Dask executor


def _dask_task(n: int, sleep: float = 0.01):
    ctx = jobs.current()
    for i in range(n):
        if ctx.stopped:
            return {"status": "cancelled", "i": i}
        ctx.report(i / n, f"i={i}", {"i": i}, force=True)
        time.sleep(sleep)
    return {"n": n, "threads": torch.get_num_threads()}


def _dask_ignores_stop(seconds: float):
    time.sleep(seconds)
    return "finished anyway"


def _dask_fails():
    raise ValueError("d_model must be an integer in [1, 8192], got 0")


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def test_dask_executor_progress_cancel_failure_and_slots(dask_client):
    ex = jobs.DaskExecutor(dask_client, report_interval=0.0, cancel_grace=30.0)
    q = JobQueue(max_jobs=1, queue_size=5, jobs_per_user=5, executor=ex)
    assert q.threads == 1                               # one torch thread per Dask task unless set
    payloads = []
    a = q.submit(_dask_task, 20, user="a", on_progress=lambda j: payloads.append(j.payload))
    b = q.submit(_dask_task, 100_000, user="b")
    assert b.position() == (1, 1) and b.executor_state is None   # never sent to Dask while waiting
    assert a.result(30) == {"n": 20, "threads": 1}
    deadline = time.monotonic() + 10
    while not payloads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert payloads and all(isinstance(p, dict) and "i" in p for p in payloads)   # through the topic
    deadline = time.monotonic() + 30
    while b.progress is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.status == "running" and b.progress is not None
    b.cancel()                                           # cooperative: the task sees the distributed.Event
    out = b.result(30)
    assert b.status == "cancelled" and out["status"] == "cancelled" and out["i"] < 100_000
    bad = q.submit(_dask_fails, user="c")
    assert bad.wait(30) and bad.status == "failed" and "d_model must be" in bad.status_line()
    with pytest.raises(ValueError, match="d_model"):
        bad.result()
    q.close()


def test_dask_task_that_ignores_stop_is_cancelled_after_the_grace(dask_client):
    ex = jobs.DaskExecutor(dask_client, cancel_grace=0.2)
    q = JobQueue(max_jobs=1, queue_size=5, jobs_per_user=5, executor=ex)
    stubborn = q.submit(_dask_ignores_stop, 1.5, user="a")
    nxt = q.submit(_dask_task, 3, user="b")
    assert stubborn.executor_state["future"] is not None       # sent to Dask at once: a slot was free
    stubborn.cancel()
    assert stubborn.wait(20) and stubborn.status == "cancelled" and not stubborn.has_value
    assert nxt.result(30)["n"] == 3                       # the slot was freed; the queue moved on
    q.close()


# ============================================================================ Context.call (task -> server)


def _calls(*names):
    ctx = jobs.current()
    out = []
    for name in names:
        try:
            out.append(("ok", ctx.call(name, b"\x00\x01", 3)))
        except (RuntimeError, ValueError) as e:   # Dask: RuntimeError with the server's message; threads: its own
            out.append(("error", f"{type(e).__name__}: {e}"))
    return out


def _services():
    def echo(data, n):
        return {"bytes": data * n, "n": n}

    def boom(data, n):
        raise ValueError("n_alphas must be an integer in [2, 1001], got -3")

    return {"echo": echo, "boom": boom, "object": lambda data, n: object()}


def test_context_call_outside_a_job_says_so():
    with pytest.raises(RuntimeError, match="only inside a job"):
        jobs.current().call("store.save", b"")


def test_context_call_on_threads_runs_the_service_directly():
    q = JobQueue(max_jobs=1, executor="threads")
    out = q.submit(_calls, "echo", "boom", "missing", services=_services()).result(30)
    assert out[0] == ("ok", {"bytes": b"\x00\x01" * 3, "n": 3})
    assert out[1] == ("error", "ValueError: n_alphas must be an integer in [2, 1001], got -3")
    assert out[2][0] == "error" and "unknown service 'missing'" in out[2][1] and "echo" in out[2][1]
    with pytest.raises(ValueError, match="services must be"):
        q.submit(_calls, services={"x": 3})
    q.close()


def test_context_call_on_dask_answers_or_fails_clearly_and_never_hangs(dask_client):
    q = JobQueue(max_jobs=1, executor=jobs.DaskExecutor(dask_client, call_timeout=30))
    out = q.submit(_calls, "echo", "boom", "missing", "object", services=_services()).result(60)
    assert out[0] == ("ok", {"bytes": b"\x00\x01" * 3, "n": 3})      # bytes through the queues, intact
    assert out[1][0] == "error" and "ValueError: n_alphas must be an integer" in out[1][1]
    assert out[2][0] == "error" and "unknown service 'missing'" in out[2][1]
    assert out[3][0] == "error" and "plain data" in out[3][1]           # never pickled through the topic
    q.close()


def test_remote_store_saves_and_loads_through_the_server_store_on_dask(dask_client, tmp_path):
    import workbench as wb

    store = wb.RunStore(tmp_path / "home")
    q = JobQueue(max_jobs=1, executor=jobs.DaskExecutor(dask_client))
    run_id = q.submit(_train_and_save, jobs.RemoteStore(), services=jobs.RemoteStore.services(store)).result(120)
    assert list(store.list()["run_id"]) == [run_id]
    again = q.submit(_load_remote, jobs.RemoteStore(), run_id, services=jobs.RemoteStore.services(store)).result(60)
    assert again == (run_id, store.read_json(run_id)["name"], int(store.load(run_id).metrics["step"].max()))
    q.close()


def _train_and_save(remote):
    import workbench as wb

    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.config_for(ds, d_model=8, n_layers=1, d_hidden=8))
    return remote.save(wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=3)), "remote-save")


def _load_remote(remote, run_id):
    run = remote.load(run_id)
    return run.run_id, remote.read_json(run_id)["name"], int(run.metrics["step"].max())
