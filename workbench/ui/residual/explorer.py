"""The residual stream explorer: the page's views bound to a model in memory and its input, for a notebook.

``ResidualExplorer.of(model, x)`` shows the stream view (layer and token sliders, the lens heat-map: a click
intervenes there), the interventions, and the lenses, attention and causal-tracing tabs. Everything runs at
once in the notebook's process (:class:`~workbench.ui.residual.base.InlineHost`): no server, no session.
"""
from __future__ import annotations

import panel as pn
import param

from .attention import AttentionView
from .base import ModelInput
from .interventions import Interventions
from .lenses import LensView
from .stream import StreamView
from .tracing import TracingView

__all__ = ["ResidualExplorer"]


class ResidualExplorer(pn.viewable.Viewer):
    """The Residual page's views over one :class:`ModelInput` (``subject``), without a page.

    ``stream``, ``interventions``, ``lenses``, ``attention`` and ``tracing`` are the views themselves: set their
    params in code (``explorer.stream.layer = 2``) as a widget would. A click on the lens heat-map sets the
    layer and token and runs the chosen intervention. A mixture shows the stream view only.
    """

    subject = param.ClassSelector(class_=ModelInput, doc="the model and input explored")

    def __init__(self, subject: ModelInput, **params):
        super().__init__(subject=subject, **params)
        self.stream = StreamView(subject=subject)
        self.interventions = Interventions(stream=self.stream, subject=subject)
        single = not self.stream.analysis.mixture if self.stream.analysis is not None else False
        sequence = single and subject.sequence
        self.lenses = LensView(subject=subject) if single else None
        self.attention = AttentionView(subject=subject) if sequence else None
        self.tracing = TracingView(subject=subject) if sequence else None
        pn.bind(self._clicked, self.stream.param.clicked, watch=True)

    @classmethod
    def of(cls, model, x, vocab: list[str] | None = None, corrupt=None, train_x=None, stages=None) -> "ResidualExplorer":
        """Explore ``model`` on ``x`` (token ids ``(T,)`` / ``(B, T)``, or vectors); see :meth:`ModelInput.of`."""
        return cls(ModelInput.of(model, x, vocab=vocab, corrupt=corrupt, train_x=train_x, stages=stages))

    def _clicked(self, _=None) -> None:
        if self.subject.sequence:
            self.interventions.run("intervention")

    def views(self) -> list:
        return [v for v in (self.stream, self.interventions, self.lenses, self.attention, self.tracing) if v is not None]

    def __panel__(self):
        stream = pn.Column(self.stream.errors, pn.Row(*self.stream.focus_widgets()), *self.stream.panels(),
                           self.interventions.errors, pn.Row(*self.interventions.widgets()),
                           *self.interventions.panels(), sizing_mode="stretch_width")
        tabs = [(self.stream.title, stream)] + [(v.title, v) for v in (self.lenses, self.attention, self.tracing)
                                                if v is not None]
        return pn.Tabs(*tabs, dynamic=True, sizing_mode="stretch_width")
