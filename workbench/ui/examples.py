"""The starter examples in the dashboard (:mod:`workbench.runtime.examples`): which example runs a session
lists, what a page shows of them before its own first job, the progress bar while they are made, and the
Remove / Restore buttons.

A page opens on an example by overriding :meth:`workbench.ui.page.Page.show_example`: it preselects the
example run (:func:`example_id`) and draws the result stored with it (:func:`stored`), or for the Residual
stream page starts its own analysis of it; the note above its figures says so (:func:`note`). Nothing here
trains or computes: the examples were made once, as a job of the server's queue.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import panel as pn
import param

from ..runtime import examples
from .session import DataStore, job_queue
from .text import escape_md

__all__ = ["example_id", "example_ids", "stored", "note", "ExamplesPanel", "may_manage"]

_CACHE_SIZE = 64
_RAW: "OrderedDict[str, dict]" = OrderedDict()   # run id -> its stored results (JSON data); run.json never changes
_RAW_LOCK = threading.Lock()


def example_ids(datastore: DataStore) -> dict[str, str]:
    """``{role: run_id}`` of the example runs this session lists (a student's list holds them: they are shared)."""
    return examples.example_ids(datastore.runs)


def example_id(datastore: DataStore, role: str) -> str | None:
    """The run id of the example ``role`` (:data:`workbench.runtime.examples.EXAMPLES`) this session lists, or None."""
    return example_ids(datastore).get(role)


def stored(datastore: DataStore, role: str, key: str):
    """``(run_id, result)``: the result ``key`` stored with the example ``role`` (decoded), or ``(None, None)``
    when the session lists no such example or it holds no such result. Read through the session's store view
    (owner-checked) once per run and process; each call decodes a fresh copy."""
    run_id = example_id(datastore, role)
    if run_id is None:
        return None, None
    with _RAW_LOCK:
        raw = _RAW.get(run_id)
    if raw is None:
        try:
            doc = datastore.store.read_json(run_id)
        except Exception:   # vanished or unreadable: the page shows what it would without examples
            return None, None
        if not examples.is_example(doc):
            return None, None
        raw = doc["meta"]["example"].get("results") or {}
        with _RAW_LOCK:
            _RAW[run_id] = raw
            while len(_RAW) > _CACHE_SIZE:
                _RAW.popitem(last=False)
    if key not in raw:
        return run_id, None
    return run_id, examples.decode(raw[key])


def note(role: str, what: str) -> str:
    """The line above a page's figures while it shows an example (Markdown; ``what`` is the page's own text)."""
    name = {e.role: e.name for e in examples.EXAMPLES}[role]
    return (f"**Example**: *{escape_md(name)}*, one of the example runs made at the first start "
            f"(the *Runs* page removes them). {what}")


def may_manage(datastore: DataStore) -> bool:
    """Whether this session may remove and restore the examples: no sign-in (a laptop), or a teacher."""
    return datastore.user is None or datastore.is_teacher


NOT_YOURS = "Removing and restoring the example runs is a teacher's action on a classroom server."


class ExamplesPanel(pn.viewable.Viewer):
    """The examples' state: a progress bar while they are made (restored, removed), and Remove / Restore.

    ``compact=True``: only the progress bar and its line, shown while a job runs (the dashboard's banner).
    While a job runs a periodic callback reads it once a second; when it moves on to another step, and
    when it ends, the session's run list is read again, so the pages find the new examples.
    """

    datastore = param.ClassSelector(class_=DataStore)

    def __init__(self, compact: bool = False, **params):
        super().__init__(**params)
        self.compact = compact
        self.bar = pn.indicators.Progress(value=-1, max=100, width=260, bar_color="info", active=True)
        self.line = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.state = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.remove_button = pn.widgets.Button(name="Remove the examples", button_type="warning", width=155)
        self.restore_button = pn.widgets.Button(name="Restore the examples", width=155)
        self.remove_button.on_click(lambda _: self.act("remove"))
        self.restore_button.on_click(lambda _: self.act("restore"))
        self.remove_button.visible = self.restore_button.visible = not compact and may_manage(self.datastore)
        # the banner: the line beside the bar; in a side column: under it (beside it, it would be squeezed)
        self.progress = (pn.Row if compact else pn.Column)(self.bar, self.line, sizing_mode="stretch_width",
                                                           visible=False)
        self._callback = None
        self._seen = None     # the step the job was on at the last look
        self._job = None
        self.poll()

    def _root(self):
        return self.datastore.raw_store

    def act(self, action: str) -> bool:
        """Start ``"remove"`` or ``"restore"`` as a job of the server's queue; refused (with the reason in the
        line) for a student, and while another such job runs."""
        if not may_manage(self.datastore):
            self.state.object = escape_md(NOT_YOURS)
            return False
        job = examples.start(self._root(), job_queue(), action=action)
        if job is None:
            self.state.object = "The example runs are being changed already: wait for that job to finish."
            return False
        self.poll()
        return True

    def poll(self) -> None:
        """Read the job (if any) and the state; call on the session's thread (the periodic callback does)."""
        job = examples.running(self._root())
        if job is not None:
            self._job = job
            step = (job.message or "").split(" (")[0]
            if self._seen is not None and step != self._seen:
                self.datastore.refresh()   # the step before saved its runs
            self._seen = step
            self.bar.value = round(100 * job.progress) if job.progress else -1
            self.line.object = escape_md(job.message or f"{job.name}: {job.status_line()}")
            self.progress.visible = True
            self.remove_button.disabled = self.restore_button.disabled = True
            served = getattr(pn.state.curdoc, "session_context", None) is not None   # not a throwaway document
            if self._callback is None and served:
                self._callback = pn.state.add_periodic_callback(self.poll, period=1000)
        else:
            if self._job is not None:   # it ended since the last look
                self._job = None
                self._seen = None
                self.datastore.refresh()
            if self._callback is not None:
                self._callback.stop()
                self._callback = None
            self.progress.visible = False
            self.remove_button.disabled = self.restore_button.disabled = False
        if not self.compact:
            self.state.object = self._state_text(job)

    def _state_text(self, job) -> str:
        ids = example_ids(self.datastore)
        if job is not None:
            return (f"The example runs are being made ({len(ids)} of {len(examples.EXAMPLES)} so far); the pages show "
                    "them as they arrive.")
        if ids:
            return (f"{len(ids)} example runs are stored (owner *{examples.OWNER}*, shared"
                    f"{', read-only' if self.datastore.user is not None else ''}); your own runs are never touched.")
        return ("No example runs are stored. *Restore the examples* makes them again (about a minute)."
                if may_manage(self.datastore) else "No example runs are stored.")

    def __panel__(self):
        if self.compact:
            return self.progress
        return pn.Column(self.progress, self.state, pn.Row(self.remove_button, self.restore_button),
                         sizing_mode="stretch_width")
