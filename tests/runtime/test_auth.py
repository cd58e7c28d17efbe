"""Sign-in of classroom mode: the rules of ``workbench.auth`` in plain Python (credentials re-read, server-side
logins, throttling, session slots, the login page), then one served classroom attacked with hand-made HTTP
requests: anonymous routes, forged and replayed cookies, cross-site posts, a removed student, guessed
passwords. Each attack asserts that nothing is read, imported or changed."""
import functools
import http.client
import http.cookiejar
import json
import os
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers.classroom_server import start_classroom

from workbench import auth, classroom

HOSTILE = "<script>alert('x')</script>"


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def _creds(tmp_path, users):
    path = tmp_path / "users.json"
    tmp = tmp_path / "users.tmp"
    tmp.write_text(json.dumps(users))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


# ============================================================================ credentials


def test_credentials_are_re_read_when_the_file_changes(tmp_path):
    path = _creds(tmp_path, {"alice": "pw-a", "bob": "pw-b"})
    creds = auth.Credentials(path)
    assert creds.check("alice", "pw-a") and creds.check("bob", "pw-b")
    assert not creds.check("alice", "pw-b") and not creds.check("carol", "") and not creds.check("alice", None)
    _creds(tmp_path, {"bob": "pw-b"})                                  # alice removed: out at once
    assert not creds.check("alice", "pw-a") and creds.fingerprint("alice") is None and creds.check("bob", "pw-b")
    _creds(tmp_path, {"bob": "new"})                                   # a new password: the old one is refused
    assert not creds.check("bob", "pw-b") and creds.check("bob", "new")


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_an_unusable_credentials_file_lets_nobody_in(tmp_path, caplog):
    path = _creds(tmp_path, {"alice": "pw-a"})
    creds = auth.Credentials(path)
    assert creds.check("alice", "pw-a")
    path.write_text("{not json")                                       # a teacher half-way through an edit
    assert not creds.check("alice", "pw-a") and "not valid JSON" in creds.error
    path.write_text(json.dumps({"alice": "pw-a"}))
    os.chmod(path, 0o644)                                              # loosened: refused as at start
    assert not creds.check("alice", "pw-a") and "readable by others" in creds.error
    os.chmod(path, 0o600)
    assert creds.check("alice", "pw-a") and creds.error is None
    path.unlink()
    assert not creds.check("alice", "pw-a") and "does not exist" in creds.error
    assert "nobody can sign in" in caplog.text


# ============================================================================ logins


def test_a_login_lives_its_seconds_and_ends_at_logout(tmp_path):
    path = _creds(tmp_path, {"alice": "pw-a", "bob": "pw-b"})
    clock = Clock()
    sessions = auth.Sessions(auth.Credentials(path), seconds=600, clock=clock)
    a = sessions.open("alice")
    assert sessions.user(a) == "alice" and sessions.user(a, claimed="alice") == "alice"
    assert sessions.user(a, claimed="bob") is None                     # a user cookie that is not the login's
    assert sessions.user("forged-id") is None and sessions.user(None) is None and sessions.user(7) is None
    assert sessions.expires(a) == 1600.0
    clock.t = 1599.0
    assert sessions.user(a) == "alice"
    clock.t = 1600.0                                                   # expired: refused and forgotten
    assert sessions.user(a) is None and sessions.count() == 0
    b = sessions.open("bob")
    assert sessions.revoke(b) and sessions.user(b) is None            # logout: a replayed id is refused
    assert not sessions.revoke(b)
    with pytest.raises(ValueError, match="'carol' is not in the credentials file"):
        sessions.open("carol")


def test_a_removed_student_or_a_new_password_ends_their_logins(tmp_path):
    path = _creds(tmp_path, {"alice": "pw-a", "bob": "pw-b"})
    sessions = auth.Sessions(auth.Credentials(path), seconds=600)
    a, b = sessions.open("alice"), sessions.open("bob")
    _creds(tmp_path, {"bob": "pw-b2"})
    assert sessions.user(a) is None and sessions.user(b) is None
    _creds(tmp_path, {"alice": "pw-a", "bob": "pw-b2"})               # back again: the old logins stay ended
    assert sessions.user(a) is None and sessions.user(b) is None
    c, d = sessions.open("alice"), sessions.open("bob")
    _creds(tmp_path, {"bob": "pw-b2"})                                 # alice removed ...
    assert sessions.user(d) == "bob"                                    # ... seen at anyone's next request
    _creds(tmp_path, {"alice": "pw-a", "bob": "pw-b2"})               # and back before her own next request
    assert sessions.user(c) is None and sessions.user(d) == "bob"


