"""The dashboard: one DataStore per browser session and a tab per page."""
from __future__ import annotations

import panel as pn

from .collapse import CollapsePage
from .common import DataStore
from .compose import ComposePage
from .connectivity import ConnectivityPage
from .grow import GrowPage
from .residual import ResidualPage
from .runs import RunsPage
from .train import TrainPage

PAGES = [("Train", TrainPage), ("Grow", GrowPage), ("Residual stream", ResidualPage),
         ("Connectivity", ConnectivityPage), ("Collapse", CollapsePage), ("Compose", ComposePage),
         ("Runs", RunsPage)]


class App(pn.viewable.Viewer):
    """All pages over one run store. ``App(store=RunStore(path))`` to use another store."""

    def __init__(self, store=None, **params):
        super().__init__(**params)
        self.datastore = DataStore(store)
        self.pages = {title: cls(self.datastore) for title, cls in PAGES}
        self.tabs = pn.Tabs(*self.pages.items(), dynamic=True, sizing_mode="stretch_width")

    def __panel__(self):
        return self.tabs

    def template(self):
        """The served page: Panel's Bootstrap template (no external fonts or CDN assets when served)."""
        return pn.template.BootstrapTemplate(title="Depth Workbench", main=[self], header_background="#2f3e4e")
