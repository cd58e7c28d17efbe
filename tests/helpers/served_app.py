"""The browser tests' shared pieces: ``panel serve apps/`` on 127.0.0.1 and one offline Chromium page.

:func:`serve_app` starts the dashboard as ``make serve`` does (a fresh ``WORKBENCH_HOME`` and model roots from
the caller, ``--num-procs 1``) and stops it by its pid; :func:`offline_page` opens Chromium with a page whose
every request off 127.0.0.1 is aborted and listed in ``page.blocked``, console errors in ``page.console_errors``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from helpers.classroom_server import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, launch_chromium

LOCAL = {"127.0.0.1", "localhost"}

__all__ = ["serve_app", "offline_page", "launch_chromium", "wait_for_port", "LOCAL", "CHROMIUM", "CHROMIUM_ARGS",
           "ROOT"]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float, what: str = "panel serve") -> None:
    """Until something listens on 127.0.0.1:``port``; fails if ``proc`` exits or ``seconds`` pass."""
    deadline = time.time() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}") from None
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not answer within {seconds:.0f} s") from None
            time.sleep(0.5)


@contextlib.contextmanager
def serve_app(home: Path, model_roots: Path, *, stop_seconds: float = 40, **env: str | None):
    """``panel serve apps/`` on a free port of 127.0.0.1 over ``home``; yields the app's URL. ``env``: more
    environment (``WORKBENCH_THREADS="1"``; None removes a variable). Stopped by its pid (SIGTERM, then SIGKILL)."""
    port = free_port()
    full = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_MODEL_ROOTS": str(model_roots), **env}
    full = {k: v for k, v in full.items() if v is not None}
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "apps/", "--port", str(port),
                             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
                             "--num-procs", "1"],
                            cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, 120)
        yield f"http://127.0.0.1:{port}/apps"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(stop_seconds)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextlib.contextmanager
def offline_page(*, width: int = 1400, height: int = 1000, timeout_ms: int = 60_000):
    """One page at ``width`` x ``height`` that can reach 127.0.0.1 only (data: and blob: too)."""
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(timeout_ms)
        page = context.new_page()
        page.console_errors, page.blocked = [], []

        def offline(route):
            url = route.request.url
            if url.startswith(("data:", "blob:")) or urlparse(url).hostname in LOCAL:
                route.continue_()
            else:
                page.blocked.append(url)
                route.abort()

        context.route("**/*", offline)
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        yield page
