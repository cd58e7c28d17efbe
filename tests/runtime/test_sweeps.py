"""Sweeps: grids checked with messages, numbers equal to training by hand, local threads and Dask give the
same numbers, failed and cancelled points reported (never missing), a shared queue's caps respected."""
from __future__ import annotations

import math
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import jobs, sweeps

TINY = dict(dataset="digits", steps=4, n_layers=1, d_hidden=8)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    c = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    yield c
    c.close()


def square(x, seed=0, fail_at=None):
    """A task of one's own: a dict of metrics."""
    if fail_at is not None and x == fail_at:
        raise ValueError(f"x must not be {fail_at}")
    return {"square": x * x, "seed_plus_x": seed + x}


def blocks_until_stopped(x):
    ctx = jobs.current()
    for i in range(200_000):
        if ctx.stopped:
            return {"status": "cancelled", "rows": [{"metric": "steps_done", "value": i}]}
        threading.Event().wait(0.001)
    return {"steps_done": -1}


def diverges(x):
    return {"status": "diverged", "rows": [{"metric": "loss", "value": float("nan")}]}


# ============================================================================ numbers


def test_train_sweep_matches_training_by_hand():
    df = sweeps.run("train", {"d_model": [8, 16]}, seeds=[0, 1], **TINY)
    assert list(df.columns) == ["point", "d_model", "seed", "metric", "value", "status", "error"]
    assert len(df) == 4 * 4 and set(df["status"]) == {"done"}
    ds = wb.data.load("digits")
    for d_model, seed in ((16, 1), (8, 0)):
        torch.set_num_threads(1)
        model = wb.models.build(wb.models.config_for(ds, d_model=d_model, n_layers=1, d_hidden=8, seed=seed))
        run = wb.train(model, ds, wb.TrainConfig(steps=4, eval_every=4, eval_max=0, seed=seed))
        got = df[(df["d_model"] == d_model) & (df["seed"] == seed)].set_index("metric")["value"]
        assert got["val_loss"] == run.final("loss", "val") and got["train_acc"] == run.final("acc", "train")


def test_threads_and_dask_give_identical_numbers(cluster):
    grid = {"d_model": [8, 16]}
    local = sweeps.run("train", grid, seeds=[0, 1], **TINY)
    remote = sweeps.run("train", grid, seeds=[0, 1], address=cluster.scheduler_address, **TINY)
    pd.testing.assert_frame_equal(local, remote)
    pair = dict(dataset="digits", steps=4, n_layers=1, d_hidden=8, d_model=8, n_alphas=3)
    local_b = sweeps.run("barrier", {"seed": [3]}, **pair)
    remote_b = sweeps.run("barrier", {"seed": [3]}, address=cluster, **pair)
    pd.testing.assert_frame_equal(local_b, remote_b)
    assert set(local_b["metric"]) == {"loss_barrier", "error_barrier", "acc_a", "acc_b"}
    assert set(local_b["alignment"].dropna()) == {"none", "weights"}


def test_barrier_task_matches_lmc_by_hand():
    df = sweeps.run("barrier", {"d_model": [8]}, dataset="digits", steps=4, n_layers=1, d_hidden=8, n_alphas=3)
    ds = wb.data.load("digits")
    torch.set_num_threads(1)
    cfg = wb.models.config_for(ds, d_model=8, n_layers=1, d_hidden=8, seed=0)
    a, b = (r.model for r in wb.lmc.train_pair(cfg, ds, (0, 1), wb.TrainConfig(steps=4, eval_every=4, seed=0)))
    before = wb.lmc.barrier_value(wb.lmc.barrier(wb.lmc.curve(a, b, ds, 3, ("val",))), "val", "loss", "linear")
    after = wb.lmc.barrier_value(wb.lmc.barrier(wb.lmc.curve(a, wb.lmc.align(a, b, seed=0), ds, 3, ("val",))),
                                 "val", "loss", "linear")
    got = df[df["metric"] == "loss_barrier"].set_index("alignment")["value"]
    assert got["none"] == before and got["weights"] == after


