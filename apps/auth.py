"""Classroom sign-in, plugged into ``panel serve --auth-module apps/auth.py`` (Bokeh's auth hooks).

``python -m workbench.classroom serve`` passes this file and its settings (in the server's environment:
the credentials file, how long a login lives, the cookie secret, TLS). The rules live in
:mod:`workbench.auth`; this file is the Tornado glue:

- ``get_user``: a request is signed in when its signed ``workbench_session`` cookie names a live login
  on this server and its signed ``user`` cookie (what Panel reads as ``pn.state.user``) names the
  same user. A request that also carries Panel's ``is_guest`` cookie is refused (Panel would read it
  as the user "guest").
- ``LoginHandler``: the form (with a token, and an Origin check on the post), the throttle, the log.
- ``LogoutHandler``: ends the login on the server and clears the cookies.

Cookies are ``HttpOnly``, ``SameSite=Strict``, ``Secure`` when served over TLS, and live as long as
the login (``WORKBENCH_SESSION_SECONDS``).
"""
import asyncio
import hmac
import logging
import os
import sys

if "torch" not in sys.modules:   # as in app_hooks: OpenMP reads it when torch loads, which happens here first
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.umask(0o077)                  # classroom mode: the store's new files are the server user's only

from tornado.web import RequestHandler  # noqa: E402

from workbench import auth  # noqa: E402

log = logging.getLogger("workbench.auth")

SETTINGS = auth.settings_from_env()
CREDENTIALS = auth.Credentials(SETTINGS.credentials)
SESSIONS = auth.Sessions(CREDENTIALS, SETTINGS.session_seconds)
THROTTLE = auth.Throttle()

login_url = "/login"
logout_url = "/logout"


def _secure(handler) -> bool:
    return SETTINGS.secure or handler.request.protocol == "https"


def _cookie(handler, name: str, value: str, *, expires: float | None = None, path: str = "/",
            signed: bool = True) -> None:
    kwargs = dict(path=path, httponly=True, secure=_secure(handler), samesite="Strict")
    if expires is not None:
        kwargs["expires"] = expires
    if signed:
        handler.set_signed_cookie(name, value, expires_days=None, **kwargs)
    else:
        handler.set_cookie(name, value, **kwargs)


def _signed(handler, name: str) -> str | None:
    days = SETTINGS.session_seconds / 86400 + 1 / 1440   # the login's own expiry is checked on the server
    try:
        value = handler.get_signed_cookie(name, max_age_days=days, min_version=2)
    except Exception:   # a malformed cookie is no cookie
        return None
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def get_user(handler):
    """The signed-in user of this request, or None (Bokeh then sends the browser to the login page)."""
    if handler.request.cookies.get("is_guest") is not None:
        return None
    return SESSIONS.user(_signed(handler, auth.SESSION_COOKIE), claimed=_signed(handler, auth.USER_COOKIE))


def _clear(handler) -> None:
    for name in (auth.USER_COOKIE, auth.SESSION_COOKIE, "id_token", "is_guest"):
        handler.clear_cookie(name, path="/")


class _Page(RequestHandler):
    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")

    def _form(self, status: int = 200, error: str = "", user: str = "", next_url: str = "/") -> None:
        token = auth.new_token()
        _cookie(self, auth.XSRF_COOKIE, token, path=login_url, signed=False)
        self.set_status(status)
        self.finish(auth.login_page(self.request.path, token, error=error, next_url=next_url, user=user))


class LoginHandler(_Page):
    def get(self):
        self._form(next_url=auth.safe_next(self.get_query_argument("next", "/")))

    async def post(self):
        request = self.request
        next_url = auth.safe_next(self.get_body_argument("next", "/"))
        if not auth.same_origin(request.headers.get("Origin"), request.headers.get("Referer"), request.host,
                                request.protocol):
            log.warning("sign-in refused: a cross-site post from %r to %s", request.headers.get("Origin"),
                        request.remote_ip)
            return self._form(403, "This sign-in form was sent from another site: refused. Sign in here.")
        cookie, token = self.get_cookie(auth.XSRF_COOKIE, ""), self.get_body_argument("_xsrf", "")
        if not cookie or not token or not hmac.compare_digest(cookie.encode(), token.encode()):
            log.warning("sign-in refused: missing or wrong form token from %s", request.remote_ip)
            return self._form(403, "This sign-in form has expired or did not come from this page: sign in again.",
                              next_url=next_url)
        user = auth.form_value(self.get_body_argument("username", ""), 64)
        password = auth.form_value(self.get_body_argument("password", ""))
        address = request.remote_ip or "?"
        wait = THROTTLE.wait(user, address)
        if wait > 0:
            log.warning("sign-in refused: %r from %s tried again %.0f s too early after failed sign-ins",
                        user, address, wait)
            return self._form(429, f"Too many failed sign-ins for this name or from this address: wait "
                                   f"{int(wait) + 1} s, then try again.", user=user, next_url=next_url)
        if not CREDENTIALS.check(user, password):
            THROTTLE.failed(user, address)
            log.warning("failed sign-in for %r from %s", user, address)
            await asyncio.sleep(auth.FAIL_DELAY)   # every wrong guess costs time, without holding the server
            return self._form(401, "Wrong user name or password.", user=user, next_url=next_url)
        THROTTLE.succeeded(user)
        sid = SESSIONS.open(user)
        expires = SESSIONS.expires(sid)
        _cookie(self, auth.SESSION_COOKIE, sid, expires=expires)
        _cookie(self, auth.USER_COOKIE, user, expires=expires)
        self.clear_cookie("is_guest", path="/")
        self.clear_cookie(auth.XSRF_COOKIE, path=login_url)
        log.info("signed in: %r from %s", user, address)
        self.redirect(next_url)


class LogoutHandler(_Page):
    def _logout(self):
        sid = _signed(self, auth.SESSION_COOKIE)
        if sid is not None and SESSIONS.revoke(sid):
            log.info("signed out: %r", _signed(self, auth.USER_COOKIE))
        _clear(self)
        self.finish(auth.message_page("Depth Workbench: signed out", "You are signed out.",
                                      link=(login_url, "Sign in again")))

    def get(self):
        self._logout()

    def post(self):
        self._logout()
