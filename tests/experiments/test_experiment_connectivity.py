"""The connectivity experiment: a pair trained as its code trains it, the barriers by hand, the analyses'
payloads and stop, and the sweeps' "barrier" task built on run."""
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import lmc
from workbench.experiments import connectivity

CHOICES = dict(dataset="digits", model={"d_model": 16, "n_layers": 1, "d_hidden": 16},
               train={"steps": 30, "lr": 3e-3, "eval_every": 30})


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return connectivity.run(**CHOICES, n_alphas=5, max_examples=256)


def test_the_pair_code_trains_the_pair_of_run(trained, store, run_code):
    scope = run_code(connectivity.as_code(**CHOICES))
    a, b = trained["runs"]
    x = wb.data.load("digits").x_val[:64]
    for mine, theirs in zip((a, b), scope["runs"]):
        assert torch.equal(mine.model(x), theirs.model(x))
    assert len(store.list()) == 2 and {scope["RUN_A"], scope["RUN_B"]} == set(store.list()["run_id"])


def test_barriers_before_and_after_weight_matching_by_hand(trained):
    a, b = (r.model for r in trained["runs"])
    ds = wb.data.load("digits")
    table = trained["barriers"].set_index(["alignment", "metric"])["value"]
    for alignment, other in (("none", b), ("weights", lmc.align(a, b, "weights", seed=0))):
        ref = lmc.barrier(lmc.curve(a, other, ds, 5, ("val",), 256))
        assert table[alignment, "loss_barrier"] == lmc.barrier_value(ref, "val", "loss", "linear")
        assert table[alignment, "error_barrier"] == lmc.barrier_value(ref, "val", "error", "linear")


def test_the_analysis_reports_its_curves_first_and_a_stop_raises(trained):
    a, b = (r.model for r in trained["runs"])
    ds = wb.data.load("digits")
    seen = []
    m = wb.monitor.Monitor(lambda p, msg, payload: seen.append((p, payload)))
    out = connectivity.analysis(a, b, ds, n_alphas=5, resolution=3, max_examples=128, monitor=m)
    payloads = [x for _, x in seen if x is not None]
    assert [list(x) for x in payloads] == [["curves"], ["layerwise"]]
    pd.testing.assert_frame_equal(payloads[0]["curves"], out["curves"])
    assert set(out) == {"curves", "layerwise", "plane"} and len(out["plane"].grid) == 9
    progress = [p for p, _ in seen if p is not None]
    assert progress == sorted(progress)
    stopped = wb.monitor.Monitor()
    stopped.stop()
    with pytest.raises(wb.monitor.Stopped):
        connectivity.analysis(a, b, ds, n_alphas=5, monitor=stopped)


def test_the_sweep_task_is_run_with_its_rows(trained):
    assert wb.sweeps.barrier_task is connectivity.task
    out = connectivity.task("digits", steps=30, lr=3e-3, d_model=16, n_layers=1, d_hidden=16, n_alphas=5,
                            max_examples=256)
    rows = {(r.get("alignment"), r["metric"]): r["value"] for r in out["rows"]}
    table = trained["barriers"].set_index(["alignment", "metric"])["value"]
    assert out["status"] == "done" and rows[("none", "loss_barrier")] == table["none", "loss_barrier"]
    assert rows[(None, "acc_a")] == trained["runs"][0].final("acc", "val")


def test_the_pages_as_code_box_trains_the_pair_the_page_trained(store, run_code):
    from workbench.ui import App

    page = App(store=store).pages["Connectivity"]
    page.pair_width.value, page.pair_layers.value, page.pair_steps.value = 16, 1, 10
    code = page.as_code()                                            # no pair stored yet: the pair's code
    assert code == connectivity.as_code(**page.pair_choices())
    page.train_pair(wait=True)
    assert page.task.status == "done", page.task.error
    scope = run_code(code)
    x = wb.data.load("digits").x_val[:64]
    for run_id, theirs in zip((page.run_a.value, page.run_b.value), scope["runs"]):
        assert torch.equal(store.load(run_id).model(x), theirs.model(x))
    page.n_alphas.value, page.resolution.value, page.max_examples.value = 5, 3, 128
    page.inst_steps.value, page.spawn_steps.value = 6, "0, 3"
    analysis = page.as_code()                                        # a pair stored: the analysis' code
    assert analysis == connectivity.as_code(run_a=page.run_a.value, run_b=page.run_b.value, n_alphas=5,
                                            resolution=3, max_examples=128, inst_steps=6, spawn=[0, 3])
    page.compute(wait=True)
    assert page.task.status == "done", page.task.error
    scope = run_code(analysis)
    pd.testing.assert_frame_equal(scope["curves"], page.results["curves"])