def test_collapse_and_grow_tasks_give_their_rows():
    nc = sweeps.run("collapse", {"d_model": [16]}, epochs=2, n_layers=1, max_samples=64)
    assert sorted(nc.loc[nc["metric"] == "nc1", "epoch"]) == [0.0, 1.0, 2.0]
    assert {"nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4", "val_acc"} <= set(nc["metric"])
    final = sweeps.run("collapse", {"d_model": [16]}, epochs=2, n_layers=1, max_samples=64, record="final")
    assert sorted(final.loc[final["metric"] == "nc1", "epoch"]) == [2.0]
    assert final.loc[final["metric"] == "nc1", "value"].iloc[0] == nc.loc[(nc["metric"] == "nc1") &
                                                                          (nc["epoch"] == 2.0), "value"].iloc[0]
    g = sweeps.run("grow", {"seed": [0]}, steps=4, eval_every=2, d_model=16,
                   data_options={"n_train": 200, "n_val": 50})
    s = g.set_index(["method", "metric"])["value"]
    assert s[("grown", "flops_ratio")] == pytest.approx(s[("grown", "flops_to_target")]
                                                        / s[("scratch", "flops_to_target")])
    assert s[("scratch", "target_loss")] == s[("scratch", "val_loss")]


def test_own_functions_by_reference_and_by_object():
    df = sweeps.run(square, {"x": [1, 2, 3]}, seeds=[10])
    got = df.pivot(index="x", columns="metric", values="value")
    assert got["square"].tolist() == [1.0, 4.0, 9.0] and got["seed_plus_x"].tolist() == [11.0, 12.0, 13.0]
    ref = sweeps.run("workbench.sweeps:train_task", {"d_model": [8]}, **TINY)
    direct = sweeps.run("train", {"d_model": [8]}, **TINY)
    pd.testing.assert_frame_equal(ref, direct)


# ============================================================================ failures, cancel, shared queues


def test_failed_points_are_reported_not_missing():
    df = sweeps.run(square, {"x": [1, 2, 3]}, fail_at=2)
    assert sorted(df["point"].unique()) == [0, 1, 2]
    bad = df[df["x"] == 2]
    assert len(bad) == 1 and bad["metric"].iloc[0] == "error" and bad["status"].iloc[0] == "failed"
    assert math.isnan(bad["value"].iloc[0]) and "x must not be 2" in bad["error"].iloc[0]
    assert set(df.loc[df["x"] != 2, "status"]) == {"done"}
    # a runtime refusal of the engine: digits takes an MLP, which has no heads
    eng = sweeps.run("train", {"n_heads": [None, 2]}, dataset="digits", steps=2, d_model=8, n_layers=1)
    row = eng[eng["n_heads"] == 2]
    assert row["status"].tolist() == ["failed"] and "n_heads is not an option" in row["error"].iloc[0]
    assert set(eng.loc[eng["n_heads"].isna(), "status"]) == {"done"}
    div = sweeps.run(diverges, {"x": [1]})
    assert div["status"].tolist() == ["diverged"]


def test_cancel_reports_every_point():
    q = jobs.JobQueue(max_jobs=1, queue_size=5, jobs_per_user=2, threads=1, executor="threads")
    seen = []
    sweep = sweeps.start(blocks_until_stopped, {"x": [1, 2, 3, 4]}, queue=q, user="student",
                         on_progress=lambda i, job: seen.append((i, job.status)))
    deadline = threading.Event()
    for _ in range(1000):
        if sweep.jobs[0] is not None and sweep.jobs[0].status == "running":
            break
        deadline.wait(0.01)
    assert q.active("student") <= 2                      # the sweep keeps within the user's share
    sweep.cancel()
    df = sweep.result(30)
    assert sorted(df["point"]) == [0, 1, 2, 3] and set(df["status"]) == {"cancelled"}
    first = df[df["point"] == 0]
    assert first["metric"].tolist() == ["steps_done"] and first["value"].iloc[0] >= 0
    assert (df.loc[df["point"] > 0, "error"] == "cancelled before it ran").all()
    assert (0, "running") in seen and not q.closed       # a shared queue stays open
    q.close()


