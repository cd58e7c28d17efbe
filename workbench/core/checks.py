"""Argument checks shared by every public function: one message shape, naming the argument and its range.

Every check raises :class:`ValueError` (never coerces): ``"lr must be a number in (0, 10], got True"``.
Booleans are not integers here, floats are not integers, and a string is never a number. Resource
limits come from the environment (``WORKBENCH_MAX_MODEL_MB`` ...) through :func:`env_limit`, read at
call time so a server's settings apply without re-importing.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Iterable

import torch

__all__ = ["check_int", "check_float", "check_bool", "check_choice", "check_choices", "check_seed", "check_str", "check_labels",
           "check_tokens", "check_features", "env_limit", "SEED_MAX", "Interval", "OneOf", "bounded", "constraints",
           "check_fields"]

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds must fit in 32 bits


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` must be a Python/numpy integer (not a bool, not a float) in ``[lo, hi]``; returns it as ``int``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, torch.Tensor)) \
        and not _is_numpy_bool(value)
    if ok:
        v = int(value)
        ok = (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        raise ValueError(f"{name} must be an integer{_range(lo, hi)}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` must be a finite real number (int or float, not a bool) in the range; returns it as ``float``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)) and not _is_numpy_bool(value)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) \
            and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        raise ValueError(f"{name} must be a finite number{_range(lo, hi, lo_open, hi_open)}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (``"no"``, 0 and 1 are refused: no truthiness)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable) -> Any:
    """``value`` must be one of ``allowed`` (listed in the message)."""
    allowed = list(allowed)
    try:
        ok = value in allowed and not isinstance(value, bool)
    except TypeError:  # unhashable or incomparable
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_choices(name: str, values: Any, allowed: Iterable) -> list:
    """A non-empty list (or tuple) of distinct values drawn from ``allowed``; returns it as a list."""
    allowed = list(allowed)
    kind = name.rstrip("s") or name
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list drawn from {allowed}, got {values!r}")
    for v in values:
        check_choice(f"{name}[]", v, allowed)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a {kind}, got {list(values)}")
    return list(values)


def check_str(name: str, value: Any, max_len: int | None = None) -> str:
    if not isinstance(value, str) or (max_len is not None and len(value) > max_len):
        extra = f" of at most {max_len} characters" if max_len is not None else ""
        shown = value if not isinstance(value, str) else value[:40] + ("..." if len(value) > 40 else "")
        raise ValueError(f"{name} must be a string{extra}, got {shown!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A seed: an integer in [0, 2**32 - 1] (numpy and scikit-learn take no more)."""
    return check_int(name, value, 0, SEED_MAX)


def check_labels(name: str, y: Any, n_classes: int | None = None, *, ignore: int | None = None) -> torch.Tensor:
    """Integer class labels ``(N,)`` or ``(N, T)`` in ``[0, n_classes)`` (``ignore`` allowed too); no coercion."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got dtype {y.dtype}")
    if y.numel():
        valid = y if ignore is None else y[y != ignore]
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            top = "" if n_classes is None else f", {n_classes - 1}"
            if lo < 0 or (n_classes is not None and hi >= n_classes):
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} must be class indices in [0{top}], got {bad}")
    return y


def check_tokens(name: str, x: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Integer token ids in ``[0, vocab_size)``; float, bool or complex ids are refused, not rounded."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            top = "" if vocab_size is None else f", {vocab_size - 1}"
            raise ValueError(f"{name} must be token ids in [0{top}], got {lo if lo < 0 else hi}")
    return x


def check_features(name: str, h: Any, ndim: int | None = None) -> torch.Tensor:
    """Real floating-point features (complex, integer and bool tensors are refused), all finite."""
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of real features, got {type(h).__name__}")
    if not h.dtype.is_floating_point:
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {h.dtype}")
    if ndim is not None and h.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(h.shape)}")
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or Inf)")
    return h


def env_limit(variable: str, default: float) -> float:
    """A positive resource limit from the environment (e.g. ``WORKBENCH_MAX_MODEL_MB``), else ``default``."""
    raw = os.environ.get(variable)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{variable} must be a positive number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{variable} must be a positive number, got {raw!r}")
    return value


def _is_numpy_bool(value) -> bool:
    return type(value).__name__ == "bool_"


# ----------------------------------------------------------------------------- declared constraints
# A bound is declared once, next to the field it bounds (scikit-learn's ``_parameter_constraints``, as
# dataclass field metadata): ``d_model: int = bounded(128, Interval(int, 1, 8192))``. ``validate()``
# checks the fields with :func:`check_fields`; sweeps, growth limits, the dashboard's widgets and the
# property tests read the same objects through :func:`constraints`.


@dataclasses.dataclass(frozen=True)
class Interval:
    """A number of ``kind`` (``int`` or ``float``) in ``[lo, hi]``, either end open when asked, None unbounded."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, name: str, value: Any):
        if self.kind is int:
            return check_int(name, value, self.lo, self.hi)
        return check_float(name, value, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        return what + _range(self.lo, self.hi, self.lo_open, self.hi_open)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of ``values`` (a string field's choices)."""

    values: tuple

    def check(self, name: str, value: Any):
        return check_choice(name, value, self.values)

    def __str__(self) -> str:
        return f"one of {list(self.values)}"


def bounded(default: Any, constraint: "Interval | OneOf") -> Any:
    """A dataclass field with ``default`` and its ``constraint`` (read by :func:`constraints`)."""
    return dataclasses.field(default=default, metadata={"constraint": constraint})


def constraints(cls_or_obj) -> dict[str, "Interval | OneOf"]:
    """``{field: constraint}`` of a dataclass's declared bounds, in field order."""
    return {f.name: f.metadata["constraint"] for f in dataclasses.fields(cls_or_obj) if "constraint" in f.metadata}


def check_fields(obj, skip: Iterable[str] = ()):
    """Check every field of dataclass ``obj`` that declares a constraint; checked values are stored back
    (a ``numpy.int64`` becomes an ``int``). Returns ``obj``."""
    skip = set(skip)
    for name, constraint in constraints(obj).items():
        if name not in skip:
            setattr(obj, name, constraint.check(name, getattr(obj, name)))
    return obj
