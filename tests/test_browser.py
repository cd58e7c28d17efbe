"""Browser test: serve apps/ and drive it in Chromium. Marked `ui`; `make test` runs it."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ui, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
PAGES = ["Train", "Grow", "Residual stream", "Connectivity", "Collapse", "Compose", "Runs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path_factory.mktemp("home")), "WORKBENCH_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "apps/", "--port", str(port),
                             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode())
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/apps"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (make test does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000)
        pg = context.new_page()
        pg.console_errors = []
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        yield pg
        browser.close()


def _open(page, tab: str) -> None:
    page.locator(".bk-tab", has_text=tab).first.click()


def _type(page, label: str, value: str) -> None:
    """Type into the first input whose label contains ``label`` and commit it with Enter."""
    box = page.locator(".bk-input-group", has_text=label).locator("input").first
    box.fill(value)
    box.press("Enter")


def _click(page, button: str) -> None:
    page.locator("button.bk-btn", has_text=button).first.click()


def test_every_page_renders_without_console_errors(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server)
    page.wait_for_selector("text=Depth Workbench")
    for title in PAGES:
        _open(page, title)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / f"page-{title.replace(' ', '_').lower()}.png"))
    assert page.console_errors == []


def test_short_training_run_draws_a_curve(server, page):
    page.goto(server)
    _open(page, "Train")
    _type(page, "steps", "60")
    _click(page, "Train")
    page.wait_for_selector("text=saved as", timeout=120_000)
    page.wait_for_selector(".js-plotly-plot .plot-container")
    n_traces = page.locator(".js-plotly-plot").first.evaluate("el => el.data.length")
    assert n_traces >= 3
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert page.console_errors == []


def test_grow_then_read_the_grown_model_in_the_residual_stream(server, page):
    """Across pages through the store: grow a model on the Grow page, analyse it on Residual stream."""
    page.goto(server)
    _open(page, "Grow")
    _type(page, "steps per stage", "20")
    _click(page, "Fill stages from preset")
    _click(page, "Grow")
    page.wait_for_selector("text=stages saved", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "grow-after-run.png"), full_page=True)

    _open(page, "Residual stream")
    page.wait_for_timeout(1000)
    _click(page, "Analyse")
    # the page has switched to the run saved last: the grown model's final stage (3 blocks)
    page.wait_for_selector("text=3 layers; logit lens at the output", timeout=120_000)
    page.wait_for_timeout(1000)
    # the contributions figure now has one trace per sublayer kind at least (attention, MLP)
    n_traces = page.locator(".js-plotly-plot").first.evaluate("el => el.data.length")
    assert n_traces >= 2
    page.screenshot(path=str(ARTIFACTS / "residual-after-grow.png"), full_page=True)
    assert page.console_errors == []
