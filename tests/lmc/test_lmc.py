"""Interpolation curves, barriers, REPAIR, layer-wise LMC, instability and the loss plane."""
import dataclasses
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import lmc

MLP = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=32, d_hidden=64, n_layers=2)
TC = wb.TrainConfig(steps=60, batch_size=64, lr=3e-3, eval_every=60, eval_max=256)


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


@pytest.fixture(scope="module")
def pair(digits):
    ra, rb = lmc.train_pair(MLP, digits, seeds=(0, 1), train_config=TC)
    return ra.model, rb.model


@pytest.fixture(scope="module")
def khop():
    return wb.data.load("khop", hops=1, nodes=6, n_train=64, n_val=48)


@pytest.fixture(scope="module")
def tf_pair(khop):
    cfg = wb.models.TransformerConfig(vocab_size=khop.vocab_size, context=khop.seq_len, d_model=16, n_heads=2,
                                      d_mlp=32, n_layers=2)
    return wb.models.build(cfg).eval(), wb.models.build(dataclasses.replace(cfg, seed=1)).eval()


def test_curve_equals_naive_per_alpha_evaluation(pair, digits):
    a, b = pair
    c = lmc.curve(a, b, digits, n_alphas=5, max_examples=0)
    assert list(c.columns) == ["alpha", "split", "loss", "acc", "error"]
    assert len(c) == 10
    for row in c.itertuples():
        ref = wb.evaluate(lmc.interpolate(a, b, row.alpha), digits, row.split)
        assert row.loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert row.acc == pytest.approx(ref["acc"], abs=1e-9)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_vmap_and_loop_evaluations_agree(family, pair, tf_pair, digits, khop):
    a, b = pair if family == "mlp" else tf_pair
    ds = digits if family == "mlp" else khop
    stacked = lmc.interpolation._lerp_stack(lmc.interpolation._params(a), lmc.interpolation._params(b), torch.linspace(0, 1, 4))
    lv, av = lmc.evaluate_params(a, stacked, ds, "val", use_vmap=True)
    ll, al = lmc.evaluate_params(a, stacked, ds, "val", use_vmap=False)
    np.testing.assert_allclose(lv, ll, rtol=1e-5)
    np.testing.assert_array_equal(av, al)


def test_transformer_curve_equals_naive_evaluation(tf_pair, khop):
    a, b = tf_pair
    c = lmc.curve(a, b, khop, n_alphas=3, splits=("val",))
    for row in c.itertuples():
        ref = wb.evaluate(lmc.interpolate(a, b, row.alpha), khop, "val")
        assert row.loss == pytest.approx(ref["loss"], rel=1e-5)
        assert row.acc == pytest.approx(ref["acc"], abs=1e-9)


def test_interpolate_endpoints_are_the_models(pair):
    a, b = pair
    x = torch.randn(8, 64)
    torch.testing.assert_close(lmc.interpolate(a, b, 0.0)(x), a(x))
    torch.testing.assert_close(lmc.interpolate(a, b, 1.0)(x), b(x))


def test_model_with_itself_has_zero_barrier(pair, digits):
    a, _ = pair
    b = lmc.barrier(lmc.curve(a, a, digits, n_alphas=7))
    assert len(b) == 2 * 2 * 2  # splits x metrics x definitions
    assert np.abs(b["barrier"]).max() < 1e-6


def test_barrier_definitions_by_hand():
    c = pd.DataFrame({"alpha": [0, 1 / 3, 2 / 3, 1], "split": "val", "loss": [1.0, 3.0, 3.0, 2.0],
                      "acc": [0.9, 0.5, 0.7, 0.8]})
    b = lmc.barrier(c)
    assert lmc.barrier_value(b, "val", "loss", "endpoint_mean") == pytest.approx(3.0 - 1.5)
    assert lmc.barrier_value(b, "val", "loss", "linear") == pytest.approx(3.0 - (1.0 + 1 / 3))
    # error = 1 - acc = [0.1, 0.5, 0.3, 0.2]
    assert lmc.barrier_value(b, "val", "error", "endpoint_mean") == pytest.approx(0.5 - 0.15)
    assert lmc.barrier_value(b, "val", "error", "linear") == pytest.approx(0.5 - (0.1 + 0.1 / 3))
    row = b[(b.metric == "loss") & (b.definition == "linear")].iloc[0]
    assert row["alpha"] == pytest.approx(1 / 3)


