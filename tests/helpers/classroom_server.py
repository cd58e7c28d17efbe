"""A served classroom for the hostile-student tests: ``panel serve apps/`` in classroom mode on 127.0.0.1.

The server runs the real classroom line (:func:`workbench.classroom.serve_command` and
:func:`workbench.classroom.serve_environment`: our sign-in module, the cookie secret in the
environment), listening on 127.0.0.1 only, with a fresh ``WORKBENCH_HOME``, a credentials file for
the teacher ``teach`` and the students ``alice`` and ``bob``, and ``WORKBENCH_TEACHERS=teach``.
Its stderr goes to a file (:meth:`Classroom.log`).

In a test file::

    from helpers.classroom_server import browser, classroom, sign_in, models, set_props   # noqa: F401 (fixtures)

    pytestmark = [pytest.mark.ui, pytest.mark.timeout(300)]

    def test_x(classroom, browser):
        context = browser.new_context()
        page = sign_in(context, classroom, "alice")          # the dashboard, signed in as alice
        sel = models(page, type="Select", title="dataset")[0]
        set_props(page, sel["id"], value="../../etc")       # what the websocket carries
        ...
        context.close()

Plain HTTP: :meth:`Classroom.http_sign_in` gives a ``urllib`` opener holding a signed-in user's
cookies (redirects are not followed: a refusal is seen as its status); :meth:`Classroom.opener` one
without cookies. Keep browser tests few: one ``classroom`` per test file (the fixture is module
scoped), at most 3 browser contexts at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.cookiejar
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TEACHER = "teach"
STUDENTS = ("alice", "bob")
USERS = (TEACHER, *STUDENTS)

__all__ = ["Classroom", "start_classroom", "classroom", "browser", "launch_chromium", "sign_in", "models", "set_props", "get_props",
           "open_advanced",
           "free_port", "TEACHER", "STUDENTS", "USERS", "ROOT", "CHROMIUM", "CHROMIUM_ARGS"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@dataclasses.dataclass
class Classroom:
    """One served classroom. ``url``: ``http://127.0.0.1:PORT``; ``app``: the dashboard (``url + "/apps"``)."""

    url: str
    port: int
    home: Path
    credentials: Path
    passwords: dict
    log_path: Path
    proc: subprocess.Popen
    env: dict

    @property
    def app(self) -> str:
        return self.url + "/apps"

    def log(self) -> str:
        """The server's stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def opener(self, jar: http.cookiejar.CookieJar | None = None) -> urllib.request.OpenerDirector:
        """A urllib opener for this server that does not follow redirects (``jar``: its cookies)."""
        handlers = [_NoRedirect]
        if jar is not None:
            handlers.append(urllib.request.HTTPCookieProcessor(jar))
        return urllib.request.build_opener(*handlers)

    def request(self, opener, path: str, *, data: dict | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict, bytes]:
        """``(status, headers, body)`` of one request (GET, or a form POST with ``data``); errors are answers."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def login_form(self, opener) -> str:
        """GET the login page with ``opener`` (which keeps its token cookie); the form's token."""
        status, _, body = self.request(opener, "/login")
        assert status == 200, status
        return re.search(rb'name="_xsrf" value="([^"]+)"', body).group(1).decode()

    def http_sign_in(self, user: str, password: str | None = None):
        """Sign ``user`` in with plain HTTP: ``(opener, jar, status)``; status 302 when signed in."""
        jar = http.cookiejar.CookieJar()
        opener = self.opener(jar)
        token = self.login_form(opener)
        status, _, _ = self.request(opener, "/login", data={
            "username": user, "password": self.passwords.get(user, "") if password is None else password,
            "_xsrf": token, "next": "/apps"}, headers={"Origin": self.url})
        return opener, jar, status

    def write_credentials(self, passwords: dict) -> None:
        """Replace the credentials file (mode 600), as a teacher editing it would; the server re-reads it."""
        tmp = self.credentials.with_suffix(".tmp")
        tmp.write_text(json.dumps(passwords))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.credentials)
        self.passwords = dict(passwords)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_classroom(tmp: Path, *, env: dict | None = None, extra_args=(), session_seconds: int = 3600,
                    timeout: float = 120) -> Classroom:
    """Start a classroom server under the directory ``tmp`` (its store, models and credentials live there).

    ``env``: more environment variables for the server (e.g. ``WORKBENCH_SESSIONS_PER_USER``);
    ``extra_args``: more ``panel serve`` arguments. Waits until the login page answers.
    """
    from workbench import classroom as cr

    tmp = Path(tmp)
    home, models_dir = tmp / "home", tmp / "models"
    home.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(exist_ok=True)
    credentials = tmp / "classroom-users.json"
    passwords = cr.make_credentials(list(USERS), credentials, overwrite=True)
    port = free_port()
    cmd = cr.serve_command(host="127.0.0.1", port=port, session_seconds=max(300, session_seconds),
                           python=sys.executable, apps="apps/")
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"           # tests listen on this machine only
    cmd += list(extra_args)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PANEL_", "BOKEH_", "WORKBENCH_"))}
    server_env = cr.serve_environment(credentials, cookie_secret=cr.new_cookie_secret(),
                                      session_seconds=max(300, session_seconds), base=base)
    server_env.update(WORKBENCH_HOME=str(home), WORKBENCH_MODEL_ROOTS=str(models_dir), WORKBENCH_THREADS="1",
                      WORKBENCH_TEACHERS=TEACHER, OMP_NUM_THREADS="1",
                      **{"WORKBENCH_EXAMPLES": "0", **(env or {})})   # no starter examples unless asked
    if session_seconds < 300:   # the command line's minimum is a class; tests may want logins to end sooner
        server_env["WORKBENCH_SESSION_SECONDS"] = str(session_seconds)
    log_path = tmp / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    room = Classroom(f"http://127.0.0.1:{port}", port, home, credentials, passwords, log_path, proc, server_env)
    deadline = time.monotonic() + timeout
    opener = room.opener()
    while True:
        try:
            status, _, _ = room.request(opener, "/login", timeout=5)
            if status == 200:
                return room
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            room.stop()
            raise RuntimeError(f"the classroom server did not start:\n{room.log()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    """One served classroom for the test file (teacher ``teach``, students ``alice`` and ``bob``)."""
    room = start_classroom(tmp_path_factory.mktemp("classroom"))
    yield room
    room.stop()


@contextlib.contextmanager
def launch_chromium():
    """Chromium (headless, the project's flags) through Playwright; fails the test if it is not installed."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (make test does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the test file (make contexts with ``browser.new_context()``)."""
    with launch_chromium() as b:
        yield b


def sign_in(context, room: Classroom, user: str, *, password: str | None = None, wait: bool = True):
    """Sign ``user`` in through the login form in a new page of the Playwright ``context``; the page,
    on the dashboard (``wait``: its tabs are drawn). The context keeps the login cookies."""
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(room.url + "/login?next=/apps", timeout=120_000)
    page.fill("#username", user)
    page.fill("#password", room.passwords[user] if password is None else password)
    page.click("button[type=submit]")
    if wait:
        page.wait_for_url(re.compile(r".*/apps$"), timeout=120_000)
        page.wait_for_selector(".bk-tab", timeout=120_000)
    return page


_MODELS_JS = """([type, name, title]) => {
  const out = [];
  for (const doc of Bokeh.documents) {
    for (const m of doc.all_models) {
      const t = m.type || m.constructor.name;
      const short = t.split('.').pop();
      if (type && short !== type && t !== type && !(type === 'Select' && short === 'CustomSelect')) continue;
      if (name != null && m.name !== name) continue;
      if (title != null && m.title !== title) continue;
      let value = null;
      try { value = JSON.parse(JSON.stringify(m.value === undefined ? null : m.value)); } catch (e) {}
      out.push({id: m.id, type: t, name: m.name ?? null, title: m.title ?? null, value: value,
                visible: m.visible ?? null, disabled: m.disabled ?? null});
    }
  }
  return out;
}"""


def models(page, *, type: str | None = None, name: str | None = None, title: str | None = None) -> list[dict]:
    """The page's Bokeh models (every document), optionally only those of a ``type`` (short name, e.g.
    ``"Select"`` (Panel's ``CustomSelect`` too), ``"Button"``, ``"Spinner"``), a ``name`` or a ``title``
    (a widget's label): a list of ``{id, type, name, title, value, visible, disabled}``."""
    return page.evaluate(_MODELS_JS, [type, name, title])


def open_advanced(page, tab: str, field: str) -> None:
    """Show ``tab`` and expand its collapsed "Advanced" card, then wait until the model titled ``field`` (a widget's
    label there) is in the page: a card's fields are laid out, and sent to the browser, when it is first opened."""
    page.locator(".bk-tab", has_text=tab).first.click()
    page.locator(".card-header:visible", has_text="Advanced").first.click()
    page.wait_for_function("""(title) => Bokeh.documents.some(d => Array.from(d.all_models).some(
        m => m.title === title))""", arg=field, timeout=30_000)


def set_props(page, model_id: str, **props) -> None:
    """Set properties of one Bokeh model in the page, as a forging browser would (the change travels
    to the server over the websocket). ``source_data={...}`` sets ``model.source.data``."""
    page.evaluate("""([id, props]) => {
      const m = Bokeh.documents.map(d => d.get_model_by_id(id)).find(x => x != null);
      if (m == null) throw new Error('no model ' + id);
      for (const [k, v] of Object.entries(props)) {
        if (k === 'source_data') { m.source.data = v; } else { m[k] = v; }
      }
    }""", [model_id, props])


def get_props(page, model_id: str, *names: str) -> dict:
    """Properties of one Bokeh model in the page, as JSON values."""
    return page.evaluate("""([id, names]) => {
      const m = Bokeh.documents.map(d => d.get_model_by_id(id)).find(x => x != null);
      if (m == null) return null;
      const out = {};
      for (const k of names) { try { out[k] = JSON.parse(JSON.stringify(m[k] ?? null)); } catch (e) { out[k] = null; } }
      return out;
    }""", [model_id, list(names)])
