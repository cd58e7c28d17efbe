"""What the server process installs when it starts (``apps/app_hooks.py``) and what each session checks
first (``apps/main.py``): the guard of Panel's component route, one log line for a value the browser
sent that a widget refuses, and the per-student bound on open sessions.

- Panel's ``/components/<module>/<class>/<attribute>/<file>`` route imports ``<module>`` before any
  check, for anyone (140 MiB and 3 s for ``transformers``). :func:`guard_component_route` refuses it
  (403) to a request that is not signed in when the server has sign-in, and (404) for every module
  outside :data:`COMPONENT_MODULES` or not imported yet, before Panel sees the request: no module is
  ever imported for a request. The served app asks for no file there (Panel bundles its own).
- A value forged through the page's Bokeh document (a Select value not among its options, a number
  out of bounds) is refused by the widget; Panel then logged two tracebacks for it (its own and
  Tornado's). :func:`quiet_refused_values` makes that one line; an exception raised in our own code
  still logs its traceback, once.
- :func:`claim_session_slot` counts a student's open sessions (:class:`workbench.auth.SessionSlots`,
  ``WORKBENCH_SESSIONS_PER_USER``) and frees the slot when the session is destroyed.
"""
from __future__ import annotations

import inspect
import logging
import sys
import traceback

import panel as pn

from ..runtime.auth import SessionSlots, slots_refusal
from .teacher import current_user

__all__ = ["COMPONENT_MODULES", "SLOTS_KEY", "guard_component_route", "allowed_component_module",
           "quiet_refused_values", "RefusedValueFilter", "claim_session_slot", "install"]

log = logging.getLogger("workbench.server")

COMPONENT_MODULES = ("panel",)      # packages whose loaded modules may serve component files
SLOTS_KEY = "workbench.session_slots"
_LIBRARIES = ("panel", "param", "bokeh", "tornado", "pyviz_comms")


def allowed_component_module(module: str) -> bool:
    """Whether ``/components/<module>/...`` may be looked at: a module of :data:`COMPONENT_MODULES` that is
    already imported (nothing is imported for a request)."""
    in_list = any(module == p or module.startswith(p + ".") for p in COMPONENT_MODULES)
    return in_list and module in sys.modules


def guard_component_route() -> bool:
    """Put the sign-in check and the module allow-list in front of Panel's ``ComponentResourceHandler``
    (once per process). Whether the route exists in this Panel."""
    from tornado.web import HTTPError

    try:
        from panel.io.server import ComponentResourceHandler
    except ImportError:   # pragma: no cover - a Panel without the route
        return False
    if getattr(ComponentResourceHandler, "_workbench_guarded", False):
        return True
    panels_prepare = ComponentResourceHandler.prepare

    async def prepare(self):
        provider = getattr(self.application, "auth_provider", None)
        get_user = getattr(provider, "get_user", None)
        get_user_async = getattr(provider, "get_user_async", None)
        if get_user is not None or get_user_async is not None:   # the server has sign-in
            user = get_user(self) if get_user is not None else await get_user_async(self)
            if not user:
                raise HTTPError(403, "sign in first")
        module = (self.path_args[0] if self.path_args else "").split("/", 1)[0]
        if not allowed_component_module(module):
            raise HTTPError(404, "no such component")
        result = panels_prepare(self)
        if inspect.isawaitable(result):
            await result

    ComponentResourceHandler.prepare = prepare
    ComponentResourceHandler._workbench_guarded = True
    return True


def _from_libraries_only(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside Panel/param/Bokeh themselves (a widget refusing a browser value),
    not in a callback of ours."""
    if not isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and all(any(f"/{lib}/" in frame.filename.replace("\\", "/") for lib in _LIBRARIES)
                                or frame.filename.startswith("<") for frame in frames)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class RefusedValueFilter(logging.Filter):
    """On Panel's ``panel.reactive`` logger: its "Callback failed" record for a value a widget refused,
    with no frame of ours in the traceback, becomes one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and str(record.msg).startswith("Callback failed for object named") \
                and _from_libraries_only(exc):
            name = str(record.msg).split("named", 1)[1].split()[0] if "named" in str(record.msg) else "?"
            record.msg = "refused a value sent by the browser for widget %s: %s"
            record.args = (name[:80], _one_line(exc))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
            record.stack_info = None
        return True


def _exception_handler(exc: BaseException) -> None:
    """Panel's ``config.exception_handler``: what it would re-raise into Tornado (a second traceback).
    A refused browser value was logged already (one line); anything else is logged once, in full."""
    if _from_libraries_only(exc):
        return
    log.error("error in a session callback: %s", _one_line(exc), exc_info=(type(exc), exc, exc.__traceback__))


def quiet_refused_values() -> None:
    """Install :class:`RefusedValueFilter` and the exception handler (once per process)."""
    reactive = logging.getLogger("panel.reactive")
    if not any(isinstance(f, RefusedValueFilter) for f in reactive.filters):
        reactive.addFilter(RefusedValueFilter())
    if pn.config.exception_handler is None:
        pn.config.exception_handler = _exception_handler


def install() -> None:
    """Everything a served workbench installs at start (``on_server_loaded``)."""
    guard_component_route()
    quiet_refused_values()
    pn.state.cache[SLOTS_KEY] = SessionSlots.from_env()


def claim_session_slot() -> str | None:
    """Count this session against its student's open sessions: None if it may go on (its slot is freed when
    the session is destroyed), else the message to show instead of the dashboard."""
    slots = pn.state.cache.get(SLOTS_KEY)
    doc = pn.state.curdoc
    if slots is None or doc is None or doc.session_context is None:
        return None
    user = current_user()
    session_id = doc.session_context.id
    if not slots.acquire(user, session_id):
        log.warning("refused a session of %r: %d open already", user, slots.limit)
        return slots_refusal(user, slots.limit)
    doc.on_session_destroyed(lambda context: slots.release(context.id))
    return None
