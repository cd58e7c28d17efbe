"""A run's ``run.json`` and ``metrics.csv`` checked before they are trusted: the format fields, the model and
train configs by their own ``validate()``, the dataset spec by :func:`workbench.data.check_spec`, the
frozen list, the size of ``meta`` and the metrics table's columns. Failures are :class:`StoreError`
messages naming the run, the file and the field.
"""
from __future__ import annotations

import dataclasses

import pandas as pd

from ...core import data as _data
from ...core import models as _models
from ...core.training import TrainConfig
from .names import StoreError, check_user

# ============================================================================ run.json validation


def _required_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


_DOC_FIELDS = {"format": str, "version": int, "name": str, "created": str, "status": str,
               "model": dict, "train": dict, "dataset": dict}
META_MAX_BYTES = 2 * 2**20  # run.json "meta" as JSON: the engine's notes (growth stages, collapse recipe, ...)
_MAX_FROZEN = 100_000   # parameter names in run.json's "frozen" list


def _validate_doc(doc: dict, where: str) -> tuple:
    """``(model_config, train_config)`` of a run document, or :class:`StoreError` naming ``where``
    (the run and its file) and the field. Uses the configs' own ``validate()`` and
    :func:`workbench.data.check_options`."""

    def bad(field: str, why: str):
        raise StoreError(f"{where}: field {field!r}: {why}")

    for key, typ in _DOC_FIELDS.items():
        if key not in doc:
            bad(key, "missing")
        if not isinstance(doc[key], typ) or isinstance(doc[key], bool):
            bad(key, f"must be a {'JSON object' if typ is dict else typ.__name__}, got {doc[key]!r}"[:300])
    if not isinstance(doc.get("meta", {}), dict):
        bad("meta", f"must be a JSON object, got {doc['meta']!r}"[:300])
    if doc.get("owner") is not None:
        try:
            check_user("owner", doc["owner"])
        except ValueError as e:
            bad("owner", str(e))
    if not isinstance(doc.get("shared", False), bool):
        bad("shared", f"must be true or false, got {doc['shared']!r}"[:300])

    m = doc["model"]
    fam = _models.FAMILIES.get(m.get("family")) if isinstance(m.get("family"), str) else None
    if fam is not None:
        for f in _required_fields(fam.config):
            if f not in m:
                bad(f"model.{f}", "missing")
    try:
        config = _models.config_from_dict(m)
        config.validate()
    except (ValueError, TypeError) as e:
        bad("model", f"invalid model config: {e}")

    t = doc["train"]
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(t) - allowed)
    if unknown:
        bad(f"train.{unknown[0]}", f"unknown train config field (allowed: {sorted(allowed)})")
    try:
        train_config = TrainConfig(**t).validate()
    except (ValueError, TypeError) as e:
        bad("train", f"invalid train config: {e}")

    try:
        _data.check_spec(doc["dataset"], allow_path=True)
    except (ValueError, TypeError) as e:
        bad(_spec_field(doc["dataset"], "dataset"), f"invalid dataset spec: {e}")
    frozen = doc.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen) or len(frozen) > _MAX_FROZEN:
        bad("frozen", f"must be a list of at most {_MAX_FROZEN} parameter names, got {frozen!r}"[:300])
    return config, train_config


def _spec_field(spec, field: str) -> str:
    """Where in a dataset spec :func:`workbench.data.check_spec` failed, for the message: the part of a
    concatenation (``dataset.parts[1]``) and its ``name`` when that is what is wrong."""
    if not isinstance(spec, dict):
        return field
    parts = spec.get("parts")
    if isinstance(parts, list):
        for i, part in enumerate(parts):
            try:
                _data.check_spec(part, allow_path=True)
            except (ValueError, TypeError, RecursionError):
                return _spec_field(part, f"{field}.parts[{i}]")
        return field
    name = spec.get("name")
    if not isinstance(name, str) or name not in _data.names():
        return f"{field}.name"
    return field


# ============================================================================ metrics.csv


_METRIC_COLUMNS = ["step", "split", "metric", "value"]


def _check_metrics(metrics: pd.DataFrame, where: str) -> None:
    missing = [c for c in _METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise StoreError(f"{where}: metrics table lacks column(s) {missing} (needs {_METRIC_COLUMNS})")
    for c in ("step", "value"):
        if len(metrics) and not pd.api.types.is_numeric_dtype(metrics[c]):
            raise StoreError(f"{where}: metrics column {c!r} must be numeric, got dtype {metrics[c].dtype}")
