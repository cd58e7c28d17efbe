"""The three modes, the Predict / Measure / Explain beats and the per-user store of answers: refusals,
bounds, owner checks, atomic files, a student's own view against a teacher's class view, the handout."""
import json
import os

import pandas as pd
import pytest

import workbench as wb
from workbench.lessons import framework, records


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_LESSONS_SOLVE", raising=False)
    monkeypatch.delenv("WORKBENCH_LESSONS_TEACHER", raising=False)
    monkeypatch.delenv("WORKBENCH_TEACHERS", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_USER", "alice")
    return tmp_path / "home"


def _as(monkeypatch, user):
    monkeypatch.setenv("WORKBENCH_USER", user)


# ============================================================================ modes


def test_modes_come_from_the_environment(home, monkeypatch):
    assert wb.lessons.mode() == "student"
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach,head")
    _as(monkeypatch, "head")
    assert wb.lessons.mode() == "teacher"
    _as(monkeypatch, "alice")
    assert wb.lessons.mode() == "student"
    monkeypatch.setenv("WORKBENCH_LESSONS_TEACHER", "1")
    assert wb.lessons.mode() == "teacher"
    monkeypatch.setenv("WORKBENCH_LESSONS_SOLVE", "1")
    assert wb.lessons.mode() == "ci"


def test_the_user_is_checked(home, monkeypatch):
    assert wb.lessons.current_user() == "alice"
    _as(monkeypatch, "../bob")
    with pytest.raises(ValueError, match="WORKBENCH_USER"):
        wb.lessons.current_user()
    monkeypatch.delenv("WORKBENCH_USER")
    monkeypatch.setattr(framework.getpass, "getuser", lambda: "osuser")
    assert wb.lessons.current_user() == "osuser"


def test_the_reference_is_for_teachers_and_ci_only(home, monkeypatch):
    with pytest.raises(PermissionError, match="teachers only"):
        wb.lessons.reference("collapse.nc1")
    monkeypatch.setenv("WORKBENCH_LESSONS_TEACHER", "1")
    src = wb.lessons.reference("collapse.nc1")
    assert src.startswith("def nc1(features, labels):") and "pinv" in src


def test_student_mode_checks_the_learners_function_ci_mode_the_reference(home, monkeypatch):
    def stub(features, labels):
        raise NotImplementedError

    r = wb.lessons.check("collapse.nc1", stub)
    assert not r.passed and r.mode == "student" and "not written yet" in r.message
    with pytest.raises(RuntimeError, match="has not passed its check yet"):
        r.function(None, None)
    # the message quotes the learner's code, never the reference's
    assert "pinv" not in str(r) and "def nc1" not in str(r)
    monkeypatch.setenv("WORKBENCH_LESSONS_SOLVE", "1")
    r = wb.lessons.check("collapse.nc1", stub)
    assert r.passed and r.mode == "ci" and r.function is wb.lessons.collapse.nc1


def test_unknown_names_are_refused_with_the_known_ones(home):
    with pytest.raises(ValueError, match="exercise must be one of .*collapse.nc1"):
        wb.lessons.check("collapse.nc2", lambda f, l: 0)
    with pytest.raises(ValueError, match="question must be one of"):
        wb.lessons.predict("nope", 1)
    with pytest.raises(ValueError, match="lesson must be one of"):
        wb.lessons.explain("nope", "text")


# ============================================================================ predict, measure, explain


def test_a_prediction_outside_the_offered_range_is_refused(home, capsys):
    with pytest.raises(ValueError, match=r"must be in \[0, 2\].*outside the offered range"):
        wb.lessons.predict("growth.flops_ratio", 2.5)
    with pytest.raises(ValueError, match="must be a number"):
        wb.lessons.predict("growth.flops_ratio", "half")
    with pytest.raises(ValueError, match="must be a number"):
        wb.lessons.predict("growth.flops_ratio", float("nan"))
    with pytest.raises(ValueError, match=r"must be one of \[0, 1, 2\]"):
        wb.lessons.predict("residual.skip_most", 3)
    with pytest.raises(ValueError, match="commit your prediction first"):
        wb.lessons.predict("growth.flops_ratio", None)
    assert wb.lessons.answers().empty              # nothing refused was kept
    assert wb.lessons.predict("growth.flops_ratio", 0.7) == 0.7
    assert "prediction committed: 0.70" in capsys.readouterr().out


def test_ci_commits_the_questions_answer_and_keeps_nothing(home, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_LESSONS_SOLVE", "1")
    assert wb.lessons.predict("residual.skip_most", None) == 1
    wb.lessons.measure("residual.skip_most", 0)
    assert wb.lessons.explain("residual", "") == ""
    assert not (home / "lessons").exists()
    assert capsys.readouterr().out.splitlines() == ["prediction committed: 1", "residual.skip_most: 0"]


def test_a_prediction_is_locked_once_the_outcome_is_measured(home, capsys):
    wb.lessons.predict("growth.flops_ratio", 0.4)
    wb.lessons.predict("growth.flops_ratio", 0.6)          # changed before the measurement: fine
    wb.lessons.measure("growth.flops_ratio", 0.81)
    assert wb.lessons.predict("growth.flops_ratio", 0.8) == 0.6
    out = capsys.readouterr().out
    assert "you predicted 0.60" in out and "kept your first prediction, 0.60" in out


def test_an_explanation_is_bounded_and_kept_as_typed(home):
    with pytest.raises(ValueError, match="write your explanation first"):
        wb.lessons.explain("growth", "   ")
    with pytest.raises(ValueError, match="at most 600 characters"):
        wb.lessons.explain("growth", "x" * 601)
    with pytest.raises(ValueError, match="must be text"):
        wb.lessons.explain("growth", 3)
    text = "Stacking <b>copies</b> starts\nfrom a trained function & saves FLOPs."
    wb.lessons.explain("growth", text)
    t = wb.lessons.answers("growth")
    assert t.loc[t.kind == "explanations", "text"].item() == " ".join(text.split())


# ============================================================================ the store


def test_each_student_sees_only_their_own_and_a_teacher_the_class(home, monkeypatch):
    for user, guess in (("alice", 0.5), ("bob", 1.2)):
        _as(monkeypatch, user)
        wb.lessons.predict("growth.flops_ratio", guess)
        wb.lessons.check("growth.zero_block", wb.lessons.growth.zero_new_block if user == "bob" else lambda block: None)
        wb.lessons.explain("growth", f"{user} thinks so.")
    _as(monkeypatch, "alice")
    mine = wb.lessons.answers("growth")
    assert set(mine.user) == {"alice"} and len(mine) == 3
    assert mine.loc[mine.kind == "checks", "passed"].item() is False
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    _as(monkeypatch, "teach")
    everyone = wb.lessons.answers("growth")
    assert set(everyone.user) == {"alice", "bob"}
    s = wb.lessons.summary("growth", everyone)
    assert sorted(s["predictions"].value) == [0.5, 1.2]
    assert dict(zip(s["checks"].user, s["checks"].passed)) == {"alice": False, "bob": True}


def test_check_attempts_are_counted(home):
    for fn in (lambda block: None, lambda block: None, wb.lessons.growth.zero_new_block):
        wb.lessons.check("growth.zero_block", fn)
    entry = records.LessonRecords().read("alice")["lessons"]["growth"]["checks"]["growth.zero_block"]
    assert entry["attempts"] == 3 and entry["passed"] and entry["ever_passed"]


def test_writes_are_owner_checked_and_bounded(home):
    rec = records.LessonRecords(home)
    with pytest.raises(PermissionError, match="alice may not write the lesson record of bob"):
        rec.write("bob", "growth", "predictions", "growth.flops_ratio", {"value": 1.0}, as_user="alice")
    with pytest.raises(ValueError, match="user must be"):
        rec.write("../x", "growth", "predictions", "k", {"value": 1.0}, as_user="../x")
    with pytest.raises(ValueError, match="kind must be one of"):
        rec.write("alice", "growth", "grades", "k", {"value": 1.0}, as_user="alice")
    with pytest.raises(ValueError, match="finite"):
        rec.write("alice", "growth", "predictions", "k", {"value": float("inf")}, as_user="alice")
    with pytest.raises(ValueError, match="text, a number"):
        rec.write("alice", "growth", "predictions", "k", {"value": [1, 2]}, as_user="alice")
    rec.write("alice", "growth", "predictions", "k", {"value": 1.0}, as_user="alice")
    path = home / "lessons" / "alice.json"
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in (home / "lessons").iterdir() if p.name.endswith(".tmp")] == []


def test_a_planted_or_broken_file_is_skipped_and_named(home, monkeypatch):
    rec = records.LessonRecords(home)
    rec.write("alice", "growth", "predictions", "growth.flops_ratio", {"value": 1.0}, as_user="alice")
    folder = home / "lessons"
    # a file in bob's name that says it is carol's
    (folder / "bob.json").write_text(json.dumps({"user": "carol", "lessons": {}}))
    (folder / "dave.json").write_text("{not json")
    (folder / "notaname!.json").write_text("{}")
    table = rec.table()
    assert set(table.user) == {"alice"}
    assert any("bob.json" in r and "not a lesson record of bob" in r for r in rec.refused)
    assert any("dave.json" in r and "unreadable" in r for r in rec.refused)
    # a file owned by another account than its user's (and this process's) is refused
    monkeypatch.setattr(records.LessonRecords, "_owner_ok", lambda self, path, user: user != "alice")
    assert rec.table().empty and any("owned by another account" in r for r in rec.refused)


def test_the_owner_rule(home, monkeypatch):
    rec = records.LessonRecords(home)
    rec.write("alice", "growth", "predictions", "growth.flops_ratio", {"value": 1.0}, as_user="alice")
    path = home / "lessons" / "alice.json"
    assert rec._owner_ok(path, "alice")                                   # written by this account
    monkeypatch.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)   # the reader is another account ...
    monkeypatch.setattr(records.LessonRecords, "_os_uid", staticmethod(lambda user: None))
    assert not rec._owner_ok(path, "alice")                               # ... and alice is no account here
    monkeypatch.setattr(records.LessonRecords, "_os_uid", staticmethod(lambda user: os.stat(path).st_uid))
    assert rec._owner_ok(path, "alice")                                   # alice's own account wrote it


