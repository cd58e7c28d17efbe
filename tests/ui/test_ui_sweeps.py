"""Sweeps page driven through its widgets in Python (no server): a tiny train grid on the session's queue,
numbers against training by hand, the figure's mean and spread against the table, CSV export, progress
per point with queue positions, cancel, bad input with messages naming the cell, the task menu only."""
import threading
import time

import numpy as np
import pandas as pd
import panel as pn
import pytest
import torch
from bokeh.document import Document
from panel.io.state import set_curdoc

import workbench as wb
from workbench import jobs
from workbench.ui.session import QUEUE_KEY, DataStore
from workbench.ui.sweeps import SweepsPage, parse_list


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def queue():
    q = jobs.JobQueue(max_jobs=1, threads=1, executor="threads")
    pn.state.cache[QUEUE_KEY] = q      # the served queue (as app_hooks makes it)
    yield q
    q.close()


def _until(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.02)


def _page(store, user="alice"):
    page = SweepsPage(DataStore(store, user=user))
    page.__panel__()
    page.task_select.value = "train"
    page.keys[0].value, page.values[0].value = "d_model", "8, 16"
    page.seeds.value = "0, 1"
    page.fixed.value = "dataset = digits\nsteps = 4\nn_layers = 1\nd_hidden = 8"
    return page


def test_a_tiny_train_grid_runs_and_matches_training_by_hand(store, queue):
    page = _page(store)
    seen_users = set()
    queue.add_listener(lambda q, job, event: seen_users.add(job.user))
    assert page.run_sweep(wait=True) and page.errors.text == ""
    assert seen_users == {"alice"}                                   # the points are the session user's jobs
    df = page.table.value
    assert list(df.columns) == ["point", "d_model", "seed", "metric", "value", "status", "error"]
    assert len(df) == 4 * 4 and set(df["status"]) == {"done"}
    assert sorted(set(zip(df["d_model"], df["seed"]))) == [(8, 0), (8, 1), (16, 0), (16, 1)]
    status = page.progress_table.value
    assert list(status["status"]) == ["done"] * 4 and "4 of 4 points finished" in page.status_line.object.replace(
        "\\", "")
    ds = wb.data.load("digits")
    torch.set_num_threads(1)
    for d_model, seed in ((16, 1), (8, 0)):                          # two points trained by hand
        model = wb.models.build(wb.models.config_for(ds, d_model=d_model, n_layers=1, d_hidden=8, seed=seed))
        run = wb.train(model, ds, wb.TrainConfig(steps=4, eval_every=4, eval_max=0, seed=seed))
        got = df[(df["d_model"] == d_model) & (df["seed"] == seed)].set_index("metric")["value"]
        assert got["val_loss"] == run.final("loss", "val") and got["train_acc"] == run.final("acc", "train")

    # the figure: the mean over the two seeds per width, the band from min to max
    page.metric.value, page.x.value, page.spread.value = "val_loss", "d_model", "minmax"
    fig = page.plot.object
    line = next(t for t in fig.data if t.mode == "lines+markers")
    band = next(t for t in fig.data if t.fill == "toself")
    by_hand = df[df["metric"] == "val_loss"].groupby("d_model")["value"]
    assert list(line.x) == [8, 16] and np.allclose(line.y, by_hand.mean().to_numpy())
    assert np.allclose(band.y, np.r_[by_hand.max().to_numpy(), by_hand.min().to_numpy()[::-1]])

    # CSV export is the table
    csv = pd.read_csv(page.download.callback())
    pd.testing.assert_frame_equal(csv.fillna(""), df.reset_index(drop=True).fillna(""), check_dtype=False)
    assert not page.download.disabled

    # the As code box runs and gives the same table
    assert "wb.sweeps.run('train', {'d_model': [8, 16]}, seeds=[0, 1]" in page.code.object
    scope = {}
    exec(page.code.object.removeprefix("```python\n").removesuffix("\n```"), scope)
    pd.testing.assert_frame_equal(scope["df"], df.reset_index(drop=True))


def test_progress_per_point_shows_queue_positions_and_cancel_drops_the_rest(store, queue):
    page = _page(store)
    page.fixed.value = "dataset = digits\nsteps = 100000\nn_layers = 1\nd_hidden = 8"   # long: cancelled below
    assert page.run_sweep()
    assert page.run_button.disabled and not page.cancel_button.disabled

    def shown():
        page._sync()
        return list(page.progress_table.value["status"])

    _until(lambda: shown()[:2] == ["running", "waiting"])          # one slot: the second point waits
    table = page.progress_table.value
    assert table.loc[1, "message"] == "queued: position 1 of 1" and list(table["status"][2:]) == ["pending"] * 2
    page.cancel()
    assert page.wait(120)
    assert set(page.progress_table.value["status"]) == {"cancelled"}
    df = page.table.value
    assert len(df) and set(df["status"]) == {"cancelled"}          # every point reported, none missing
    assert sorted(df["point"].unique()) == [0, 1, 2, 3]
    assert not page.run_button.disabled and page.cancel_button.disabled
    assert queue.n_waiting == 0 and queue.n_running == 0


