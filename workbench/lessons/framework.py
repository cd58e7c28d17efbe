"""The lesson format: questions the learner answers before running, exercises checked against a hidden
reference, the three modes one notebook runs in, and the time-limited call that keeps the kernel alive.

A :class:`Lesson` has six beats (``README.md`` "Lessons"): *Predict* (a :class:`Question`, answered with
:func:`workbench.lessons.predict` before anything runs), *Build* (an :class:`Exercise`: 5-20 lines the
learner writes, checked by :func:`workbench.lessons.check` against the reference on seeded random cases,
ARENA-style), *Explore* (an inline explorer bound to the learner's own model), *Measure* (one printed
number, the outcome of the question), *Explain* (one or two sentences, kept) and *Extend* (papers, each
with a ready experiment in the notebook).

Modes (:func:`mode`), all from the same notebook:

- ``"student"``: the reference stays inside the package (never printed, never in the notebook);
  ``check`` answers with what is wrong, specifically.
- ``"teacher"``: :func:`workbench.lessons.reference` prints the reference and
  :func:`workbench.lessons.answers` shows the class's records. The user (``WORKBENCH_USER``, else the
  operating-system user) is named in ``WORKBENCH_TEACHERS``, or ``WORKBENCH_LESSONS_TEACHER=1``.
- ``"ci"``: ``WORKBENCH_LESSONS_SOLVE=1`` (set by ``notebooks/lessons/conftest.py`` for nbval): every
  ``check`` uses the reference, so it passes and the notebook's measured numbers are the reference's.

The reference is hidden from the notebook, not secret: it is source code in the installed package, and a
learner who looks for it there finds it. The checks are for feedback, not for grading.
"""
from __future__ import annotations

import ctypes
import functools
import getpass
import inspect
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core import checks
from ..runtime import classroom

SOLVE_ENV = "WORKBENCH_LESSONS_SOLVE"
TEACHER_ENV = "WORKBENCH_LESSONS_TEACHER"
USER_ENV = "WORKBENCH_USER"
MODES = ("student", "teacher", "ci")
CASE_SECONDS = 10.0       # one case of a check: the learner's function gets this long
CHECK_SECONDS = 45.0      # all cases of one check together
MESSAGE_CHARS = 600       # a check's message as kept and shown


# ============================================================================ who and how


def current_user() -> str:
    """The learner: ``WORKBENCH_USER`` if set, else the operating-system user (checked as a user name)."""
    name = os.environ.get(USER_ENV) or None
    where = USER_ENV
    if name is None:
        try:
            name = getpass.getuser()
        except Exception:   # no user database entry (some containers)
            name = None
        where = "the operating-system user name"
    if name is None:
        raise ValueError(f"no user name: set {USER_ENV}")
    try:
        return checks.check_user(where, name)
    except ValueError as e:
        raise ValueError(f"{e}; set {USER_ENV} to a user name") from None


def mode() -> str:
    """``"ci"``, ``"teacher"`` or ``"student"`` (see the module docstring), read from the environment each call."""
    if os.environ.get(SOLVE_ENV, "") == "1":
        return "ci"
    if os.environ.get(TEACHER_ENV, "") == "1":
        return "teacher"
    try:
        return "teacher" if classroom.is_teacher(current_user()) else "student"
    except ValueError:
        return "student"


# ============================================================================ lessons, questions, exercises


@dataclass(frozen=True)
class Question:
    """What the learner predicts: a number in ``[low, high]`` or one of ``choices``.

    ``ci_answer`` is the prediction a CI run commits (the notebook ships with ``None``). ``digits``: how the
    measured outcome is printed.
    """

    name: str
    prompt: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    ci_answer: Any = None
    unit: str = ""
    digits: int = 2

    def check(self, value) -> Any:
        """``value`` if it is an allowed answer, else ValueError naming the range or the choices."""
        if self.choices:
            return checks.check_choice(f"prediction for {self.name}", value, list(self.choices))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"prediction for {self.name} must be a number in [{self.low:g}, {self.high:g}]"
                             f"{' ' + self.unit if self.unit else ''}, got {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"prediction for {self.name} must be in [{self.low:g}, {self.high:g}]"
                             f"{' ' + self.unit if self.unit else ''}, got {value!r}: that is outside the offered range")
        return float(value)

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return f"a number in [{self.low:g}, {self.high:g}]" + (f" {self.unit}" if self.unit else "")

    def show(self, value) -> str:
        """``value`` as the lesson prints it."""
        if isinstance(value, float):
            return f"{value:.{self.digits}f}"
        return str(value)


@dataclass(frozen=True)
class Case:
    """One seeded input of a check: ``args`` for the learner's function, ``what`` for the message, and
    whatever the judge precomputed (``data``)."""

    what: str
    args: tuple = ()
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Exercise:
    """A Build beat: ``reference(*args)`` is the hidden solution; ``cases()`` the seeded inputs;
    ``judge(fn, case)`` runs ``fn`` (the learner's, guarded) on a case and returns None when right, else
    the specific message (what differs, by how much, where, and the likely cause)."""

    name: str
    title: str
    params: tuple[str, ...]
    reference: Callable
    cases: Callable[[], list[Case]]
    judge: Callable[[Callable, Case], str | None]
    case_seconds: float = CASE_SECONDS


