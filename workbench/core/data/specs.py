"""Stored dataset specs (what a run keeps of its data): :func:`from_spec` rebuilds the data, :func:`check_spec`
checks a spec without building it; a concatenation's spec lists its parts. The dashboard refuses a
spec that names a server path.
"""
from __future__ import annotations

import torch

from ..checks import check_bool
from .dataset import Dataset
from .options import _SPECS, _short, check_options, load, names

PATH_REFUSED = "text datasets from the dashboard come by upload, not as a server path"
MAX_PARTS = 64              # parts of a concatenated dataset's spec
MAX_NESTING = 4             # concatenations of concatenations: at most this many levels
def from_spec(spec: dict, *, allow_path: bool = True) -> Dataset:
    """Rebuild a dataset from its :meth:`Dataset.spec` (the one way to rebuild the data of a stored run).

    ``allow_path=False`` (the dashboard) refuses a spec that names a file on the server;
    old specs holding ``"path": None`` are accepted. A concatenation's spec
    (``{"name": ..., "parts": [spec, ...]}``, see ``compose.concat``) rebuilds every part and
    concatenates them.
    """
    return _from_spec(spec, allow_path, 0)


def _from_spec(spec, allow_path: bool, depth: int) -> Dataset:
    name, options = _split_spec(spec, allow_path, depth)
    if "parts" in options:
        return _concat_from_spec(name, options["parts"], allow_path, depth)
    return load(name, **options)


def check_spec(spec: dict, *, allow_path: bool = True) -> dict:
    """Validate a stored dataset spec as :func:`from_spec` would, without building the data or reading a file.

    Returns the spec; raises ``ValueError`` naming what is wrong (for the run store's load).
    Combinations checked only while building (e.g. ``khop.length`` with ``layout="table"``) are left to it.
    """
    _check_spec(spec, allow_path, 0)
    return spec


def _check_spec(spec, allow_path: bool, depth: int) -> None:
    name, options = _split_spec(spec, allow_path, depth)
    if "parts" in options:
        for part in options["parts"]:
            _check_spec(part, allow_path, depth + 1)
    else:
        check_options(name, **options)


def _split_spec(spec, allow_path, depth: int = 0) -> tuple[str, dict]:
    check_bool("allow_path", allow_path)
    if not isinstance(spec, dict):
        raise ValueError(f"dataset spec must be a dict with a 'name', got {_short(spec)}")
    options = dict(spec)
    name = options.pop("name", None)
    if "parts" in options:
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise ValueError(f"dataset spec: name must be a string of 1 to 100 characters, got {_short(name)}")
        if set(options) != {"parts"}:
            raise ValueError(f"dataset spec of a concatenation takes only 'name' and 'parts', got "
                             f"{sorted(options, key=str)}")
        parts = options["parts"]
        if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"dataset spec: parts must be a list of 1 to {MAX_PARTS} dataset specs, got "
                             f"{_short(parts)}")
        if depth >= MAX_NESTING:
            raise ValueError(f"dataset spec: concatenations may be nested at most {MAX_NESTING} deep")
        return name, options
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"dataset spec: name must be one of {names()}, got {_short(name)}")
    if options.get("path") is not None and not allow_path:
        raise ValueError(PATH_REFUSED)
    return name, options


def _concat_from_spec(name: str, parts: list, allow_path: bool, depth: int = 0) -> Dataset:
    built = [_from_spec(p, allow_path, depth + 1) for p in parts]
    first = built[0]
    for d in built[1:]:
        if d.kind != first.kind or d.n_classes != first.n_classes or d.vocab != first.vocab \
                or d.x_train.shape[1:] != first.x_train.shape[1:]:
            raise ValueError("dataset spec: the parts of a concatenation must share kind, vocabulary and shape")
    cat = lambda attr: torch.cat([getattr(d, attr) for d in built])  # noqa: E731
    return Dataset(name, first.kind, cat("x_train"), cat("y_train"), cat("x_val"), cat("y_val"), first.n_classes,
                   f"concatenation of {len(built)} datasets: " + "; ".join(d.description for d in built),
                   first.vocab, {"parts": [d.spec() for d in built]})
