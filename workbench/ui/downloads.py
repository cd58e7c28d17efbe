"""The Hub downloads of a class server, for the Teacher page: who downloaded which model, and Share.

On a class server a model a student names on the Hub is downloaded into that student's own folder
(:func:`workbench.roots.hub_cache`) and offered to nobody else. The teacher sees every student's
downloads here and shares one with the class (:func:`workbench.roots.share_model`: it moves to the
shared downloads, which every listing offers). The browser sends only a key into the listing this
server made; every action asks ``allowed()`` again. Not a page of its own: the Teacher page shows it.
"""
from __future__ import annotations

from typing import Callable

import panel as pn

from ..io import interop, model_roots as roots
from .text import escape_md
from .widgets import ErrorBox

__all__ = ["HubDownloads"]


class HubDownloads(pn.viewable.Viewer):
    """Every signed-in user's Hub downloads, with a Share button (a teacher's action)."""

    def __init__(self, home, allowed: Callable[[], bool], **params):
        super().__init__(**params)
        self.home, self.allowed = home, allowed
        self.select = pn.widgets.Select(name="Student's download", options={}, sizing_mode="stretch_width")
        self.share_button = pn.widgets.Button(name="Share with the class", button_type="primary", width=170)
        self.share_button.on_click(lambda _: self.share_selected())
        self.refresh_button = pn.widgets.Button(name="Refresh downloads", width=150)
        self.refresh_button.on_click(lambda _: self.refresh())
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.errors = ErrorBox()
        self._rows: dict[str, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the downloads again (each student's own; the shared ones in the note)."""
        rows = roots.user_downloads(self.home)
        self._rows = {str(i): r for i, r in enumerate(rows)}
        self.select.options = {f"{r['user']} · {r['label']}": key for key, r in self._rows.items()}
        self.share_button.disabled = not rows
        shared = list(roots.list_models([roots.hub_cache(None, self.home)], home=self.home))
        per_model, total = interop.hub_limits()
        self.note.object = escape_md(
            f"Hub names are {'allowed' if interop.hub_allowed(True) else 'switched off'} for students "
            f"({interop.ALLOW_HUB_ENV}); at most {per_model:g} MB a model and {total:g} MB in all "
            f"({interop.HUB_MAX_ENV}, {interop.HUB_CACHE_ENV}). Shared with the class: "
            + (", ".join(shared) or "none") + ".")

    def share_selected(self) -> bool:
        """Share the selected download with the class; returns whether it acted (refusals in the error box)."""
        if not self.allowed():
            self.errors.show("Share with the class: only a teacher shares downloads")
            return False
        row = self._rows.get(self.select.value)
        if row is None:
            self.errors.show("Share with the class: pick one of the listed downloads (press Refresh downloads)")
            return False
        try:
            roots.share_model(row["user"], row["repo"], self.home)
        except (ValueError, OSError) as e:   # shared or removed meanwhile: say so, keep the page
            self.errors.show(f"Share with the class: {e}")
            self.refresh()
            return False
        self.errors.clear()
        self.refresh()
        self.note.object = escape_md(f"Shared {row['label']} (downloaded by {row['user']}) with the class. ") + \
            self.note.object
        return True

    def __panel__(self):
        return pn.Column(pn.pane.Markdown("### Hub downloads"), self.errors, self.select,
                         pn.Row(self.share_button, self.refresh_button), self.note, sizing_mode="stretch_width")