def test_barrier_definitions_agree_where_they_must(pair, digits):
    a, b = pair
    c = lmc.curve(a, b, digits, n_alphas=9)
    table = lmc.barrier(c)
    for split in ("train", "val"):
        for metric in ("loss", "error"):
            ends = c[c.split == split].sort_values("alpha")[metric].to_numpy()
            gap = abs(ends[-1] - ends[0]) / 2
            em = lmc.barrier_value(table, split, metric, "endpoint_mean")
            li = lmc.barrier_value(table, split, metric, "linear")
            assert abs(em - li) <= gap + 1e-9
    # symmetric endpoints: identical
    sym = pd.DataFrame({"alpha": np.linspace(0, 1, 5), "split": "val", "loss": [1, 2, 4, 2, 1.0], "acc": 0.5})
    t = lmc.barrier(sym)
    assert lmc.barrier_value(t, metric="loss", definition="linear") == lmc.barrier_value(
        t, metric="loss", definition="endpoint_mean") == 3.0


def test_alignment_lowers_the_barrier_and_keeps_the_function(pair, digits):
    a, b = pair
    before = lmc.barrier_value(lmc.barrier(lmc.curve(a, b, digits, 9)), "train", "loss", "linear")
    for method in ("weights", "activations"):
        aligned = lmc.align(a, b, method=method, data=digits)
        assert (aligned(digits.x_val) - b(digits.x_val)).abs().max().item() <= 1e-5
        after = lmc.barrier_value(lmc.barrier(lmc.curve(a, aligned, digits, 9)), "train", "loss", "linear")
        assert after < before, method


@torch.no_grad()
def _hidden_stats(model, x):
    """Per block, mean and population std (float64) of the hidden pre-activation units ``fc(pre_norm(h))``,
    running the residual MLP's blocks by hand (no hooks)."""
    model.eval()
    h, out = model.embed(x), []
    for blk in model.blocks:
        u = blk.fc(blk.pre_norm(h)).double()                      # (N, d_hidden)
        out.append((u.mean(0), u.std(0, unbiased=False)))
        h = blk(h)
    return out


def test_repair_matches_goal_statistics(pair, digits):
    a, b = pair
    b = lmc.align(a, b, "activations", data=digits)
    alpha = 0.5
    x = digits.x_train
    repaired = lmc.repair(a, b, alpha, digits)
    for (ma, sa), (mb, sb), (mr, sr) in zip(_hidden_stats(a, x), _hidden_stats(b, x), _hidden_stats(repaired, x)):
        torch.testing.assert_close(mr, (1 - alpha) * ma + alpha * mb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sr, (1 - alpha) * sa + alpha * sb, atol=1e-4, rtol=1e-4)
    # at alpha 0 REPAIR changes nothing
    x = digits.x_val
    torch.testing.assert_close(lmc.repair(a, b, 0.0, digits)(x), a(x), atol=1e-4, rtol=1e-4)


def test_compare_has_every_method(pair, digits):
    a, b = pair
    c = lmc.compare(a, b, digits, n_alphas=5, splits=("val",))
    assert set(c["method"]) == {"none", "weights", "activations", "repair"}
    assert len(c) == 4 * 5
    # every method starts at A and ends at (a function-identical copy of) B
    ends = c[c.alpha.isin([0.0, 1.0])].groupby("alpha")["loss"]
    assert (ends.max() - ends.min()).max() < 1e-5


