"""The lessons under nbval run in CI mode: every ``wb.lessons.check`` uses the reference solution (so it passes),
predictions left at ``None`` commit the question's CI answer, nothing is recorded, and the measured numbers are
compared under ``NBVAL_CHECK_OUTPUT``. The kernel inherits the variable when nbval starts it (the first cell's
setup), so it is set just before each cell runs and removed after, never leaking into other test files."""
import os

import pytest

SOLVE = "WORKBENCH_LESSONS_SOLVE"
HERE = os.path.dirname(os.path.abspath(__file__))


def _here(item) -> bool:
    return os.path.dirname(os.path.abspath(str(item.path))) == HERE


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _here(item):
        item._lessons_before = os.environ.get(SOLVE)
        os.environ[SOLVE] = "1"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    if _here(item):
        before = getattr(item, "_lessons_before", None)
        if before is None:
            os.environ.pop(SOLVE, None)
        else:
            os.environ[SOLVE] = before