def test_a_sweep_larger_than_the_users_share_runs_to_the_end_in_a_shared_queue():
    q = jobs.JobQueue(max_jobs=2, queue_size=2, jobs_per_user=1, threads=1, executor="threads")
    sweep = sweeps.start(square, {"x": list(range(6))}, queue=q, user="student")
    df = sweep.result(60)
    assert df.sort_values("point").query("metric == 'square'")["value"].tolist() == [float(x * x) for x in range(6)]
    status = sweep.status()
    assert list(status.columns) == ["point", "x", "status", "progress", "message"]
    assert set(status["status"]) == {"done"}
    q.close()


# ============================================================================ bad grids


@pytest.mark.parametrize("grid, kwargs, match", [
    ([1, 2], {}, "grid must be a dict"),
    ({"x": []}, {}, r"grid\['x'\] must be a non-empty list"),
    ({"x": "123"}, {}, r"grid\['x'\] must be a non-empty list"),
    ({"x": 3}, {}, r"grid\['x'\] must be a non-empty list"),
    ({"y": [1]}, {}, r"grid key 'y' is not an argument of task 'square'; its arguments: \['x', 'seed', 'fail_at'\]"),
    ({"x": [1]}, {"x": 2}, "both a grid key and a fixed argument"),
    ({"x": [1]}, {"z": 2}, "'z' is not an argument"),
    ({"x": [[1, 2]]}, {}, r"grid\['x'\]\[0\] must be a number, a string"),
    ({"x": [float("nan")]}, {}, r"grid\['x'\]\[0\] must be finite"),
    ({"x": [1, 2, 1]}, {}, r"grid\['x'\] repeats the value 1"),
    ({"x": [1], "seed": [0]}, {"seeds": [1]}, "either as seeds"),
    ({"x": [1]}, {"seeds": "01"}, "seeds must be a list"),
    ({"x": [1]}, {"seeds": [-1]}, r"seeds\[\] must be an integer in \[0, 4294967295\]"),
    ({"x": list(range(40)), "seed": list(range(30))}, {}, "40 x 30 = 1200 points; at most 1000"),
    ({1: [1]}, {}, "grid keys must be argument names"),
    ({"queue": [1]}, {}, "keyword of sweeps.run"),
])
def test_bad_grids_are_refused_with_messages(grid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweeps.run(square, grid, **kwargs)


@pytest.mark.parametrize("task, grid, fixed, match", [
    ("train", {"steps": [10, 0]}, {}, r"grid\['steps'\]\[1\] must be an integer in \[1, 100000\], got 0"),
    ("train", {"d_model": [8, True]}, {}, r"grid\['d_model'\]\[1\] must be an integer"),
    ("train", {"dataset": ["digits", "cifar"]}, {}, r"grid\['dataset'\]\[1\] must be one of"),
    ("train", {"d_model": [8]}, {"lr": 0}, r"lr must be a finite number in \(0, 10\]"),
    ("barrier", {"n_alphas": [1]}, {}, r"grid\['n_alphas'\]\[0\] must be an integer in \[2, 1001\]"),
    ("collapse", {"dataset": ["khop"]}, {}, r"grid\['dataset'\]\[0\] must be one of \['digits', 'mnist1d'\]"),
    ("collapse", {"epochs": [2]}, {"record": "last"}, "record must be one of"),
    ("grow", {"recipe": ["khop", "image"]}, {}, r"grid\['recipe'\]\[1\] must be one of"),
    ("grow", {"seed": [0]}, {"data_options": "n_train=5"}, "data_options must be a dict"),
    ("fit", {"x": [1]}, {}, "task must be one of"),
    ("os:no_such_function", {"x": [1]}, {}, "cannot be imported"),
    ("os.path; rm -rf", {"x": [1]}, {}, "task must be one of"),
])
def test_bad_values_for_built_in_tasks_are_refused_before_anything_runs(task, grid, fixed, match):
    with pytest.raises(ValueError, match=match):
        sweeps.run(task, grid, **fixed)


def test_points_are_the_product_in_key_order_with_seeds_last():
    pts = sweeps.points(square, {"x": [1, 2], "fail_at": [None, 5]}, seeds=[7])
    assert pts == [{"x": 1, "fail_at": None, "seed": 7}, {"x": 1, "fail_at": 5, "seed": 7},
                   {"x": 2, "fail_at": None, "seed": 7}, {"x": 2, "fail_at": 5, "seed": 7}]


def test_queue_and_address_are_exclusive():
    q = jobs.JobQueue(max_jobs=1, threads=1, executor="threads")
    with pytest.raises(ValueError, match="either queue"):
        sweeps.run(square, {"x": [1]}, queue=q, address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="queue must be"):
        sweeps.run(square, {"x": [1]}, queue="server")
    with pytest.raises(ValueError, match="address must be"):
        sweeps.run(square, {"x": [1]}, address=12)
    q.close()


# ============================================================================ worker processes


def kill_worker_once(x, marker):
    """Kills its worker process the first time it runs for x == 1 (a worker dying mid-sweep)."""
    import os

    if x == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return {"x": x}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_worker_processes_import_unpickle_and_survive_a_killed_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        remote = sweeps.run("train", {"d_model": [8]}, seeds=[0], address=c, **TINY)
        # the worker dies running point x=1; Dask reruns the point on the restarted worker
        killed = sweeps.run(kill_worker_once, {"x": [0, 1, 2]}, address=c, marker=str(tmp_path / "killed"))
    local = sweeps.run("train", {"d_model": [8]}, seeds=[0], **TINY)
    assert set(remote["status"]) == {"done"}
    np.testing.assert_array_equal(remote["value"].to_numpy(), local["value"].to_numpy())
    assert (tmp_path / "killed").exists()
    assert sorted(killed["point"]) == [0, 1, 2] and set(killed["status"]) == {"done"}
    assert killed.sort_values("point")["value"].tolist() == [0.0, 1.0, 2.0]


# ============================================================================ fuzzing the grid checks

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_KEYS = st.sampled_from(["dataset", "steps", "seed", "lr", "d_model", "n_layers", "batch_size", "data_options",
                         "n_heads", "nope", "queue", "", "x"])
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(["digits", "khop", "cifar"]),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_GRIDS = st.one_of(st.dictionaries(_KEYS, st.one_of(st.lists(_VALUES, max_size=5), _VALUES), max_size=4),
                   st.lists(_VALUES, max_size=3), _VALUES)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=st.sampled_from(["train", "barrier", "grow", square]), grid=_GRIDS,
       seeds=st.one_of(st.none(), st.lists(st.integers(-2, 5), max_size=3), st.text(max_size=2)),
       fixed=st.dictionaries(_KEYS, _VALUES, max_size=2))
def test_fuzzed_grids_give_points_or_a_message_naming_the_field(task, grid, seeds, fixed):
    fixed = {k: v for k, v in fixed.items() if k not in sweeps.RESERVED and k}
    try:
        pts = sweeps.points(task, grid, seeds=seeds, **fixed)
    except ValueError as e:
        msg = str(e)
        named = [f"grid[{k!r}]" for k in (grid if isinstance(grid, dict) else {})] + list(fixed) + \
            ["grid", "seeds", "seed", "grid key"]
        assert any(n in msg for n in named), msg
        return
    assert isinstance(grid, dict)
    sizes = [len(v) for v in grid.values()] + ([len(seeds)] if seeds is not None else [])
    assert len(pts) == math.prod(sizes) and all(set(p) == set(grid) | ({"seed"} if seeds else set()) for p in pts)


def test_every_argument_of_the_built_in_tasks_is_checked():
    import inspect

    for name in sweeps.TASKS:
        fn = sweeps._TASK_FUNCTIONS[name]
        assert set(inspect.signature(fn).parameters) == set(sweeps._CHECKS[name]), name
