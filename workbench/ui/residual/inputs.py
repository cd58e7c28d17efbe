"""The input the Residual page's views read: a sample of the model's validation split (a batch of them for a
vector model) or typed text, and a corrupt text for patching.

:class:`InputPicker` holds the choice as params; :meth:`InputPicker.request` checks it on the event loop,
:meth:`InputPicker.build` turns it into a :class:`~workbench.ui.residual.base.ModelInput` in the page's
job. Text becomes token ids by the opened model's own rule (:meth:`workbench.interop.OpenModel.encode`:
its tokenizer, else its character vocabulary, else typed ids), which also checks the vocabulary range and
the context; a dataset is rebuilt from the run's spec, never from a server path.
"""
from __future__ import annotations

import json

import panel as pn
import param
import torch

from ...core import checks
from ...io import interop
from ..session import dataset_from_spec
from .base import ModelInput

__all__ = ["InputPicker", "INPUTS", "SAMPLE", "TYPED", "VECTOR_BATCH", "LENS_TRAIN_MAX"]

SAMPLE, TYPED = "Dataset sample", "Typed text"
INPUTS = [SAMPLE, TYPED]
VECTOR_BATCH = 256   # vector datasets: analyse this many validation examples at once
LENS_TRAIN_MAX = 512   # at most this many training sequences are handed to a tuned-lens fit


