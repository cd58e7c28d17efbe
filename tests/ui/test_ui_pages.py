"""The Page base: the registry, the layout, every page's "As code" snippet executed, a damaged run index.

The snippets run against a temporary store (WORKBENCH_HOME, from the ``store`` fixture), with tiny step
counts set through the pages' own widgets, so a snippet that no longer matches the engine fails here.
"""
import importlib.util
import os

import panel as pn
import pytest

import workbench as wb
from workbench.ui import App
from workbench.ui.text import escape_md
from workbench.ui.page import REGISTRY, Page, pages

TITLES = ["Start here", "Train", "Grow", "Residual stream", "Depth lab", "Connectivity", "Collapse", "Compose", "Sweeps", "Scaling laws", "Unroll & learngene", "Grokking",
          "Runs"]
if importlib.util.find_spec("workbench.ui.teacher") is not None:   # the classroom's Teacher page, last
    TITLES.append("Teacher")


def _exec(page) -> dict:
    """Run the page's "As code" box as a notebook would; returns the snippet's variables."""
    page.show_code()
    code = page.code.object
    assert code.startswith("```python\n") and code.endswith("\n```")
    scope = {}
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), f"<{page.title} as code>", "exec"), scope)
    return scope


@pytest.fixture
def app(store):
    return App(store=store)


SHOWN = [t for t in TITLES if t != "Teacher"]   # without sign-in: no Teacher tab (only teachers get one)


def test_every_page_is_registered_in_order_and_the_app_shows_the_registry(app):
    assert [cls.title for cls in pages()] == TITLES
    assert list(app.pages) == SHOWN and [t.title for t in app.pages.values()] == SHOWN
    assert [name for name, _ in zip(app.tabs._names, app.tabs)] == SHOWN
    assert all(isinstance(p, Page) and p.datastore is app.datastore for p in app.pages.values())


def test_a_session_builds_the_first_tab_at_once_and_each_other_page_when_its_tab_is_shown(store):
    app = App(store=store)
    assert app.pages.built() == ["Start here"]                 # the tab a session lands on
    assert app.tabs[0].objects == [app.pages["Start here"].__panel__()]  # the page's layout, built once
    assert all(not holder.objects for holder in list(app.tabs)[1:])
    app.tabs.active = SHOWN.index("Grokking")                  # a click on the tab, as the browser sends it
    assert app.pages.built() == ["Start here", "Grokking"]
    assert app.tabs[SHOWN.index("Grokking")].objects == [app.pages["Grokking"].__panel__()]
    app.tabs.active = 0
    app.tabs.active = SHOWN.index("Grokking")                  # shown again: the same page, not a new one
    assert app.pages.built() == ["Start here", "Grokking"] and len(app.tabs[SHOWN.index("Grokking")].objects) == 1


def test_a_new_subclass_registers_itself():
    class Extra(Page):
        title = "Extra (test)"
        order = 999

    try:
        assert REGISTRY["Extra (test)"] is Extra and pages()[-1] is Extra
        page = Extra()
        assert page.task is not None and page.task.on_session_end == "stop"
        assert page.__panel__().objects[0].object == "## Extra \\(test\\)"
    finally:
        REGISTRY.pop("Extra (test)")


def test_layout_side_column_figures_and_collapsed_advanced(app):
    for title, page in app.pages.items():
        if title == "Teacher":   # without a signed-in teacher it is one line saying so (its own tests)
            continue
        layout = page.__panel__()
        row = layout.objects[1]
        side, main = row.objects
        assert side.width == Page.side_width
        if page.run_buttons():  # the main Run button (others, e.g. "train a pair", may sit in Advanced)
            assert page.run_buttons()[0] in side.select(pn.widgets.Button), title
        assert all(w.width is None or w.width <= Page.side_width for w in side.select(pn.widgets.Widget)), title
        plots = main.select(pn.pane.Plotly)
        assert plots, title                                     # a figure next to the side column
        assert page.advanced_card.collapsed and page.advanced_card.title == "Advanced"
        assert page.code_card.collapsed and page.code.object.startswith("```python")


def test_run_buttons_are_disabled_while_the_task_runs(app):
    page = app.pages["Connectivity"]
    page.task.status = "running"
    assert all(b.disabled for b in page.run_buttons())
    page.task.status = "done"
    assert not any(b.disabled for b in page.run_buttons())


def test_train_and_runs_and_residual_snippets_run(app, store):
    train = app.pages["Train"]
    train.train_widgets["steps"].value = 4
    train.train_widgets["eval_every"].value = 2
    scope = _exec(train)
    assert int(scope["run"].metrics["step"].max()) == 4 and len(store.list()) == 1
    assert {t.name for t in scope["wb"].figures.training.training_curves(scope["run"].metrics).data} >= {"val loss"}
    app.datastore.refresh()
    run_id = store.list()["run_id"].iloc[0]

    runs = app.pages["Runs"]
    runs.select(run_id)
    assert f"store.load({run_id!r})" in runs.code.object
    assert _exec(runs)["run"].run_id == run_id

    residual = app.pages["Residual stream"]
    assert residual.run_select.value == run_id
    scope = _exec(residual)
    assert tuple(scope["x"].shape) == (256, 64) and scope["model"].config.n_layers == 2
    residual.analyse(wait=True)  # the page's own numbers agree with the snippet's
    contrib = wb.residual.contributions(scope["model"], scope["x"])
    assert contrib["rel_norm"].round(6).tolist() == residual.analysis.contrib["rel_norm"].round(6).tolist()


