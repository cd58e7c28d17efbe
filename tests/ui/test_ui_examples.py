"""First contact in Python: the Start here tab, every page opening on a starter example (a figure with data,
the note saying so), examples that arrive while a page is open, a user's own job replacing the example, the
Remove / Restore buttons, the Teacher tab for teachers only, and a status line that is never squeezed.

The examples are one real set in tiny mode (a few steps of each pipeline) made once for the module.
"""
import shutil

import pandas as pd
import panel as pn
import pytest

import workbench as wb
from workbench.runtime import examples
from workbench.ui import App
from workbench.ui.examples import example_ids
from workbench.ui.page import pages
from workbench.ui.start import LINES, StartPage
from workbench.ui.task import BackgroundTask

NO_NOTE = {"Start here", "Runs"}   # their figure is the example itself (the Start page's, a selected row)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("examples")
        examples.make(wb.RunStore(root), tiny=True)
    finally:
        torch.set_num_threads(threads)
    return root


def _points(fig) -> int:
    """The most points of any trace of a plotly figure (x, y or z values)."""
    data = fig.to_dict()["data"] if hasattr(fig, "to_dict") else (fig or {}).get("data", [])
    best = 0
    for trace in data:
        for key in ("x", "y", "z"):
            v = trace.get(key)
            if v is not None and not isinstance(v, (str, int, float)):
                best = max(best, len(v))
    return best


def _figures(page) -> list:
    """The visible figures next to the side column (the page's first view)."""
    side, main = page.__panel__().objects[1].objects
    return [p.object for p in main.select(pn.pane.Plotly) if p.visible]


def test_every_page_opens_on_an_example_with_data_and_says_so(made):
    app = App(store=wb.RunStore(made))
    assert list(app.pages)[0] == "Start here" and "Teacher" not in app.pages
    for title in app.pages:
        page = app.show(title)
        if page.task is not None and page.task.job is not None:   # the Residual page analyses its example
            page.task.wait(120)
            page.task.poll()
            assert page.task.status == "done", (title, page.task.error)
        assert page.showing_example, title
        assert not page.errors.text, (title, page.errors.text)
        assert any(_points(fig) >= 2 for fig in _figures(page)), title
        assert page.example_note.visible == (title not in NO_NOTE), title
    ids = example_ids(app.datastore)
    assert app.pages["Connectivity"].run_a.value == ids["pair-a"] and app.pages["Connectivity"].run_b.value == ids["pair-b"]
    assert app.pages["Residual stream"].run_select.value == ids["grow-1"]
    assert app.pages["Depth lab"].run.value == ids["grow-1"] and app.pages["Runs"].selected_id == ids["pair-a"]
    assert sorted(app.pages["Compose"].specialists.value) == sorted([ids["compose-grammar"], ids["compose-arithmetic"]])
    assert app.pages["Grokking"].inputs["p"].value == examples.GROK["p"]   # the form holds the example's config
    assert len(app.pages["Grow"].view.stages) == 2


def test_the_start_page_says_what_each_page_measures_and_lists_the_examples(made):
    page = StartPage(wb.ui.session.DataStore(wb.RunStore(made)))
    page.__panel__()
    assert {cls.title for cls in pages()} - {"Start here"} <= set(LINES)   # one line each, none left to a fallback
    for cls in pages():
        if cls.title not in ("Start here", "Teacher"):
            assert f"**{wb.ui.text.escape_md(cls.title)}**" in page.pages_table.object, cls.title
    assert "Teacher" not in page.pages_table.object                       # no sign-in: no Teacher tab
    assert all(wb.ui.text.escape_md(e.name) in page.examples_list.object for e in examples.EXAMPLES)
    assert "**Grow**" in page.where.object and page.examples_panel.remove_button.visible


def test_examples_that_arrive_while_a_page_is_open_are_shown(made, tmp_path):
    store = wb.RunStore(tmp_path / "home")
    app = App(store=store)
    connectivity, train = app.show("Connectivity"), app.show("Train")
    assert not connectivity.showing_example and not train.showing_example
    assert _points(connectivity.view.curves_pane.object) == 0
    for run in (made / "runs").iterdir():   # the examples job saving its runs into this store
        if not run.name.startswith("."):
            shutil.copytree(run, store.runs_dir / run.name)
    shutil.copy(made / examples.STATE_FILE, store.root / examples.STATE_FILE)
    store.reconcile()
    app.datastore.refresh()                   # what the progress bar does when a step of the job ends
    assert connectivity.showing_example and train.showing_example
    assert _points(connectivity.view.curves_pane.object) >= 2


def test_a_users_own_job_replaces_the_example(made, tmp_path):
    root = tmp_path / "home"
    shutil.copytree(made, root)
    app = App(store=wb.RunStore(root))
    train = app.show("Train")
    assert train.showing_example and train.example_note.visible
    train.train_widgets["steps"].value = 2
    train.train_widgets["eval_every"].value = 1
    train.start(wait=True)
    assert train.task.status == "done" and not train.showing_example and not train.example_note.visible
    assert train.last_run_id in set(app.datastore.runs["run_id"])
    app.datastore.refresh()
    assert not train.showing_example          # the example does not come back over the user's run


def test_remove_and_restore_buttons_run_as_jobs_and_keep_the_users_runs(made, tmp_path, monkeypatch):
    root = tmp_path / "home"
    shutil.copytree(made, root)
    store = wb.RunStore(root)
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1))
    metrics = pd.DataFrame({"step": [1], "split": ["val"], "metric": ["loss"], "value": [2.0]})
    mine = store.save(wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), metrics=metrics,
                                      dataset={"name": "digits", **wb.data.check_options("digits")}, name="mine"))
    app = App(store=store)
    panel = app.pages["Runs"].examples_panel
    assert panel.remove_button.visible and panel.act("remove")
    examples.running(store).wait(60)
    panel.poll()                              # the session's periodic callback: the job ended
    assert example_ids(app.datastore) == {} and list(app.datastore.runs["run_id"]) == [mine]
    assert "No example runs" in panel.state.object

    def one_run_each(saver, tiny, monitor):   # a fast stand-in for the set's pipelines
        for e in examples.EXAMPLES:
            saver.save(wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), metrics=metrics,
                                       dataset={"name": "digits", **wb.data.check_options("digits")}, name="x"),
                       role=e.role)

    monkeypatch.setattr(examples, "_STEPS", (("stand-in", one_run_each, 1.0),))
    assert panel.act("restore")
    examples.running(store).wait(60)
    panel.poll()
    assert len(example_ids(app.datastore)) == len(examples.EXAMPLES) and mine in set(app.datastore.runs["run_id"])


def test_the_teacher_tab_is_for_teachers_in_classroom_mode_only(store, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    assert "Teacher" not in App(store=store).pages                       # no sign-in (a laptop)
    assert "Teacher" not in App(store=store, user="student01").pages
    assert "Teacher" in App(store=store, user="teach").pages


def test_the_status_line_has_a_line_of_its_own_under_the_bar_and_stop():
    task = BackgroundTask()
    controls = task.controls()
    bar_row, text = controls.objects
    assert isinstance(bar_row, pn.Row) and text not in bar_row.objects
    assert [type(o) for o in bar_row.objects] == [pn.indicators.Progress, pn.widgets.Button]
    assert text.sizing_mode == "stretch_width" and text.width is None   # as wide as the side column
    task.message = "stopped: the worker returned nothing in time"
    assert text.object == wb.ui.text.escape_md(task.message)            # the whole text, not clipped to a width
