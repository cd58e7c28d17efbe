"""Widgets every page shares: the error box, the text upload, widgets built from a config, run pickers.

Numbers get free-entry inputs: a value out of range is caught by the config's ``validate()``, whose
message names the field and the range; string fields get the values the config accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import panel as pn

from ..core import models
from ..core.checks import Interval, constraints, env_limit
from ..core.training import TrainConfig
from .text import describe_error, escape_md

__all__ = ["ErrorBox", "TextUpload", "UPLOAD_ENV", "config_widgets", "values_from_widgets", "CHOICES",
           "allowed_values", "run_options", "deferred_card"]


def deferred_card(build, **params) -> pn.Card:
    """A collapsed ``pn.Card`` whose content, ``build()`` (a list), is laid out when it is first expanded.

    A collapsed card's children are still sent to the browser and rendered there (hidden): the "Advanced"
    and "As code" cards were most of a page's models (17 number inputs on the Train page), so every
    session paid for building, sending and rendering them although few students open them. The widgets
    themselves are the page's (made in its constructor, read by its actions); only their views wait.
    ``params`` are the Card's (``title``, ...); ``collapsed=False`` lays the content out at once.
    """
    card = pn.Card(**{"collapsed": True, **params})

    def fill(*_):
        if not card.collapsed and not card.objects:
            card.objects = list(build())

    card.param.watch(fill, "collapsed")
    fill()
    return card


class ErrorBox(pn.viewable.Viewer):
    """A red box for messages such as "d_model must be an integer in [1, 8192], got 0"; hidden when empty.

    The message is shown as text (escaped: it may echo what the user typed); ``text`` is the message.
    """

    def __init__(self, **params):
        super().__init__(**params)
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False)
        self._text = ""

    def show(self, error: BaseException | str) -> None:
        self._text = error if isinstance(error, str) else describe_error(error)
        self._alert.object = escape_md(self._text)
        self._alert.visible = True

    def clear(self) -> None:
        self._text = ""
        self._alert.object, self._alert.visible = "", False

    @property
    def text(self) -> str:
        return self._text if self._alert.visible else ""

    @property
    def html(self) -> str:
        """The Markdown the box renders (for tests of the escaping)."""
        return self._alert.object

    def __panel__(self):
        return self._alert


UPLOAD_ENV = "WORKBENCH_MAX_UPLOAD_MB"
UPLOAD_ACCEPT = ".txt,.text,.md,.csv,.tsv,.json,.py"


class TextUpload(pn.viewable.Viewer):
    """A text file sent from the browser, for the ``text`` dataset: the dashboard never reads a server path.

    At most ``$WORKBENCH_MAX_UPLOAD_MB`` megabytes (default 2), decoded as UTF-8 (a leading byte-order
    mark is dropped). :meth:`text` is ``None`` when nothing was uploaded (the built-in corpus is used).

    An upload is checked the moment it arrives, at the widget: one too large or not UTF-8 text is dropped
    at once (the widget's value here and the copy the page's document keeps are cleared, and the
    browser's input reset), and the note under the widget says why; :meth:`text` then raises that
    message (so Train refuses rather than falling back to the built-in corpus) until another file comes.
    """

    def __init__(self, **params):
        super().__init__(**params)
        self.file = pn.widgets.FileInput(accept=UPLOAD_ACCEPT, multiple=False, width=260)
        self.note = pn.pane.Markdown(self._note(), margin=(0, 10), styles={"font-size": "90%"})
        self.refused = ""   # why the last upload was dropped ("" when none was)
        self._dropping = False
        self.file.param.watch(self._arrived, "value")

    @staticmethod
    def limit_mb() -> float:
        return env_limit(UPLOAD_ENV, 2.0)

    def _note(self) -> str:
        return (f"**text file** (upload, UTF-8, at most {self.limit_mb():g} MB; none: the built-in corpus)")

    @property
    def filename(self) -> str | None:
        return self.file.filename if self.file.value is not None else None

    def _decode(self, raw) -> str:
        if not isinstance(raw, bytes):
            raise ValueError("text file: upload one plain-text file")
        limit = self.limit_mb()
        if len(raw) > limit * 2**20:
            raise ValueError(f"text file must be at most {limit:g} MB ({UPLOAD_ENV}), got {len(raw) / 2**20:.1f} MB")
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {self.file.filename!r} is not UTF-8 text (byte {e.start}); "
                             "upload a plain-text file such as .txt") from None

    def _arrived(self, event) -> None:
        """A file came from the browser: keep it if it is small UTF-8 text, else drop it now and say why."""
        if self._dropping:
            return
        if event.new is None:
            self.refused = ""
            self.note.object = self._note()
            return
        try:
            self._decode(event.new)
        except ValueError as e:
            self.refused = str(e)
            self._drop()
            self.note.object = f"{self._note()}  \n**Refused:** {escape_md(self.refused)}"
        else:
            self.refused = ""
            self.note.object = self._note()

    def _drop(self) -> None:
        """Forget the upload: the value here, the base64 copy on the document's model, the browser's input."""
        self._dropping = True
        try:
            self.file.param.update(value=None, filename=None, mime_type=None)
            for model, _ in list(self.file._models.values()):
                for prop in ("value", "filename", "mime_type"):   # read-only for Python: set as a client would
                    model.set_from_json(prop, "")
            if self.file._models:
                self.file.clear()
        finally:
            self._dropping = False

    def text(self) -> str | None:
        """The uploaded file's text, or ``None``; ValueError when it is too large or not UTF-8 text (also when
        such an upload was just dropped at the widget)."""
        raw = self.file.value
        if raw is None:
            if self.refused:
                raise ValueError(self.refused)
            return None
        return self._decode(raw)

    def clear(self) -> None:
        self.refused = ""
        self.note.object = self._note()
        self.file.clear() if hasattr(self.file, "clear") else setattr(self.file, "value", None)

    def __panel__(self):
        return pn.Column(self.note, self.file, margin=0)


def allowed_values(config, field: str) -> list:
    """The values ``config`` accepts for the string ``field``: its class's ``CHOICES`` (what ``validate()`` checks)."""
    return list(type(config).CHOICES[field])