def test_logins_are_bounded_per_user(tmp_path):
    sessions = auth.Sessions(auth.Credentials(_creds(tmp_path, {"alice": "pw"})), seconds=600, per_user=3)
    ids = [sessions.open("alice") for _ in range(5)]
    assert [sessions.user(i) for i in ids] == [None, None, "alice", "alice", "alice"]   # the oldest went first
    assert sessions.count("alice") == 3


# ============================================================================ throttle


def test_failed_logins_are_slowed_down_per_user():
    clock = Clock(0.0)
    t = auth.Throttle(per_user=3, per_address=100, window=600, max_wait=8, clock=clock)
    for _ in range(3):
        assert t.wait("alice", "10.0.0.1") == 0
        t.failed("alice", "10.0.0.1")
    assert t.wait("alice", "10.0.0.1") == 1.0                          # 2 ** 0 after the 3rd failure
    assert t.wait("alice", "10.0.0.2") == 1.0                          # from any address
    assert t.wait("bob", "10.0.0.1") == 0                               # others are not held up
    clock.t = 1.0
    assert t.wait("alice", "10.0.0.1") == 0
    for expected in (2.0, 4.0, 8.0, 8.0):                               # doubling, capped at max_wait
        t.failed("alice", "10.0.0.1")
        assert t.wait("alice", "10.0.0.1") == expected
    t.succeeded("alice")
    assert t.wait("alice", "10.0.0.1") == 0
    for _ in range(3):
        t.failed("bob", "10.0.0.9")
    clock.t += 601                                                      # a quiet window forgets
    assert t.wait("bob", "10.0.0.9") == 0


def test_failed_logins_are_slowed_down_per_address_and_memory_is_bounded():
    clock = Clock(0.0)
    t = auth.Throttle(per_user=100, per_address=4, window=600, max_wait=60, max_keys=50, clock=clock)
    for i in range(4):                                                  # four names guessed from one address
        t.failed(f"user{i}", "10.6.6.6")
    assert t.wait("someone-else", "10.6.6.6") == 1.0 and t.wait("someone-else", "10.0.0.1") == 0
    t.succeeded("user0")                                                # a success does not clear the address
    assert t.wait("user0", "10.6.6.6") == 1.0
    for i in range(1000):
        t.failed(f"spray{i}", f"10.1.{i // 256}.{i % 256}")
    assert len(t) <= 50


# ============================================================================ open sessions


