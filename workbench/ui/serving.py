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
- :func:`warm_up` lays out one dashboard before the first student comes (every page module, plotly's
  validators and Panel's models imported: the first session paid 4-8 s for them, Panel's Plotly pane alone
  4 s for ``plotly.graph_objs.FigureWidget``, which imports nbformat and jsonschema), then moves the
  whole start-up heap out of the garbage collector's sight (``gc.freeze``): with torch and the pages
  loaded a full collection walked about 480 000 objects (0.45 s on a quiet core, over 1 s on a loaded
  one), and Panel runs one after sessions close, in the server's only thread, while others load.
- :func:`debug_report` says what the server holds (sessions' objects, threads, periodic callbacks, the
  queue, Panel's caches); with ``WORKBENCH_DEBUG_SESSIONS=1`` in the server's environment (never in
  production) a ``SIGUSR1`` makes it print one line ``workbench-debug {json}`` on stderr
  (``bench/bench_soak.py`` reads it).
"""
from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import signal
import sys
import threading
import traceback

import panel as pn

from ..runtime.auth import SessionSlots, slots_refusal
from .teacher import current_user

__all__ = ["COMPONENT_MODULES", "SLOTS_KEY", "guard_component_route", "allowed_component_module",
           "quiet_refused_values", "RefusedValueFilter", "claim_session_slot", "install", "warm_up",
           "debug_report", "DEBUG_ENV", "discard"]

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
    if os.environ.get(DEBUG_ENV, "").strip() == "1":
        _install_debug_signal()


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


def warm_up() -> float:
    """Build one dashboard in a throwaway document (nothing is served or saved), collect, then ``gc.freeze()``
    what is left: the modules, caches and class objects every session shares, none of them garbage.
    Returns the seconds it took. Called once per server process, at start (``on_server_loaded``)."""
    import time

    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from .app import App

    t0 = time.perf_counter()
    import plotly.graph_objs as go

    go.FigureWidget   # noqa: B018 -- Panel's Plotly pane tests figures against it: its import is the 4 s
    doc = Document()
    with set_curdoc(doc):
        app = App()
        app.template()
        view = app.__panel__()
        discard(view, view.get_root(doc))
    del app, view, doc
    gc.collect()
    gc.freeze()
    return time.perf_counter() - t0


def discard(view, root) -> None:
    """Forget ``view``'s ``root`` model (from ``view.get_root(doc)`` on a document no session serves): what
    Bokeh's session-destroyed hook does for a served one. Panel keeps every root in ``state._views`` until
    then, so a throwaway document's objects would otherwise live as long as the process."""
    from panel.io.state import state

    view._cleanup(root)
    state._views.pop(root.ref["id"], None)


# ----------------------------------------------------------------------------- what the server holds

DEBUG_ENV = "WORKBENCH_DEBUG_SESSIONS"   # "1": SIGUSR1 prints debug_report() on stderr (benchmarks, tests)
# the classes a session makes one or more of: none may outlive it
SESSION_CLASSES = ("Document", "ServerSession", "App", "LazyPages", "DataStore", "Page", "BackgroundTask",
                   "TaskContext", "ExamplesPanel", "PeriodicCallback")


def debug_report() -> dict:
    """What this server process holds now: live instances of :data:`SESSION_CLASSES` (gc, after a collection;
    a page counts as ``Page``), thread names, Panel's periodic callbacks and scheduled tasks, the job
    queue's unfinished jobs and listeners, the sizes of ``pn.state`` caches, the resident set (MiB).
    Walks the heap: seconds on a loaded server, so only on request (:data:`DEBUG_ENV`)."""
    from panel.io.state import state

    from .page import Page
    from .session import QUEUE_KEY

    gc.collect()
    counts = dict.fromkeys(SESSION_CLASSES, 0)
    for obj in gc.get_objects():
        cls = type(obj)
        if cls.__name__ in counts and cls.__name__ != "Page":
            counts[cls.__name__] += 1
        if isinstance(obj, Page):
            counts["Page"] += 1
    queue = pn.state.cache.get(QUEUE_KEY)
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    except ImportError:   # pragma: no cover - psutil comes with the test and bench extras
        rss = None
    return {
        "objects": counts,
        "threads": sorted(t.name for t in threading.enumerate()),
        "periodic": sum(len(cbs) for cbs in list(state._periodic.values())),
        "scheduled": sorted(state._scheduled),
        "queue": None if queue is None else {
            "jobs": len(queue.snapshot()), "listeners": len(queue._listeners), "students": len(queue._students)},
        "cache": {str(k): (len(v) if hasattr(v, "__len__") else 1) for k, v in list(pn.state.cache.items())},
        "panel": {name: len(getattr(state, name)) for name in
                  ("_locations", "_notifications", "_templates", "_views", "_handles", "_periodic",
                   "_onload", "_on_session_destroyed") if hasattr(getattr(state, name, None), "__len__")},
        "sessions": len(state.session_info.get("sessions", {})),
        "gc": {"frozen": gc.get_freeze_count(), "garbage": len(gc.garbage)},
        "rss_mib": rss,
    }


def _install_debug_signal() -> None:
    """SIGUSR1 -> one ``workbench-debug {json}`` line on stderr, made on the server's event loop."""
    import asyncio

    loop = asyncio.get_event_loop()

    def report():
        try:
            line = json.dumps(debug_report(), default=str)
        except Exception as e:  # noqa: BLE001 -- a debug aid must not break the server
            line = json.dumps({"error": f"{type(e).__name__}: {e}"})
        print(f"workbench-debug {line}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, lambda *_: loop.call_soon_threadsafe(report))