def test_closing_the_tab_cancels_the_sweep(store, queue):
    doc = Document()
    with set_curdoc(doc):
        page = SweepsPage(DataStore(store, user="bob"))
    page.keys[0].value, page.values[0].value = "d_model", "8, 16"
    page.fixed.value = "dataset = digits\nsteps = 100000\nn_layers = 1\nd_hidden = 8"
    assert page.run_sweep()
    _until(lambda: queue.n_running == 1)
    for callback in list(doc.session_destroyed_callbacks):
        callback(None)
    assert page.sweep.wait(120)
    assert set(page.sweep.status()["status"]) == {"cancelled"}


@pytest.mark.parametrize("edit, message", [
    (lambda p: setattr(p.values[0], "value", "8, "), "grid row 1 (d_model): value 2 is empty"),
    (lambda p: setattr(p.values[0], "value", "8, 0"), "grid['d_model'][1] must be an integer in [1, 8192], got 0"),
    (lambda p: setattr(p.values[0], "value", "8, 8.5"), "grid['d_model'][1] must be an integer"),
    (lambda p: (setattr(p.keys[1], "value", "d_model"), setattr(p.values[1], "value", "32")),
     "grid row 2: key 'd_model' is already in an earlier row"),
    (lambda p: setattr(p.values[1], "value", "1, 2"), "grid row 2: choose a key for the values '1, 2'"),
    (lambda p: setattr(p.seeds, "value", "0, x"), "seeds[] must be"),
    (lambda p: setattr(p.fixed, "value", "steps 4"), "fixed options, line 1: write key = value, got 'steps 4'"),
    (lambda p: setattr(p.fixed, "value", "steps = 4\nsteps = 5"), "fixed options, line 2: 'steps' is given twice"),
    (lambda p: setattr(p.fixed, "value", "steps = 0"), "steps must be an integer in [1, 100000], got 0"),
    (lambda p: setattr(p.fixed, "value", "d_model = 8"), "'d_model' is both a grid key and a fixed argument"),
    (lambda p: setattr(p.fixed, "value", "bogus = 1"), "'bogus' is not an argument of task 'train'"),
    (lambda p: setattr(p.values[0], "value", "1," * 3000), "at most 4000 characters"),
    (lambda p: setattr(p.task_select, "value", "os:system"), "task must be one of ['train', 'barrier'"),
])
def test_bad_input_gives_a_message_naming_the_cell_and_starts_nothing(store, queue, edit, message):
    page = _page(store)
    edit(page)
    assert page.run_sweep() is False
    assert message in page.errors.text, page.errors.text
    assert page.sweep is None and queue.n_waiting == queue.n_running == 0
    assert "fix the form first" in (page.show_code() or page.code.object)


def test_the_task_menu_holds_the_engine_tasks_and_each_default_checks(store):
    page = SweepsPage(DataStore(store))
    assert page.task_select.options == list(wb.sweeps.TASKS)
    for task in wb.sweeps.TASKS:
        page.task_select.value = task
        task_, grid, fixed, seeds = page.checked_spec()     # the defaults are valid sweeps of that task
        assert task_ == task and grid and seeds == [0, 1]
        assert page.x.value and page.metric.value
        assert page.code.object.startswith("```python\nimport workbench as wb\ndf = wb.sweeps.run(" + repr(task))


def test_parse_list_types_values():
    assert parse_list("v", "8, 0.5, 1e-3, True, none, digits, '3'") == [8, 0.5, 1e-3, True, None, "digits", "3"]
    assert parse_list("v", "-2") == [-2]


def test_on_a_dask_queue_the_points_run_on_that_cluster_with_the_same_numbers(store, queue):
    """With WORKBENCH_DASK the server's one queue is on Dask (app_hooks): the page's points are its jobs,
    they run on the cluster's worker (not on the server's threads) and give the same numbers."""
    distributed = pytest.importorskip("distributed")
    local = _page(store)
    assert local.run_sweep(wait=True)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        remote_queue = jobs.JobQueue(executor=cluster.scheduler_address, threads=1)
        pn.state.cache[QUEUE_KEY] = remote_queue
        try:
            ran_on = []
            remote_queue.add_listener(lambda q, job, event: ran_on.append(threading.current_thread().name))
            remote = _page(store)
            assert remote.run_sweep(wait=True), remote.errors.text
            assert ran_on and not any(name.startswith("workbench-job-") for name in ran_on)  # no server thread
            assert isinstance(remote_queue.executor, jobs.DaskExecutor)
        finally:
            remote_queue.close()
        pd.testing.assert_frame_equal(remote.result, local.result)