def test_session_slots_bound_students_not_teachers(monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    slots = auth.SessionSlots(limit=2)
    assert slots.acquire("alice", "s1") and slots.acquire("alice", "s2")
    assert not slots.acquire("alice", "s3") and slots.count("alice") == 2
    assert slots.acquire("bob", "s4")
    assert all(slots.acquire("teach", f"t{i}") for i in range(10))      # teachers: no bound
    assert all(slots.acquire(None, f"n{i}") for i in range(10))         # no sign-in: no bound
    slots.release("s1")
    assert slots.acquire("alice", "s5") and not slots.acquire("alice", "s6")
    monkeypatch.setenv("WORKBENCH_SESSIONS_PER_USER", "5")
    assert auth.SessionSlots.from_env().limit == 5
    for bad in ("0", "-1", "x", "1e3"):
        monkeypatch.setenv("WORKBENCH_SESSIONS_PER_USER", bad)
        with pytest.raises(ValueError, match=r"WORKBENCH_SESSIONS_PER_USER must be an integer in \[1, 1000\]"):
            auth.SessionSlots.from_env()
    assert "alice has 2 dashboard tabs open already" in auth.slots_refusal("alice", 2)


# ============================================================================ the form


def test_the_login_page_escapes_everything_and_loads_nothing():
    page = auth.login_page("/login", 'tok"en', error=HOSTILE, next_url="/apps", user='"><img src=x onerror=1>')
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert 'value="tok&quot;en"' in page and 'value="/apps"' in page
    tags = _tags(page)                                                  # no external asset: renders offline
    assert {t for t, _ in tags} <= {"html", "head", "meta", "title", "style", "body", "main", "h1", "p", "form",
                                    "input", "label", "button"}
    assert not [a for _, attrs in tags for a, _ in attrs if a in ("src", "href", "onerror", "onload")]
    assert not re.search(r"https?://|@import|url\(", page.split("<style>")[1].split("</style>")[0])
    assert "<script" not in auth.message_page("t", HOSTILE, link=("/login", HOSTILE))
    assert 'value="/"' in auth.login_page("/login", "t", next_url="https://evil.example/")


def _tags(page):
    from html.parser import HTMLParser

    found = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Collect().feed(page)
    return found


@pytest.mark.parametrize("url, expected", [
    ("/apps", "/apps"), ("/", "/"), ("//evil.example/x", "/"), ("https://evil.example", "/"), ("/a/../b", "/"),
    ("/apps?x=1", "/"), ("javascript:alert(1)", "/"), ("/\\evil", "/"), (None, "/"), ("/" + "a" * 300, "/"),
])
def test_safe_next(url, expected):
    assert auth.safe_next(url) == expected


@pytest.mark.parametrize("origin, referer, ok", [
    ("http://h.example:5006", None, True), ("HTTP://H.EXAMPLE:5006", None, True),
    ("https://h.example:5006", None, False), ("http://evil.example", None, False), ("null", None, False),
    (None, "http://h.example:5006/login?next=/apps", True), (None, "http://evil.example/login", False),
    ("http://evil.example", "http://h.example:5006/login", False), (None, None, True),
])
def test_same_origin(origin, referer, ok):
    assert auth.same_origin(origin, referer, "h.example:5006", "http") is ok


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CREDENTIALS", str(tmp_path / "u.json"))
    monkeypatch.setenv("PANEL_COOKIE_SECRET", "s" * 40)
    monkeypatch.delenv("WORKBENCH_SESSION_SECONDS", raising=False)
    monkeypatch.delenv("WORKBENCH_COOKIE_SECURE", raising=False)
    s = auth.settings_from_env()
    assert s.credentials == tmp_path / "u.json" and s.session_seconds == classroom.CLASS_SECONDS and not s.secure
    monkeypatch.setenv("WORKBENCH_SESSION_SECONDS", "60")
    with pytest.raises(ValueError, match=r"WORKBENCH_SESSION_SECONDS must be an integer in \[300, 604800\]"):
        auth.settings_from_env()
    monkeypatch.setenv("WORKBENCH_SESSION_SECONDS", "900")
    monkeypatch.setenv("WORKBENCH_COOKIE_SECURE", "1")
    assert auth.settings_from_env().secure and auth.settings_from_env().session_seconds == 900
    monkeypatch.setenv("PANEL_COOKIE_SECRET", "short")
    with pytest.raises(ValueError, match="PANEL_COOKIE_SECRET must be set to a secret of at least 32"):
        auth.settings_from_env()
    monkeypatch.delenv("WORKBENCH_CREDENTIALS")
    with pytest.raises(ValueError, match="WORKBENCH_CREDENTIALS must name the credentials file"):
        auth.settings_from_env()


# ============================================================================ a served classroom, by hand


PROBE = "wb_probe_marker"   # a module that leaves a file behind when anything imports it


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authroom")
    probe = tmp / "probe"
    probe.mkdir()
    (probe / f"{PROBE}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('yes')\nclass X:\n"
        "    _css = ['x.css']\n")
    (probe / "x.css").write_text("body{}")
    preexisting = tmp / "home" / "notes.txt"
    preexisting.parent.mkdir()
    preexisting.write_text("the teacher's")
    os.chmod(preexisting, 0o644)
    r = start_classroom(tmp, env={"PYTHONPATH": str(probe)})
    r.probe, r.preexisting = probe, preexisting
    yield r
    r.stop()


pytestmark = [pytest.mark.timeout(300)]


def _app_content(body: bytes) -> bool:
    """Whether a response carries the dashboard (its Bokeh document and session token), not a login page."""
    return b"docs_json" in body or b"Bokeh.embed" in body or b"<title>Depth Workbench</title>" in body


def _refused(status, headers):
    return status in (401, 403, 404) or (status == 302 and "login" in headers.get("Location", ""))


@pytest.mark.slow
def test_anonymous_visitors_reach_no_route_that_runs_code(room):
    anon = room.opener()
    for path in ["/", "/apps", "/apps/", "/apps/ws", "/apps/metadata", "/apps/autoload.js?bokeh-autoload-element=x",
                 f"/components/{PROBE}/X/_css/x.css", "/components/transformers/AutoModel/_css/x.css",
                 "/components/panel/Column/_stylesheets/x.css", "/liveness", "/admin", "/panel-preview/x",
                 "/static/../../etc/passwd", "/static/extensions/../../../../etc/passwd"]:
        status, headers, body = room.request(anon, path)
        assert _refused(status, headers), (path, status)
        assert not _app_content(body) and b"root:" not in body, path
    status, _, body = room.request(anon, "/login")
    assert status == 200 and b"Sign in" in body
    assert not (room.probe / "IMPORTED").exists()                      # nothing was imported for them
    # a websocket upgrade without a login is refused at the handshake
    conn = http.client.HTTPConnection("127.0.0.1", room.port, timeout=10)
    conn.request("GET", "/apps/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                             "Sec-WebSocket-Version": "13", "Origin": room.url})
    assert conn.getresponse().status in (401, 403)
    conn.close()


@pytest.mark.slow
def test_signed_in_students_reach_no_other_module_either(room):
    alice, _, status = room.http_sign_in("alice")
    assert status == 302
    status, _, body = room.request(alice, "/apps")
    assert status == 200 and _app_content(body)
    for module in (PROBE, "transformers", "os", "workbench.store", "panel.does_not_exist"):
        status, _, _ = room.request(alice, f"/components/{module}/X/_css/x.css")
        assert status == 404, module
    assert not (room.probe / "IMPORTED").exists()


def _set_cookies(headers) -> list[str]:
    return [v for k, v in headers.items() if k.lower() == "set-cookie"]


@pytest.mark.slow
def test_login_cookies_are_httponly_strict_and_live_as_long_as_the_class(room):
    jar = http.cookiejar.CookieJar()
    opener = room.opener(jar)
    token = room.login_form(opener)
    req = urllib.request.Request(room.url + "/login", data=urllib.parse.urlencode(
        {"username": "bob", "password": room.passwords["bob"], "_xsrf": token}).encode(), headers={"Origin": room.url})
    try:
        opener.open(req, timeout=30)
    except urllib.error.HTTPError as e:
        assert e.code == 302
        raw = e.headers.get_all("Set-Cookie")
    cookies = {c.split("=", 1)[0]: c for c in raw}
    assert {"user", "workbench_session"} <= set(cookies)
    for name in ("user", "workbench_session"):
        attrs = cookies[name].lower()
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        assert "secure" not in attrs.replace("samesite", "")             # no TLS here (see the TLS test)
    by_name = {c.name: c for c in jar}
    left = by_name["workbench_session"].expires - time.time()
    assert 3600 - 120 < left <= 3600 + 5                                 # the class (3600 s here), not 24 h


@pytest.mark.slow
def test_forged_cookies_are_refused(room):
    from tornado.web import create_signed_value

    alice, jar, _ = room.http_sign_in("alice")
    real = {c.name: c.value for c in jar}
    bob, bob_jar, _ = room.http_sign_in("bob")
    bob_cookies = {c.name: c.value for c in bob_jar}
    other = "another-secret-" + "x" * 30
    forged = [
        {"user": "teach"},                                                           # unsigned
        {"user": create_signed_value(other, "user", "teach").decode(),
         "workbench_session": create_signed_value(other, "workbench_session", "made-up").decode()},
        {"user": real["user"]},                                                      # user cookie alone
        {"user": real["user"], "workbench_session": bob_cookies["workbench_session"]},  # alice's name, bob's login
        {"user": bob_cookies["user"], "workbench_session": real["workbench_session"]},
        {**real, "is_guest": "1"},                                                   # Panel would read "guest"
        {"is_guest": "1"},
    ]
    anon = room.opener()
    for cookies in forged:
        header = "; ".join(f"{k}={v}" for k, v in cookies.items())
        status, headers, body = room.request(anon, "/apps", headers={"Cookie": header})
        assert _refused(status, headers), cookies
        assert not _app_content(body)
    header = "; ".join(f"{k}={v}" for k, v in real.items())
    assert room.request(anon, "/apps", headers={"Cookie": header})[0] == 200   # the real pair works


@pytest.mark.slow
def test_a_cookie_replayed_after_logout_is_refused(room):
    alice, jar, _ = room.http_sign_in("alice")
    saved = "; ".join(f"{c.name}={c.value}" for c in jar)
    anon = room.opener()
    assert room.request(anon, "/apps", headers={"Cookie": saved})[0] == 200
    status, headers, body = room.request(alice, "/logout")
    assert status == 200 and b"signed out" in body.lower()
    status, headers, _ = room.request(anon, "/apps", headers={"Cookie": saved})   # replayed: refused
    assert _refused(status, headers)
    conn = http.client.HTTPConnection("127.0.0.1", room.port, timeout=10)
    conn.request("GET", "/apps/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade", "Cookie": saved,
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                             "Sec-WebSocket-Version": "13", "Origin": room.url})
    assert conn.getresponse().status in (401, 403)
    conn.close()


@pytest.mark.slow
def test_cross_site_and_tokenless_login_posts_are_refused(room):
    for headers, with_token in [({"Origin": "http://evil.example"}, True), ({"Origin": "null"}, True),
                                ({"Referer": "http://evil.example/phish"}, True), ({"Origin": room.url}, False)]:
        jar = http.cookiejar.CookieJar()
        opener = room.opener(jar)
        token = room.login_form(opener)
        data = {"username": "alice", "password": room.passwords["alice"], "_xsrf": token if with_token else "x" * 32}
        status, answer, body = room.request(opener, "/login", data=data, headers=headers)
        assert status == 403, headers
        assert not any(c.startswith(("user=", "workbench_session=")) for c in _set_cookies(answer))
        assert b"refused" in body or b"expired" in body
    # a post with no token cookie at all (a form on another site cannot read or set ours)
    status, _, _ = room.request(room.opener(), "/login", data={"username": "alice",
                                "password": room.passwords["alice"], "_xsrf": "abc"}, headers={"Origin": room.url})
    assert status == 403
    assert "sign-in refused: a cross-site post" in room.log()


@pytest.mark.slow
def test_a_removed_student_is_out_at_the_next_page_load(room):
    carol_pw = "carol-pw-" + "c" * 10
    room.write_credentials({**room.passwords, "carol": carol_pw})
    carol, jar, status = room.http_sign_in("carol")
    assert status == 302 and room.request(carol, "/apps")[0] == 200
    passwords = {k: v for k, v in room.passwords.items() if k != "carol"}
    room.write_credentials(passwords)                                   # the teacher deletes her line
    status, headers, body = room.request(carol, "/apps")
    assert _refused(status, headers) and not _app_content(body)
    assert room.http_sign_in("carol", carol_pw)[2] == 401              # and she cannot sign in again
    assert room.request(room.http_sign_in("alice")[0], "/apps")[0] == 200   # the others go on, no restart
    assert room.proc.poll() is None


@pytest.mark.slow
def test_guessed_passwords_are_slowed_down_and_logged(room):
    room.write_credentials({**room.passwords, "dave": "dave-pw-" + "d" * 10})
    statuses = [room.http_sign_in("dave", f"guess{i}")[2] for i in range(5)]
    assert statuses == [401] * 5
    assert room.http_sign_in("dave")[2] == 429                          # the right password must wait now
    log = room.log()
    assert log.count("failed sign-in for 'dave' from 127.0.0.1") == 5
    assert "tried again" in log
    assert room.http_sign_in("alice")[2] == 302                          # another student is not held up


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_the_classroom_server_keeps_its_files_to_itself(room):
    status = open(f"/proc/{room.proc.pid}/status").read()
    assert re.search(r"^Umask:\s+0077$", status, re.M), status[:300]
    room.request(room.http_sign_in("bob")[0], "/apps")                   # a session: the store is opened
    made = [p for p in room.home.rglob("*") if p != room.preexisting]
    assert any(p.name == "server.lock" for p in made) and any(p.is_dir() for p in made)
    loose = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in made if p.stat().st_mode & 0o077]
    assert not loose
    assert stat.S_IMODE(room.preexisting.stat().st_mode) == 0o644        # an existing file is left as it was
    assert room.preexisting.read_text() == "the teacher's"