@dataclass(frozen=True)
class Lesson:
    """One notebook of the course: its questions, exercises, the question its Measure beat answers, and
    the papers its Extend beat points to."""

    name: str
    title: str
    notebook: str
    questions: tuple[Question, ...]
    exercises: tuple[Exercise, ...]
    measured: str
    papers: tuple[str, ...] = ()


LESSONS: dict[str, Lesson] = {}


def register(lesson: Lesson) -> Lesson:
    """Add ``lesson`` to :data:`LESSONS` (each lesson module does, on import)."""
    for q in lesson.questions:
        if not q.name.startswith(lesson.name + "."):
            raise ValueError(f"question {q.name!r} must be named {lesson.name}.<something>")
    for ex in lesson.exercises:
        if not ex.name.startswith(lesson.name + "."):
            raise ValueError(f"exercise {ex.name!r} must be named {lesson.name}.<something>")
    if lesson.measured not in {q.name for q in lesson.questions}:
        raise ValueError(f"lesson {lesson.name}: measured must name one of its questions, got {lesson.measured!r}")
    LESSONS[lesson.name] = lesson
    return lesson


def _load() -> dict[str, Lesson]:
    """The registry (the package's ``__init__`` imports :mod:`workbench.lessons.course`, which fills it)."""
    return LESSONS


def lesson(name: str) -> Lesson:
    """The registered lesson ``name``, or ValueError listing the lessons."""
    lessons = _load()
    return lessons[checks.check_choice("lesson", name, sorted(lessons))]


def _find(kind: str, name: str):
    lessons = _load()
    found = {x.name: x for les in lessons.values() for x in (les.exercises if kind == "exercise" else les.questions)}
    if not isinstance(name, str) or name not in found:
        raise ValueError(f"{kind} must be one of {sorted(found)}, got {name!r}")
    return found[name]


def exercise(name: str) -> Exercise:
    """The registered exercise ``name`` (``"<lesson>.<exercise>"``)."""
    return _find("exercise", name)


def question(name: str) -> Question:
    """The registered question ``name`` (``"<lesson>.<question>"``)."""
    return _find("question", name)


def lesson_of(name: str) -> str:
    return name.split(".", 1)[0]


# ============================================================================ calling the learner's code


class LearnerError(Exception):
    """The learner's function raised ``error``; ``where`` is its line in the learner's code, if found."""

    def __init__(self, error: BaseException, where: str = ""):
        super().__init__(str(error))
        self.error, self.where = error, where

    def describe(self) -> str:
        e = self.error
        if isinstance(e, NotImplementedError):
            return "your function is not written yet (it raised NotImplementedError): replace that line with your code"
        text = f"your function raised {type(e).__name__}: {_short(str(e), 200)}"
        return text + (f" ({self.where})" if self.where else "")


class _Timeout(BaseException):
    """Raised inside a learner's function that ran past its time (a BaseException: ``except Exception`` in the
    learner's code does not swallow it)."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _learner_line(tb) -> str:
    """``line N: <source>`` of the deepest frame that is the learner's (not the workbench, not a library)."""
    best = None
    for frame in traceback.extract_tb(tb):
        f = frame.filename
        if f.startswith(_PACKAGE_DIR) or "site-packages" in f or f.startswith(sys.prefix) or f.startswith(
                getattr(sys, "base_prefix", sys.prefix)):
            continue
        best = frame
    if best is None:
        return ""
    code = (best.line or "").strip()
    return f"line {best.lineno}: {_short(code, 80)}" if code else f"line {best.lineno}"