def test_layerwise_single_group_of_everything_equals_the_full_curve(pair, digits):
    a, b = pair
    everything = {"all": [k for k, _ in a.named_parameters()]}
    lw = lmc.layerwise(a, b, digits, groups=everything, n_alphas=5)
    full = lmc.barrier(lmc.curve(a, b, digits, n_alphas=5, splits=("val",)))
    got = lw[(lw.base == "A") & (lw.metric == "loss") & (lw.definition == "linear")]["barrier"].item()
    assert got == pytest.approx(lmc.barrier_value(full, "val", "loss", "linear"), rel=1e-6)


def test_layerwise_default_groups(pair, digits):
    a, b = pair
    lw = lmc.layerwise(a, b, digits, n_alphas=3)
    assert list(dict.fromkeys(lw["group"])) == ["embed", "block 0", "block 1", "readout"]
    assert set(lw["base"]) == {"A", "B"}
    same = lmc.layerwise(a, a, digits, n_alphas=3)
    assert np.abs(same["barrier"]).max() < 1e-6


def test_instability_one_row_per_spawn_step(digits):
    tc = dataclasses.replace(TC, steps=20, eval_every=20)
    df = lmc.instability(MLP, digits, spawn_steps=[0, 10], train_config=tc, n_alphas=3, max_examples=128)
    assert list(df["spawn_step"]) == [0, 10]
    assert {"loss_barrier", "error_barrier", "acc_a", "acc_b"} <= set(df.columns)
    with pytest.raises(ValueError, match="spawn_steps"):
        lmc.instability(MLP, digits, spawn_steps=[20], train_config=tc)


def test_plane_places_the_models_and_evaluates_them(pair, digits):
    a, b = pair
    c = lmc.align(a, b, "weights")
    p = lmc.plane(a, b, c, digits, resolution=5, margin=0.0, max_examples=0)
    pts = p.points.set_index("name")
    dist = torch.cat([(pb - pa).reshape(-1) for pa, pb in zip(a.parameters(), b.parameters())]).norm().item()
    assert pts.loc["B", "x"] == pytest.approx(dist, rel=1e-5)
    assert pts.loc["B", "y"] == 0 and pts.loc["C", "y"] > 0
    at_a = p.grid[(p.grid.x.abs() < 1e-9) & (p.grid.y.abs() < 1e-9)]
    assert at_a["loss"].item() == pytest.approx(wb.evaluate(a, digits, "val")["loss"], rel=1e-4)
    assert len(p.grid) == 25


def test_mismatched_configs_raise(pair, digits):
    a, _ = pair
    other = wb.models.build(dataclasses.replace(MLP, n_layers=3))
    for fn in (lambda: lmc.curve(a, other, digits), lambda: lmc.align(a, other),
               lambda: lmc.layerwise(a, other, digits), lambda: lmc.repair(a, other, 0.5, digits)):
        with pytest.raises(ValueError, match="n_layers"):
            fn()


def test_a_stopped_monitor_cancels(pair, digits):
    a, b = pair
    stop = threading.Event()
    stop.set()
    monitor = wb.monitor.Monitor(stopped=stop.is_set)
    with pytest.raises(lmc.Cancelled):
        lmc.compare(a, b, digits, n_alphas=3, monitor=monitor)
    with pytest.raises(lmc.Cancelled):
        lmc.layerwise(a, b, digits, monitor=monitor)
    assert lmc.Cancelled is wb.monitor.Stopped and issubclass(wb.jobs.JobCancelled, wb.monitor.Stopped)


def test_the_monitor_sees_progress_per_method(pair, digits):
    a, b = pair
    seen = []
    lmc.compare(a, b, digits, n_alphas=3, methods=("none", "weights"), max_examples=64,
                monitor=wb.monitor.Monitor(lambda progress, message, payload: seen.append((progress, message))))
    assert seen == [(0.0, "curve: none"), (0.5, "curve: weights"), (1.0, "done")]
