"""Sweep figures: the summary against numpy by hand, bands and lines as drawn, refusals with messages."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workbench.figures import sweeps as fs


def barrier_frame() -> pd.DataFrame:
    """A table shaped like sweeps.run("barrier", {"d_model": [8, 16]}, seeds=[0, 1, 2]) with known values."""
    rows, point = [], 0
    values = {("none", 8): [0.9, 1.2, 1.5], ("weights", 8): [0.3, 0.2, 0.4],
              ("none", 16): [0.6, 0.8, 1.3], ("weights", 16): [0.1, 0.1, 0.1]}
    for d_model in (16, 8):                       # out of order on purpose: the x axis is sorted
        for seed in range(3):
            for alignment in ("none", "weights"):
                rows.append({"point": point, "d_model": d_model, "seed": seed, "alignment": alignment,
                             "metric": "loss_barrier", "value": values[(alignment, d_model)][seed],
                             "status": "done", "error": ""})
            rows.append({"point": point, "d_model": d_model, "seed": seed, "alignment": None, "metric": "acc_a",
                         "value": 0.5, "status": "done", "error": ""})
            point += 1
    rows.append({"point": point, "d_model": 8, "seed": 3, "alignment": None, "metric": "error",
                 "value": np.nan, "status": "failed", "error": "ValueError: boom"})
    rows.append({"point": point + 1, "d_model": 8, "seed": 4, "alignment": "none", "metric": "loss_barrier",
                 "value": 99.0, "status": "diverged", "error": ""})
    return pd.DataFrame(rows), values


def test_summary_against_numpy():
    df, values = barrier_frame()
    table = fs.summarize(df, "d_model", "loss_barrier", color="alignment")
    assert list(table.columns) == ["alignment", "d_model", "mean", "std", "min", "max", "n"]
    for _, r in table.iterrows():
        v = np.array(values[(r["alignment"], r["d_model"])])
        assert r["mean"] == pytest.approx(v.mean()) and r["std"] == pytest.approx(v.std(ddof=1))
        assert (r["min"], r["max"], r["n"]) == (v.min(), v.max(), 3)     # the diverged 99.0 is left out
    assert table["d_model"].tolist() == [8, 16, 8, 16]
    both = fs.summarize(df, "d_model", "loss_barrier", color="alignment", statuses=("done", "diverged"))
    assert both.set_index(["alignment", "d_model"]).loc[("none", 8), "max"] == 99.0


def test_band_and_mean_line_as_drawn():
    df, values = barrier_frame()
    fig = fs.barrier_vs_width(df)
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["no alignment", "weight matching"] and len(bands) == 2
    none = np.array([values[("none", 8)], values[("none", 16)]])
    assert list(lines[0].x) == [8, 16] and np.allclose(lines[0].y, none.mean(1))
    assert list(bands[0].x) == [8, 16, 16, 8]
    assert np.allclose(bands[0].y, [none[0].max(), none[1].max(), none[1].min(), none[0].min()])
    std = fs.metric_plot(df, "d_model", "loss_barrier", color="alignment", spread="std")
    band = [t for t in std.data if t.fill == "toself"][0]
    m, s = none.mean(1), none.std(1, ddof=1)
    assert np.allclose(band.y, [m[0] + s[0], m[1] + s[1], m[1] - s[1], m[0] - s[0]])
    plain = fs.metric_plot(df, "d_model", "loss_barrier", color="alignment", spread="none")
    assert not [t for t in plain.data if t.fill == "toself"]


def test_single_seed_has_no_band_and_log_axes():
    df = pd.DataFrame({"epoch": [0.0, 1.0, 2.0], "metric": "nc1", "value": [2.0, 1.0, 0.5], "status": "done"})
    fig = fs.nc_vs_epochs(df)
    assert len(fig.data) == 1 and list(fig.data[0].y) == [2.0, 1.0, 0.5] and fig.layout.yaxis.type == "log"


def test_flops_to_loss_lines_per_method_and_unreached_points_left_out():
    df = pd.DataFrame({"seed": [0, 0, 1, 1], "d_model": 16, "method": ["grown", "scratch"] * 2,
                       "metric": "flops_to_target", "value": [1e9, 2e9, np.nan, 3e9], "status": "done"})
    fig = fs.flops_to_loss(df, x="d_model")
    lines = {t.name: list(t.y) for t in fig.data if t.mode == "lines+markers"}
    assert lines == {"grown": [1e9], "from scratch": [2.5e9]}


def test_refusals_and_empty_tables():
    df, _ = barrier_frame()
    with pytest.raises(ValueError, match="'alignment' takes several values"):
        fs.summarize(df, "d_model", "loss_barrier")
    assert fs.summarize(df, "d_model", "loss_barrier", where={"alignment": "weights"})["n"].tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"no column\(s\) \['width'\]"):
        fs.metric_plot(df, "width", "loss_barrier")
    with pytest.raises(ValueError, match="spread must be one of"):
        fs.metric_plot(df, "d_model", "loss_barrier", color="alignment", spread="iqr")
    with pytest.raises(ValueError, match="where: df has no column"):
        fs.summarize(df, "d_model", "loss_barrier", where={"n_layers": 2})
    with pytest.raises(ValueError, match="df must be a DataFrame"):
        fs.summarize([1, 2], "d_model", "loss_barrier")
    for empty in (fs.metric_plot(None, "d_model", "loss_barrier"),
                  fs.metric_plot(df, "d_model", "no_such_metric")):
        assert not empty.data and empty.layout.annotations
