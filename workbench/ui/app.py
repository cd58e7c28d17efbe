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
        # No busy indicator: Panel's busy state is one per process (any session's callback sets every
        # session's indicator), so under a class it would spin for everyone when anyone clicks -- each page
        # says what its own job is doing in its status line instead. The indicator was also the one
        # component whose stylesheet was sometimes rendered with Panel's CDN address when several sessions
        # were busy at once (the three-session browser test, in fresh-clone CI), and the served page must
        # load nothing from the internet.
        return pn.template.BootstrapTemplate(title="Depth Workbench", main=[self], header_background="#2f3e4e",
                                             busy_indicator=None)