# ============================================================================ the server's log


def _raised_in(fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001 - the test keeps whatever was raised
        return e.with_traceback(e.__traceback__.tb_next)   # from the raising call down, as Panel catches it


def test_a_refused_browser_value_is_one_line_and_our_own_errors_keep_their_traceback(caplog):
    import logging

    from panel.util import indexOf

    from workbench.ui import serving

    refused = _raised_in(functools.partial(indexOf, "zzz", ["a", "b"]))   # what a Select does with a forged value

    def our_callback():
        raise ValueError("a bug of ours")

    ours = _raised_in(our_callback)
    f = serving.RefusedValueFilter()
    record = logging.LogRecord("panel.reactive", logging.ERROR, "reactive.py", 1,
                               "Callback failed for object named 'preset' \n", None, (ValueError, refused,
                                                                                       refused.__traceback__))
    assert f.filter(record) and record.exc_info is None and record.levelname == "WARNING"
    assert record.getMessage() == "refused a value sent by the browser for widget 'preset': ValueError: zzz not in list"
    record = logging.LogRecord("panel.reactive", logging.ERROR, "reactive.py", 1,
                               "Callback failed for object named 'x' \n", None, (ValueError, ours, ours.__traceback__))
    assert f.filter(record) and record.exc_info[1] is ours and record.levelname == "ERROR"   # kept whole
    with caplog.at_level(logging.INFO, logger="workbench.server"):
        serving._exception_handler(refused)                            # logged once already: nothing more
        assert not caplog.records
        serving._exception_handler(ours)
        assert len(caplog.records) == 1 and caplog.records[0].exc_info[1] is ours
