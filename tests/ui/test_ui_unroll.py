"""Unroll & learngene page driven from Python: train a small model or pick a stored run, every figure
filled; expansion experiment; bad choices refused with a message naming the control."""
import pytest

pn = pytest.importorskip("panel")

import workbench as wb  # noqa: E402
from workbench import models  # noqa: E402
from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.page import pages  # noqa: E402
from workbench.ui.unroll import UnrollPage  # noqa: E402


def _small(page):
    page.d_model.value, page.n_layers.value, page.steps.value = 16, 3, 10
    page.finetune.value, page.max_examples.value = 5, 64


def test_page_is_registered():
    assert UnrollPage in pages()


def test_train_a_model_fills_gap_bars_and_r2(store):
    page = UnrollPage(DataStore(store))
    page.__panel__()
    assert page.run.options == {}
    page.source.value = "train a model"
    _small(page)
    page.analyse(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    gap = page.results["gap"]
    assert sorted(gap["depth"].unique()) == [1, 2, 3]
    names = {t.name for t in page.gap_plot.object.data}
    assert any(n.startswith("gap") for n in names) and "first-order (parallel)" in names
    assert list(page.compare_plot.object.data[0].x) == ["deep", "unrolled", "unrolled + fine-tuned"]
    assert list(page.r2_plot.object.data[0].x) == list(page.results["r2"]["param"])
    assert "validation accuracy deep" in page.status.object
    assert "unroll.gap(model" in page.code.object


def test_stored_run_is_analysed(store):
    ds = wb.data.load("digits")
    model = models.build(models.config_for(ds, d_model=16, d_hidden=16, n_layers=2))
    run_id = store.save(wb.train(model, ds, wb.TrainConfig(steps=5, eval_every=5, eval_max=64)))
    page = UnrollPage(DataStore(store))
    assert page.run.value == run_id
    _small(page)
    page.analyse(wait=True)
    assert page.task.status == "done", page.task.error
    assert sorted(page.results["gap"]["depth"].unique()) == [1, 2]
    assert run_id in page.code.object


def test_expansion_experiment_draws_both_inits(store):
    page = UnrollPage(DataStore(store))
    page.d_model.value = 16
    page.min_depth.value, page.max_depth.value = 2, 3
    page.aux_layers.value, page.aux_steps.value, page.child_steps.value = 2, 5, 3
    page.expand(wait=True)
    assert page.task.status == "done", page.task.error
    table = page.results["expansion"]
    assert set(table["init"]) == {"learngene", "random"} and set(table["depth"]) == {2, 3}
    assert {t.name for t in page.expansion_plot.object.data} >= {"learngene", "random"}


def test_bad_choices_get_a_message_and_do_not_start(store):
    page = UnrollPage(DataStore(store))
    page.analyse(wait=True)
    assert "no stored run to analyse" in page.errors.text
    page.source.value = "train a model"
    page.n_layers.value = 0
    page.analyse(wait=True)
    assert "n_layers must be an integer in [1, 24], got 0" in page.errors.text
    page.n_layers.value = 3
    page.min_depth.value, page.max_depth.value = 5, 3
    page.expand(wait=True)
    assert "'to' (3) must be at least 'from' (5)" in page.errors.text
    page.finetune.value = None
    page.analyse(wait=True)
    assert "fine-tune steps must be an integer" in page.errors.text
    assert page.task.status == "idle"


def test_as_code_reproduces_the_page(store):
    page = UnrollPage(DataStore(store))
    page.source.value = "train a model"
    _small(page)
    page.min_depth.value, page.max_depth.value = 2, 2
    page.aux_layers.value, page.aux_steps.value, page.child_steps.value = 2, 3, 2
    page.analyse(wait=True)
    assert page.task.status == "done", page.task.error
    code = page.as_code()
    assert code.count("import workbench as wb") == 1
    scope: dict = {}
    exec(compile(code, "<as code>", "exec"), scope)
    import pandas as pd

    mine = scope["unroll"].gap(scope["model"], *scope["ds"].split("val"), unit="block", max_examples=64)
    pd.testing.assert_frame_equal(mine, page.results["gap"])
    assert set(scope["table"]["depth"]) == {2}


def test_learngene_depth_follows_the_deepest_descendant_until_set(store):
    """TLEG's auxiliary model is as deep as the deepest descendant: the field follows "to"."""
    page = UnrollPage(DataStore(store))
    assert page.aux_layers.value == page.max_depth.value == 8
    page.max_depth.value = 6
    assert page.aux_layers.value == 6
    page.aux_layers.value = 3          # the user's own choice is kept
    page.max_depth.value = 7
    assert page.aux_layers.value == 3


def test_a_stored_run_that_vanished_or_was_forged_is_refused_in_the_page(store, tmp_path):
    """Item 11 of issue 21: the refusal names the field and says why, in the error box (no server path)."""
    ds = wb.data.load("digits")
    model = models.build(models.config_for(ds, d_model=16, d_hidden=16, n_layers=2))
    run_id = store.save(wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16)))
    page = UnrollPage(DataStore(store))
    _small(page)
    for forged in ("not-a-run", "../../etc/passwd", run_id[:-1] + ("0" if run_id[-1] != "0" else "1")):
        page.run.param.update(value=forged)              # what a hostile client can send
        page.analyse(wait=True)
        assert page.task.status == "error" and page.errors.text.startswith("stored run: ")
        assert str(tmp_path) not in page.errors.text
    page.run.value = run_id
    store.delete(run_id)                                 # vanishes after it was offered
    page.analyse(wait=True)
    assert page.errors.text.startswith("stored run: ") and "does not exist" in page.errors.text


def test_a_width_the_model_cannot_take_is_named_before_anything_runs(store):
    page = UnrollPage(DataStore(store))
    page.source.value, page.dataset.value = "train a model", "text"
    _small(page)
    page.d_model.value = 18                                  # not divisible by the Transformer's 4 heads
    page.analyse(wait=True)
    assert "d_model (18) must be divisible by n_heads (4)" in page.errors.text and page.task.status == "idle"
