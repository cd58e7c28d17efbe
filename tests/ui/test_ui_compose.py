"""Compose page driven in Python: train two specialists, compose, read the table, sample text."""
import panel as pn
import pytest

import workbench as wb
from workbench.ui.session import DataStore
from workbench.ui.compose import ComposePage


@pytest.fixture
def page(store):
    return ComposePage(DataStore(store))


def test_page_shows_empty_figures_and_the_engines_merges(page):
    layout = page.__panel__()
    assert page.heatmap in layout.select(pn.pane.Plotly) and page.heatmap.object.data == ()
    for pane in (page.cosines, page.knob_plot, page.sequence_plot):
        assert pane in layout.select(pn.pane.Plotly) and pane.object.data == ()
    assert "model x domain" in page.heatmap.object.layout.title.text
    # the merge menu: the page's mixtures and every weight-space merge of the engine's registry
    assert page.merges.options == ["logit mean", "probability mixture", "gated mixture"] + [
        m.replace("_", " ") for m in wb.compose.MERGES]
    assert page.specialists.options == {} and "at least one specialist" not in page.errors.text
    page.run_compose(wait=True)
    page.run_compose(wait=True)
    assert "at least one specialist" in page.errors.text
    page.sample(wait=True)
    assert "compose first" in page.errors.text


def test_train_two_compose_and_sample(page, store):
    page.train_steps.value = 20
    page.n_layers.value = 1
    page.train_two(wait=True)
    assert page.train_task.status == "done", page.train_task.error
    listed = store.list()
    assert len(listed) == 3 and set(listed["group_name"]) == {"compose"}
    assert len(page.specialists.value) == 2 and page.base.value in set(listed["run_id"])
    base_run = store.load(page.base.value)
    assert [p["corpus"] for p in base_run.meta["trained_on"]] == ["grammar", "arithmetic"]
    wb.data.load(**base_run.dataset)  # every stored run keeps a loadable dataset spec
    page.merges.value = ["logit mean", "gated mixture", "ties", "lines"]
    page.run_compose(wait=True)
    assert page.compose_task.status == "done", page.compose_task.error
    table = page.result["table"]
    assert set(table["domain"]) == {"grammar", "arithmetic"}
    assert set(table["model"]) == {"grammar", "arithmetic", "logit mean", "gated mixture", "ties", "lines", "base"}
    heat = page.heatmap.object.data[0]
    assert len(heat.y) == 7 and list(heat.x) == ["grammar", "arithmetic"]
    assert set(page.summary.object["model"]) == set(table["model"])
    # the logit mixtures are offered to the Residual stream page of this session (not saved in the store)
    session = page.datastore.session_models
    assert list(session) == ["mixture: logit mean (grammar + arithmetic)",
                             "mixture: gated mixture (grammar + arithmetic)"]
    assert session["mixture: logit mean (grammar + arithmetic)"] is page.result["models"]["logit mean"]
    assert page.datastore.session_info["mixture: gated mixture (grammar + arithmetic)"]["members"] == [
        "grammar", "arithmetic"]
    assert len(store.list()) == 3
    # the "as code" box rebuilds the same table from the store
    code = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    scope = {}
    exec(code, scope)
    assert scope["table"]["value"].round(5).tolist() == table["value"].round(5).tolist()
    page.metric.value = "acc"
    assert page.heatmap.object.data[0].colorbar.title.text == "acc"
    page.sample_model.value = "logit mean"
    page.prompt.value = "The "
    page.n_chars.value = 30
    page.sample(wait=True)
    assert page.errors.text == ""
    text = page.sample_out.object
    assert "The " in text and len(text) > 30
    page.prompt.value = "~"  # not in the vocabulary
    page.sample(wait=True)
    assert "not in the vocabulary" in page.errors.text
    assert page.cosines.object.data != () and page.knob_plot.object.data == () and page.sequence_plot.object.data == ()
    _new_merges_cosines_slerp_sweep_and_sequential_curve(page, store)


def test_compose_refuses_specialists_on_different_substrates(page, store):
    for seed, corpus in ((0, "grammar"), (1, "code")):
        ds = wb.data.load("text", corpus=corpus, context=16, corpus_chars=2000)
        model = wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                                                     embedding="frozen-random", seed=seed))
        page.datastore.save(wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16)))
    page.specialists.value = list(store.list()["run_id"])
    page.merges.value = ["logit mean"]
    page.run_compose(wait=True)
    assert page.compose_task.status == "error"
    assert "different vocabularies" in page.compose_task.error


def _new_merges_cosines_slerp_sweep_and_sequential_curve(page, store):
    """DARE, SLERP, Model Stock and OPCM on the page (run on the specialists trained by the test above)."""
    page.metric.value = "loss"
    page.merges.value = ["slerp", "opcm", "dare", "model stock"]
    page.t.value = 1.5
    page.run_compose(wait=True)
    assert "t must be a number in [0.0, 1.0]" in page.errors.text
    page.t.value = 0.0
    page.density.value = 1.0   # DARE at density 1 is task arithmetic
    page.run_compose(wait=True)
    assert page.compose_task.status == "done", page.compose_task.error
    table = page.result["table"].set_index(["model", "domain", "metric"])["value"]
    for domain in ("grammar", "arithmetic"):   # SLERP at t=0 is the first specialist
        assert table["slerp", domain, "loss"] == table["grammar", domain, "loss"]
    cos = page.cosines.object.data[0]
    assert list(cos.x) == ["grammar", "arithmetic"] and cos.z[0][0] == pytest.approx(1.0)
    ref = wb.compose.task_cosines(store.load(page.base.value).model, [page.result["models"]["grammar"],
                                                                     page.result["models"]["arithmetic"]])
    assert cos.z[0][1] == pytest.approx(ref["cosine"].iloc[1])
    page.metric.value = "acc"
    knob = page.knob_plot.object.data
    assert [tr.name for tr in knob] == ["grammar", "arithmetic", "mean"] and list(knob[0].x) == [0, 0.25, 0.5, 0.75, 1]
    seq = page.sequence_plot.object.data
    assert [tr.name for tr in seq] == list(wb.compose.SEQUENTIAL) and list(seq[0].x) == [1, 2]
    # one task merged: every method's merge is the first specialist (OPCM and averaging exactly scaled by 1)
    assert seq[1].y[0] == pytest.approx(table["grammar", "grammar", "acc"], abs=0.02)
    code = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    scope = {}
    exec(code, scope)
    assert scope["table"]["value"].round(5).tolist() == page.result["table"]["value"].round(5).tolist()
    assert scope["sequence"]["value"].round(5).tolist() == page.result["sequence"]["value"].round(5).tolist()


def test_a_specialist_or_base_that_vanished_or_was_forged_is_refused_in_the_page(page, store, tmp_path):
    """Item 11 of issue 21: the refusal names the field and says why, in the error box (no server path)."""
    page.merges.value = ["logit mean", "ties"]
    page.specialists.param.update(value=["not-a-run"])       # what a hostile client can send
    page.run_compose(wait=True)
    assert page.compose_task.status == "error" and page.errors.text.startswith("specialists: ")
    assert str(tmp_path) not in page.errors.text
