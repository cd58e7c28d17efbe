"""Pages under one job queue (as served: the server's queue in pn.state.cache), driven in Python.

Trainings are held at a gate so that the order of events is ours: several sessions (each its own
DataStore and user) share a queue with one slot; the waiting ones show their true position as the
queue moves, Stop removes a waiting job, a refused admission is shown on the page, closing a tab
cancels its waiting job while the running training finishes and is saved.
"""
import threading
import time

import panel as pn
import pytest
from bokeh.document import Document
from panel.io.state import set_curdoc

import workbench.experiments.train as train_module
from workbench import jobs
from workbench.ui import App
from workbench.ui.session import QUEUE_KEY, DataStore, job_queue
from workbench.ui.train import TrainPage


def _until(condition, timeout=120.0):
    """Wait for ``condition()`` (the queue moves on other threads); fails if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.02)


@pytest.fixture
def gates(monkeypatch):
    """Each training (in the order they start) waits for its own Event: ``gates[i].set()`` releases the i-th."""
    events = [threading.Event() for _ in range(8)]
    started = []
    real_train = train_module.train_model

    def gated(*args, **kwargs):
        i = len(started)
        started.append(i)
        events[i].wait(120)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_model", gated)
    yield events
    for e in events:   # never leave a worker blocked
        e.set()


def _queue(**kwargs):
    q = jobs.JobQueue(threads=1, executor="threads", **{"max_jobs": 1, **kwargs})
    pn.state.cache[QUEUE_KEY] = q          # where a served page finds the server's queue
    return q


def _page(store, user, name):
    page = TrainPage(DataStore(store, user=user))
    page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 6, 3
    page.run_name.value = name
    return page


def test_the_served_queue_is_the_one_pages_use(store):
    q = _queue()
    try:
        assert job_queue() is q
        del pn.state.cache[QUEUE_KEY]
        default = job_queue()
        assert default is not q and job_queue() is default   # without a server: one module default
    finally:
        q.close()


def test_a_waiting_session_sees_its_position_and_runs_after_the_first(store, gates):
    q = _queue()
    a, b, c = (_page(store, user, f"run-{user}") for user in ("alice", "bob", "carol"))
    a.start()
    _until(lambda: a.task.job.status == "running")
    b.start()
    assert b.task.job.status == "waiting" and b.task.status == "running"
    assert b.task.message == "queued: position 1 of 1"
    c.start()
    assert c.task.message == "queued: position 2 of 2"
    assert [j.user for j in q.jobs()] == ["alice", "bob", "carol"]        # the session's user owns the job
    gates[0].set()                                                        # alice's training may go on
    a.task.join(120)
    assert a.task.status == "done", a.task.error
    _until(lambda: b.task.job.status == "running")
    _until(lambda: c.task.message == "queued: position 1 of 1")          # moved up as bob started
    assert not b.task.message.startswith("queued")
    gates[1].set()
    gates[2].set()
    b.task.join(120)
    c.task.join(120)
    assert (b.task.status, c.task.status) == ("done", "done"), (b.task.error, c.task.error)
    assert a.task.job.finished <= b.task.job.started and b.task.job.finished <= c.task.job.started
    assert sorted(store.list()["name"]) == ["run-alice", "run-bob", "run-carol"]
    assert [p.last_run.name for p in (a, b, c)] == ["run-alice", "run-bob", "run-carol"]  # no cross-talk
    q.close()


def test_stop_on_a_waiting_job_removes_it_from_the_queue(store, gates):
    q = _queue()
    a, b = _page(store, "alice", "kept"), _page(store, "bob", "never")
    a.start()
    b.start()
    assert b.task.job.status == "waiting" and q.n_waiting == 1
    b.task.stop()
    assert b.task.job.status == "cancelled" and q.n_waiting == 0
    assert b.task.status == "cancelled" and "cancelled" in b.task.message
    assert b.start_button.disabled is False                               # the page may start again
    gates[0].set()
    a.task.join(120)
    assert a.task.status == "done", a.task.error
    assert list(store.list()["name"]) == ["kept"] and b.last_run is None  # bob's training never ran
    q.close()


def test_a_refused_admission_shows_its_message(store, gates):
    q = _queue(queue_size=1, jobs_per_user=1)
    a, b, c = _page(store, "alice", "a"), _page(store, "bob", "b"), _page(store, "carol", "c")
    controls = c.task.controls()
    a.start()
    b.start()                                                             # waits: the one waiting place
    c.start()                                                             # refused: the queue is full
    assert c.task.status == "idle" and c.task.job is None
    assert c.task.notice.startswith("the queue is full") and "WORKBENCH_QUEUE_SIZE" in c.task.notice
    assert "the queue is full" in controls.objects[1].object   # the status line under the bar and Stop
    assert c.start_button.disabled is False
    second = TrainPage(a.datastore)                                       # alice's second page
    second.start()                                                        # refused: her share is used
    assert second.task.status == "idle" and "WORKBENCH_JOBS_PER_USER" in second.task.notice
    for g in gates:
        g.set()
    a.task.join(120)
    b.task.join(120)
    assert sorted(store.list()["name"]) == ["a", "b"]
    q.close()


def test_closing_a_session_cancels_its_waiting_job_and_a_running_one_finishes_and_is_saved(store, gates):
    q = _queue()
    docs = [Document(), Document()]
    apps = []
    for doc in docs:
        with set_curdoc(doc):                                             # built in a session, as when served
            apps.append(App(store=store))
    a, b = (app.pages["Train"] for app in apps)
    assert a.datastore.queue_user != b.datastore.queue_user               # one queue user per session
    for page, name in ((a, "running"), (b, "waiting")):
        page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 6, 3
        page.run_name.value = name
        page.start()
    assert b.task.job.status == "waiting"
    for doc in docs:                                                      # both tabs are closed
        for callback in list(doc.session_destroyed_callbacks):
            callback(None)
    assert b.task.job.status == "cancelled" and q.n_waiting == 0          # the waiting one is gone
    assert a.task.job.status == "running" and not a.task.job.stop_requested
    gates[0].set()
    a.task.wait(120)
    listing = store.list()
    assert list(listing["name"]) == ["running"] and listing.loc[0, "status"] == "completed"
    assert listing.loc[0, "steps"] == 6                                   # finished, not stopped
    q.close()


def test_a_job_stopped_from_the_queue_stops_the_page_task(store, gates):
    """The teacher view stops any job through the queue: the page's training stops and is saved as stopped."""
    q = _queue()
    a = _page(store, "alice", "stopped")
    a.train_widgets["steps"].value = 2000
    a.start()
    _until(lambda: a.task.job.status == "running")
    q.find(a.task.job.id).cancel()
    assert a.task.stop_event.is_set()
    gates[0].set()
    a.task.join(120)
    assert a.task.status == "cancelled" and a.task.job.status == "cancelled"
    listing = store.list()
    assert listing.loc[0, "status"] == "cancelled" and listing.loc[0, "steps"] < 2000
    q.close()
