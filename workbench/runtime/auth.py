"""Sign-in for classroom mode, bounded by us: the credentials as they are now, server-side login
sessions, failed-login throttling, open-tab slots, and the login page.

``panel serve --auth-module apps/auth.py`` plugs this into the server (Bokeh's auth hooks: ``get_user``,
a ``LoginHandler`` and a ``LogoutHandler``); that file holds the Tornado glue, this module the rules,
with no web framework, so each rule is tested in plain Python (``tests/test_auth.py``):

- :class:`Credentials` re-reads the credentials file when it changes (by mtime, size and inode): a
  student removed from it, or whose password changed, is out at their next page load, without a
  restart. An unreadable or invalid file lets nobody in (fail closed) until it is fixed.
- :class:`Sessions` keeps each login on the server: a random id (in a signed cookie) maps to the user,
  the password it was made with and its expiry (``WORKBENCH_SESSION_SECONDS``: a class, not Panel's
  24 h). Logout revokes the id, so a cookie replayed after logout is refused; a restart forgets every
  login (everyone signs in again). At most :data:`LOGINS_PER_USER` logins a user are kept.
- :class:`Throttle` slows failed logins down per user and per address (a wait that doubles after a
  few failures, capped), in bounded memory.
- :class:`SessionSlots` bounds a student's open browser sessions (``WORKBENCH_SESSIONS_PER_USER``).
- :func:`login_page` is self-contained HTML (no external asset: it renders offline) that escapes
  everything it shows; :func:`same_origin` and :func:`new_token` refuse cross-site form posts.

Settings come from the environment that ``python -m workbench.classroom serve`` gives the server
(:func:`settings_from_env`): the cookie secret travels there too, never in a command line.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import html
import logging
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from .classroom import CLASS_SECONDS, SESSION_SECONDS_RANGE, is_teacher, read_credentials

__all__ = ["Credentials", "Sessions", "Throttle", "SessionSlots", "AuthSettings", "settings_from_env", "login_page",
           "message_page", "safe_next", "same_origin", "new_token", "LOGINS_PER_USER", "SESSIONS_PER_USER",
           "FAIL_DELAY", "SESSION_COOKIE", "USER_COOKIE", "XSRF_COOKIE", "slots_refusal", "form_value"]

log = logging.getLogger("workbench.auth")

USER_COOKIE = "user"                  # the signed user name, as Panel reads it (pn.state.user)
SESSION_COOKIE = "workbench_session"  # the signed id of the login on this server
XSRF_COOKIE = "workbench_xsrf"        # the login form's token (double submit, plus an Origin check)
LOGINS_PER_USER = 16                  # logins (cookies) kept per user: the oldest goes first
SESSIONS_PER_USER = 3                 # default open browser sessions per student
FAIL_DELAY = 0.5                      # seconds every failed login waits before its answer (not blocking)
_FORM_MAX = 1024                      # characters read from a login form field


def _fingerprint(password: str) -> str:
    """What a login remembers of the password it was made with (a changed password ends the login)."""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()


# ============================================================================ credentials


class Credentials:
    """The credentials file (``{user: password}``, mode 0600), re-read whenever it changes on disk.

    :meth:`check` and :meth:`fingerprint` see the file as it is at the call: a student removed from it
    is unknown at once. A missing, loosened (readable by others) or invalid file lets nobody in and is
    logged once per change, until it is fixed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._users: dict[str, str] = {}
        self.error: str | None = None
        self.version = 0   # counts the reads of a changed file
        self.users()   # a broken file at start is logged at start

    def users(self) -> dict[str, str]:
        """``{user: password}`` as the file says now (empty while it is unusable)."""
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)
            except OSError as e:
                stamp = ("missing", str(e))
            if stamp != self._stamp:
                try:
                    self._users = read_credentials(self.path)
                    self.error = None
                    log.info("credentials: %d users read from %s", len(self._users), self.path)
                except (ValueError, OSError) as e:
                    self._users, self.error = {}, str(e)
                    log.error("credentials unusable, nobody can sign in until it is fixed: %s", e)
                self._stamp = stamp
                self.version += 1
            return self._users

    def check(self, user: str, password: str) -> bool:
        """Whether ``user`` is in the file with exactly ``password`` (compared in constant time)."""
        known = self.users().get(user) if isinstance(user, str) else None
        if known is None or not isinstance(password, str):
            hmac.compare_digest(b"x" * 32, b"y" * 32)   # about the same work for unknown names
            return False
        return hmac.compare_digest(known.encode("utf-8"), password.encode("utf-8"))

    def fingerprint(self, user: str) -> str | None:
        """The current password's fingerprint of ``user``, or None when the user is not in the file."""
        known = self.users().get(user)
        return None if known is None else _fingerprint(known)


