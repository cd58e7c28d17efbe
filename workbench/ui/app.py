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
        # A busy indicator of this session's own: the template's default is one LoadingSpinner shared by
        # every session of the process, and with several sessions opening at once its stylesheet was
        # sometimes rendered with Panel's CDN address (seen in the three-session browser test) -- the
        # served page must load nothing from the internet.
        return pn.template.BootstrapTemplate(title="Depth Workbench", main=[self], header_background="#2f3e4e",
                                             busy_indicator=pn.indicators.LoadingSpinner(width=20, height=20))
