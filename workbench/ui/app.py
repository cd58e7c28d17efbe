"""The dashboard: one DataStore per browser session and a tab per registered page (``page.pages()``)."""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import panel as pn
from panel.io.state import set_curdoc

from .session import DataStore
from .examples import ExamplesPanel
from .page import Page, pages


class LazyPages(Mapping):
    """The session's pages by title, each built on first use (``pages[title]``, or its tab first shown).

    Building every page's widgets and empty figures took ~1.2 s of server CPU per session (most of it
    plotly's templates), paid again by every student who opens the dashboard although a session sees
    few of the tabs; now a session pays for the tab it lands on. Iterating gives the titles in the
    registry's order without building anything; ``values()``/``items()`` build them all. A page is built
    in the session's document (the one current when the mapping was made), wherever it is first asked
    for, so its job still belongs to the session: closing the tab ends it as it ends the others.
    """

    def __init__(self, datastore: DataStore):
        self._datastore = datastore
        self._doc = pn.state.curdoc
        self._classes = {cls.title: cls for cls in pages() if cls.shown_to(datastore)}   # Teacher: teachers only
        self._built: dict[str, Page] = {}

    def __getitem__(self, title: str) -> Page:
        if title not in self._built:
            cls = self._classes[title]   # KeyError for an unknown title
            with set_curdoc(self._doc) if self._doc is not None else nullcontext():
                self._built[title] = cls(self._datastore)
        return self._built[title]

    def __iter__(self):
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def built(self) -> list[str]:
        """The titles of the pages built so far."""
        return list(self._built)


def _url_tab() -> str | None:
    """The served session's ``?tab=`` argument (the first one, decoded; None outside a served session)."""
    args = getattr(pn.state, "session_args", None) or {}
    try:
        return args["tab"][0].decode("utf-8", "replace")[:200]
    except (KeyError, IndexError, AttributeError, TypeError):
        return None


class App(pn.viewable.Viewer):
    """All pages over one run store. ``App(store=RunStore(path))`` to use another store.

    ``user``: the signed-in user (default ``pn.state.user`` of the session; None without sign-in).
    ``pages``: a :class:`LazyPages`; each tab holds a column that receives its page when the tab is
    first shown (the first tab's page at once). ``tab``: the title of the tab to open on; served, the
    URL's ``?tab=<title>`` (a link to one page); a title that is not a tab of this session opens the first.
    """

    def __init__(self, store=None, user: str | None = None, tab: str | None = None, **params):
        super().__init__(**params)
        self.datastore = DataStore(store, user=user)
        self.pages = LazyPages(self.datastore)
        self._holders = {title: pn.Column(sizing_mode="stretch_width") for title in self.pages}
        self.tabs = pn.Tabs(*self._holders.items(), dynamic=True, sizing_mode="stretch_width")
        self.tabs.param.watch(lambda event: self.show(list(self._holders)[event.new]), "active")
        titles = list(self._holders)
        tab = _url_tab() if tab is None else tab
        if tab in titles:
            self.tabs.active = titles.index(tab)   # the watcher builds it
        elif titles:
            self.show(titles[0])
        self.examples_banner = ExamplesPanel(compact=True, datastore=self.datastore)   # while they are made

    def show(self, title: str) -> Page:
        """Build the page ``title`` if needed and put it into its tab (does not switch tabs)."""
        page = self.pages[title]
        holder = self._holders[title]
        if not holder.objects:
            holder.objects = [page]
        return page

    def __panel__(self):
        return pn.Column(self.examples_banner, self.tabs, sizing_mode="stretch_width")

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
