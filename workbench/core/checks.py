"""Argument checks shared by every public function: one message shape, naming the argument and its range.

Every check raises :class:`ValueError` (never coerces): ``"lr must be a number in (0, 10], got True"``.
Booleans are not integers here, floats are not integers, and a string is never a number. Resource
limits come from the environment (``WORKBENCH_MAX_MODEL_MB`` ...) through :func:`env_limit`, read at
call time so a server's settings apply without re-importing.

"Is this a workbench model / Dataset?" is one refusal too (:func:`check_model`, :func:`check_dataset`):
the model families and the dataset type register themselves here when their modules load, so this
module imports neither. It imports no torch either (a tensor can only exist once torch is loaded), so
the command-line tools that check user names (``python -m workbench.classroom credentials``) start
without it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import sys
from typing import Any, Iterable

__all__ = ["check_int", "check_float", "check_bool", "check_choice", "check_choices", "check_seed", "check_str",
           "check_labels", "check_tokens", "check_features", "check_user", "check_model", "check_dataset",
           "as_tensor", "env_limit", "SEED_MAX", "USER_MAX_CHARS", "Interval", "OneOf", "Flag", "bounded",
           "required", "constraints", "check_fields", "register_model", "register_dataset"]

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds must fit in 32 bits


def _is_tensor(value) -> bool:
    """``value`` is a ``torch.Tensor`` (without importing torch: if it is not loaded, nothing is a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


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
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _is_tensor(value) \
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
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_tensor(value) \
        and not _is_numpy_bool(value)
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


def check_labels(name: str, y: Any, n_classes: int | None = None, *, ignore: int | None = None):
    """Integer class labels ``(N,)`` or ``(N, T)`` in ``[0, n_classes)`` (``ignore`` allowed too); no coercion."""
    if not _is_tensor(y):
        raise ValueError(f"{name} must be a torch.Tensor of integer labels, got {type(y).__name__}")
    import torch

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


def check_tokens(name: str, x: Any, vocab_size: int | None = None):
    """Integer token ids in ``[0, vocab_size)``; float, bool or complex ids are refused, not rounded."""
    if not _is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    import torch

    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            top = "" if vocab_size is None else f", {vocab_size - 1}"
            raise ValueError(f"{name} must be token ids in [0{top}], got {lo if lo < 0 else hi}")
    return x


def check_features(name: str, h: Any, ndim: int | None = None):
    """Real floating-point features (complex, integer and bool tensors are refused), all finite."""
    if not _is_tensor(h):
        raise ValueError(f"{name} must be a torch.Tensor of real features, got {type(h).__name__}")
    import torch

    if not h.dtype.is_floating_point:
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {h.dtype}")
    if ndim is not None and h.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(h.shape)}")
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or Inf)")
    return h


def as_tensor(name: str, value: Any, *, scalar: bool = False):
    """``value`` as a tensor with its own dtype (numpy arrays and lists keep theirs: nothing is cast);
    ``scalar=True`` also takes a single number. Anything else: ``ValueError`` naming ``name``."""
    if _is_tensor(value):
        return value
    import numpy as np

    if isinstance(value, (np.ndarray, list, tuple)) or (scalar and np.isscalar(value)):
        import torch

        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"{name} must be a tensor or an array of numbers, got {type(value).__name__}")


USER_MAX_CHARS = 64
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_USER_RULE = (f"a user name of 1 to {USER_MAX_CHARS} characters (letters, digits and _ . @ + -, "
              "starting with a letter or digit)")


def check_user(name: str, value) -> str:
    """A user name (signed-in user, run owner, teacher): ``value`` itself, or ValueError naming ``name``.

    Names are untrusted (a login form, an OAuth provider): 1 to 64 characters, letters, digits and
    ``_ . @ + -``, starting with a letter or digit; no spaces, slashes, quotes or markup.
    """
    if not isinstance(value, str) or len(value) > USER_MAX_CHARS or not _USER.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"{name} must be {_USER_RULE}, got {shown}")
    return value


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
# property tests read the same objects through :func:`constraints` (the data options' table holds
# the same objects).


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
        value = check_choice(name, value, self.values)
        return str(value) if isinstance(value, str) else value   # a numpy.str_ becomes a plain str

    def __str__(self) -> str:
        return f"one of {list(self.values)}"


@dataclasses.dataclass(frozen=True)
class Flag:
    """``True`` or ``False`` (no truthiness: ``0``, ``1`` and ``"no"`` are refused)."""

    def check(self, name: str, value: Any):
        return check_bool(name, value)

    def __str__(self) -> str:
        return "True or False"


Constraint = Interval | OneOf | Flag


def bounded(default: Any, constraint: Constraint) -> Any:
    """A dataclass field with ``default`` and its ``constraint`` (read by :func:`constraints`)."""
    return dataclasses.field(default=default, metadata={"constraint": constraint})


def required(constraint: Constraint) -> Any:
    """A dataclass field without a default (the caller must give it), with its ``constraint``."""
    return dataclasses.field(metadata={"constraint": constraint})


def constraints(cls_or_obj) -> dict[str, Constraint]:
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


# ----------------------------------------------------------------------------- workbench models and datasets
# The model families (workbench.core.models) and the Dataset type (workbench.core.data) register here when
# they load: this module stays below them and imports neither.

_MODELS: dict[str, type] = {}     # family name -> model class
_DATASETS: list[type] = []


def register_model(family: str, cls: type) -> None:
    """Make instances of ``cls`` (family ``family``) pass :func:`check_model`."""
    _MODELS[family] = cls


def register_dataset(cls: type) -> None:
    """Make instances of ``cls`` pass :func:`check_dataset`."""
    if cls not in _DATASETS:
        _DATASETS.append(cls)


def check_model(name: str, value: Any, families: Iterable[str] | None = None):
    """``value`` must be a workbench model (``ResidualMLP`` or ``Transformer``), of one of ``families`` when
    given (family names, ``"mlp"``, ``"transformer"``); returns it. A Hugging Face model, a mixture or any
    other module is refused, naming ``name``: ``"model must be a workbench model (ResidualMLP or
    Transformer), got GPT2LMHeadModel"``."""
    wanted = list(_MODELS) if families is None else list(families)
    classes = [_MODELS[f] for f in wanted if f in _MODELS]
    if not classes or not isinstance(value, tuple(classes)):
        what = " or ".join(c.__name__ for c in classes)
        raise ValueError(f"{name} must be a workbench model{f' ({what})' if what else ''}, got {type(value).__name__}")
    return value


def check_dataset(name: str, value: Any, kind: str | None = None):
    """``value`` must be a workbench ``Dataset`` (``wb.data.load(...)``), holding ``kind`` data (``"vector"``
    or ``"sequence"``) when given; returns it."""
    if not _DATASETS or not isinstance(value, tuple(_DATASETS)):
        raise ValueError(f"{name} must be a workbench Dataset (wb.data.load(...)), got {type(value).__name__}")
    if kind is not None and value.kind != kind:
        raise ValueError(f"{name} must be a workbench Dataset of {kind} data, got the {value.kind} dataset "
                         f"{value.name!r}")
    return value
