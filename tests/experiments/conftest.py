"""Helpers for the experiments' tests: run an ``as_code`` string as a notebook would."""
import pytest


def exec_code(code: str, name: str = "as code") -> dict:
    """Execute ``code`` (an experiment's ``as_code``, or a page's "As code" box with its fence); returns
    the snippet's variables."""
    code = code.removeprefix("```python\n").removesuffix("\n```")
    scope: dict = {}
    exec(compile(code, f"<{name}>", "exec"), scope)
    return scope


@pytest.fixture
def run_code():
    return exec_code


def learned(metrics):
    """A run's metrics without the wall-clock rows (``seconds``): what two runs of one pipeline share."""
    return metrics[metrics["metric"] != "seconds"].reset_index(drop=True)


@pytest.fixture
def without_time():
    return learned
