"""What a lesson notebook calls: ``start``, ``predict``, ``check``, ``measure``, ``explain``, and for teachers
``reference``, ``answers`` and ``teacher_view``. Every answer is kept in the learner's record
(:class:`workbench.lessons.records.LessonRecords`) except in CI mode; a record that cannot be written
(a read-only home) is said once and the lesson goes on.
"""
from __future__ import annotations

import inspect
import json
import os
import textwrap
from pathlib import Path

import pandas as pd

from .framework import (
    CheckResult, LESSONS, Question, _load, current_user, exercise, lesson, lesson_of, mode, question, run_check,
)
from .records import EXPLANATION_CHARS, LessonRecords


def _records() -> LessonRecords:
    return LessonRecords()


def _keep(kind: str, key: str, entry: dict, lesson_name: str | None = None):
    """Write ``entry`` into the current user's record (not in CI mode); a failure is printed, not raised."""
    if mode() == "ci":
        return None
    try:
        user = current_user()
        return _records().write(user, lesson_name or lesson_of(key), kind, key, entry, as_user=user)
    except (OSError, ValueError, PermissionError, RuntimeError) as e:
        print(f"(not kept in your lesson record: {e})")
        return None


def _own(kind: str, key: str) -> dict | None:
    if mode() == "ci":
        return None
    try:
        doc = _records().read(current_user())
    except (OSError, ValueError):
        return None
    return doc["lessons"].get(lesson_of(key), {}).get(kind, {}).get(key)


# ============================================================================ the six beats


def start(name: str) -> None:
    """Print the lesson's title, the mode and where answers are kept (the first cell of every lesson)."""
    les = lesson(name)
    m = mode()
    print(f"Lesson {les.name}: {les.title}")
    if m == "ci":
        print("mode: ci (WORKBENCH_LESSONS_SOLVE=1: every check uses the reference solution; nothing is recorded)")
        return
    try:
        user = current_user()
    except ValueError as e:
        print(f"mode: {m} ({e})")
        return
    print(f"mode: {m}, user {user}; your answers are kept in {_records().root}")
    if m == "teacher":
        print("teacher: wb.lessons.reference(name) shows a reference, wb.lessons.teacher_view(lesson) the class")


def predict(name: str, value):
    """Commit a prediction for question ``name`` before running (see the question's prompt).

    ``value`` must be one of the offered answers (a number in the question's range, or one of its choices);
    anything else is refused with ValueError. ``None`` means "not answered yet": refused too, except in CI
    mode, which commits the question's ``ci_answer``. Once the lesson has measured the outcome the first
    committed prediction is kept. Returns the committed value.
    """
    q = question(name)
    if value is None:
        if mode() != "ci":
            raise ValueError(f"commit your prediction first: set it to {q.describe()} and run the cell again. "
                             f"The question: {q.prompt}")
        value = q.ci_answer
    value = q.check(value)
    kept = _own("predictions", name)
    if kept is not None and _own("measures", name) is not None and kept.get("value") != value:
        print(f"kept your first prediction, {q.show(kept['value'])}: the outcome was measured after it")
        return kept["value"]
    _keep("predictions", name, {"value": value})
    print(f"prediction committed: {q.show(value)}")
    return value


def check(name: str, fn) -> CheckResult:
    """Check the learner's function ``fn`` for exercise ``name`` against the hidden reference.

    The function runs on the exercise's seeded random cases, each in a thread with a time limit (a
    function that loops forever is stopped, the kernel goes on); the first case it gets wrong ends the
    check with a message naming what differs, by how much and the likely slip. Something that is not a
    function, a function that raises, or one that returns the wrong shape gets a message naming that.
    In CI mode the reference itself is checked. The result's ``function`` is what later cells use: the
    function checked if it passed, else one that says the check has not passed yet.
    """
    ex = exercise(name)
    m = mode()
    target = ex.reference if m == "ci" else fn
    result = run_check(ex, target, m)
    if not result.passed:
        result.function = _not_passed(ex.name)
    if m != "ci":
        before = _own("checks", ex.name) or {}
        _keep("checks", ex.name, {"passed": result.passed, "message": result.message,
                                  "attempts": int(before.get("attempts") or 0) + 1,
                                  "ever_passed": bool(before.get("ever_passed")) or result.passed})
    return result


def _not_passed(name: str):
    def not_yet(*args, **kwargs):
        raise RuntimeError(f"{name} has not passed its check yet: fix your function in the Build cell, run the check "
                           f"again, then this cell")
    return not_yet


def measure(name: str, value, label: str | None = None):
    """Print (and keep) the measured outcome of question ``name``: the lesson's one expected number.

    ``value``: a number, one of the question's choices, or None (not reached). Returns ``value``.
    """
    q = question(name)
    shown = "not reached" if value is None else q.show(float(value) if not q.choices else value)
    print(f"{label or q.name}: {shown}")
    entry = {"value": None if value is None else (float(value) if not q.choices else value)}
    _keep("measures", name, entry)
    if mode() != "ci":
        mine = _own("predictions", name)
        if mine is not None:
            print(f"you predicted {q.show(mine['value'])}")
    return value