# ============================================================================ login sessions


@dataclasses.dataclass
class _Login:
    user: str
    fingerprint: str
    expires: float


class Sessions:
    """Logins kept on the server: ``open`` gives a random id for the cookie, ``user`` checks one.

    A login lives ``seconds`` (a class) and ends earlier at ``revoke`` (logout), when its user leaves
    the credentials file or their password changes (``credentials``). Memory: at most
    ``per_user`` logins a user (the oldest is dropped), expired ones pruned as new ones open.
    """

    def __init__(self, credentials: Credentials, seconds: int = CLASS_SECONDS, per_user: int = LOGINS_PER_USER,
                 clock=time.time):
        self.credentials = credentials
        self.seconds = seconds
        self.per_user = per_user
        self._clock = clock
        self._lock = threading.Lock()
        self._logins: dict[str, _Login] = {}
        self._seen = credentials.version

    def _sweep(self) -> None:
        """After the credentials file changed: end every login whose user left it or changed password, so
        that adding them back later does not revive an old cookie."""
        self.credentials.users()
        if self.credentials.version == self._seen:
            return
        with self._lock:
            self._seen = self.credentials.version
            logins = list(self._logins.items())
        for sid, login in logins:
            if self.credentials.fingerprint(login.user) != login.fingerprint:
                self.revoke(sid)

    def open(self, user: str) -> str:
        """A new login of ``user`` (who must be in the credentials file): its id, for the signed cookie."""
        fingerprint = self.credentials.fingerprint(user)
        if fingerprint is None:
            raise ValueError(f"user {user!r} is not in the credentials file")
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        with self._lock:
            for key in [k for k, v in self._logins.items() if v.expires <= now]:
                del self._logins[key]
            mine = [k for k, v in self._logins.items() if v.user == user]   # in insertion order: oldest first
            for key in mine[:max(0, len(mine) - self.per_user + 1)]:
                del self._logins[key]
            self._logins[sid] = _Login(user, fingerprint, now + self.seconds)
        return sid

    def user(self, sid, claimed=None) -> str | None:
        """The user of login ``sid`` if it is live (not expired, not revoked, its user still in the file with
        the same password, and the same as ``claimed`` when given); else None (and the login is dropped)."""
        if not isinstance(sid, str):
            return None
        self._sweep()
        with self._lock:
            login = self._logins.get(sid)
        if login is None:
            return None
        live = login.expires > self._clock() and self.credentials.fingerprint(login.user) == login.fingerprint
        if not live:
            self.revoke(sid)
            return None
        if claimed is not None and claimed != login.user:
            return None
        return login.user

    def expires(self, sid) -> float | None:
        with self._lock:
            login = self._logins.get(sid)
        return None if login is None else login.expires

    def revoke(self, sid) -> bool:
        """End login ``sid`` (logout). Whether it was live."""
        with self._lock:
            return self._logins.pop(sid, None) is not None

    def count(self, user: str | None = None) -> int:
        with self._lock:
            return sum(1 for v in self._logins.values() if user is None or v.user == user)


# ============================================================================ failed logins


