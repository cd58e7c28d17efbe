"""Train and Runs pages driven in Python (no server), plus the shared BackgroundTask."""
import threading

import pytest

import workbench as wb
from workbench.ui import App
from workbench.ui.task import BUSY, BackgroundTask


@pytest.fixture
def app(store):
    return App(store=store)


def test_training_from_the_page_saves_a_run_and_draws_curves(app, store):
    page = app.pages["Train"]
    page.train_widgets["steps"].value = 40
    page.train_widgets["eval_every"].value = 20
    page.run_name.value = "from-ui"
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    listing = store.list()
    assert list(listing["name"]) == ["from-ui"] and listing.loc[0, "steps"] == 40
    names = {t.name for t in page.plot.object.data}
    assert {"batch loss", "train loss", "val loss", "val acc"} <= names
    assert "wb.data.load('digits'" in page.code.object


def test_sequence_dataset_switches_to_transformer_widgets(app):
    page = app.pages["Train"]
    page.dataset.value = "modadd"
    assert "n_heads" in page.model_widgets and "d_in" not in page.model_widgets
    page.dataset_widgets["p"].value = 7
    page.model_widgets["d_model"].value = 16
    page.model_widgets["n_heads"].value = 2
    page.train_widgets["steps"].value = 5
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.last_run.model.config.vocab_size == 9


def test_number_widgets_start_and_end_at_the_bounds_the_configs_declare(app):
    """Spinners stop at the declared bounds (start/end); the family's own bounds after a switch."""
    from workbench.core.checks import Interval, constraints

    page = app.pages["Train"]
    assert (page.model_widgets["d_model"].start, page.model_widgets["d_model"].end) == (1, 8192)
    page.dataset.value = "modadd"
    assert (page.model_widgets["d_model"].start, page.model_widgets["d_model"].end) == (1, 16384)
    for widgets, config in ((page.model_widgets, wb.models.TransformerConfig), (page.train_widgets, wb.TrainConfig)):
        for name, c in constraints(config).items():
            if name in widgets and isinstance(c, Interval):
                assert (widgets[name].start, widgets[name].end) == (c.lo, c.hi), name


def _engine_message(check) -> str:
    with pytest.raises(ValueError) as info:
        check()
    return str(info.value)


@pytest.mark.parametrize("where, field, value, check", [
    ("model_widgets", "d_model", 0, lambda: wb.models.MLPConfig(d_in=64, n_classes=10, d_model=0).validate()),
    ("train_widgets", "lr", 50.0, lambda: wb.TrainConfig(lr=50.0).validate()),
    ("dataset_widgets", "val_fraction", 0.9, lambda: wb.data.check_options("digits", val_fraction=0.9)),
])
def test_bad_input_shows_a_message_and_starts_nothing(app, store, where, field, value, check):
    """The page shows the engine's own message (which names the field and the value) and starts nothing."""
    page = app.pages["Train"]
    getattr(page, where)[field].value = value
    page.start(wait=True)
    message = _engine_message(check)
    assert page.errors.text == message and field in message and str(value) in message
    assert page.task.status == "idle" and len(store.list()) == 0


def test_runs_page_selects_exports_and_deletes(app, store):
    train = app.pages["Train"]
    train.train_widgets["steps"].value = 10
    train.start(wait=True)
    runs = app.pages["Runs"]
    assert len(runs.table.value) == 1
    runs.select(train.last_run_id)
    assert runs.plot.object.data and len(runs.config_view.value) > 10
    csv = runs._metrics_csv().getvalue()
    assert csv.splitlines()[0].startswith("step,split,metric,value")
    runs._ask_delete()
    assert runs.confirm_button.visible
    runs.delete_selected()
    assert len(store.list()) == 0 and len(runs.table.value) == 0


def test_runs_page_survives_a_corrupt_run(app, store):
    train = app.pages["Train"]
    train.train_widgets["steps"].value = 5
    train.start(wait=True)
    (store.runs_dir / train.last_run_id / "run.json").write_text("garbage")
    runs = app.pages["Runs"]
    runs.select(train.last_run_id)
    assert "not valid JSON" in runs.errors.text


def test_background_task_runs_in_a_thread_reports_and_stops():
    updates, done = [], []
    task = BackgroundTask(on_update=updates.append, on_done=done.append)
    release = threading.Event()

    def work(ctx):
        ctx.report(1, progress=0.5)
        release.wait(5)
        while not ctx.stopped:
            pass
        return "stopped"

    task.start(work)
    assert task.running
    assert task.start(work) is False and task.notice == BUSY  # refused with a notice, not an exception
    task.stop()
    release.set()
    task.join(5)
    assert updates == [1] and done == ["stopped"] and task.status == "cancelled"


def test_background_task_reports_errors_without_raising():
    task = BackgroundTask()
    task.run_now(lambda ctx: wb.data.load("khop", hops=99))
    assert task.status == "error" and "khop.hops must be" in task.error and "got 99" in task.error


def test_two_sessions_train_at_once_without_interfering(store):
    """Two browser sessions = two App instances over one store, training on worker threads together."""
    apps = [App(store=store), App(store=store)]
    for i, a in enumerate(apps):
        page = a.pages["Train"]
        page.train_widgets["steps"].value = 30 + 10 * i
        page.model_widgets["n_layers"].value = 1 + i
        page.run_name.value = f"session-{i}"
        page.start()  # background thread (no server: the worker applies updates itself)
    for a in apps:
        a.pages["Train"].task.join(120)
    runs = [a.pages["Train"].last_run for a in apps]
    assert [r.name for r in runs] == ["session-0", "session-1"]
    assert [r.model.config.n_layers for r in runs] == [1, 2]
    assert [int(r.metrics["step"].max()) for r in runs] == [30, 40]
    assert sorted(store.list()["name"]) == ["session-0", "session-1"]
