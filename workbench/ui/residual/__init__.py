"""Residual stream page: what each layer writes, the lenses, attention, causal tracing and interventions.

The page (:class:`ResidualPage`) is a few parameterised Viewers: :class:`ModelSource` (a stored run, a model
folder or Hub name, or a session mixture; opened in the page's job), :class:`InputPicker` (a dataset sample
or typed text), and the views, each drawing engine tables: :class:`StreamView` (contributions, the logit
lens heat-map, skip effects, attribution, growth stages), :class:`Interventions` (erase, skip, patch at a
clicked cell), :class:`LensView` (logit, tuned and Jacobian lenses, commitment), :class:`AttentionView`
(patterns, head-type scores, across stages) and :class:`TracingView` (causal tracing, attribution patching).
A view works alone in a notebook too, bound to a model in memory and its tokens
(``StreamView(subject=ModelInput.of(model, x))``), and :class:`ResidualExplorer` shows them all
(``ResidualExplorer.of(model, x)``): the same classes serve both faces.
"""
from .attention import AttentionView
from .base import InlineHost, ModelInput, View
from .explorer import ResidualExplorer
from .inputs import INPUTS, InputPicker
from .interventions import INTERVENTIONS, Interventions
from .lenses import LensView
from .page import EXPLANATION, ResidualPage
from .sources import SOURCES, ModelSource
from .stream import Analysis, StreamView
from .tracing import TracingView

__all__ = ["ResidualPage", "ResidualExplorer", "ModelSource", "InputPicker", "StreamView", "Interventions", "LensView", "AttentionView",
           "TracingView", "ModelInput", "View", "InlineHost", "Analysis", "SOURCES", "INPUTS", "INTERVENTIONS",
           "EXPLANATION"]
