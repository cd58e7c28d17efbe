"""What every experiment does the same way: open its data, read its choices, write them as code."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SIZE_KEYS = ("d_model", "n_layers", "d_hidden", "n_heads", "d_mlp")


def status(run_status: str) -> str:
    """A Run's status as a sweep point's (``completed`` -> ``done``)."""
    return {"completed": "done"}.get(run_status, run_status)


def load(dataset, data_options: Mapping | None = None):
    """``dataset`` itself when it is a :class:`~workbench.data.Dataset`, else ``data.load(dataset, **data_options)``."""
    from ..core import data

    if isinstance(dataset, data.Dataset):
        if data_options:
            raise ValueError("data_options apply to a dataset name, not to a Dataset already built")
        return dataset
    if data_options is not None and not isinstance(data_options, Mapping):
        raise ValueError(f"data_options must be a dict of dataset options or None, got {type(data_options).__name__}")
    return data.load(dataset, **dict(data_options or {}))


def choices(name: str, value) -> dict:
    """A dict of choices (model overrides, training fields): ``value`` as a dict, {} for None."""
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of {name} options or None, got {type(value).__name__}")
    return dict(value)


def train_config(train):
    """A validated :class:`~workbench.TrainConfig` from a TrainConfig or a dict of its fields."""
    from ..core.training import TrainConfig

    if isinstance(train, TrainConfig):
        return train.validate()
    return TrainConfig(**choices("train", train)).validate()


def size_overrides(ds, **sizes) -> dict:
    """Model size options that are set, checked against the fields of the family that takes ``ds``."""
    from ..core import models

    overrides = {k: v for k, v in sizes.items() if v is not None}
    fam = models.family_of(ds)
    fields = {f.name for f in dataclasses.fields(fam.config)}
    for k in overrides:
        if k not in fields:
            raise ValueError(f"{k} is not an option of the {fam.name!r} models that dataset {ds.name!r} takes; "
                             f"their size options: {[f for f in SIZE_KEYS if f in fields]}")
    return overrides


def kwargs(d: Mapping[str, Any]) -> str:
    """``k=v, ...`` of a dict, values as Python literals."""
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def data_arguments(data_options: Mapping | None, text_file: str | None = None) -> str:
    """The options of a ``wb.data.load(name...)`` line (``, a=1, b=2``); an uploaded text is read from
    ``text_file`` (never written into the code)."""
    options = dict(data_options or {})
    parts = []
    if "text" in options:
        parts.append(f"text=open({text_file or 'my_text.txt'!r}, encoding='utf-8').read()")
    shown = {k: v for k, v in options.items() if k != "text"}
    if shown:
        parts.append(kwargs(shown))
    return "".join(", " + p for p in parts)