def _engine_choices() -> dict[str, list]:
    mlp, tf = models.MLPConfig(d_in=1, n_classes=2), models.TransformerConfig(vocab_size=2)
    return {"norm": allowed_values(mlp, "norm"), "activation": allowed_values(mlp, "activation"),
            "embedding": allowed_values(tf, "embedding"), "schedule": allowed_values(TrainConfig(), "schedule")}


# Allowed values of string fields, for Select widgets, read from the configs' validation (which has no
# public constant); config_widgets asks each config for its own (a Transformer takes fewer norms).
CHOICES = _engine_choices()


def config_widgets(config, skip: tuple[str, ...] = (), choices: dict | None = None) -> dict[str, pn.widgets.Widget]:
    """One widget per dataclass field of ``config`` (an instance, whose values are the defaults).

    Integers and floats get free-entry inputs whose start and end are the bounds the config declares
    (:func:`workbench.checks.constraints`); a value out of range is still caught by the config's
    ``validate()``, whose message names the field and the range.
    """
    given = dict(choices or {})
    declared = constraints(config)
    widgets = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        bound = declared.get(f.name)
        limits = {"start": bound.lo, "end": bound.hi} if isinstance(bound, Interval) else {}
        if isinstance(value, bool):
            w = pn.widgets.Checkbox(name=f.name, value=value)
        elif isinstance(value, int):
            w = pn.widgets.IntInput(name=f.name, value=value, width=130, **limits)
        elif isinstance(value, float):
            w = pn.widgets.FloatInput(name=f.name, value=value, width=130, **limits)
        elif f.name in given or f.name in CHOICES:
            options = list(given[f.name]) if f.name in given else allowed_values(config, f.name)
            w = pn.widgets.Select(name=f.name, options=options, value=value, width=130)
        else:
            continue
        widgets[f.name] = w
    return widgets


def values_from_widgets(widgets: dict[str, pn.widgets.Widget]) -> dict[str, Any]:
    """``{field: value}``; an emptied number box gives ``None`` (caught by validation with the range)."""
    return {name: w.value for name, w in widgets.items()}


def run_options(runs: pd.DataFrame | None, family: str | None = None) -> dict[str, str]:
    """``{label: run_id}`` for a Select widget, newest first; optionally one model family only."""
    if runs is None or not len(runs):
        return {}
    if family is not None:
        runs = runs[runs["family"] == family]
    labels = {}
    for r in runs.itertuples():
        acc = "" if pd.isna(r.val_acc) else f", val acc {r.val_acc:.3f}"
        stage = "" if r.stage is None or pd.isna(r.stage) else f", stage {int(r.stage)}"
        labels[f"{r.name} [{r.dataset}, {r.family} x{r.n_layers}{stage}{acc}] {r.run_id[-6:]}"] = r.run_id
    return labels
