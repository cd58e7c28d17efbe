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


def test_required_fields_and_flags_are_declared_too():
    import dataclasses

    from workbench.core.checks import Flag, OneOf, check_fields, constraints, required

    @dataclasses.dataclass
    class Config:
        size: int = required(checks.Interval(int, 1, 4))
        on: bool = checks.bounded(False, Flag())
        mode: str = checks.bounded("a", OneOf(("a", "b")))

    with pytest.raises(TypeError):
        Config()                                       # required: no default
    assert str(constraints(Config)["on"]) == "True or False"
    assert type(check_fields(Config(size=2, mode=np.str_("b"))).mode) is str   # stored back as a plain str
    for bad, message in [({"size": 5}, "size must be an integer in [1, 4], got 5"),
                         ({"size": 2, "on": 1}, "on must be True or False, got 1")]:
        with pytest.raises(ValueError) as e:
            check_fields(Config(**bad))
        assert str(e.value) == message


def test_one_refusal_for_what_is_not_a_workbench_model_or_dataset():
    import copy

    import workbench as wb

    mlp = wb.models.build(wb.models.MLPConfig(d_in=3, n_classes=2, d_model=8, n_layers=1, d_hidden=8))
    assert checks.check_model("model", mlp) is mlp and checks.check_model("m", copy.deepcopy(mlp), ["mlp"])
    for value, got in [(torch.nn.Linear(2, 2), "Linear"), (mlp.blocks, "ModuleList"), (None, "NoneType")]:
        with pytest.raises(ValueError) as e:
            checks.check_model("model", value)
        assert str(e.value) == f"model must be a workbench model (ResidualMLP or Transformer), got {got}"
    with pytest.raises(ValueError) as e:
        checks.check_model("model_b", mlp, families=("transformer",))
    assert str(e.value) == "model_b must be a workbench model (Transformer), got ResidualMLP"

    modadd = wb.data.load("modadd", p=5)
    assert checks.check_dataset("data", modadd) is modadd and checks.check_dataset("d", modadd, kind="sequence")
    with pytest.raises(ValueError) as e:
        checks.check_dataset("dataset", {"name": "modadd"})
    assert str(e.value) == "dataset must be a workbench Dataset (wb.data.load(...)), got dict"
    with pytest.raises(ValueError) as e:
        checks.check_dataset("dataset", modadd, kind="vector")
    assert str(e.value) == "dataset must be a workbench Dataset of vector data, got the sequence dataset 'modadd'"


def test_as_tensor_keeps_the_dtype_and_names_what_it_refuses():
    assert checks.as_tensor("x", np.arange(3, dtype=np.int16)).dtype == torch.int16
    assert checks.as_tensor("x", [[1.5, 2.0]]).dtype == torch.float64
    t = torch.ones(2)
    assert checks.as_tensor("x", t) is t
    assert checks.as_tensor("x", np.float32(2.0), scalar=True).item() == 2.0
    for bad in ["abc", {"a": 1}, 3, [[1], [2, 3]]]:
        with pytest.raises(ValueError, match=r"^x must be a tensor or an array of numbers, got"):
            checks.as_tensor("x", bad)
