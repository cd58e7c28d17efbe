"""What every view of the Residual stream page shares: the model and input it reads, how its slow work
runs, and the view base class.

A view is a ``pn.viewable.Viewer`` whose choices are params and whose figures are drawn from tables the
engine returned. Its slow work (a forward pass, a lens fit) is a module-level function
``fn(monitor, subject, **choices) -> result``, named by an action in the view's ``jobs``; a *host*
runs it. On the dashboard the host is the page: it opens the model and builds the input in its job
(never on the server's event loop), then calls the function there. In a notebook the host is
:class:`InlineHost`: the view is bound to a :class:`ModelInput` (a model in memory and its tokens) and
the function runs at once, so the same Viewer classes serve both faces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import panel as pn
import param
import torch

from ...core import monitor as _monitor
from ... import hooks, residual
from ..text import code_block
from ..widgets import ErrorBox

__all__ = ["ModelInput", "View", "InlineHost", "as_monitor", "NO_SUBJECT"]

_SHOW = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
NO_SUBJECT = "no model and input yet: press Analyse (or bind the view to a model and tokens: ModelInput.of(model, x))"


@dataclass(eq=False)
class ModelInput:
    """The model and the input a view reads.

    ``model``: any model an adapter of :mod:`workbench.hooks` reads (a logit mixture only for the stream
    view); ``x``: the input batch, token ids ``(B, T)`` or vectors ``(B, d_in)``; ``tokens``: one label per
    position of ``x[0]`` (None for vectors); ``vocab``: token strings by id, or None; ``y``: targets
    (None: the next tokens of ``x``); ``corrupt``: corrupt token ids ``(1, T)`` for patching, or None;
    ``train_x``: what a tuned lens is trained on (a tensor or a function giving one; default ``x``); ``stages``: ``[(label, model or a
    function returning one)]``, the growth stages the model belongs to; ``store`` and ``run_id``: the
    stored run the model is (a lens is stored with it), else None; ``key``: names the model (caches).
    """

    model: Any
    x: torch.Tensor
    tokens: list[str] | None = None
    vocab: list[str] | None = None
    y: torch.Tensor | None = None
    corrupt: torch.Tensor | None = None
    train_x: Any = None
    stages: list = field(default_factory=list)
    store: Any = None
    run_id: str | None = None
    key: Any = None

    @classmethod
    def of(cls, model, x, vocab: list[str] | None = None, corrupt=None, train_x=None, stages=None,
           y=None) -> "ModelInput":
        """Bind a model in memory and its input (a notebook's objects): ``x`` token ids ``(T,)`` / ``(B, T)``
        or vectors; ``vocab`` default the model's own (``model.config.vocab``) when it has one."""
        x = torch.as_tensor(x)
        single = model.members[0] if residual.is_mixture(model) else model
        sequence = hooks.adapter(single).family == "transformer"
        if sequence and x.dim() == 1:
            x = x[None]
        if corrupt is not None:
            corrupt = torch.as_tensor(corrupt)
            corrupt = corrupt[None] if corrupt.dim() == 1 else corrupt
        if vocab is None:
            v = getattr(getattr(single, "config", None), "vocab", None)
            vocab = list(v) if isinstance(v, (list, tuple)) else None
        tokens = None
        if sequence:
            tokens = [vocab[int(i)] if vocab and 0 <= int(i) < len(vocab) else str(int(i)) for i in x[0]]
        return cls(model, x, tokens, vocab, y, corrupt, train_x, list(stages or []), key=("memory", id(model)))

    @property
    def single(self):
        """The model itself, or a mixture's first member (what decides the family)."""
        return self.model.members[0] if residual.is_mixture(self.model) else self.model

    @property
    def sequence(self) -> bool:
        return hooks.adapter(self.single).family == "transformer"

    def one_model(self, what: str):
        """The model, for analyses that read one model (never a mixture)."""
        if residual.is_mixture(self.model):
            raise ValueError(f"{what} reads one model: choose a stored run or a Hugging Face model, not a mixture")
        return self.model

    def training(self) -> torch.Tensor:
        """What a tuned lens is trained on: ``train_x`` (a tensor, or a function giving one or None), else ``x``."""
        t = self.train_x() if callable(self.train_x) else self.train_x
        return self.x if t is None else t

    def token(self, token_id: int) -> str:
        """A token id as readable text (its vocabulary string, spaces and newlines made visible)."""
        text = self.vocab[token_id] if self.vocab and 0 <= token_id < len(self.vocab) else str(token_id)
        return "".join(_SHOW.get(c, c) for c in text)


class _TaskMonitor(_monitor.Context):
    """A page task's context (``ctx.stopped``, ``ctx.report(payload, progress, message)``) seen as the engine's
    monitor (``report(progress, message, payload)``): engine functions show progress and obey Stop."""

    def __init__(self, ctx):
        super().__init__(report_interval=0.25)
        self._ctx = ctx

    @property
    def stopped(self) -> bool:
        return bool(self._ctx.stopped)

    def _send(self, progress, message, payload) -> None:
        self._ctx.report(progress=progress, message=message)


def as_monitor(ctx) -> _monitor.Context:
    """The engine's monitor for a page task's context (None or a monitor: itself, resolved)."""
    if ctx is None or isinstance(ctx, _monitor.Context):
        return _monitor.resolve(ctx)
    return _TaskMonitor(ctx)


class InlineHost:
    """Runs a view's work at once (a notebook, a test): the view's own error box shows a refusal."""

    def run(self, view: "View", action: str, wait: bool = True) -> bool:
        view.errors.clear()
        try:
            choices = view.choices(action)
            if view.subject is None:
                raise ValueError(NO_SUBJECT)
            result = view.jobs[action](None, view.subject, **choices)
        except (ValueError, TypeError) as e:
            view.errors.show(e)
            return False
        view.show(action, result)
        return True

    def refuse(self, view: "View", error: Exception) -> None:
        """A choice the view never offered: its error box names the field."""
        view.errors.show(error)

    def busy(self) -> bool:
        return False


class View(pn.viewable.Viewer):
    """A view of the Residual page over one :class:`ModelInput` (``subject``).

    Subclasses list their slow work in ``jobs`` (action -> module-level ``fn(monitor, subject, **choices)``),
    read and check their choices in :meth:`choices` (cheap: on the event loop, raising ``ValueError``
    naming the field), draw a result in :meth:`show` and give the engine calls in :meth:`code_lines`
    (they assume ``model``, ``x``, ``y``, ``tokens`` and ``vocab`` are defined, as the page's "As code"
    box defines them). ``host``: who runs the work (default :class:`InlineHost`: at once).
    """

    subject = param.ClassSelector(class_=ModelInput, allow_None=True, doc="the model and input the view reads")

    jobs: ClassVar[dict[str, Callable]] = {}
    title: ClassVar[str] = ""

    def __init__(self, host=None, **params):
        super().__init__(**params)
        self.host = host if host is not None else InlineHost()
        self.errors = ErrorBox()
        self.code = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.code_card = pn.Card(self.code, title="As code", collapsed=True, sizing_mode="stretch_width")
        self.prelude: Callable[[], list[str]] = lambda: ["import workbench as wb"]

    @property
    def standalone(self) -> bool:
        return isinstance(self.host, InlineHost)

    def run(self, action: str, wait: bool = True) -> bool:
        """Start ``action`` through the host (refused while the page's job runs; a bad choice is named)."""
        return self.host.run(self, action, wait)

    def choices(self, action: str) -> dict:
        return {}

    def show(self, action: str, result) -> None:
        raise NotImplementedError

    def code_lines(self) -> list[str]:
        return []

    def as_code(self) -> str:
        """The page's (or notebook's) set-up lines and this view's engine calls."""
        return "\n".join(self.prelude() + self.code_lines())

    def show_code(self) -> None:
        try:
            code = self.as_code()
        except (ValueError, TypeError) as e:
            code = f"# fix the form first: {e}"
        self.code.object = code_block(code.strip())

    def panels(self) -> list:
        """The view's widgets and figures (the page puts them in a tab)."""
        raise NotImplementedError

    def __panel__(self):
        self.show_code()
        items = self.panels()
        if self.standalone:
            items = [self.errors] + items
        return pn.Column(*items, self.code_card, sizing_mode="stretch_width")
