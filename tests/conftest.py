"""Shared fixtures: a temporary run store per test and a clean Panel state for UI tests."""
import os

import pytest
import torch

# Torch threads per test process: OMP_NUM_THREADS when set (`make test` runs two xdist workers with one
# thread each, so the two cores are not oversubscribed), else at most two.
_threads = os.environ.get("OMP_NUM_THREADS", "").strip()
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One torch thread for this test (tiny models: on the shared 2-core machine two threads made them
    ~10x slower, 70 s against 6 s for the same sweep, through thread contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty RunStore in a temporary directory (also exported as WORKBENCH_HOME)."""
    import workbench as wb

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return wb.RunStore(tmp_path / "home")


@pytest.fixture(autouse=True)
def _reset_panel_state():
    yield
    import sys

    if "panel" in sys.modules:
        sys.modules["panel"].state.reset()
