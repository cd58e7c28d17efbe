"""The lessons on the Teacher page, in Python: per lesson a histogram of the class's predictions against the
measured outcome, who passed which check, the explanations as text (a payload never becomes markup); a
student's board holds only their own answers; a student gets no Teacher page at all."""
import html
import json

import pandas as pd
import plotly.graph_objects as go
import pytest

import workbench as wb
from workbench.figures import lessons as figs
from workbench.ui import lessons as ui_lessons
from workbench.ui import teacher
from workbench.ui.session import DataStore

PAYLOAD = "<script>alert(1)</script><b>bold</b>"


@pytest.fixture
def answered(store, monkeypatch):
    """Three students answered the growth lesson (into the store's home), the teacher is 'teach'."""
    monkeypatch.delenv("WORKBENCH_LESSONS_SOLVE", raising=False)
    monkeypatch.delenv("WORKBENCH_LESSONS_TEACHER", raising=False)
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    for user, guess, fn, text in (("alice", 0.5, wb.lessons.growth.zero_new_block, "Copies start trained."),
                                  ("bob", 1.2, lambda block: None, PAYLOAD),
                                  ("carol", 0.5, wb.lessons.growth.zero_new_block, "Less compute & same loss.")):
        monkeypatch.setenv("WORKBENCH_USER", user)
        wb.lessons.predict("growth.flops_ratio", guess)
        wb.lessons.check("growth.zero_block", fn)
        wb.lessons.measure("growth.flops_ratio", 0.81)
        wb.lessons.explain("growth", text)
    return store


def _page(monkeypatch, store, user):
    monkeypatch.setattr(teacher, "current_user", lambda: user)
    return teacher.TeacherPage(DataStore(store), queue=None)


def test_the_teacher_page_shows_the_class_per_lesson(answered, monkeypatch):
    page = _page(monkeypatch, answered, "teach")
    board = page.lesson_board
    assert board is not None and board in page.figures()
    assert board.lesson_select.value == "growth"
    s = board.summary
    assert sorted(s["predictions"].value) == [0.5, 0.5, 1.2] and len(s["outcomes"]) == 3
    fig = board.histogram.object
    hist = [t for t in fig.data if isinstance(t, go.Histogram)]
    assert len(hist) == 1 and sorted(hist[0].x) == [0.5, 0.5, 1.2]
    line = [sh for sh in fig.layout.shapes if sh.type == "line"]
    assert len(line) == 1 and line[0].x0 == pytest.approx(0.81)
    assert "measured: 0.81 (3 students)" in fig.to_json()
    checks = board.checks_view.object
    assert checks.count("<tr>") == 4                       # header + three students
    assert "alice</td><td style='padding:2px 8px;color:#1a7f37'" in checks
    assert "bob</td><td style='padding:2px 8px;color:#b35900'" in checks and "not yet (1 attempt)" in checks
    # bob's failed check message is in a title attribute, escaped
    assert "output projection" in checks


def test_explanations_are_text_never_markup(answered, monkeypatch):
    board = _page(monkeypatch, answered, "teach").lesson_board
    shown = board.explanations_view.object
    assert html.escape(PAYLOAD) in shown and "<script>" not in shown and "<b>bold" not in shown
    assert "Less compute &amp; same loss." in shown
    assert "<b>alice</b>" in shown                           # the page's own markup, user names escaped inside


def test_a_user_name_cannot_inject_markup():
    checks = pd.DataFrame({"user": ["x<i>y"], "key": ["growth.zero_block"], "passed": [False], "attempts": [2],
                           "text": ["'><script>"]})
    out = ui_lessons.checks_html(checks, ["growth.zero_block"])
    assert "x&lt;i&gt;y" in out and "<script>" not in out and "&#x27;&gt;&lt;script&gt;" in out


def test_the_lesson_picker_switches_lessons(answered, monkeypatch):
    board = _page(monkeypatch, answered, "teach").lesson_board
    board.lesson_select.value = "collapse"
    assert board.summary["lesson"] == "collapse" and board.summary["predictions"].empty
    assert "No check has been run yet." in board.checks_view.object
    assert "no predictions yet" in board.histogram.object.to_json()


def test_a_student_board_holds_only_their_own(answered):
    board = ui_lessons.LessonBoard(answered.root, "alice", teacher=False)
    s = board.summary
    assert list(s["predictions"].value) == [0.5] and set(s["checks"].user) == {"alice"}
    assert "bob" not in board.checks_view.object and "script" not in board.explanations_view.object
    assert "your own answers" in board.histogram.object.layout.title.text
    nobody = ui_lessons.LessonBoard(answered.root, None, teacher=False)
    assert nobody.summary["predictions"].empty


def test_a_student_gets_no_teacher_page(answered, monkeypatch):
    page = _page(monkeypatch, answered, "alice")
    assert not page.allowed and page.lesson_board is None and page.__panel__() is page.notice


def test_a_refused_record_is_named_on_the_board(answered):
    (answered.root / "lessons" / "mallory.json").write_text(json.dumps({"user": "alice", "lessons": {}}))
    board = ui_lessons.LessonBoard(answered.root, "teach", teacher=True)
    assert "Skipped 1 record file" in board.note.object and "mallory" in board.note.object
    assert "mallory" not in board.checks_view.object


def test_the_histogram_of_a_choice_question_has_categories():
    frame = pd.DataFrame({"kind": ["prediction"] * 3 + ["outcome"], "value": [0, 1, 1, 0]})
    fig = figs.predictions_histogram(frame, title="skip", categorical=True)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 1 and list(bars[0].x) == ["0", "1"] and list(bars[0].y) == [1, 2]
    assert "measured: 0 (1 student)" in fig.to_json()
