"""Teacher page (classroom mode): who is running and waiting, Stop for any job, runs marked shared, and the
budget of a student's job (training steps and minutes; ``WORKBENCH_STUDENT_MAX_STEPS`` /
``WORKBENCH_STUDENT_MAX_SECONDS`` until the teacher changes it here, see :class:`workbench.jobs.Budget`).

Only the signed-in users named in ``WORKBENCH_TEACHERS`` see it (:func:`workbench.classroom.is_teacher`);
everyone else, and everyone on a server without sign-in, gets one line saying so. Every action
checks again, so a page built for a teacher does nothing for anyone else.

The job queue is the server's one :class:`workbench.jobs.JobQueue`, which ``apps/app_hooks.py``
keeps in ``pn.state.cache["workbench.queue"]``; the table is its ``snapshot()``, refreshed once a
second while served. Below it the lessons board (:class:`workbench.ui.lessons.LessonBoard`): per lesson
the class's predictions against the measured outcome, who passed which check, the explanations.
Everything users typed or chose (user names, job names, messages, run names, explanations) is escaped
before it reaches HTML.

:func:`current_user` lives here, not in :mod:`workbench.classroom`, because the engine never
imports Panel (``tests/test_import_graph.py`` counts function-level imports too).
"""
from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import pandas as pd
import panel as pn

from ..runtime import classroom, jobs
from .text import escape_html, escape_md
from .downloads import HubDownloads
from .lessons import LessonBoard
from .page import Page

__all__ = ["TeacherPage", "current_user", "server_queue", "QUEUE_CACHE_KEY", "NOT_A_TEACHER"]

QUEUE_CACHE_KEY = "workbench.queue"
NOT_A_TEACHER = ("The Teacher page is for the teachers of a classroom server (signed in, and named in "
                 "WORKBENCH_TEACHERS).")
REFRESH_MS = 1000
_LABEL_CHARS = 60   # of a user-provided string in a picker label

EXPLANATION = """The server's job queue: every training of every student, running or waiting (in the
order they will start). Stop cancels a waiting job or asks a running one to stop (it stops at its
next step and is saved as stopped). A student's job may train at most so many steps and run at most so
many minutes (the budget; 0 lifts a cap): a form asking for more is refused, and a job that gets there
stops as if Stop was pressed, keeping what it has. A new budget applies to jobs submitted from then on;
teachers' jobs have none. A run marked shared appears, read-only, in every student's Runs list; students
can open it but not delete it."""

CODE = """import workbench as wb
store = wb.RunStore()                  # the server's store ($WORKBENCH_HOME)
store.list()                           # every run, with its owner and shared flag
store.share(run_id)                    # every signed-in user lists and opens it
store.list(user="student1")            # what student1 sees: their runs and the shared ones
# the budget of a student's job (the server's queue; WORKBENCH_STUDENT_MAX_STEPS / _SECONDS at start)
# queue.set_student_budget(max_steps=20_000, max_seconds=1200)"""


def current_user() -> str | None:
    """The signed-in user of this browser session (``pn.state.user``), or None without sign-in.

    A name that is not a valid user name (:func:`workbench.classroom.check_user`, e.g. from an
    OAuth provider) raises ValueError: it must not fall back to None, which means "no sign-in" and
    sees every run.
    """
    user = pn.state.user
    if user is None:
        return None
    return classroom.check_user("signed-in user", user)


def server_queue():
    """The server's job queue (``pn.state.cache["workbench.queue"]``, made by ``apps/app_hooks.py``), or None."""
    return pn.state.cache.get(QUEUE_CACHE_KEY)


