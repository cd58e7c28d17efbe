"""The dashboard: one DataStore per browser session and a tab per registered page (``page.pages()``)."""
from __future__ import annotations

import panel as pn

from .common import DataStore
from .page import pages


class App(pn.viewable.Viewer):
    """All pages over one run store. ``App(store=RunStore(path))`` to use another store.

    ``user``: the signed-in user (default ``pn.state.user`` of the session; None without sign-in).
    """

    def __init__(self, store=None, user: str | None = None, **params):
        super().__init__(**params)
        self.datastore = DataStore(store, user=user)
        self.pages = {cls.title: cls(self.datastore) for cls in pages()}
        self.tabs = pn.Tabs(*self.pages.items(), dynamic=True, sizing_mode="stretch_width")

    def __panel__(self):
        return self.tabs

    def template(self):
        """The served page: Panel's Bootstrap template (no external fonts or CDN assets when served)."""
        return pn.template.BootstrapTemplate(title="Depth Workbench", main=[self], header_background="#2f3e4e")
