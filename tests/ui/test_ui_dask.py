"""Page jobs on Dask workers (issue 12): with the server's queue on a Dask cluster, the pages train on a
worker, progress comes back through Dask's topic, Stop is cooperative, and the runs are saved by the
server's own store (through the job's services) -- also after the tab was closed, with the student's owner.

One in-process LocalCluster for the module; tiny configs; each test checks that the job really ran on
Dask (``task.where == "dask"`` and the queue's executor), so a silent fallback to threads fails it."""
import time

import pandas as pd
import pytest
import torch

distributed = pytest.importorskip("distributed")
pn = pytest.importorskip("panel")

from workbench import jobs  # noqa: E402
from workbench.ui.session import QUEUE_KEY, DataStore  # noqa: E402
from workbench.ui.task import BackgroundTask  # noqa: E402
from workbench.ui.grokking import GrokkingPage  # noqa: E402
from workbench.ui.train import TrainPage  # noqa: E402
from helpers.growpage import grow_pressing_add_now  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


@pytest.fixture
def queue(client):
    q = jobs.JobQueue(max_jobs=2, jobs_per_user=4, executor=jobs.DaskExecutor(client, report_interval=0.1,
                                                                             cancel_grace=30.0))
    pn.state.cache[QUEUE_KEY] = q          # what apps/app_hooks.py does: every page's task finds it
    yield q
    pn.state.cache.pop(QUEUE_KEY, None)
    q.close()


def _train_page(store, steps=30, user=None, name="on-dask"):
    page = TrainPage(DataStore(store, user=user))
    page.model_widgets["d_model"].value = 16
    page.model_widgets["n_layers"].value = 1
    page.model_widgets["d_hidden"].value = 16
    page.train_widgets["steps"].value = steps
    page.train_widgets["eval_every"].value = 10
    page.run_name.value = name
    updates = []
    shown = page.task.on_update
    page.task.on_update = lambda payload: (updates.append(payload), shown(payload))
    return page, updates


