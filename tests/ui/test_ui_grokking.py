"""Grokking page driven from Python: a tiny config trains through the page's task and fills every figure;
bad fields are refused with a message naming the field."""
import math

import pytest

pn = pytest.importorskip("panel")

from workbench import grokking  # noqa: E402
from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.grokking import GrokkingPage  # noqa: E402
from workbench.ui.page import pages  # noqa: E402


def _tiny(page):
    for name, value in {"p": 7, "train_fraction": 0.5, "d_model": 8, "n_heads": 2, "d_mlp": 16, "steps": 20,
                        "eval_every": 10, "every": 10, "n_key": 2}.items():
        page.inputs[name].value = value


def _tiny_threshold(page):
    page.t_ratios.value, page.t_M.value, page.t_hidden.value, page.t_epochs.value = "0.5, 1.5", 11, 16, 20


def test_page_is_registered_and_form_holds_the_defaults(store):
    assert GrokkingPage in pages()
    page = GrokkingPage(DataStore(store))
    assert page.config() == grokking.GrokConfig()


def test_tiny_run_fills_curves_heatmap_and_measures(store):
    page = GrokkingPage(DataStore(store))
    page.__panel__()
    _tiny(page)
    _tiny_threshold(page)   # the "As code" box holds the threshold sweep too, run below
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    m = page.results["metrics"]
    assert sorted(m[m["split"] == "measure"]["step"].unique()) == [0, 10, 20]
    names = {t.name for t in page.loss_plot.object.data}
    assert {"train loss", "val loss", "train acc", "val acc"} <= names
    heat = page.fourier_plot.object.data[0]
    assert list(heat.y) == [1, 2, 3] and list(heat.x) == [0, 10, 20]   # (p - 1) / 2 frequencies x steps
    assert any(t.name.startswith("restricted loss") for t in page.measure_plot.object.data)
    assert "final train accuracy" in page.status.object
    code = page.code.object
    assert "grokking.GrokConfig(p=7" in code
    scope = {}   # the "As code" box runs as a notebook would, to the same metrics (same seed)
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), "<as code>", "exec"), scope)
    assert scope["ph"] == page.results["phases"]
    assert scope["run"].metrics.query("split == 'measure'")["value"].tolist() == pytest.approx(
        m.query("split == 'measure'")["value"].tolist(), rel=1e-6)


def test_bad_fields_get_a_message_and_do_not_start(store):
    page = GrokkingPage(DataStore(store))
    page.inputs["p"].value = 9
    page.train(wait=True)
    assert "p must be a prime" in page.errors.text
    assert page.results == {}
    page.inputs["p"].value = 7
    page.inputs["n_key"].value = 4
    page.train(wait=True)
    assert "n_key must be an integer in [1, 3], got 4" in page.errors.text


def test_threshold_section_runs_per_ratio_and_matches_its_code(store, one_thread):
    page = GrokkingPage(DataStore(store))
    page.__panel__()
    _tiny(page)
    _tiny_threshold(page)
    seen = []
    shown = page.on_update
    page.on_update = lambda payload: (seen.append(len(payload["threshold"])) if isinstance(payload, dict)
                                      and "threshold" in payload else None, shown(payload))
    page.run_threshold(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    assert seen == [1, 2]                    # progress per ratio
    t = page.threshold
    assert list(t["ratio"]) == [0.5, 1.5] and list(t["n"]) == [round(r * 11 * math.log(11)) for r in (0.5, 1.5)]
    names = [tr.name for tr in page.threshold_plot.object.data]
    assert names == ["test accuracy (here)", "train accuracy", "Tian 2025"]
    assert list(page.threshold_plot.object.data[2].x) == list(grokking.TIAN_REPORTED)
    lines = [s for s in page.threshold_plot.object.layout.shapes if s.x0 == s.x1]
    assert [s.x0 for s in lines] == [grokking.TIAN_CRITICAL]    # the critical line
    assert "test accuracy here" in page.threshold_status.object
    assert page.results == {}                # the grokking run's results are left alone
    code = page.code.object
    assert "grokking.tian_threshold(ratios=[0.5, 1.5], M=11, epochs=20, hidden=16" in code
    scope = {}   # the whole "As code" box (the grokking run tiny too) gives the same table
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), "<as code>", "exec"), scope)
    assert scope["table"]["test_acc"].tolist() == t["test_acc"].tolist()
    assert scope["table"]["train_acc"].tolist() == t["train_acc"].tolist()


@pytest.mark.parametrize("field, value, message", [
    ("t_ratios", "1.0, x", "ratios: value 2 must be a finite number in (0, 4.587), got 'x'"),
    ("t_ratios", "1.0, 5.0", "ratios: value 2 must be a finite number in (0, 4.587), got 5.0"),
    ("t_epochs", 0, "epochs must be an integer in [1, 100000], got 0"),
    ("t_M", 2, "M must be an integer in [3, 211], got 2"),
    ("t_weight_decay", -1.0, "weight decay must be a finite number in [0, 10], got -1.0"),
])
def test_threshold_bad_fields_get_a_message_and_do_not_start(store, field, value, message):
    page = GrokkingPage(DataStore(store))
    page.t_M.value, page.t_ratios.value = 11, "1.0, 2.0"
    getattr(page, field).value = value
    page.run_threshold(wait=True)
    assert message in page.errors.text
    assert page.threshold is None and page.task.status == "idle"
