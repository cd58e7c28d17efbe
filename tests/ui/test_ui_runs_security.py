"""The Runs page and the index notice against a hostile student, in Python without a server (issue 21,
items 4 and 5). What the browser can forge -- a Tabulator's rows (``value``) and ``selection`` even when
the table is disabled, a click on a disabled or hidden button -- is set here directly, as Panel would set
it from the client's message; the browser tests (test_browser_classroom_runs.py) send the real messages."""
import html
import io

import pandas as pd
import pytest

import workbench as wb
from workbench.ui import App
from workbench.ui.page import NOT_YOURS_TO_REBUILD


BOB, OUTSIDE = 424242.5, 31337.25


def _run(name):
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=8, n_layers=1,
                                                d_hidden=8))
    return wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16), name=name)


@pytest.fixture
def classroom(store, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    ids = {}
    for user in ("alice", "bob"):
        run = _run(f"{user}-run")
        if user == "bob":
            run.metrics = run.metrics.assign(value=BOB)          # bob's numbers are unmistakable
        ids[user] = store.save(run, owner=user)
    # a metrics.csv outside the store, where "../.." from a run folder would reach
    (store.root.parent / "metrics.csv").write_text(f"step,split,metric,value\n1,val,loss,{OUTSIDE}\n")
    return ids


def _csv(page) -> str:
    out = page._metrics_csv()
    return out.getvalue() if isinstance(out, io.StringIO) else out


def test_a_forged_row_does_not_export_another_users_metrics(classroom, store):
    runs = App(store=store, user="alice").pages["Runs"]
    assert list(runs.rows["run_id"]) == [classroom["alice"]]
    forged = runs.table.value.copy()
    for target in (classroom["bob"], "../..", "../../..", "../" + classroom["bob"]):
        forged.loc[0, "run_id"] = target              # what a forged source.data leaves in the widget's value
        runs.table.value = forged.copy()
        runs.table.selection = [0]
        csv = _csv(runs)
        assert str(BOB) not in csv and str(OUTSIDE) not in csv      # neither bob's nor a file outside the store
        assert csv == store.read_metrics(classroom["alice"]).to_csv(index=False)   # the server's own row 0
        assert runs.errors.text == ""
    assert str(BOB) not in runs.plot.object.to_json() and str(OUTSIDE) not in runs.plot.object.to_json()


@pytest.mark.parametrize("selection", [[5], [-1], [1], [0, 1], [True], ["0"], [None], [10**12]])
def test_an_out_of_range_selection_selects_nothing(classroom, store, selection):
    runs = App(store=store, user="alice").pages["Runs"]
    forged = pd.concat([runs.table.value] * 3, ignore_index=True)
    forged["run_id"] = classroom["bob"]
    runs.table.value = forged
    try:
        runs.table.selection = selection
    except (IndexError, TypeError, ValueError):    # Panel's own watcher may fail on it (logged when served)
        pass
    runs._show_selected()
    assert runs.selected_id is None
    assert _csv(runs) == "" and "select one run" in runs.errors.text       # refused, and said so
    assert runs.delete_button.disabled
    runs.delete_selected()                                                 # a forged click on Delete
    assert set(store.list()["run_id"]) == set(classroom.values())


def test_a_forged_click_on_the_disabled_export_button_exports_nothing(classroom, store):
    runs = App(store=store, user="alice").pages["Runs"]
    assert runs.download.disabled
    runs.download._clicks += 1                     # what the browser sends for a click
    assert (runs.download.data or "").split("base64,")[-1] == ""   # an empty file
    assert "select one run" in runs.errors.text


def test_a_forged_row_cannot_delete_another_users_run(classroom, store):
    runs = App(store=store, user="alice").pages["Runs"]
    forged = runs.table.value.copy()
    forged.loc[0, "run_id"] = classroom["bob"]
    forged.loc[0, "owner"] = "alice"
    runs.table.value = forged
    runs.table.selection = [0]
    runs._ask_delete()
    runs.delete_selected()
    assert set(store.list()["run_id"]) == {classroom["bob"]}               # alice deleted her own row 0 only


def test_the_teacher_exports_any_run_and_the_laptop_too(classroom, store):
    for user in ("teach", None):
        runs = App(store=store, user=user).pages["Runs"]
        runs.select(classroom["bob"])
        assert str(BOB) in _csv(runs) and runs.errors.text == ""


# ----------------------------------------------------------------------------- the index notice


def _break_index(store):
    (store.root / "index.sqlite").write_bytes(b"not an sqlite file" * 100)


def test_a_student_gets_no_rebuild_button_and_a_forged_click_is_refused(classroom, store):
    _break_index(store)
    app = App(store=wb.RunStore(store.root), user="alice")
    notice = app.pages["Runs"].index_notice
    assert notice.layout.visible and not notice.button.visible
    assert "ask your teacher" in notice.alert.object
    notice.button.visible = True                   # unhidden in the browser, then clicked
    notice.button.clicks += 1
    assert notice.task is None                     # no job started
    assert "Rebuild index refused" in notice.alert.object and "teacher" in notice.alert.object
    assert not list(store.root.glob("index.sqlite.bak-*"))
    assert app.datastore.index_error                # still broken: only the teacher repairs it
    assert html.unescape(notice.alert.object.replace("\\", "")).endswith(NOT_YOURS_TO_REBUILD)


def test_the_teachers_rebuild_runs_as_a_job_and_lists_every_run(classroom, store):
    _break_index(store)
    app = App(store=wb.RunStore(store.root), user="teach")
    notice = app.pages["Runs"].index_notice
    assert notice.button.visible
    notice.button.clicks += 1
    assert notice.task is not None and notice.task.job is not None         # submitted to the queue
    assert notice.task.job.name == "rebuild index" and notice.task.job.user == "teach"
    notice.task.join(60)
    assert notice.task.status == "done", notice.task.error
    assert app.datastore.index_error == "" and not notice.layout.visible
    assert sorted(app.pages["Runs"].rows["run_id"]) == sorted(classroom.values())
    assert len(list(store.root.glob("index.sqlite.bak-*"))) == 1