def _same_function(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_train_page_trains_on_a_worker_and_the_server_saves_the_run_once(queue, store):
    page, updates = _train_page(store)
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.task.where == "dask" and isinstance(queue.executor, jobs.DaskExecutor)
    listing = store.list()
    assert list(listing["name"]) == ["on-dask"] and listing.loc[0, "steps"] == 30      # exactly once
    assert page.last_run_id == listing.loc[0, "run_id"] == page.last_run.run_id
    loaded = store.load(page.last_run_id)
    x = torch.as_tensor(__import__("workbench").data.load("digits").x_val[:32])
    assert _same_function(loaded.model, page.last_run.model, x)   # the page shows exactly what was saved
    pd.testing.assert_frame_equal(loaded.metrics, page.last_run.metrics)
    # progress payloads (the metrics rows so far) came through Dask's topic to on_update
    assert updates and all(isinstance(u, list) and u and {"step", "split", "metric", "value"} <= set(u[0])
                           for u in updates if u is not None)
    assert {"batch loss", "val loss"} <= {t.name for t in page.plot.object.data}


def test_stop_reaches_the_worker_and_the_stopped_run_is_saved(queue, store):
    page, updates = _train_page(store, steps=100_000, name="stopped")
    page.start()                                     # no server: returns at once, the job runs on Dask
    deadline = time.monotonic() + 60
    while not updates and time.monotonic() < deadline:
        time.sleep(0.05)
    assert updates and page.task.where == "dask"
    page.task.stop()
    assert page.task.wait(60) and page.task._box["final"].wait(30)
    page.task.poll()
    assert page.task.status == "cancelled" and page.task.job.status == "cancelled"
    listing = store.list()
    assert list(listing["name"]) == ["stopped"] and listing.loc[0, "steps"] < 100_000   # stopped early, kept


def test_a_closed_tab_still_gets_its_run_saved(queue, store):
    page, updates = _train_page(store, steps=60, name="orphan")
    page.start()
    page.task.session_destroyed(None)                # Train: on_session_end = "finish"
    assert page.task.wait(60) and page.task.job.status == "done"
    assert page.task._box["final"].wait(30)
    assert list(store.list()["name"]) == ["orphan"]
    assert page.last_run is None                     # no session: nothing was shown, the run was saved anyway


def test_a_student_job_saves_as_the_student(queue, store, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teacher")
    page, _ = _train_page(store, steps=10, user="alice", name="alices")
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.task.where == "dask"
    assert store.owner(page.last_run_id) == "alice" and page.last_run.run_id == page.last_run_id


def test_remote_store_keeps_the_viewer_rules_of_the_server(queue, store, monkeypatch):
    """A student's job that asks the server for another student's private run is refused there."""
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teacher")
    bob, _ = _train_page(store, steps=5, user="bob", name="bobs")
    bob.start(wait=True)
    assert bob.task.status == "done", bob.task.error
    task = BackgroundTask(queue=queue)
    errors = []
    task.on_done = errors.append
    alice = DataStore(store, user="alice").store
    task.run_now(_load_job, alice, bob.last_run_id)
    assert task.where == "dask" and task.status == "error"
    assert "belongs to another user" in task.error and "alice" in task.error


def _load_job(ctx, store, run_id):
    return store.load(run_id)


def test_grokking_page_end_to_end_on_a_worker(queue, store):
    page = GrokkingPage(DataStore(store))
    page.__panel__()
    for name, value in {"p": 7, "train_fraction": 0.5, "d_model": 8, "n_heads": 2, "d_mlp": 16, "steps": 20,
                        "eval_every": 10, "every": 10, "n_key": 2}.items():
        page.inputs[name].value = value
    frames = []
    shown = page.task.on_update
    page.task.on_update = lambda p: (frames.append(p), shown(p))
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.task.where == "dask"
    # the live payloads were DataFrames on the worker: they arrive as DataFrames (not pickled: tagged plain data)
    live = [p["metrics"] for p in frames if isinstance(p, dict) and "metrics" in p]
    assert live and all(isinstance(m, pd.DataFrame) and {"step", "split", "metric", "value"} <= set(m.columns)
                        for m in live)
    m = page.results["metrics"]
    assert sorted(m[m["split"] == "measure"]["step"].unique()) == [0, 10, 20]
    run = page.results["run"]                         # a Run rebuilt from its files (it was not saved)
    assert run.run_id is None and run.metrics["step"].max() == 20


def test_a_job_that_cannot_be_shipped_runs_on_the_server_threads_and_says_why(queue):
    task = BackgroundTask(queue=queue)
    out = []
    task.on_done = out.append
    model = torch.nn.Linear(2, 2)
    task.run_now(_model_job, model)
    assert task.status == "done" and out == [id(model)]       # the very object: it ran in this process
    assert task.where.startswith("threads (") and "model object" in task.where
    task.run_now(lambda ctx: "local")                         # a lambda cannot be imported by workers
    assert task.status == "done" and task.where.startswith("threads (") and "module-level" in task.where


def _model_job(ctx, model):
    return id(model)


def test_grow_page_on_a_worker_honours_add_a_block_now(queue, store, monkeypatch):
    """The Grow page's live control crosses to the worker: "add a block now", pressed on the page while
    the job runs on Dask, reaches growth.grow there (through the job's control services)."""
    from workbench.runtime.jobs import remote
    from workbench.ui.grow import GrowPage

    monkeypatch.setattr(remote._RemoteGrowControl, "poll_interval", 0.0)  # ask the page at every step
    page = GrowPage(DataStore(store))
    pressed = grow_pressing_add_now(page, steps=80)
    assert page.task.status == "done", page.task.error
    assert page.task.where == "dask"
    assert pressed.is_set()
    run = page.last_run
    assert run.model.config.n_layers == 2
    assert [s["op"] for s in run.meta["stages"]] == ["train", "add_layer"]
    assert sum(s["steps_done"] for s in run.meta["stages"]) == 80
    assert len(store.list()) == 2            # one saved run per stage, saved by the server
