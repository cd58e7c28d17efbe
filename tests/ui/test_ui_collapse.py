"""Collapse page driven from Python: a short training run fills every figure and lands in the store."""
import pytest

pn = pytest.importorskip("panel")

from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.collapse import CollapsePage  # noqa: E402


def _small(page, epochs=4):
    page.epochs.value, page.every.value = epochs, 2


def test_training_fills_every_figure_and_saves_the_run(store):
    page = CollapsePage(DataStore(store))
    page.__panel__()
    _small(page)
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    # NC1..NC4 panels drawn on log axes, one line per metric with data
    fig = page.nc_plot.object
    assert {t.name for t in fig.data} >= {"Tr(Σ_W Σ_B⁺)/C", "ETF error (means)", "NCC ≠ network"}
    assert fig.layout.yaxis.type == "log"
    # 3-D means next to the simplex, Gram heat-maps, per-layer lines for the recorded epochs
    kinds = [t.type for t in page.simplex_plot.object.data]
    assert kinds.count("scatter3d") == 3
    assert [t.type for t in page.gram_plot.object.data] == ["heatmap"] * 3
    assert {t.name for t in page.layer_plot.object.data} == {"epoch 0", "epoch 2", "epoch 4"}
    assert set(page.table["epoch"]) == {0.0, 2.0, 4.0}
    runs = store.list()
    assert len(runs) == 1 and runs["name"].iloc[0] == "collapse-digits"
    assert "Saved as" in page.status.object


def test_imbalance_control_shows_minority_collapse_metric(store):
    page = CollapsePage(DataStore(store))
    _small(page, epochs=2)
    page.minority_ratio.value, page.n_minority.value = 0.1, 3
    page.save.value = False
    assert page.options()["imbalance"] == 0.1
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    assert "minority_cos" in set(page.table["metric"])
    curve = page.minority_plot.object.data
    assert len(curve) == 1 and len(curve[0].y) == 2          # epochs 0 and 2
    assert -1 <= min(curve[0].y) <= max(curve[0].y) <= 1
    assert len(store.list()) == 0


def test_bad_values_get_a_message_and_do_not_start(store):
    page = CollapsePage(DataStore(store))
    page.epochs.value = 0
    page.train(wait=True)
    assert "epochs must be an integer >= 1" in page.errors.text
    assert page.task.status == "idle"
    page.epochs.value, page.weight_decay.value = 3, None
    page.train(wait=True)
    assert "weight decay must be a number" in page.errors.text


def test_classifier_menu_reaches_the_recipe(store):
    page = CollapsePage(DataStore(store))
    page.classifier.value = "etf"
    assert page.options()["classifier"] == "etf" and "ebv_tau" not in page.options()
    page.classifier.value, page.ebv_tau.value = "ebv", 0.2
    assert page.options()["classifier"] == "ebv" and page.options()["ebv_tau"] == 0.2
    page.ebv_tau.value = None
    page.train(wait=True)
    assert "EBV temperature must be a number" in page.errors.text
    assert page.task.status == "idle"


def test_ebv_head_with_mixup_fills_the_head_gram_and_mixup_figures(store):
    page = CollapsePage(DataStore(store))
    page.epochs.value, page.every.value = 1, 1
    page.save.value = False
    page.classifier.value, page.mixup.value = "ebv", 0.4
    page.train(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.run.model.config.classifier == "ebv"
    head = page.head_plot.object
    assert [t.type for t in head.data] == ["heatmap"] * 3
    assert "threshold 0.05" in head.layout.title.text
    # the identity target of EBV, next to the head's cosines (all |cos| <= threshold off the diagonal)
    target = list(map(list, head.data[1].z))
    assert target == [[1.0 if i == j else 0.0 for j in range(10)] for i in range(10)]
    names = {t.name for t in page.mixup_plot.object.data}
    assert {"different-class mixes", "same-class mixes, class 0", "same-class mixes, class 2"} <= names
    cross = next(t for t in page.mixup_plot.object.data if t.name == "different-class mixes")
    assert len(cross.x) == 3 * 30 * 11