def explain(name: str, text: str) -> str:
    """Keep the learner's explanation for lesson ``name``: one or two sentences, at most
    :data:`~workbench.lessons.records.EXPLANATION_CHARS` characters. Empty is refused (accepted, and not
    kept, in CI mode)."""
    les = lesson(name)
    if not isinstance(text, str):
        raise ValueError(f"explanation must be text (one or two sentences), got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        if mode() == "ci":
            return ""
        raise ValueError("write your explanation first: one or two sentences, in the quotes, then run the cell again")
    if len(text) > EXPLANATION_CHARS:
        raise ValueError(f"explanation must be at most {EXPLANATION_CHARS} characters (one or two sentences), "
                         f"got {len(text)}")
    _keep("explanations", les.name, {"text": text}, lesson_name=les.name)
    print(f"explanation kept ({len(text)} characters)")
    return text


# ============================================================================ teachers


def reference(name: str) -> str:
    """The reference solution of exercise ``name`` as source text: teachers (and CI) only."""
    ex = exercise(name)
    if mode() == "student":
        raise PermissionError(f"the reference of {name} is shown to teachers only (a user named in "
                              f"WORKBENCH_TEACHERS, or WORKBENCH_LESSONS_TEACHER=1)")
    return textwrap.dedent(inspect.getsource(ex.reference))


def answers(name: str | None = None) -> pd.DataFrame:
    """The lesson records as a long table (``user, lesson, kind, key, value, passed, text, attempts, time``).

    A teacher sees the class; anyone else only their own rows; CI nothing. ``name``: one lesson.
    """
    if name is not None:
        lesson(name)
    m = mode()
    records = _records()
    if m == "ci":
        return records.table(lesson=name, users=[])
    if m == "teacher":
        return records.table(lesson=name)
    return records.table(lesson=name, users=[current_user()])


def summary(name: str, table: pd.DataFrame) -> dict:
    """Per lesson: the predictions and measured outcomes, who passed which check, the explanations
    (plain data; the Teacher page and :func:`teacher_view` show it)."""
    les = lesson(name)
    t = table[table["lesson"] == les.name]
    q = les.measured
    preds = t[(t["kind"] == "predictions") & (t["key"] == q)][["user", "value"]]
    outcomes = t[(t["kind"] == "measures") & (t["key"] == q)][["user", "value"]]
    checks_ = t[t["kind"] == "checks"][["user", "key", "passed", "attempts", "text"]]
    explained = t[t["kind"] == "explanations"][["user", "text"]]
    return {"lesson": les.name, "question": question(q), "predictions": preds.reset_index(drop=True),
            "outcomes": outcomes.reset_index(drop=True), "checks": checks_.reset_index(drop=True),
            "explanations": explained.reset_index(drop=True)}


def teacher_view(name: str) -> None:
    """Print the lesson's references and the class's answers (teachers); a one-line note for anyone else."""
    les = lesson(name)
    m = mode()
    if m == "student":
        print("This cell shows teachers the reference solutions and the class's answers.")
        return
    if m == "ci":
        print(f"CI run: every check of {les.name} used its reference solution.")
        return
    for ex in les.exercises:
        print(f"# reference of {ex.name}\n{reference(ex.name)}")
    s = summary(name, answers(name))
    q: Question = s["question"]
    print(f"{q.name}: {len(s['predictions'])} predictions, {len(s['outcomes'])} measured outcomes")
    if len(s["predictions"]):
        print(s["predictions"]["value"].value_counts().sort_index().to_string())
    print("checks passed:")
    print(s["checks"][["user", "key", "passed", "attempts"]].to_string(index=False) if len(s["checks"]) else "none yet")
    print("explanations:")
    for r in s["explanations"].itertuples():
        print(f"- {r.user}: {r.text}")


# ============================================================================ the notebooks


def notebooks_dir() -> Path:
    """``notebooks/lessons/`` of the checkout the package runs from (an editable install)."""
    return Path(__file__).resolve().parents[2] / "notebooks" / "lessons"


def handout(dest: str | os.PathLike) -> list[Path]:
    """Write the lesson notebooks to ``dest`` with every output cleared (the stored outputs are the CI
    run's: they would show the measured numbers before the learner predicts). Returns the files written."""
    src = notebooks_dir()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: the lesson notebooks come with a checkout of the repository")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for les in _load().values():
        doc = json.loads((src / les.notebook).read_text(encoding="utf-8"))
        for cell in doc.get("cells", []):
            if cell.get("cell_type") == "code":
                cell["outputs"], cell["execution_count"] = [], None
            cell.get("metadata", {}).pop("execution", None)
        doc.get("metadata", {}).pop("widgets", None)
        out = dest / les.notebook
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    return sorted(written)


def lessons_table() -> pd.DataFrame:
    """One row per lesson: name, title, notebook, question, exercises."""
    from .course import ORDER

    _load()
    return pd.DataFrame([{"lesson": les.name, "title": les.title, "notebook": les.notebook, "question": les.measured,
                          "exercises": ", ".join(ex.name for ex in les.exercises)}
                         for les in (LESSONS[n] for n in ORDER)])
