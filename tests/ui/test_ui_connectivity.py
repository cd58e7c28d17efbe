"""Connectivity page driven from Python: pick runs, compute, train a pair, refuse mismatched pairs."""
import dataclasses

import numpy as np
import pytest

import workbench as wb
from workbench.ui.session import DataStore
from workbench.ui.connectivity import ConnectivityPage

MLP = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=32, n_layers=2)
TC = wb.TrainConfig(steps=30, lr=3e-3, eval_every=30, eval_max=128)


@pytest.fixture(scope="module")
def runs():
    ds = wb.data.load("digits")
    pair = wb.lmc.train_pair(MLP, ds, seeds=(0, 1), train_config=TC)
    return pair + [wb.train(wb.models.build(dataclasses.replace(MLP, d_hidden=48)), ds, TC, name="wider")]


@pytest.fixture
def page(store, runs):
    for run in runs:
        store.save(run)
    return ConnectivityPage(DataStore(store))


def _ids(page, name_part):
    return [rid for label, rid in page.run_a.options.items() if name_part in label]


def test_compare_fills_every_figure(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.n_alphas.value, page.resolution.value, page.max_examples.value = 5, 5, 256
    page.compute(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.errors.text == ""
    methods = {t.legendgroup.split(" (")[0] for t in page.curves_plot.object.data}
    assert len(methods) == 4
    table = page.barriers.object
    assert len(table) == 4 and "loss / linear" in table.columns
    assert len(page.layer_plot.object.data) == 2  # rest from A, rest from B
    assert page.plane_plot.object.data[0].type == "contour"


def test_mismatched_configs_get_a_clear_message(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "wider")[0]
    page.compute(wait=True)   # checked in the job, which opens the runs (never the event loop)
    assert "different configs" in page.errors.text and "d_hidden" in page.errors.text
    assert page.task.status == "error"
    page.run_b.value = page.run_a.value
    page.compute(wait=True)
    assert "same run" in page.errors.text


def test_train_pair_saves_and_selects_two_runs(page, store):
    before = len(store.list())
    page.pair_width.value, page.pair_layers.value, page.pair_steps.value = 8, 1, 10
    page.train_pair(wait=True)
    assert page.task.status == "done", page.task.error
    assert len(store.list()) == before + 2
    assert page.run_a.value != page.run_b.value
    assert {store.read_json(page.run_a.value)["model"]["seed"], store.read_json(page.run_b.value)["model"]["seed"]} == {0, 1}


def test_instability_runs_and_checks_its_input(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.spawn_steps.value, page.inst_steps.value, page.n_alphas.value, page.max_examples.value = "0, 5", 10, 5, 128
    page.run_instability(wait=True)
    assert page.task.status == "done", page.task.error
    assert list(page.results["instability"]["spawn_step"]) == [0, 5]
    page.spawn_steps.value = "0, 50"
    page.run_instability(wait=True)
    assert "spawn steps must lie in" in page.errors.text
    page.spawn_steps.value = "zero"
    page.run_instability(wait=True)
    assert "whole numbers" in page.errors.text


def test_stop_cancels_a_running_analysis(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.task.stop_event.set()
    store, id_a, id_b = page._pair()
    from workbench.ui.connectivity import _analysis_job

    class Ctx:
        stop_event = page.task.stop_event

        @property
        def stopped(self):
            return self.stop_event.is_set()

        def report(self, *a, **k):
            pass

    with pytest.raises(wb.lmc.Cancelled):
        _analysis_job(Ctx(), store, id_a, id_b, 5, 5, 128)


def test_train_pair_on_khop_uses_the_learnable_table_layout(page, store):
    page.pair_dataset.value = "khop"
    page.pair_width.value, page.pair_layers.value, page.pair_steps.value = 8, 1, 5
    page.train_pair(wait=True)
    assert page.task.status == "done", page.task.error
    spec = store.read_json(page.run_a.value)["dataset"]
    assert spec["name"] == "khop" and spec["layout"] == "table" and spec["hops"] == 1


def test_fusion_fills_the_reg_plot_and_the_map_follows_the_widgets(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.max_examples.value = 128
    page.run_fusion(wait=True)
    assert page.task.status == "done", page.task.error
    table = page.results["fusion"]
    assert list(table["method"][:4]) == ["A", "B", "vanilla", "emd"]
    names = {t.name for t in page.fusion_plot.object.data}
    assert {"Sinkhorn (soft)", "vanilla averaging", "EMD (hard)", "parent A", "parent B"} <= names
    assert page.fusion_layer.options[0] == "res"
    page.fusion_method.value, page.fusion_layer.value = "emd", "hidden.0"
    z = np.asarray(page.map_plot.object.data[0].z, dtype=float)
    assert z.shape == (32, 32)
    np.testing.assert_allclose(np.sort(z.ravel())[-32:], 1.0)    # n T of a hard map: a permutation matrix
    np.testing.assert_allclose(np.sort(z.ravel())[:-32], 0.0)
    page.fusion_method.value = "sinkhorn"
    page.fusion_reg.value = 1.0
    assert "reg 1" in page.map_plot.object.layout.title.text


def test_layerwise_fills_both_base_tabs_before_and_after_alignment(page):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.n_alphas.value, page.max_examples.value = 6, 128
    page.run_layerwise(wait=True)
    assert page.task.status == "done", page.task.error
    assert len(page.base_tabs) == 2
    for base in ("A", "B"):
        heat = page.base_heat[base].object
        assert [t.type for t in heat.data] == ["heatmap", "heatmap"]        # before / after alignment
        assert len(heat.data[0].y) == 4                                     # embed, block 0, block 1, readout
    names = [t.name for t in page.base_cum["A"].object.data]
    assert any("from input" in n for n in names) and any("from output" in n for n in names)
    assert any("estimate" in n for n in names)
    assert set(page.results["estimate"]["alignment"]) == {"none", "weights"}


def test_a_run_that_vanished_or_was_forged_is_refused_by_every_action(page, store, tmp_path):
    """Item 11 of issue 21: the refusal names the field and says why, in the page's error box (no server path)."""
    seed0, seed1 = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    actions = [page.compute, page.run_fusion, page.run_layerwise, page.run_instability]
    page.spawn_steps.value, page.inst_steps.value = "0", 10
    for forged in ("not-a-run", "../../etc", seed1[:-1] + ("0" if seed1[-1] != "0" else "1")):
        page.run_a.value, page.run_b.value = seed0, seed1
        page.run_b.param.update(value=forged)           # what a hostile client can send
        for act in actions:
            act(wait=True)
            assert page.task.status == "error" and page.errors.text.startswith("model B: ")
            assert str(tmp_path) not in page.errors.text and "/" not in page.errors.text.replace("../../", "")
    store.delete(seed0)                                 # vanishes after it was offered
    page.run_a.value, page.run_b.value = seed0, seed1
    for act in actions:
        act(wait=True)
        assert page.errors.text.startswith("model A: ") and "does not exist" in page.errors.text


@pytest.mark.parametrize("field, value, message, actions", [
    ("n_alphas", None, "alphas must be an integer in [3, 101], got None", "compute layerwise instability"),
    ("resolution", 10_000, "plane resolution must be an integer in [3, 61], got 10000", "compute"),
    ("max_examples", -1, "examples per split must be an integer in [0, 1000000], got -1",
     "compute fusion layerwise instability"),
    ("inst_steps", 10**9, "total steps must be an integer in [2, 100000], got 1000000000", "instability"),
    ("spawn_steps", ", ".join(map(str, range(20))), "spawn steps: at most 16", "instability"),
    ("fusion_qk", "<b>both</b>", "Q and K must be one of ['joint', 'separate']", "fusion"),
])
def test_an_emptied_or_forged_number_is_named_and_starts_nothing(page, field, value, message, actions):
    page.run_a.value, page.run_b.value = _ids(page, "seed0")[0], _ids(page, "seed1")[0]
    page.inst_steps.value = 300
    getattr(page, field).param.update(value=value)          # what a hostile client can send
    for action in actions.split():
        act = getattr(page, action if action == "compute" else f"run_{action}")
        page.errors.clear()
        act(wait=True)
        assert message in page.errors.text and page.task.job is None, (action, page.errors.text)