def _short(text: Any, n: int = _LABEL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _clock(t) -> str:
    if t is None or pd.isna(t):
        return ""
    return _dt.datetime.fromtimestamp(float(t)).strftime("%H:%M:%S")


_JOB_COLUMNS = ["id", "user", "name", "status", "position", "progress", "message", "budget", "submitted", "started"]
MAX_BUDGET_MINUTES = 7 * 24 * 60


def jobs_html(snapshot: list[dict]) -> str:
    """An HTML table of a queue snapshot, every cell escaped."""
    if not snapshot:
        return "<p>No jobs are running or waiting.</p>"
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in _JOB_COLUMNS)
    rows = []
    for job in snapshot:
        cells = []
        for c in _JOB_COLUMNS:
            v = job.get(c)
            if c == "progress":
                v = "" if v is None else f"{100 * float(v):.0f}%"
            elif c in ("submitted", "started"):
                v = _clock(v)
            elif c == "budget":
                v = job.get("over_budget") and "over budget: stopping" or v or "none"
            elif v is None:
                v = ""
            cells.append(f"<td style='padding:2px 8px'>{escape_html(_short(v, 120))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<table class='wb-teacher-jobs' style='border-collapse:collapse'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


class TeacherPage(Page):
    title = "Teacher"
    order = 90
    explanation = EXPLANATION
    on_session_end = None   # no background job of its own

    @classmethod
    def shown_to(cls, datastore) -> bool:
        """A tab only for a signed-in teacher (classroom mode): without sign-in, or for a student, no tab."""
        try:
            return datastore.is_teacher
        except ValueError:   # a bad WORKBENCH_TEACHERS: no tab (the page itself would say why)
            return False

    def __init__(self, datastore=None, queue=None, **params):
        super().__init__(datastore, **params)
        self._queue = queue
        try:
            self.user = current_user()
            self.allowed = classroom.is_teacher(self.user)
            self.denied = "" if self.allowed else NOT_A_TEACHER
        except ValueError as e:   # a bad signed-in name or a bad WORKBENCH_TEACHERS: say which, show nothing
            self.user, self.allowed, self.denied = None, False, f"{NOT_A_TEACHER} ({e})"
        self.notice = pn.pane.Markdown(escape_md(self.denied), sizing_mode="stretch_width")
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.jobs_view = pn.pane.HTML(jobs_html([]), sizing_mode="stretch_width", min_height=120)
        self.job_select = pn.widgets.Select(name="Job", options={}, sizing_mode="stretch_width")
        self.stop_button = pn.widgets.Button(name="Stop this job", button_type="danger", width=140)
        self.stop_button.on_click(lambda _: self.stop_selected())
        self.refresh_button = pn.widgets.Button(name="Refresh", width=90)
        self.refresh_button.on_click(lambda _: self.refresh())
        self.run_select = pn.widgets.Select(name="Run", options={}, sizing_mode="stretch_width")
        self.share_button = pn.widgets.Button(name="Mark shared", button_type="primary", width=120)
        self.unshare_button = pn.widgets.Button(name="Stop sharing", width=120)
        self.share_button.on_click(lambda _: self.share_selected(True))
        self.unshare_button.on_click(lambda _: self.share_selected(False))
        self.shared_view = pn.pane.HTML("", sizing_mode="stretch_width")
        self.budget_steps = pn.widgets.IntInput(name="steps per student job (0: no limit)", value=0, start=0,
                                                width=150)
        self.budget_minutes = pn.widgets.FloatInput(name="minutes per student job (0: no limit)", value=0.0,
                                                    start=0.0, width=150)
        self.budget_button = pn.widgets.Button(name="Set budget", button_type="primary", width=120)
        self.budget_button.on_click(lambda _: self.set_budget())
        self.budget_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self._callback = None
        self.downloads = HubDownloads(self.datastore.raw_store.root, self._teacher) if self.allowed else None
        # the lessons' records in the store's home: the class's predictions, checks and explanations
        self.lesson_board = LessonBoard(self.datastore.raw_store.root, self.user, teacher=True) if self.allowed else None
        if self.allowed:
            self.refresh()
            self._show_budget(fill=True)

    # ---------------------------------------------------------------- reading
    @property
    def queue(self):
        return self._queue if self._queue is not None else server_queue()

    def _teacher(self) -> bool:
        """Check again at every action: the page's session must still be a teacher's."""
        try:
            ok = classroom.is_teacher(current_user())
        except ValueError:
            ok = False
        if not ok:
            self.status.object = escape_md(NOT_A_TEACHER)
        return ok

    def refresh(self) -> None:
        """Read the queue's snapshot and the store's runs again."""
        if not self.allowed:
            return
        q = self.queue
        snapshot = q.snapshot() if q is not None else []
        self.jobs_view.object = (jobs_html(snapshot) if q is not None else
                                 "<p>This server has no job queue (apps/app_hooks.py makes it when "
                                 "<code>panel serve apps/</code> starts).</p>")
        options = {f"#{_short(j['id'], 12)} · {_short(j['user'], 30)} · {_short(j['name'], 40)} · {j['status']}"
                   + (f" (position {j['position']})" if j.get("position") else ""): str(j["id"]) for j in snapshot}
        self._set_options(self.job_select, options)
        self.stop_button.disabled = not options
        self._show_budget()
        self._refresh_runs()

    def _show_budget(self, fill: bool = False) -> None:
        """The budget line (and with ``fill`` the two fields) from the queue's student budget."""
        q = self.queue
        if q is None:
            self.budget_note.object = "No job queue on this server: no budget to set."
            self.budget_button.disabled = True
            return
        b = q.student_budget
        self.budget_button.disabled = False
        self.budget_note.object = escape_md(f"Each student job: {b.describe()} (teachers' jobs: no limit).")
        if fill:
            self.budget_steps.value = b.max_steps or 0
            self.budget_minutes.value = round(b.max_seconds / 60, 3) if b.max_seconds else 0.0

    def _refresh_runs(self) -> None:
        try:
            runs = self.datastore.store.list()     # every run (user=None): a teacher's view
        except Exception as e:  # a broken index: the notice above the page says so; keep the page
            runs = pd.DataFrame(columns=["run_id", "name", "owner", "shared"])
            self.errors.show(e)
        options = {}
        for r in runs.itertuples():
            owner = r.owner if isinstance(r.owner, str) else "no owner"
            mark = " [shared]" if bool(r.shared) else ""
            options[f"{_short(r.name, 40)} · {_short(owner, 30)}{mark} · {r.run_id[-6:]}"] = r.run_id
        self._set_options(self.run_select, options)
        self.share_button.disabled = self.unshare_button.disabled = not options
        shared = runs[runs["shared"].astype(bool)] if len(runs) else runs
        self.shared_view.object = (
            "<p><b>Shared runs</b>: " + (", ".join(
                f"{escape_html(_short(r.name, 40))} ({escape_html(r.owner if isinstance(r.owner, str) else 'no owner')})"
                for r in shared.itertuples()) or "none") + "</p>")

    @staticmethod
    def _set_options(select, options: dict) -> None:
        """New options only when they changed (the 1 s refresh must not close an open dropdown); the
        selection is kept while its item is listed."""
        if options == select.options:
            return
        keep = select.value
        select.options = options
        select.value = keep if keep in options.values() else next(iter(options.values()), None)

    # ---------------------------------------------------------------- acting
    def stop_selected(self) -> bool:
        """Cancel the selected job (waiting: removed; running: asked to stop). Returns whether it acted."""
        if not self.allowed or not self._teacher():
            return False
        job_id, q = self.job_select.value, self.queue
        job = q.find(job_id) if (q is not None and job_id is not None) else None
        if job is None:
            self.status.object = "That job has finished already."
            self.refresh()
            return False
        was = job.status
        acted = job.cancel()
        verb = ("removed from the queue" if was == "waiting" else "asked to stop") if acted else "already stopping"
        self.status.object = escape_md(f"Job #{job.id} of {job.user} ({job.name}): {verb}.")
        self.refresh()
        return acted

    def share_selected(self, shared: bool = True) -> bool:
        """Mark the selected run as shared (or not). Returns whether it acted."""
        if not self.allowed or not self._teacher():
            return False
        run_id = self.run_select.value
        if run_id is None:
            return False
        try:
            self.datastore.store.share(run_id, shared=shared)
        except Exception as e:  # a run deleted meanwhile, a broken run.json: say so, keep the page
            self.errors.show(e)
            return False
        self.errors.clear()
        self.datastore.refresh()
        self.status.object = escape_md(f"Run {run_id}: {'shared with everyone' if shared else 'no longer shared'}.")
        self._refresh_runs()
        return True

    def set_budget(self) -> bool:
        """Set the budget of students' jobs from the two fields (0: no cap). Returns whether it acted; a bad
        value is refused in the error box, naming the field."""
        if not self.allowed or not self._teacher():
            return False
        q = self.queue
        if q is None:
            self.errors.show("Set budget: this server has no job queue")
            return False
        steps, minutes = self.budget_steps.value, self.budget_minutes.value
        try:
            if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= jobs.MAX_BUDGET_STEPS:
                raise ValueError(f"steps per student job must be a whole number in [0, {jobs.MAX_BUDGET_STEPS:,}] "
                                 f"(0: no limit), got {steps!r}")
            if (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes)
                    or not (minutes == 0 or 1 / 60 <= minutes <= MAX_BUDGET_MINUTES)):
                raise ValueError(f"minutes per student job must be 0 (no limit) or in [1/60, {MAX_BUDGET_MINUTES:,}], "
                                 f"got {minutes!r}")
            budget = q.set_student_budget(max_steps=steps or None, max_seconds=minutes * 60 if minutes else None)
        except ValueError as e:
            self.errors.show(e)
            return False
        self.errors.clear()
        self.status.object = escape_md(f"Budget of a student's job: {budget.describe()} (jobs submitted from now on).")
        self._show_budget()
        return True

    def as_code(self) -> str:
        return CODE

    # ---------------------------------------------------------------- layout
    def side(self):
        return [self.refresh_button, self.job_select, self.stop_button, self.run_select,
                pn.Row(self.share_button, self.unshare_button), self.status,
                pn.pane.Markdown("**Budget of a student's job**", margin=(10, 10, 0, 10)),
                pn.Row(self.budget_steps, self.budget_minutes), self.budget_button, self.budget_note]

    def figures(self):
        return [pn.pane.Markdown("### Job queue"), self.jobs_view, self.shared_view, self.downloads, self.lesson_board]

    def __panel__(self):
        if not self.allowed:
            return self.notice
        if self._callback is None and pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            self._callback = pn.state.add_periodic_callback(self.refresh, period=REFRESH_MS)
        return super().__panel__()