class Throttle:
    """Failed logins slowed down per user name and per address, in bounded memory.

    After ``free`` failures (``per_user`` for a name, ``per_address`` for an address: a whole class may
    sit behind one address) within ``window`` seconds, each next try must wait ``2 ** (k - free)``
    seconds after the last failure (k failures so far), at most ``max_wait``. A successful login
    clears its name's count, not its address's. At most ``max_keys`` names and addresses are
    remembered (the least recently failed are forgotten first).
    """

    def __init__(self, per_user: int = 5, per_address: int = 30, window: float = 900.0, max_wait: float = 60.0,
                 max_keys: int = 10_000, clock=time.monotonic):
        self.limits = {"user": per_user, "address": per_address}
        self.window, self.max_wait, self.max_keys = window, max_wait, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._fails: collections.OrderedDict[tuple, tuple[int, float]] = collections.OrderedDict()

    def _wait(self, key, now) -> float:
        count, last = self._fails.get(key, (0, -math.inf))
        if now - last > self.window:
            self._fails.pop(key, None)
            return 0.0
        free = self.limits[key[0]]
        if count < free:
            return 0.0
        return max(0.0, last + min(self.max_wait, 2.0 ** (count - free)) - now)

    def wait(self, user: str, address: str) -> float:
        """Seconds until ``user`` may try again from ``address`` (0: now)."""
        now = self._clock()
        with self._lock:
            return max(self._wait(("user", user), now), self._wait(("address", address), now))

    def failed(self, user: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            for key in (("user", user), ("address", address)):
                count, last = self._fails.pop(key, (0, -math.inf))
                self._fails[key] = (1 if now - last > self.window else count + 1, now)
            while len(self._fails) > self.max_keys:
                self._fails.popitem(last=False)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._fails.pop(("user", user), None)

    def __len__(self) -> int:
        return len(self._fails)


# ============================================================================ open browser sessions


def slots_refusal(user: str, limit: int) -> str:
    return (f"{user} has {limit} dashboard tab{'s' if limit != 1 else ''} open already, the most a student may "
            f"have at once. Close one of them (or sign out there), then reload this page: a closed tab's place "
            f"is free again within a minute.")


class SessionSlots:
    """At most ``limit`` open browser sessions per student (teachers and no sign-in: no limit).

    ``acquire(user, session_id)`` when a session starts, ``release(session_id)`` when it is destroyed
    (the tab was closed and Bokeh discarded the session).
    """

    def __init__(self, limit: int = SESSIONS_PER_USER):
        self.limit = limit
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}

    @classmethod
    def from_env(cls) -> "SessionSlots":
        return cls(_env_int("WORKBENCH_SESSIONS_PER_USER", SESSIONS_PER_USER, 1, 1000))

    def acquire(self, user: str | None, session_id: str) -> bool:
        """Whether ``user`` may open session ``session_id`` (counted if so)."""
        if user is None or is_teacher(user):
            return True
        with self._lock:
            if sum(1 for u in self._owner.values() if u == user) >= self.limit:
                return False
            self._owner[session_id] = user
            return True

    def release(self, session_id: str) -> None:
        with self._lock:
            self._owner.pop(session_id, None)

    def count(self, user: str) -> int:
        with self._lock:
            return sum(1 for u in self._owner.values() if u == user)


# ============================================================================ settings


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    credentials: Path
    session_seconds: int
    secure: bool


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not lo <= int(raw) <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {raw[:40]!r}")
    return int(raw)


def settings_from_env() -> AuthSettings:
    """The sign-in settings ``classroom serve`` passes the server: ``WORKBENCH_CREDENTIALS`` (the file),
    ``WORKBENCH_SESSION_SECONDS`` (how long a login lives), ``WORKBENCH_COOKIE_SECURE=1`` (served over TLS:
    cookies are ``Secure``), and ``PANEL_COOKIE_SECRET`` (signs the cookies; at least 32 characters)."""
    path = os.environ.get("WORKBENCH_CREDENTIALS", "")
    if not path:
        raise ValueError("WORKBENCH_CREDENTIALS must name the credentials file (python -m workbench.classroom serve "
                         "sets it)")
    secret = os.environ.get("PANEL_COOKIE_SECRET", "")
    if len(secret) < 32:
        raise ValueError("PANEL_COOKIE_SECRET must be set to a secret of at least 32 characters (python -m "
                         "workbench.classroom serve sets it)")
    seconds = _env_int("WORKBENCH_SESSION_SECONDS", CLASS_SECONDS, *SESSION_SECONDS_RANGE)
    secure = os.environ.get("WORKBENCH_COOKIE_SECURE", "") not in ("", "0")
    return AuthSettings(Path(path), seconds, secure)


