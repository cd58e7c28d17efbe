"""Scaling laws page driven from Python: a tiny sweep through the page's task (progress per point, every
view filled, the "As code" box reproducing the table), a planted power law through the page's fit path, and
bad fields refused with a message naming the field."""
import numpy as np
import pandas as pd
import pytest

pn = pytest.importorskip("panel")

from workbench import scaling  # noqa: E402
from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.page import pages  # noqa: E402
from workbench.ui.scaling import ScalingPage  # noqa: E402


def _planted(seed=0):
    """y = 50 x^-0.35 + 0.8 with 2% noise and one 30% outlier, as a sweep table over parameters."""
    rng = np.random.default_rng(seed)
    x = np.logspace(2, 6, 10)
    clean = 50 * x ** -0.35 + 0.8
    y = clean * (1 + 0.02 * rng.standard_normal(len(x)))
    y[4] *= 1.3
    table = pd.DataFrame({"axis": "width", "value": np.arange(1, 11), "params": x, "n_train": 1000,
                          "val_loss": y, "val_acc": 0.5, "train_loss": y})
    return table, clean


def _fast_fit(page):
    page.n_starts.value, page.n_boot.value = 4, 5


def test_page_is_registered_between_sweeps_and_unroll():
    titles = [cls.title for cls in pages()]
    assert ScalingPage in pages()
    assert titles.index("Sweeps") < titles.index("Scaling laws") < titles.index("Unroll & learngene")


def test_planted_power_law_through_the_fit_path(store, one_thread):
    page = ScalingPage(DataStore(store))
    page.__panel__()
    table, clean = _planted()
    page.n_heldout.value = 2
    page.n_boot.value = 20
    page.fit_table(table, wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    full, ext = page.results["fit"], page.results["extrapolation"]
    assert full.alpha == pytest.approx(0.35, abs=0.03) and full.c == pytest.approx(0.8, abs=0.15)
    # the held-out points are the two largest, predicted by the fit of the 8 smallest; the prediction is
    # close to the noiseless law there (2% noise), and the error is |pred - y| / y by hand
    assert list(ext["x"]) == list(table["params"].iloc[-2:]) and ext["fit"].n == 8
    f = ext["fit"]
    pred = f.a * ext["x"] ** -f.alpha + f.c
    assert np.allclose(ext["rel_error"], np.abs(pred - table["val_loss"].iloc[-2:]) / table["val_loss"].iloc[-2:])
    assert np.allclose(pred, clean[-2:], rtol=0.06)
    params = page.params_table.object
    assert list(params["fitted on"]) == ["all 10 points", "the 8 smallest"]
    assert params["alpha"].iloc[0] == pytest.approx(full.alpha)
    names = [t.name for t in page.plot.object.data]
    assert "held out" in names and any(n.startswith("extrapolated (error") for n in names)
    assert any(n.startswith("all points:") for n in names) and "90% bootstrap band" in names
    assert f"{ext['rel_error'][-1]:.1%}" in page.status.object.replace("\\", "")
    # no held-out points: the fit of all points alone
    page.n_heldout.value = 0
    page.fit_table(table, wait=True)
    assert page.results["extrapolation"] is None and "predicted" not in page.status.object


def test_tiny_sweep_reports_each_point_and_matches_its_code(store, one_thread):
    page = ScalingPage(DataStore(store))
    page.__panel__()
    page.values.value, page.steps.value = "2, 4, 8, 16, 32", 3
    page.n_heldout.value = 1
    _fast_fit(page)
    seen = []
    shown = page.on_update
    page.on_update = lambda payload: (seen.append(len(payload["table"])) if isinstance(payload, dict)
                                      and "table" in payload else None, shown(payload))
    page.run_sweep(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    assert seen == [1, 2, 3, 4, 5]           # progress per point
    table = page.results["table"]
    assert list(table["value"]) == [2, 4, 8, 16, 32] and table["params"].is_monotonic_increasing
    assert len(page.points_table.object) == 5 and len(page.params_table.object) == 2
    assert "relative error" in page.status.object
    code = page.code.object
    assert "scaling.sweep('width', [2, 4, 8, 16, 32]" in code and "n_heldout=1" in code
    scope = {}
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), "<as code>", "exec"), scope)
    assert scope["table"]["val_loss"].tolist() == pytest.approx(table["val_loss"].tolist(), rel=1e-6)
    assert scope["ext"]["rel_error"] == pytest.approx(page.results["extrapolation"]["rel_error"], rel=1e-6)
    # refit with other options, no training
    page.n_heldout.value = 0
    page.refit(wait=True)
    assert page.results["extrapolation"] is None and len(page.results["table"]) == 5


def test_axis_change_brings_its_default_values():
    page = ScalingPage()
    page.axis.value = "data"
    assert page.values.value.startswith("50, 100")
    page.values.value = "10, 20, 30, 40"
    page.axis.value = "depth"
    assert page.values.value == "10, 20, 30, 40"   # typed values are kept


@pytest.mark.parametrize("field, value, message", [
    ("values", "8, x, 32, 64, 128, 256", "values: value 2 must be an integer in [1, 100000], got 'x'"),
    ("values", "8, 16, 32", "values must hold at least 6 points"),
    ("values", "8, 8, 16, 32, 64, 128", "values must be distinct"),
    ("values", "8, , 16", "values: value 2 is empty"),
    ("steps", 0, "steps must be an integer in [1, 100000], got 0"),
    ("seed", -1, "seed must be"),
    ("n_heldout", -1, "held-out largest points must be an integer >= 0, got -1"),
    ("n_boot", 5000, "bootstrap resamples must be an integer in [0, 2000], got 5000"),
    ("lr", 0.0, "lr must be a finite number in (0, 1], got 0.0"),
])
def test_bad_fields_get_a_message_and_do_not_start(store, field, value, message):
    page = ScalingPage(DataStore(store))
    getattr(page, field).value = value
    page.run_sweep(wait=True)
    assert message in page.errors.text
    assert page.results == {} and page.task.status == "idle"
    assert "fix the form first" in (page.show_code() or page.code.object)


def test_refit_without_a_sweep_and_a_table_without_columns(store):
    page = ScalingPage(DataStore(store))
    page.refit(wait=True)
    assert "no sweep to refit yet" in page.errors.text
    page.fit_table(pd.DataFrame({"x": [1, 2]}), wait=True)
    assert "table must have the columns" in page.errors.text
    assert scaling.SWEEP_COLUMNS[0] == "axis"
