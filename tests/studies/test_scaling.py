"""Power-law fits: a known exponent with noise and an outlier is recovered; bad input refused by name."""
import numpy as np
import pandas as pd
import pytest

from workbench import scaling


def _synthetic(seed=0):
    rng = np.random.default_rng(seed)
    x = np.logspace(2, 6, 12)
    y = 50 * x ** -0.35 + 0.8
    y = y * (1 + 0.02 * rng.standard_normal(len(x)))
    y[5] *= 1.3   # one 30% outlier
    return x, y


def test_known_exponent_with_noise_and_outlier_is_recovered():
    x, y = _synthetic()
    f = scaling.fit(x, y, n_starts=8, n_boot=10, seed=0)
    assert f.alpha == pytest.approx(0.35, abs=0.03)
    assert f.c == pytest.approx(0.8, abs=0.15)
    assert f.a == pytest.approx(50, rel=0.15)
    assert np.allclose(f.predict(x), f.a * x ** -f.alpha + f.c)
    lo, hi = f.band["alpha"]
    assert lo <= hi and f.boot.shape[1] == 3
    # a plain (non-robust) least squares on the same points is pulled further by the outlier
    plain = scaling.fit(x, y, n_starts=8, n_boot=0, f_scale=100.0)
    assert abs(f.alpha - 0.35) <= abs(plain.alpha - 0.35) + 1e-6
    # seeded: the same call gives the same fit
    again = scaling.fit(x, y, n_starts=8, n_boot=10, seed=0)
    assert (again.a, again.alpha, again.c) == (f.a, f.alpha, f.c)


def test_exact_power_law_without_noise():
    x = np.array([1.0, 2, 4, 8, 16, 32])
    y = 3.0 * x ** -0.5 + 0.25
    f = scaling.fit(x, y, n_starts=8, n_boot=0)
    assert (f.a, f.alpha, f.c) == pytest.approx((3.0, 0.5, 0.25), rel=1e-4)


def test_extrapolation_error_on_held_out_points():
    x, y = _synthetic()
    e = scaling.extrapolation(x, y, n_heldout=2, n_starts=8, n_boot=0)
    assert list(e["x"]) == list(x[-2:])
    assert np.allclose(e["rel_error"], np.abs(e["fit"].predict(x[-2:]) - y[-2:]) / y[-2:])
    assert np.all(e["rel_error"] < 0.2)


@pytest.mark.parametrize("x, y, field", [
    ([1, 2, 3, 4], [1, 0, 1, 1], "y must be a list of positive"),
    ([1, 2, -3, 4], [1, 1, 1, 1], "x must be a list of positive"),
    ([1, 2, 3], [1, 1, 1], "at least 4 points"),
    ([1, 2, 3, 4], [1, 1, 1], "same length"),
    ([1, 2, 3, 4], [1, 1, float("nan"), 1], "y must be"),
])
def test_bad_input_names_the_field(x, y, field):
    with pytest.raises(ValueError, match=field):
        scaling.fit(x, y, n_boot=0)


def test_sweep_on_digits_returns_the_table():
    t = scaling.sweep("width", (4, 8), steps=3)
    assert isinstance(t, pd.DataFrame) and list(t["value"]) == [4, 8]
    assert t["params"].is_monotonic_increasing and np.all(t["val_loss"] > 0)
    with pytest.raises(ValueError, match="axis"):
        scaling.sweep("heads", (1, 2))


def test_sweep_reports_each_point_to_its_monitor_and_a_stop_keeps_the_points_finished():
    import workbench as wb

    tables, progress = [], []
    m = wb.monitor.Monitor(lambda p, msg, payload: (progress.append(p),
                                                    tables.append(len(payload)) if payload is not None else None))
    scaling.sweep("width", (4, 8), steps=3, monitor=m)
    assert tables == [1, 2] and progress == sorted(progress) and progress[-1] == 1.0

    class StopAfterFirst(wb.monitor.Monitor):
        def _send(self, p, msg, payload):
            if payload is not None:
                self.stop()

    t = scaling.sweep("width", (4, 8, 16), steps=3, monitor=StopAfterFirst())
    assert list(t["value"]) == [4]