def test_grow_snippet_runs(app, store):
    page = app.pages["Grow"]
    page.dataset.value = "digits"
    page.model_widgets["d_model"].value, page.model_widgets["d_hidden"].value = 16, 16
    page.train_widgets["eval_every"].value = 2
    page.stage_steps.value = 2
    page.fill_preset()
    scope = _exec(page)
    assert scope["run"].model.config.n_layers == page.final_layers.value == 2
    assert sorted(store.list()["stage"].tolist()) == [0, 1]


def test_collapse_snippet_runs(app):
    page = app.pages["Collapse"]
    page.epochs.value, page.every.value = 2, 1
    scope = _exec(page)
    assert set(scope["tracker"].table["epoch"]) == {0.0, 1.0, 2.0}
    assert scope["geo"]["view"] is not None


def test_connectivity_snippets_run(app, store):
    page = app.pages["Connectivity"]
    assert "wb.lmc.train_pair" in page.code.object or "train_pair" in page.as_code()  # no pair stored yet
    page.pair_width.value, page.pair_layers.value, page.pair_steps.value = 8, 1, 3
    scope = _exec(page)
    assert len(store.list()) == 2
    app.datastore.refresh()
    assert {page.run_a.value, page.run_b.value} == {scope["RUN_A"], scope["RUN_B"]}
    page.n_alphas.value, page.resolution.value, page.max_examples.value = 3, 3, 64
    page.spawn_steps.value, page.inst_steps.value = "0, 1", 2
    scope = _exec(page)
    assert set(scope["curves"]["method"]) == {"none", "weights", "activations", "repair"}
    assert len(scope["curves"]) > 0


def test_compose_snippet_runs(app):
    page = app.pages["Compose"]
    page.train_steps.value, page.n_layers.value = 2, 1
    page.merges.value = ["logit mean", "ties"]
    assert "wb.compose.merge('ties', base, ms, density=0.2, scale=1.0)" in page.as_code()
    scope = _exec(page)
    assert set(scope["table"]["model"]) >= {"grammar", "arithmetic", "logit mean", "ties"}
    assert isinstance(scope["sampling"].sample_text(scope["ms"][0], scope["cfg"].vocab, n_chars=5, seed=0), str)


def test_sweeps_snippet_runs_and_gives_the_pages_table(app):
    page = app.pages["Sweeps"]
    page.task_select.value = "barrier"
    page.values[0].value, page.seeds.value = "8", "0"
    page.fixed.value = "dataset = digits\nsteps = 3\nn_layers = 1\nd_hidden = 8\nn_alphas = 3\nmax_examples = 64"
    scope = _exec(page)
    assert set(scope["df"]["metric"]) == {"loss_barrier", "error_barrier", "acc_a", "acc_b"}
    assert scope["wb"].figures.sweeps.barrier_vs_width(scope["df"]).data
    page.run_sweep(wait=True)
    assert page.errors.text == ""
    cols = ["alignment", "metric", "value"]
    assert page.result[cols].fillna("").values.tolist() == scope["df"][cols].fillna("").values.tolist()


# ----------------------------------------------------------------------------- a damaged run index (issue 10)
def test_a_corrupt_index_is_reported_and_rebuilt_from_the_page(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    store = wb.RunStore(home)
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.config_for(ds, d_model=8, n_layers=1, d_hidden=8))
    run_id = store.save(wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2), name="<b>kept</b>"))
    (home / "index.sqlite").write_bytes(os.urandom(4096))   # random bytes: not an SQLite file

    app = App(store=wb.RunStore(home))
    ds_ = app.datastore
    assert "index.sqlite" in ds_.index_error and "rebuild_index" in ds_.index_error
    assert len(ds_.runs) == 0
    runs = app.pages["Runs"]
    assert len(runs.table.value) == 0
    notice = runs.index_notice
    assert notice.layout.visible and escape_md(ds_.index_error) in notice.alert.object
    assert "<" not in notice.alert.object.replace("&lt;", "")     # the message shown escaped
    # every page offers the repair; pressing it rebuilds the index and lists the run again
    assert all(p.index_notice.layout.visible for p in app.pages.values())
    notice.button.clicks += 1
    notice.task.join(60)                                  # a job of the queue, not the click handler
    assert ds_.index_error == "" and not notice.layout.visible
    assert list(runs.table.value["run_id"]) == [run_id] and list(runs.table.value["name"]) == ["<b>kept</b>"]
    assert app.pages["Residual stream"].run_select.value == run_id
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("index.sqlite.bak-"))  # the old file kept


def test_runs_page_lists_run_folders_that_fail_validation(app, store):
    train = app.pages["Train"]
    train.train_widgets["steps"].value = 2
    train.start(wait=True)
    bad = store.runs_dir / "20200101-000000-broken-abcdef"
    bad.mkdir()
    (bad / "run.json").write_text("<script>not json</script>")
    app.datastore.rebuild_index()
    runs = app.pages["Runs"]
    assert list(runs.broken_view.value["run_id"]) == [bad.name] and runs.broken_view.visible
    assert "1 run folder(s) fail validation" in runs.broken_note.object
    assert list(runs.table.value["run_id"]) == [train.last_run_id]
