"""Lessons that check themselves: a short course on depth, one notebook per lesson in
``notebooks/lessons/``, each with a hidden reference here.

A lesson has six beats (``README.md`` "Lessons"): *Predict* (:func:`predict`: a number or a choice,
committed before running; outside the offered range refused), *Build* (:func:`check`: the learner's
5-20 lines against the reference on seeded random cases, with a message that names what is wrong),
*Explore* (an inline explorer on the learner's own model), *Measure* (:func:`measure`: one printed
number), *Explain* (:func:`explain`: one or two sentences, kept) and *Extend* (papers, each with a
ready experiment in the notebook).

One notebook, three modes (:func:`mode`): student (the reference hidden), teacher (:func:`reference`,
:func:`answers` with the class, :func:`teacher_view`) and CI (``WORKBENCH_LESSONS_SOLVE=1``: every check
uses the reference; nbval compares the measured numbers). Answers are kept per user in the run store's
home (:class:`LessonRecords`); the Teacher page shows them for the class.

>>> import workbench as wb
>>> wb.lessons.lessons_table()[["lesson", "notebook"]]      # doctest: +SKIP
>>> result = wb.lessons.check("growth.zero_block", my_function)   # doctest: +SKIP

Files: ``framework`` (questions, exercises, lessons, modes, the time-limited check), ``records`` (the
per-user store), ``learner`` (what notebooks call), ``course`` (the lesson order) and one module per
lesson with its exercise, reference and judge: ``growth``, ``residual``, ``connectivity``,
``collapse``, ``grokking``, ``llama``.
"""
from .framework import (
    CASE_SECONDS, CHECK_SECONDS, LESSONS, MODES, SOLVE_ENV, TEACHER_ENV, USER_ENV, Case, CheckResult, Exercise,
    Lesson, Question, current_user, exercise, lesson, mode, question, run_limited,
)
from .learner import (
    answers, check, explain, handout, lessons_table, measure, notebooks_dir, predict, reference, start, summary,
    teacher_view,
)
from .records import EXPLANATION_CHARS, LessonRecords
from . import course  # noqa: E402,F401  (registers the lessons: wb.lessons.growth, ... are their modules)

__all__ = ["check", "predict", "measure", "explain", "start", "reference", "answers", "summary", "teacher_view",
           "handout", "lessons_table", "notebooks_dir", "mode", "current_user", "lesson", "exercise", "question",
           "run_limited", "Lesson", "Exercise", "Question", "Case", "CheckResult", "LessonRecords", "LESSONS", "MODES",
           "SOLVE_ENV", "TEACHER_ENV", "USER_ENV", "CASE_SECONDS", "CHECK_SECONDS", "EXPLANATION_CHARS"]
