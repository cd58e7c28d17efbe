"""Load test in the browser: three sessions train at once on a server with one job slot.

One ``panel serve apps/`` on 127.0.0.1 with ``WORKBENCH_MAX_JOBS=1`` (a fresh WORKBENCH_HOME), three
Playwright browser contexts (separate Bokeh sessions, separate queue users) on the Train page. Each
starts a short digits training under its own run name, one click after the other. With one slot the
queue runs them one at a time, so while one trains the two others wait and must say so, each with its
*own* place: at a moment when one page shows a training step and both others are queued behind it
("... of 2"), the two waiting pages show positions 1 and 2 (the same text on both would be one job's
status shown to two sessions). Then all three finish, each page's result line names its own run and
no other session's run name appears on it, and each session finds its own run on the Runs page.
Screenshots: ``artifacts/load-<name>.png``. Marked ``ui`` like the other browser tests.
"""
import re
import time

import pytest
from helpers.classroom_server import browser  # noqa: F401 -- a fixture
from helpers.served_app import ROOT, serve_app

pytestmark = [pytest.mark.ui, pytest.mark.timeout(240)]

ARTIFACTS = ROOT / "artifacts"
NAMES = ["load-alpha", "load-bravo", "load-charlie"]   # distinct run names (their store slugs are the same text)
STEPS = "400"   # several seconds of digits training each: long enough that the others are seen waiting

# Panel 1.9.4's Plotly view: remove() purges the plot but leaves _rendered set, so the 25 ms throttled
# resize_layout() scheduled by the last layout pass can still call Plotly.relayout on the purged div when a
# tab is switched within those 25 ms (here: right after a full-page screenshot resized the viewport). The
# figure is already gone from the page, nothing the user sees changes; every other console error counts.
PURGED_PLOT_RELAYOUT = "Cannot read properties of undefined (reading '_guiEditing')"

QUEUED = re.compile(r"queued: position (\d+) of (\d+)")
STEP = re.compile(r"^step \d+/\d+, loss")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with one job slot; stopped by its pid when the module is done."""
    with serve_app(tmp_path_factory.mktemp("load-home"), tmp_path_factory.mktemp("models"), stop_seconds=15,
                   WORKBENCH_MAX_JOBS="1", WORKBENCH_THREADS="1", WORKBENCH_JOBS_PER_USER="2") as url:
        yield url


def _texts(page, pattern) -> list[str]:
    """The texts of the elements matching ``pattern`` now (no waiting: they may come and go)."""
    return [t.strip() for t in page.locator(f"text=/{pattern.pattern}/").all_inner_texts()]


def _status(page) -> str:
    """What the Train page's status line says now: "queued: position k of n", "step ...", or ""."""
    for pattern in (QUEUED, STEP):
        found = [t for t in _texts(page, pattern) if pattern.search(t)]
        if found:
            return found[0]
    return ""


def test_three_sessions_share_one_slot_each_sees_its_own_place_and_finds_its_own_run(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    contexts, pages = [], []
    for name in NAMES:   # one context each: separate cookies, separate Bokeh sessions
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(30_000)
        pg = ctx.new_page()
        pg.console_errors = []
        pg.on("console", lambda m, pg=pg: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e, pg=pg: pg.console_errors.append(str(e)))
        pg.failed_requests = []   # which resource a "Failed to load resource" console error was about
        pg.on("requestfailed", lambda r, pg=pg: pg.failed_requests.append(f"{r.url[:200]} ({r.failure})"))
        contexts.append(ctx)
        pages.append(pg)
    try:
        for pg in pages:   # the three sessions load at the same time
            pg.goto(server, wait_until="commit")
        for pg, name in zip(pages, NAMES):
            pg.wait_for_selector("text=Depth Workbench")
            pg.locator(".bk-tab", has_text="Train").first.click()
            for label, value in (("steps", STEPS), ("run name", name)):
                box = pg.locator(".bk-input-group", has_text=label).locator("input").first
                box.fill(value)
                box.press("Enter")
            pg.wait_for_timeout(300)
        for pg in pages:   # start all three at once (one click after the other)
            pg.locator("button.bk-btn", has_text="Train").first.click()

        # Watch the three status lines until all have finished
        seen_queued = [False] * 3
        snapshot = None   # statuses at a moment: one training, two queued behind it
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            statuses = [_status(pg) for pg in pages]
            for i, s in enumerate(statuses):
                seen_queued[i] |= bool(QUEUED.search(s))
            queued = [QUEUED.search(s) for s in statuses if QUEUED.search(s)]
            if (snapshot is None and sum(bool(STEP.search(s)) for s in statuses) == 1 and len(queued) == 2
                    and all(m.group(2) == "2" for m in queued)):
                snapshot = statuses
                for pg, name in zip(pages, NAMES):
                    pg.screenshot(path=str(ARTIFACTS / f"load-{name}-while-queued.png"))
            if all(pg.locator("text=/saved as/").count() for pg in pages):
                break
            time.sleep(0.15)
        else:
            raise AssertionError(f"not all three trainings finished in time; last statuses {statuses}")

        pages[-1].wait_for_timeout(1000)   # let the last curves settle before the full-page screenshots resize them
        assert sum(seen_queued) >= 2, f"with one slot two of three sessions must have waited: {seen_queued}"
        assert snapshot is not None, "never saw one session training while the two others were queued"
        positions = sorted(int(QUEUED.search(s).group(1)) for s in snapshot if QUEUED.search(s))
        assert positions == [1, 2], f"the two waiting sessions must show their own places 1 and 2: {snapshot}"

        for pg, name in zip(pages, NAMES):
            saved = _texts(pg, re.compile("saved as"))
            assert len(saved) == 1 and saved[0].startswith("completed") and f"-{name}-" in saved[0], saved
            for other in NAMES:
                if other != name:   # no other session's run on this page
                    assert pg.get_by_text(other).count() == 0, f"{name}'s page shows {other}"
            pg.screenshot(path=str(ARTIFACTS / f"load-{name}.png"), full_page=True)

        for pg, name in zip(pages, NAMES):   # each finds its own run under Runs and opens it
            pg.locator(".bk-tab", has_text="Runs").first.click()
            row = pg.locator(".tabulator-row", has_text=name).first
            row.wait_for()
            row.click()
            pg.wait_for_selector(f".js-plotly-plot >> text={name}")   # the curves are titled with the run's name
            pg.screenshot(path=str(ARTIFACTS / f"load-{name}-runs.png"), full_page=True)
        for pg, name in zip(pages, NAMES):
            errors = [e for e in pg.console_errors if e != PURGED_PLOT_RELAYOUT]
            assert errors == [], (name, errors[:5], "failed requests:", pg.failed_requests[:10])
    finally:
        for ctx in contexts:
            ctx.close()