def test_a_folder_that_cannot_be_listed_gives_no_rows_and_says_why(home, monkeypatch):
    rec = records.LessonRecords(home)
    rec.write("alice", "growth", "predictions", "growth.flops_ratio", {"value": 1.0}, as_user="alice")

    def denied(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(type(rec.root), "iterdir", denied)
    assert rec.table().empty and rec.refused == [f"{rec.root}: cannot list the lesson records (Permission denied)"]
    assert len(rec.table(users=["alice"])) == 1          # one's own record is still read by name


def test_an_oversized_record_is_refused(home, monkeypatch):
    monkeypatch.setattr(records, "FILE_BYTES", 300)
    rec = records.LessonRecords(home)
    rec.write("alice", "growth", "explanations", "growth", {"text": "short"}, as_user="alice")
    with pytest.raises(ValueError, match="would exceed 300 bytes"):
        rec.write("alice", "growth", "checks", "growth.zero_block", {"message": "m" * 250}, as_user="alice")
    assert rec.read("alice")["lessons"]["growth"].keys() == {"explanations"}


def test_a_record_that_cannot_be_written_does_not_stop_the_lesson(home, capsys):
    home.mkdir(parents=True)
    (home / "lessons").write_text("a file where the folder should be")
    assert wb.lessons.predict("growth.flops_ratio", 1.0) == 1.0
    assert "(not kept in your lesson record" in capsys.readouterr().out


# ============================================================================ the course


def test_lessons_table_lists_six_lessons_in_course_order():
    t = wb.lessons.lessons_table()
    assert list(t.lesson) == ["growth", "residual", "connectivity", "collapse", "grokking", "llama"]
    assert isinstance(t, pd.DataFrame) and t.notebook.str.endswith(".ipynb").all()
