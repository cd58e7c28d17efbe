"""The datasets' options, each with its default and declared bound, checked before any work (a message
naming ``dataset.option`` and its range); :func:`load` and :func:`shape_of` dispatch on the name.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from ..checks import SEED_MAX, Interval, OneOf, env_limit
from .dataset import Dataset, Shape
from .sequence import KHOP_LAYOUTS, _khop, _khop_shape, _modadd, _modadd_shape
from .text import CORPORA, _text, _text_shape, _too_big, max_text_bytes
from .vector import _digits, _digits_shape, _mnist1d, _mnist1d_shape

TEXT_SOURCES = ("path", "text", "corpus")  # the text dataset takes exactly one
MAX_VOCAB_CHARS = 2**20     # the text dataset's vocab option (models.VOCAB_MAX tokens)
# ----------------------------------------------------------------------------- options

_SEED = Interval(int, 0, SEED_MAX)   # seeds fit numpy's 32 bits
_NODES = Interval(int, 2, 52)        # khop's node symbols: a-z, A-Z
# name -> {option: (default, constraint)}: an Interval or OneOf (workbench.checks, the objects the model and
# training configs declare), or str for the text dataset's free-text options (path, text, vocab; checked below).
_SPECS: dict[str, dict[str, tuple]] = {
    "digits": {"seed": (0, _SEED), "val_fraction": (0.2, Interval(float, 0.05, 0.5))},
    "mnist1d": {"seed": (42, _SEED), "num_samples": (5000, Interval(int, 100, 100_000))},
    "khop": {"hops": (2, Interval(int, 1, 8)), "nodes": (12, _NODES), "length": (0, Interval(int, 0, _NODES.hi)),
             "queries": (1, Interval(int, 1, 52)), "layout": ("edges", OneOf(KHOP_LAYOUTS)),
             "n_train": (20000, Interval(int, 10, 1_000_000)), "n_val": (2000, Interval(int, 10, 100_000)),
             "seed": (0, _SEED)},
    "modadd": {"p": (97, Interval(int, 2, 1000)), "train_fraction": (0.5, Interval(float, 0.01, 0.99)),
               "seed": (0, _SEED)},
    "text": {"path": (None, str), "text": (None, str), "context": (64, Interval(int, 2, 4096)),
             "val_fraction": (0.1, Interval(float, 0.01, 0.5)), "vocab": (None, str),
             "corpus_chars": (200_000, Interval(int, 1000, 10_000_000)), "seed": (0, _SEED),
             "corpus": ("grammar", OneOf(tuple(sorted(CORPORA))))},
}
# name -> Dataset.kind: what a dataset holds, known from its name alone (the model family follows from it).
_KINDS = {"digits": "vector", "mnist1d": "vector", "khop": "sequence", "modadd": "sequence", "text": "sequence"}
# Options for which None is a documented value ("not given"); None is refused everywhere else.
_NONE_OK = {("text", "path"), ("text", "text"), ("text", "vocab"), ("text", "corpus")}


def names() -> list[str]:
    return list(_SPECS)


def options_spec(name: str) -> dict[str, tuple]:
    """``{option: (default, type, low, high)}`` for a dataset (used to build widgets): numbers with their
    declared bounds, strings (choices and free text) as ``(default, str, None, None)``."""
    _check_name(name)
    return {key: (default, c.kind, c.lo, c.hi) if isinstance(c, Interval) else (default, str, None, None)
            for key, (default, c) in _SPECS[name].items()}


def option_constraints(name: str) -> dict:
    """``{option: constraint}`` for a dataset: the declared :class:`~workbench.checks.Interval` or
    :class:`~workbench.checks.OneOf` of each option (``None`` for free text: a path, a text, a vocabulary),
    the objects :func:`load` checks against (the form a page or a property test reads)."""
    _check_name(name)
    return {key: None if c is str else c for key, (_, c) in _SPECS[name].items()}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"dataset must be one of {names()}, got {_short(name)}")


def kind_of(name: str) -> str:
    """``"vector"`` (features and one label per example) or ``"sequence"`` (tokens and per-position targets):
    the :attr:`Dataset.kind` of dataset ``name``, without building it."""
    _check_name(name)
    return _KINDS[name]


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _range(c: Interval) -> str:
    return f"[{c.lo}, {'inf' if c.hi is None else c.hi}]"


def _check_option(name: str, key: str, value, constraint):
    """One option: type first (bools are not numbers, floats not integers), then range; returns it normalised."""
    qual = f"{name}.{key}"
    if value is None and (name, key) in _NONE_OK:
        return None
    if isinstance(constraint, OneOf):
        return constraint.check(qual, value)
    if not isinstance(constraint, Interval):
        return _check_str_option(name, key, value)
    typ, lo, hi, rng = constraint.kind, constraint.lo, constraint.hi, _range(constraint)
    if typ is int:
        if not isinstance(value, numbers.Integral) or _is_bool(value) or isinstance(value, torch.Tensor):
            raise ValueError(f"{qual} must be an integer in {rng}, got {value!r}")
        value = int(value)
    elif typ is float:
        if not isinstance(value, numbers.Real) or _is_bool(value) or isinstance(value, torch.Tensor) \
                or not math.isfinite(float(value)):
            raise ValueError(f"{qual} must be a number in {rng}, got {value!r}")
        value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{qual} must be in {rng}, got {value!r}")
    return value


def _check_str_option(name: str, key: str, value):
    qual = f"{name}.{key}"
    if key == "path":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{qual} must be a file path (a non-empty string) or None, got {_short(value)}")
        return value
    if key == "text":
        if isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{qual} must be a string (decode the uploaded bytes as UTF-8 first), got bytes")
        if not isinstance(value, str):
            raise ValueError(f"{qual} must be a string (the text itself) or None, got {_short(value)}")
        if len(value) > max_text_bytes() or len(value.encode("utf-8", "surrogatepass")) > max_text_bytes():
            raise _too_big(qual, len(value.encode("utf-8", "surrogatepass")))
        return value
    if key == "vocab":  # a string of characters (a list of one-character strings is joined)
        if isinstance(value, (list, tuple)) and all(isinstance(c, str) and len(c) == 1 for c in value):
            value = "".join(value)
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_VOCAB_CHARS:
            raise ValueError(f"{qual} must be a string of 1 to {MAX_VOCAB_CHARS} characters (the alphabet) or "
                             f"None, got {_short(value)}")
        return value
    raise AssertionError(f"no check for the string option {qual}")  # pragma: no cover


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_options(name: str, options: dict) -> dict:
    spec = _SPECS[name]
    unknown = set(options) - set(spec)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for dataset {name!r}; allowed: {sorted(spec)}")
    out = {}
    for key, (default, c) in spec.items():
        if key in options and options[key] is None and (name, key) not in _NONE_OK:
            if isinstance(c, Interval):
                what = f"{'an integer' if c.kind is int else 'a number'} in {_range(c)}"
            else:
                what = f"one of {list(c.values)}" if isinstance(c, OneOf) else "given"
            raise ValueError(f"{name}.{key} must be {what}, got None (leave it out to use the default {default!r})")
        out[key] = _check_option(name, key, options.get(key, default), c)
    if name == "text":
        given = [k for k in TEXT_SOURCES if options.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"text: give exactly one of path, text or corpus, got {' and '.join(given)}")
        if given and given[0] != "corpus":
            out["corpus"] = None
        elif out["corpus"] is None:
            out["corpus"] = spec["corpus"][0]  # corpus=None with no other source: the documented default
    if name == "khop":
        _check_khop_combination(out)
        _check_khop_size(out)
    return out


def _check_khop_combination(o: dict) -> None:
    if o["layout"] == "table" and o["length"] not in (0, o["nodes"]):
        raise ValueError(f"khop.length must be 0 or nodes={o['nodes']} with layout='table', got {o['length']}")
    if o["length"] > o["nodes"]:
        raise ValueError(f"khop.length must be in [1, nodes={o['nodes']}] (or 0: nodes), got {o['length']}")


def _check_khop_size(o: dict) -> None:
    """Bound the memory of the generated tensors (``WORKBENCH_MAX_DATA_MB``, default 1024)."""
    length = o["length"] or o["nodes"]
    seq = o["nodes"] + 1 + o["queries"] if o["layout"] == "table" else 2 * length + 1 + 2 * o["queries"]
    n = o["n_train"] + o["n_val"]
    need = n * (2 * 8 * seq + 16 * o["nodes"])  # x and y int64, plus the per-sequence draws
    limit = env_limit("WORKBENCH_MAX_DATA_MB", 1024)
    if need > limit * 2**20:
        raise ValueError(f"khop: {n} sequences of length {seq} need about {need / 2**20:,.0f} MB, more than "
                         f"the limit of {limit:g} MB (WORKBENCH_MAX_DATA_MB); lower n_train or n_val")


def check_options(name: str, **options) -> dict:
    """Validate options without building the data (no file is read); returns them with defaults filled in."""
    _check_name(name)
    return _resolve_options(name, options)


def load(name: str, **options) -> Dataset:
    """Build dataset ``name`` offline; see :func:`options_spec` for each one's options and ranges.

    ``None`` is refused with a message naming the option and its range, except where it is a
    documented value: the ``text`` dataset's ``path``, ``text`` and ``vocab`` (not given) and
    ``corpus`` (not given; ``"grammar"`` when neither ``path`` nor ``text`` is given either).
    The ``text`` dataset takes exactly one of ``path``, ``text`` and ``corpus``.
    """
    _check_name(name)
    opts = _resolve_options(name, options)
    return _LOADERS[name](**opts)


def shape_of(name: str, **options) -> Shape:
    """The :class:`Shape` of ``load(name, **options)`` -- input size, classes or vocabulary (with its tokens),
    sequence length, split sizes -- computed from the options alone: no tensor is generated, so a form
    can be checked and a model config built at once, whatever sizes the options ask for.

    Options are checked as :func:`load` checks them (same messages). The ``text`` dataset's vocabulary
    is the set of its characters: of the given text, or of the built-in corpus's first ``corpus_chars``
    characters (found by generating the corpus only until every character it can write has appeared).
    """
    _check_name(name)
    o = _resolve_options(name, options)
    return _SHAPES[name](o)


_SHAPES = {"digits": _digits_shape, "mnist1d": _mnist1d_shape, "khop": _khop_shape, "modadd": _modadd_shape,
           "text": _text_shape}


_LOADERS = {"digits": _digits, "mnist1d": _mnist1d, "khop": _khop, "modadd": _modadd, "text": _text}