class InputPicker(pn.viewable.Viewer):
    """The input choice: ``kind`` (one of :data:`INPUTS`), the validation ``sample`` or the typed ``text``,
    a ``corrupt`` text (patching: as many tokens as the text), and ``domain``: which of a mixture's
    datasets samples come from (``domains`` lists them; empty for a single model)."""

    kind = param.String(default=SAMPLE, doc="one of INPUTS")
    sample = param.Integer(default=0, allow_None=True, doc="index into the validation split")
    text = param.String(default="", doc="typed text (characters of the vocabulary, or token ids '3 1 4')")
    corrupt = param.String(default="", doc="the corrupt text for patching (same number of tokens)")
    domain = param.String(default=None, allow_None=True, doc="a mixture's dataset the samples come from")
    domains = param.List(default=[], doc="the datasets offered in domain")

    def __init__(self, **params):
        super().__init__(**params)
        typed = self.param.kind.rx() == TYPED
        self.kind_buttons = pn.widgets.RadioButtonGroup.from_param(self.param.kind, options=INPUTS, name="")
        self.sample_input = pn.widgets.IntInput.from_param(self.param.sample, start=0, width=170,
                                                           name="sample (validation split)", visible=typed.rx.not_())
        self.text_input = pn.widgets.TextInput.from_param(
            self.param.text, width=320, placeholder="The cat sees the moon.", visible=typed,
            name="text (characters of the vocabulary, or token ids '3 1 4')")
        self.corrupt_input = pn.widgets.TextInput.from_param(
            self.param.corrupt, width=320, visible=typed, name="corrupt text (for patching; same number of tokens)")
        self.domain_select = pn.widgets.Select.from_param(self.param.domain, options=[], width=160,
                                                          name="samples from", visible=pn.bind(
                                                              lambda k, d: k == SAMPLE and bool(d),
                                                              self.param.kind, self.param.domains))
        self._datasets: dict = {}    # dataset spec json -> Dataset
        self._offer_domains()

    @param.depends("domains", watch=True)
    def _offer_domains(self) -> None:
        self.domain_select.options = list(self.domains)
        if self.domains and self.domain not in self.domains:
            self.domain = self.domains[0]

    # ---------------------------------------------------------------- the request (on the event loop)
    def request(self) -> dict:
        kind = checks.check_choice("input", self.kind, INPUTS)
        if kind == SAMPLE and self.domains:
            checks.check_choice("samples from", self.domain, list(self.domains))
        req = {"input": kind, "text": self.text or "", "corrupt": self.corrupt or "",
               "sample": checks.check_int("sample", self.sample if self.sample is not None else 0, 0),
               "domain": self.domain if self.domains else None}
        if kind == TYPED:
            if not req["text"]:
                raise ValueError("type some text (or choose a dataset sample)")
            req["input_key"] = ("text", req["text"])
        else:
            req["input_key"] = ("sample", req["domain"], req["sample"])
        return req

    # ---------------------------------------------------------------- the input (in the page's job)
    def dataset(self, spec: dict):
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._datasets:
            self._datasets[key] = dataset_from_spec(spec)   # never a server path
        return self._datasets[key]

    def build(self, opened: interop.OpenModel, req: dict, corrupt: bool = False) -> ModelInput:
        """The :class:`ModelInput` of the request for ``opened`` (``corrupt``: also encode the corrupt text)."""
        model, vocab, spec = opened.model, opened.vocab, opened.dataset
        sequence = ModelInput(model, torch.zeros(1, 1, dtype=torch.long)).sequence
        ds = self.dataset(spec) if spec and req["input"] == SAMPLE else None

        def train_x():   # what a tuned lens trains on: the training split (built when first asked)
            d = ds if ds is not None else (self.dataset(spec) if spec else None)
            return None if d is None else d.x_train[:LENS_TRAIN_MAX * (1 if sequence else 4)]
        if req["input"] == TYPED:
            if not sequence:
                raise ValueError("typed text needs a sequence model; vector models take dataset samples")
            ids = opened.encode(req["text"], "text")
            tokens = [vocab[i] if vocab and i < len(vocab) else str(i) for i in ids]
            x, y = torch.tensor([ids]), None
        else:
            if ds is None:
                raise ValueError("this model has no dataset recorded; type text (or token ids) instead")
            x_val, y_val = ds.split("val")
            i = req["sample"]
            if sequence:
                if not 0 <= i < len(x_val):
                    raise ValueError(f"sample must be in [0, {len(x_val) - 1}], got {i}")
                x = x_val[i:i + 1]
                tokens = [ds.vocab[int(t)] for t in x[0]] if ds.vocab else None
                y = None if ds.name == "text" else y_val[i:i + 1]   # a text window: its own next tokens
            else:
                start = min(max(i, 0), max(len(x_val) - VECTOR_BATCH, 0))
                x, y, tokens = x_val[start:start + VECTOR_BATCH], y_val[start:start + VECTOR_BATCH], None
        x_corrupt = None
        if corrupt and req["input"] == TYPED and req["corrupt"]:
            ids = opened.encode(req["corrupt"], "corrupt text")
            if len(ids) != x.shape[1]:
                raise ValueError(f"corrupt text must have as many tokens as the text ({x.shape[1]}), got {len(ids)}")
            x_corrupt = torch.tensor([ids])
        return ModelInput(model, x, tokens, vocab if vocab else (ds.vocab if ds is not None else None), y, x_corrupt,
                          train_x, key=opened.key)

    # ---------------------------------------------------------------- as code
    def code_lines(self, sequence: bool, tokenizer: bool) -> list[str]:
        """Lines defining ``x``, ``y``, ``tokens`` and ``x_train`` (what a tuned lens trains on), after the source's
        lines define ``model``, ``vocab`` and ``spec``."""
        n_train = LENS_TRAIN_MAX * (1 if sequence else 4)
        if self.kind == TYPED:
            if tokenizer:
                lines = [f"x, y = torch.tensor([tokenizer({self.text!r})['input_ids']]), None",
                         "tokens = tokenizer.convert_ids_to_tokens(x[0].tolist())"]
            else:
                lines = [f"text = {self.text!r}",
                         "ids = wb.data.dataset.encode_text(text, vocab).tolist() if vocab else "
                         "[int(t) for t in text.split()]",
                         "x, y = torch.tensor([ids]), None",
                         "tokens = [vocab[i] for i in ids] if vocab else [str(i) for i in ids]"]
            return lines + [f"x_train = wb.data.from_spec(spec).x_train[:{n_train}] if spec else x"]
        i = int(self.sample or 0)
        lines = ["ds = wb.data.from_spec(spec)", "x_val, y_val = ds.split('val')", f"x_train = ds.x_train[:{n_train}]"]
        if sequence:
            # a text window's targets are its own next tokens (y=None), as on the page
            return lines + [f"x, y = x_val[{i}:{i + 1}], (None if ds.name == 'text' else y_val[{i}:{i + 1}])",
                            "tokens = [ds.vocab[int(t)] for t in x[0]] if ds.vocab else None"]
        return lines + [f"start = min({i}, max(len(x_val) - {VECTOR_BATCH}, 0))",
                        f"x, y = x_val[start:start + {VECTOR_BATCH}], y_val[start:start + {VECTOR_BATCH}]",
                        "tokens = None"]

    def widgets(self) -> list:
        return [self.kind_buttons, self.domain_select, self.sample_input, self.text_input, self.corrupt_input]

    def __panel__(self):
        return pn.Column(*self.widgets())