def guard(fn: Callable) -> Callable:
    """``fn`` with its exceptions turned into :class:`LearnerError` (so a judge tells the learner's errors
    from its own)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _Timeout:
            raise
        except Exception as e:
            raise LearnerError(e, _learner_line(e.__traceback__)) from e
    return call


def _async_raise(thread: threading.Thread, exc: type) -> bool:
    """Raise ``exc`` inside ``thread`` at its next Python instruction (CPython); whether it was delivered."""
    if thread.ident is None:
        return False
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))
    if n > 1:   # pragma: no cover - undo: never more than one thread state
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)
        return False
    return n == 1


def run_limited(target: Callable[[], Any], seconds: float) -> tuple[str, Any]:
    """Run ``target()`` in a daemon thread for at most ``seconds``.

    Returns ``("ok", value)``, ``("error", exception)`` or ``("timeout", stopped)``: past its time the
    thread is asked to stop (an exception raised at its next Python instruction; a long C call, a torch
    operation or ``time.sleep``, finishes first) and left behind if it does not within a second. The caller
    (the notebook's kernel) never waits longer than ``seconds + 1``.
    """
    box: dict = {}

    def work():
        try:
            box["value"] = target()
        except BaseException as e:   # noqa: BLE001 - everything goes back to the caller
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True, name="workbench-lesson-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        _async_raise(thread, _Timeout)
        thread.join(1.0)
        return "timeout", not thread.is_alive()
    if "error" in box:
        return "error", box["error"]
    return "ok", box.get("value")


# ============================================================================ the check


@dataclass
class CheckResult:
    """What :func:`workbench.lessons.check` found. ``function`` is the one checked (the reference in CI
    mode): later cells use it. Prints as plain text (never HTML: the message quotes the learner's code)."""

    exercise: str
    passed: bool
    message: str
    cases: int
    function: Callable | None = None
    mode: str = "student"
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        if self.passed:
            return f"{self.exercise}: passed ({self.cases} cases)"
        return f"{self.exercise}: not yet. {self.message}"

    __repr__ = __str__


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _not_a_function(fn) -> str:
    if fn is None:
        return "check needs your function, got None: define it with def and pass its name (check(name, my_function))"
    kind = type(fn).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return (f"check needs your function, got {_short(repr(fn), 60)} ({article} {kind}): pass the function itself, "
            f"its name without parentheses (check(name, f), not check(name, f(...)))")


def _signature_problem(fn, params: tuple[str, ...]) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None   # a builtin or a C function: let the call tell
    try:
        sig.bind(*params)
    except TypeError:
        names = ", ".join(params)
        return (f"your function takes ({', '.join(sig.parameters)}), but the exercise calls it with {len(params)} "
                f"argument{'s' * (len(params) != 1)}: ({names})")
    return None


def run_check(ex: Exercise, fn, current_mode: str) -> CheckResult:
    """Check ``fn`` against ``ex`` on every case (see :func:`workbench.lessons.check`)."""
    start = time.perf_counter()

    def result(passed: bool, message: str, n: int) -> CheckResult:
        return CheckResult(ex.name, passed, _short(message, MESSAGE_CHARS), n, fn if callable(fn) else None,
                           current_mode, time.perf_counter() - start)

    if not callable(fn) or isinstance(fn, type):
        return result(False, _not_a_function(fn), 0)
    problem = _signature_problem(fn, ex.params)
    if problem:
        return result(False, problem, 0)
    learner = guard(fn)
    cases = ex.cases()
    for i, case in enumerate(cases, 1):
        left = CHECK_SECONDS - (time.perf_counter() - start)
        limit = max(1.0, min(ex.case_seconds, left))
        status, value = run_limited(lambda c=case: ex.judge(learner, c), limit)
        where = f"case {i} of {len(cases)} ({case.what})"
        if status == "timeout":
            tail = "" if value else " It is still running in the background; restart the kernel if it slows you down."
            return result(False, f"your function did not return within {limit:.0f} s on {where}: an endless loop, or "
                                 f"far more work than the exercise needs?{tail}", i)
        if status == "error":
            if isinstance(value, LearnerError):
                return result(False, f"on {where}: {value.describe()}", i)
            return result(False, f"on {where}: the check could not use what your function returned "
                                 f"({type(value).__name__}: {_short(str(value), 160)})", i)
        if value is not None:
            return result(False, f"on {where}: {value}", i)
    return result(True, "", len(cases))


# ============================================================================ helpers for judges


def tensor_result(value, shape: tuple | None, what: str = "your function"):
    """``value`` as a float64 torch tensor of ``shape`` (None: any), or a message saying what it is instead."""
    import numpy as np
    import torch

    want = "" if shape is None else f" of shape {tuple(shape)}"
    if value is None:
        return None, f"{what} returned None: did you forget the return statement? (expected a tensor{want})"
    if isinstance(value, (list, tuple)):
        try:
            value = torch.as_tensor(np.asarray(value, dtype=float))
        except (TypeError, ValueError):
            return None, f"{what} returned a {type(value).__name__} that is not a list of numbers (expected a tensor{want})"
    elif isinstance(value, np.ndarray):
        value = torch.from_numpy(np.asarray(value, dtype=float))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        return None, f"{what} returned a {type(value).__name__}, expected a tensor{want}"
    if shape is not None and tuple(value.shape) != tuple(shape):
        return None, f"{what} returned shape {tuple(value.shape)}, expected {tuple(shape)}"
    value = value.detach().to("cpu", torch.float64)
    if not torch.isfinite(value).all():
        return None, f"{what} returned NaN or infinite values"
    return value, None


def number_result(value, what: str = "your function"):
    """``value`` as a Python float, or a message saying what it is instead."""
    import numpy as np
    import torch

    if value is None:
        return None, f"{what} returned None: did you forget the return statement? (expected one number)"
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        if value.size == 1 if isinstance(value, np.ndarray) else value.numel() == 1:
            value = float(value.reshape(-1)[0])
        else:
            return None, f"{what} returned an array of shape {tuple(value.shape)}, expected one number"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None, f"{what} returned a {type(value).__name__}, expected one number"
    value = float(value)
    if not math.isfinite(value):
        return None, f"{what} returned {value}, expected a finite number"
    return value, None


def fmt(x: float) -> str:
    """A number as a message shows it: ``3e-02``, ``0.53``."""
    x = float(x)
    return f"{x:.0e}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.3g}"
