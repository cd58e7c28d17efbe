"""The lessons board: per lesson, the class's predictions against the measured outcome, who has passed which
check, and the explanations (``workbench.lessons``; records in ``<home>/lessons/``).

A teacher's board reads every student's record; anyone else's board reads only their own. Everything a
student typed (explanations, check messages quoting their code, user names) reaches the page as text:
escaped HTML (:mod:`workbench.ui.text`), and the figure through :mod:`workbench.figures.safe`.
"""
from __future__ import annotations

import pandas as pd
import panel as pn

from .. import lessons
from ..figures import lessons as figs
from .text import escape_html, escape_md

__all__ = ["LessonBoard", "checks_html", "explanations_html"]


def checks_html(checks: pd.DataFrame, exercises: list[str]) -> str:
    """An HTML table, one row per student, one column per exercise: passed or not yet, with attempts."""
    if not len(checks):
        return "<p>No check has been run yet.</p>"
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{escape_html(e)}</th>" for e in exercises)
    rows = []
    for user, g in checks.groupby("user", sort=True):
        by = g.set_index("key")
        cells = []
        for e in exercises:
            if e not in by.index:
                cells.append("<td style='padding:2px 8px;color:#888'>not tried</td>")
                continue
            r = by.loc[e]
            attempts = r["attempts"] if pd.notna(r["attempts"]) else 0
            state = "passed" if bool(r["passed"]) else "not yet"
            colour = "#1a7f37" if bool(r["passed"]) else "#b35900"
            cells.append(f"<td style='padding:2px 8px;color:{colour}' title='{escape_html(r['text'] or '')}'>"
                         f"{state} ({int(attempts)} attempt{'s' * (int(attempts) != 1)})</td>")
        rows.append(f"<tr><td style='padding:2px 8px'>{escape_html(user)}</td>{''.join(cells)}</tr>")
    return (f"<table class='wb-lesson-checks' style='border-collapse:collapse'><thead><tr>"
            f"<th style='text-align:left;padding:2px 8px'>student</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def explanations_html(explanations: pd.DataFrame) -> str:
    """The explanations as an HTML list of plain text (every character escaped)."""
    if not len(explanations):
        return "<p>No explanation yet.</p>"
    items = "".join(f"<li><b>{escape_html(r.user)}</b>: <span style='white-space:pre-wrap'>{escape_html(r.text)}</span></li>"
                    for r in explanations.itertuples())
    return f"<ul class='wb-lesson-explanations'>{items}</ul>"


class LessonBoard(pn.viewable.Viewer):
    """The lesson records under ``home`` as ``user`` sees them (``teacher``: the class; else their own)."""

    def __init__(self, home, user: str | None, teacher: bool = False, **params):
        super().__init__(**params)
        self.records = lessons.LessonRecords(home)
        self.user, self.teacher = user, bool(teacher)
        table = lessons.lessons_table()
        self.lesson_select = pn.widgets.Select(name="Lesson", options={f"{r.lesson}: {r.title}": r.lesson
                                                                       for r in table.itertuples()}, width=420)
        self.refresh_button = pn.widgets.Button(name="Refresh answers", width=140)
        self.refresh_button.on_click(lambda _: self.refresh())
        self.lesson_select.param.watch(lambda _: self.refresh(), "value")
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.histogram = pn.pane.Plotly(figs.predictions_histogram(None), sizing_mode="stretch_width")
        self.checks_view = pn.pane.HTML("", sizing_mode="stretch_width")
        self.explanations_view = pn.pane.HTML("", sizing_mode="stretch_width")
        self.summary: dict | None = None
        self.refresh()

    def table(self) -> pd.DataFrame:
        """The records this board may show: everyone's for a teacher, the user's own otherwise (none
        without a user)."""
        if self.teacher:
            return self.records.table()
        if self.user is None:
            return self.records.table(users=[])
        return self.records.table(users=[self.user])

    def refresh(self) -> None:
        name = self.lesson_select.value
        s = lessons.summary(name, self.table())
        self.summary = s
        q = s["question"]
        frame = pd.concat([s["predictions"].assign(kind="prediction"), s["outcomes"].assign(kind="outcome")],
                          ignore_index=True)
        who = "the class" if self.teacher else "your own answers"
        self.histogram.object = figs.predictions_histogram(
            frame if len(frame) else None, title=f"{q.name}: predictions against the measured outcome ({who})",
            unit=q.unit, categorical=bool(q.choices))
        les = lessons.lesson(name)
        self.checks_view.object = checks_html(s["checks"], [e.name for e in les.exercises])
        self.explanations_view.object = explanations_html(s["explanations"])
        refused = self.records.refused
        self.note.object = escape_md(
            f"{les.title}. Question: {q.prompt}"
            + (f"\n\nSkipped {len(refused)} record file(s): {'; '.join(refused[:3])}" if refused else ""))

    def __panel__(self):
        return pn.Column(pn.pane.Markdown("### Lessons"), pn.Row(self.lesson_select, self.refresh_button), self.note,
                         self.histogram, pn.pane.Markdown("**Checks**"), self.checks_view,
                         pn.pane.Markdown("**Explanations**"), self.explanations_view, sizing_mode="stretch_width")
