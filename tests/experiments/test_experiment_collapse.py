"""The collapse experiment: its code trains and tracks what run does (mixup included), the records reach
the monitor, and the sweeps' task reads the same recipe."""
import numpy as np
import pandas as pd

import workbench as wb
from workbench import collapse
from workbench.experiments import collapse as experiment


def test_the_code_tracks_what_run_tracks(store, run_code, one_thread):
    options = dict(epochs=2, mixup=0.2, d_model=16, n_layers=1)
    result = experiment.run("digits", every=1, store=store, **options)
    run = result["run"]
    assert run.run_id in set(store.list()["run_id"])
    scope = run_code(experiment.as_code("digits", every=1, **options))
    table = scope["tracker"].table
    ours = run.metrics[run.metrics["epoch"].notna()].reset_index(drop=True)
    pd.testing.assert_frame_equal(table[ours.columns].reset_index(drop=True), ours, check_dtype=False)
    assert np.array_equal(collapse.head_gram(scope["model"])["gram"], result["head"]["gram"])
    pd.testing.assert_frame_equal(scope["mix"], result["mixup"])


def test_records_reach_the_monitor_and_the_last_one_always(one_thread):
    seen = []
    m = wb.monitor.Monitor(lambda p, msg, payload: seen.append(payload))
    result = experiment.run("digits", every=1, epochs=3, d_model=16, n_layers=1, layers=False, live=True,
                            min_interval=3600.0, monitor=m)
    records = [x for x in seen if isinstance(x, dict) and "table" in x]
    assert len(records) == 2                     # the first, then (an hour later at the earliest) the last
    assert records[-1]["epoch"] == 3.0 and {"view", "gram"} <= set(records[-1]["geometry"])
    assert len(records[-1]["table"]) == len(result["run"].metrics[result["run"].metrics["epoch"].notna()])


def test_the_sweep_task_is_the_experiments(one_thread):
    assert wb.sweeps.collapse_task is experiment.task
    assert wb.sweeps.TASKS == tuple(wb.experiments.SWEEP_TASKS) == ("train", "barrier", "collapse", "grow")
    assert all(wb.sweeps._TASK_FUNCTIONS[name] is fn for name, fn in wb.experiments.SWEEP_TASKS.items())
    out = experiment.task("digits", epochs=2, every=1, d_model=16, n_layers=1, record="final")
    assert out["status"] == "done" and {r["epoch"] for r in out["rows"]} == {2.0}


def test_the_pages_as_code_box_tracks_what_the_page_tracked(store, run_code, one_thread):
    from workbench.ui import App

    page = App(store=store).pages["Collapse"]
    page.epochs.value, page.every.value, page.mixup.value = 2, 1, 0.2
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    shown = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    assert shown == experiment.as_code(page.dataset.value, every=1, max_samples=512, **page.options())
    scope = run_code(shown)
    run = page.run
    ours = run.metrics[run.metrics["epoch"].notna()].reset_index(drop=True)
    pd.testing.assert_frame_equal(scope["tracker"].table[ours.columns].reset_index(drop=True), ours,
                                  check_dtype=False)
    pd.testing.assert_frame_equal(page.table.reset_index(drop=True), scope["tracker"].table, check_dtype=False)