# ============================================================================ cross-site checks


def new_token() -> str:
    """A random token for the login form (also set as the :data:`XSRF_COOKIE`)."""
    return secrets.token_urlsafe(24)


def same_origin(origin: str | None, referer: str | None, host: str, scheme: str) -> bool:
    """Whether a form post comes from this server's own page: its ``Origin`` (else its ``Referer``) must be
    ``scheme://host``; a post with neither (old clients, curl) passes this check and relies on the token."""
    def _origin(url):
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else None

    own = f"{scheme}://{host}".lower()
    if origin:
        return origin.strip().lower() == own
    if referer:
        return _origin(referer.strip()) == own
    return True


_NEXT = re.compile(r"/[A-Za-z0-9_\-./]{0,200}")


def safe_next(url) -> str:
    """Where to go after signing in: a path on this server (no scheme, host, ``//``, ``..`` or query), else ``/``."""
    if isinstance(url, str) and _NEXT.fullmatch(url) and not url.startswith("//") and ".." not in url:
        return url
    return "/"


# ============================================================================ pages


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;background:#f3f5f7;
margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center;color:#1d2733}
main{background:#fff;border-radius:8px;box-shadow:0 2px 10px rgba(0,0,0,.12);padding:28px 32px;width:320px}
h1{font-size:20px;margin:0 0 16px;color:#2f3e4e}
label{display:block;font-size:14px;margin:12px 0 4px}
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:8px;font-size:15px;
border:1px solid #b8c2cc;border-radius:4px}
button{margin-top:18px;width:100%;padding:9px;font-size:15px;background:#2f3e4e;color:#fff;border:0;
border-radius:4px;cursor:pointer}
p.error{background:#fdecea;color:#8a1c12;padding:8px;border-radius:4px;font-size:14px}
p{font-size:14px;line-height:1.4}
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            "<meta name=\"referrer\" content=\"same-origin\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>")


def login_page(action: str, token: str, *, error: str = "", next_url: str = "/", user: str = "") -> str:
    """The sign-in form: self-contained (inline style, no script, no external asset), everything escaped.

    ``action``: the login endpoint; ``token``: the form's cross-site token; ``error``: a message shown
    above the form; ``next_url``: where to go after; ``user``: the name typed before (kept in the box).
    """
    e = html.escape
    message = f"<p class=\"error\" role=\"alert\">{e(error)}</p>" if error else ""
    return _page("Depth Workbench: sign in", (
        f"{message}<form method=\"post\" action=\"{e(action)}\" autocomplete=\"off\">"
        f"<input type=\"hidden\" name=\"_xsrf\" value=\"{e(token)}\">"
        f"<input type=\"hidden\" name=\"next\" value=\"{e(safe_next(next_url))}\">"
        f"<label for=\"username\">User name</label>"
        f"<input type=\"text\" id=\"username\" name=\"username\" maxlength=\"64\" value=\"{e(user[:64])}\" "
        f"autocapitalize=\"none\" spellcheck=\"false\" required autofocus>"
        f"<label for=\"password\">Password</label>"
        f"<input type=\"password\" id=\"password\" name=\"password\" maxlength=\"256\" required>"
        f"<button type=\"submit\">Sign in</button></form>"))


def message_page(title: str, message: str, *, link: tuple[str, str] | None = None) -> str:
    """A page with one escaped message (signed out, refused) and an optional ``(href, text)`` link."""
    e = html.escape
    more = f"<p><a href=\"{e(link[0])}\">{e(link[1])}</a></p>" if link else ""
    return _page(title, f"<p>{e(message)}</p>{more}")


def form_value(value, limit: int = _FORM_MAX) -> str:
    """A login form field as text, cut to ``limit`` characters (never trusted further)."""
    return value[:limit] if isinstance(value, str) else ""
