"""Shared fixtures: a temporary run store per test and a clean Panel state for UI tests."""
import os

import pytest
import torch

# The dashboard's starter examples (about a minute of training at a server's first start) only where a test asks
# for them (tests/browser/test_browser_first_contact.py, tests/runtime/test_examples.py): every other served app
# and page starts on an empty store, as the tests expect.
os.environ.setdefault("WORKBENCH_EXAMPLES", "0")

# Torch threads per test process: OMP_NUM_THREADS when set (`make test` runs two xdist workers with one
# thread each, so the two cores are not oversubscribed), else at most two.
_threads = os.environ.get("OMP_NUM_THREADS", "").strip()
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from torch's global generator seeded with 0: a test's arbitrary inputs
    (``torch.randn(3, 10)`` for a refusal, a shape check) are the same whatever ran before it in its process."""
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the engine tests that take the `device` fixture (cpu, cuda, cuda:1, mps); "
                          "default cpu. bench/device_check.py runs them with --device cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: engine tests that run on --device (they take the `device` fixture)")
    name = config.getoption("--device", default="cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"--device {name}: MPS is not available")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The torch device of ``--device`` (default cpu): engine tests that take it build their models and
    inputs there and compare with references computed on the same device (``pytest -m device --device cuda``)."""
    return torch.device(pytestconfig.getoption("--device"))


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
