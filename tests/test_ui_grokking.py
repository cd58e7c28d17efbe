"""Grokking page driven from Python: a tiny config trains through the page's task and fills every figure;
bad fields are refused with a message naming the field."""
import pytest

pn = pytest.importorskip("panel")

from workbench import grokking  # noqa: E402
from workbench.ui.common import DataStore  # noqa: E402
from workbench.ui.grokking import GrokkingPage  # noqa: E402
from workbench.ui.page import pages  # noqa: E402


def _tiny(page):
    for name, value in {"p": 7, "train_fraction": 0.5, "d_model": 8, "n_heads": 2, "d_mlp": 16, "steps": 20,
                        "eval_every": 10, "every": 10, "n_key": 2}.items():
        page.inputs[name].value = value


def test_page_is_registered_and_form_holds_the_defaults(store):
    assert GrokkingPage in pages()
    page = GrokkingPage(DataStore(store))
    assert page.config() == grokking.GrokConfig()


def test_tiny_run_fills_curves_heatmap_and_measures(store):
    page = GrokkingPage(DataStore(store))
    page.__panel__()
    _tiny(page)
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
