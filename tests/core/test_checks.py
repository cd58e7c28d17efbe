"""workbench.checks: one message shape, no coercion (bools are not numbers, floats are not integers)."""
import math

import numpy as np
import pytest
import torch

from workbench import checks


@pytest.mark.parametrize("value", [True, False, 3.0, "3", None, np.bool_(True), torch.tensor(3), [3]])
def test_check_int_refuses_non_integers(value):
    with pytest.raises(ValueError, match=r"^n must be an integer in \[0, 5\], got"):
        checks.check_int("n", value, 0, 5)


def test_check_int_accepts_numpy_integers_and_bounds():
    assert checks.check_int("n", np.int64(5), 0, 5) == 5 and type(checks.check_int("n", np.int32(1), 0)) is int
    with pytest.raises(ValueError, match=">= 2"):
        checks.check_int("n", 1, 2)
    with pytest.raises(ValueError, match="<= 9"):
        checks.check_int("n", 10, None, 9)


@pytest.mark.parametrize("value", [True, math.nan, math.inf, "0.1", None, 0, 10.5])
def test_check_float_open_and_closed(value):
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0, 10\]"):
        checks.check_float("lr", value, 0, 10, lo_open=True)
    assert checks.check_float("lr", 10, 0, 10, lo_open=True) == 10.0


def test_check_bool_and_choice():
    assert checks.check_bool("tie", False) is False
    for v in ("no", 0, 1, None):
        with pytest.raises(ValueError, match="tie must be True or False"):
            checks.check_bool("tie", v)
    with pytest.raises(ValueError, match=r"norm must be one of \['pre', 'peri'\], got 'post'"):
        checks.check_choice("norm", "post", ["pre", "peri"])
    with pytest.raises(ValueError, match="norm must be one of"):
        checks.check_choice("norm", ["pre"], ["pre", "peri"])  # unhashable


def test_check_seed_range():
    assert checks.check_seed("seed", 2**32 - 1) == 2**32 - 1
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
        checks.check_seed("seed", 2**32)


def test_tensor_checks():
    with pytest.raises(ValueError, match=r"y must be class indices in \[0, 2\], got -1"):
        checks.check_labels("y", torch.tensor([0, -1]), 3)
    with pytest.raises(ValueError, match=r"y must be class indices in \[0, 2\], got 3"):
        checks.check_labels("y", torch.tensor([0, 3]), 3)
    checks.check_labels("y", torch.tensor([0, -100, 2]), 3, ignore=-100)
    with pytest.raises(ValueError, match="integer labels"):
        checks.check_labels("y", torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="integer token ids"):
        checks.check_tokens("x", torch.tensor([[1.5]]), 4)
    with pytest.raises(ValueError, match=r"x must be token ids in \[0, 3\], got 4"):
        checks.check_tokens("x", torch.tensor([[1, 4]]), 4)
    with pytest.raises(ValueError, match="real floating-point"):
        checks.check_features("h", torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="finite"):
        checks.check_features("h", torch.tensor([[math.nan]]))
    with pytest.raises(ValueError, match="2 dimensions"):
        checks.check_features("h", torch.zeros(3), ndim=2)


def test_env_limit(monkeypatch):
    monkeypatch.delenv("WORKBENCH_X_MB", raising=False)
    assert checks.env_limit("WORKBENCH_X_MB", 7) == 7
    monkeypatch.setenv("WORKBENCH_X_MB", "12.5")
    assert checks.env_limit("WORKBENCH_X_MB", 7) == 12.5
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv("WORKBENCH_X_MB", bad)
        with pytest.raises(ValueError, match="WORKBENCH_X_MB must be a positive number"):
            checks.env_limit("WORKBENCH_X_MB", 7)


def test_check_choices():
    assert checks.check_choices("splits", ("train", "val"), ["train", "val"]) == ["train", "val"]
    for bad, msg in [("train", "non-empty list"), ([], "non-empty list"), (["test"], r"splits\[\] must be one of"),
                     (["val", "val"], "must not repeat a split")]:
        with pytest.raises(ValueError, match=msg):
            checks.check_choices("splits", bad, ["train", "val"])


def test_declared_constraints_check_fields_and_say_their_range():
    import dataclasses

    from workbench.core.checks import Interval, OneOf, bounded, check_fields, constraints

    @dataclasses.dataclass
    class Config:
        width: int = bounded(8, Interval(int, 1, 64))
        rate: float = bounded(0.5, Interval(float, 0.0, 1.0, lo_open=True))
        mode: str = bounded("a", OneOf(("a", "b")))
        free: int = 3

    assert list(constraints(Config)) == ["width", "rate", "mode"]
    assert str(constraints(Config)["width"]) == "an integer in [1, 64]"
    assert str(constraints(Config)["rate"]) == "a finite number in (0.0, 1.0]"
    assert check_fields(Config(width=np.int64(64))).width == 64 and type(Config(width=np.int64(3)).width) is not int
    assert type(check_fields(Config(width=np.int64(3))).width) is int
    for bad, message in [({"width": 65}, "width must be an integer in [1, 64], got 65"),
                         ({"width": True}, "width must be an integer in [1, 64], got True"),
                         ({"rate": 0.0}, "rate must be a finite number in (0.0, 1.0], got 0.0"),
                         ({"mode": "c"}, "mode must be one of ['a', 'b'], got 'c'")]:
        with pytest.raises(ValueError) as e:
            check_fields(Config(**bad))
        assert str(e.value) == message
    assert check_fields(Config(free=-5)).free == -5   # no constraint declared: not checked here
