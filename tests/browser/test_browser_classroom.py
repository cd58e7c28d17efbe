"""The hostile student in a real browser, against one served classroom (tests/classroom_server.py): the login
page alone and offline, the cookies, a widget value forged through the page's Bokeh document (one log
line, nothing changed), the bound on open sessions, and a cookie replayed after signing out."""
import re
import time

import pytest
from helpers.classroom_server import (browser, get_props, models, open_advanced, set_props,  # noqa: F401
                                      sign_in, start_classroom)

pytestmark = [pytest.mark.ui, pytest.mark.timeout(400)]

SLOTS = 2


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    r = start_classroom(tmp_path_factory.mktemp("browserroom"), env={"WORKBENCH_SESSIONS_PER_USER": str(SLOTS)})
    yield r
    r.stop()


def test_the_login_page_stands_alone_and_the_cookies_are_strict(room, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        asked = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(room.app, timeout=120_000)
        assert re.search(r"/login\?next=%2Fapps$", page.url)              # an anonymous visitor: the form only
        assert page.locator("#username").is_visible() and page.locator("form script").count() == 0
        assert all(u.startswith(room.url) for u in asked), asked          # nothing from elsewhere: works offline
        assert not page.evaluate("typeof Bokeh !== 'undefined'")          # no dashboard code for them
        page.close()

        page = sign_in(context, room, "alice")
        assert page.locator("a", has_text="Sign out (alice)").count() == 1
        cookies = {c["name"]: c for c in context.cookies()}
        for name in ("user", "workbench_session"):
            c = cookies[name]
            assert c["httpOnly"] and c["sameSite"] == "Strict" and not c["secure"]
            assert 3600 - 300 < c["expires"] - time.time() <= 3600 + 5       # the class, not 24 h
        assert page.evaluate("document.cookie") == ""                      # no script reads them
    finally:
        context.close()


def _lines_since(room, mark: int) -> list[str]:
    return room.log()[mark:].splitlines()


def test_a_forged_out_of_options_value_is_one_log_line_and_changes_nothing(room, browser):
    context = browser.new_context()
    try:
        page = sign_in(context, room, "alice")
        open_advanced(page, "Train", "norm")                                # the Train page's fields, all laid out
        dataset = models(page, type="Select", title="dataset")[0]
        options = get_props(page, dataset["id"], "options")["options"]
        assert "../../../etc/passwd" not in str(options)
        norm = models(page, type="Select", title="norm")[0]
        mark = len(room.log())
        set_props(page, dataset["id"], value="../../../etc/passwd")          # what a forging websocket sends
        set_props(page, norm["id"], value="<b>evil</b>")
        page.wait_for_timeout(3000)
        lines = _lines_since(room, mark)
        refused = [line for line in lines if "refused a value sent by the browser" in line]
        assert len(refused) == 2, lines                                       # one line for each forged value
        assert "'dataset'" in refused[0] and "not in list" in refused[0] and "'norm'" in refused[1]
        assert not [line for line in lines if "Traceback" in line or line.startswith("  File ")], lines
        assert len("\n".join(lines)) < 2000
        # the server still answers this session: the form shows its own, valid value for the dataset
        page.locator(".bk-tab", has_text="Runs").first.click()
        page.wait_for_timeout(1000)
        assert room.proc.poll() is None
        assert not list(room.home.glob("runs/*/run.json"))                  # nothing was trained or saved
    finally:
        context.close()


def _dashboard_or_refusal(page, timeout=120) -> bool:
    """Wait until the page shows the dashboard (True) or the refusal of a session (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.locator(".bk-tab").count():
            return True
        if page.locator("text=dashboard tabs open already").count():
            return False
        page.wait_for_timeout(500)
    raise AssertionError("the page showed neither the dashboard nor the refusal")


def test_a_student_has_a_bounded_number_of_open_sessions(room, browser):
    context = browser.new_context()
    teacher = browser.new_context()
    try:
        first = sign_in(context, room, "bob")
        pages = [first]
        for _ in range(SLOTS - 1):
            p = context.new_page()
            p.goto(room.app, timeout=120_000)
            p.wait_for_selector(".bk-tab", timeout=120_000)
            pages.append(p)
        extra = context.new_page()
        extra.goto(room.app, timeout=120_000)
        extra.wait_for_selector(f"text=bob has {SLOTS} dashboard tabs open already", timeout=120_000)
        assert extra.locator(".bk-tab").count() == 0                         # no dashboard behind the message
        assert "refused a session of 'bob'" in room.log()
        extra.close()
        teachers = [sign_in(teacher, room, "teach")]                          # teachers: no bound
        for _ in range(SLOTS):
            p = teacher.new_page()
            p.goto(room.app, timeout=120_000)
            p.wait_for_selector(".bk-tab", timeout=120_000)
            teachers.append(p)
        pages.pop().close()                                                   # closing a tab frees its place
        deadline = time.monotonic() + 120
        while True:
            p = context.new_page()
            p.goto(room.app, timeout=120_000)
            if _dashboard_or_refusal(p):
                break
            p.close()
            assert time.monotonic() < deadline, "the closed tab's place was not freed"
            time.sleep(5)
    finally:
        context.close()
        teacher.close()


def test_a_cookie_saved_before_signing_out_is_refused_after(room, browser):
    context = browser.new_context()
    thief = browser.new_context()
    try:
        page = sign_in(context, room, "alice")
        saved = context.cookies()
        page.locator("a", has_text="Sign out (alice)").click()
        page.wait_for_selector("text=You are signed out")
        assert not [c for c in context.cookies() if c["name"] in ("user", "workbench_session")]
        thief.add_cookies(saved)                                              # the same cookies, replayed
        stolen = thief.new_page()
        stolen.goto(room.app, timeout=120_000)
        assert "/login" in stolen.url and stolen.locator("#username").is_visible()
        assert not stolen.evaluate("typeof Bokeh !== 'undefined'")
    finally:
        context.close()
        thief.close()
