"""The train experiment: its code is its pipeline (same numbers), and the sweeps' task is built on it."""
import pandas as pd

import workbench as wb
from workbench.experiments import train

CHOICES = dict(dataset="digits", data_options={"val_fraction": 0.25},
               model={"d_model": 16, "n_layers": 1, "d_hidden": 16}, train={"steps": 6, "eval_every": 3, "lr": 3e-3})


def test_the_code_trains_what_run_trains_and_saves_it(store, run_code, without_time, one_thread):
    run = train.run(**CHOICES, name="mine", store=store)
    assert run.run_id in set(store.list()["run_id"]) and store.list()["name"].tolist() == ["mine"]
    code = train.as_code(**CHOICES, name="mine")
    assert "val_fraction=0.25" in code and "d_model=16" in code and "steps=6" in code
    scope = run_code(code)
    pd.testing.assert_frame_equal(without_time(scope["run"].metrics), without_time(run.metrics))
    assert scope["run"].model.config == run.model.config
    assert sorted(store.list()["name"]) == ["mine", "mine"]


def test_live_payloads_are_the_rows_so_far_and_stop_keeps_the_run(one_thread):
    seen = []
    m = wb.monitor.Monitor(lambda p, msg, payload: seen.append(payload))
    run = train.run(**CHOICES, live_every=2, monitor=m)
    rows = [x for x in seen if x is not None]
    assert rows and all(isinstance(x, list) for x in rows) and len(rows[-1]) == len(run.metrics)
    stopped = wb.monitor.Monitor()
    stopped.stop()
    run = train.run(**CHOICES, monitor=stopped)
    assert run.status == "cancelled"


def test_the_sweep_task_is_the_experiment(one_thread):
    assert wb.sweeps.train_task is train.task
    out = train.task("digits", steps=4, d_model=8, n_layers=1, d_hidden=8)
    ref = train.run("digits", model={"seed": 0, "d_model": 8, "n_layers": 1, "d_hidden": 8},
                    train={"steps": 4, "eval_every": 4, "lr": 1e-3, "batch_size": 64, "eval_max": 0, "seed": 0})
    assert out["status"] == "done"
    assert {r["metric"]: r["value"] for r in out["rows"]}["val_loss"] == ref.final("loss", "val")


def test_the_pages_as_code_box_trains_what_the_page_trained(store, run_code, without_time, one_thread):
    from workbench.ui import App

    page = App(store=store).pages["Train"]
    page.dataset_widgets["val_fraction"].value = 0.25
    for key, value in CHOICES["model"].items():
        page.model_widgets[key].value = value
    for key, value in CHOICES["train"].items():
        page.train_widgets[key].value = value
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    scope = run_code(page.code.object)
    pd.testing.assert_frame_equal(without_time(scope["run"].metrics), without_time(page.last_run.metrics))
    shown = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    assert shown == train.as_code(page.dataset.value, *page.configs())
