"""The explorers: the figure areas of the dashboard's pages as Viewers that also work alone in a notebook.

Each is a ``pn.viewable.Viewer`` whose choices are params (:class:`Explorer`): :class:`ConnectivityView` (the
interpolation curves and barriers of two models), :class:`CollapseView` (the class-mean geometry of a
classifier, per layer), :class:`GrowthView` (the stages of a grown model), :class:`GrokkingView` (the progress
measures of a grokking run). The Connectivity, Collapse, Grow and Grokking pages embed them; ``wb.ui.explore``
binds them to a notebook's objects. The residual stream explorer is :class:`workbench.ui.residual.ResidualExplorer`.
"""
from .base import Explorer
from .collapse import CollapseView
from .connectivity import ConnectivityView
from .grokking import GrokkingView
from .growth import GrowthView

__all__ = ["Explorer", "ConnectivityView", "CollapseView", "GrowthView", "GrokkingView"]
