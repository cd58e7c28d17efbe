"""Sessions give their memory back: 200 sessions open, train, and close against one served app.

One ``panel serve apps/`` on 127.0.0.1 (a temporary ``WORKBENCH_HOME``, no starter examples, the queue at its
defaults, ``WORKBENCH_DEBUG_SESSIONS=1``), started and stopped by this module by its pid. Sessions arrive in
waves of ``WAVE`` (10) at once; each opens the dashboard, goes to the Train tab, sets a short run (``STEPS``
steps of the digits MLP, its own run name), presses Train, waits until its page says the run was saved,
and closes. Most sessions are Bokeh websocket clients (``bokeh.client.pull_session``: a real server
session, the page built for it, the button's click sent as the browser sends it); one per wave is a real
Chromium page (a fresh context, every request off 127.0.0.1 aborted). The server discards a closed
session after ``--unused-session-lifetime`` (here 1 s, checked every second: Bokeh's defaults, 15 s and
17 s, only make it later).

What the server holds is read from inside it: ``SIGUSR1`` makes it print
:func:`workbench.ui.serving.debug_report` (live sessions' objects by class after a collection, thread
names, Panel's periodic callbacks, the queue's unfinished jobs and listeners, ``pn.state`` caches, RSS).
The *baseline* is taken after a warm-up wave (the same work, not counted) once its sessions are gone; the
*after* once all ``N`` sessions are gone. Rows: RSS after / baseline (target <= 1.1), RSS growth per
session (target <= 1 MiB), and whether anything a session made outlived it (threads, periodic
callbacks, queue entries and listeners, sessions' objects, caches: target none).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_classroom import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, _Server

N, WAVE, STEPS = 200, 10, 5
BROWSERS_PER_WAVE = 1
SESSION_TIMEOUT_S = 180.0
LIFETIME_MS = "1000"   # --unused-session-lifetime and --check-unused-sessions
# what a session makes; the report's "objects" counts of these must come back to the baseline
SESSION_OBJECTS = ("Document", "ServerSession", "App", "LazyPages", "DataStore", "Page", "BackgroundTask",
                   "TaskContext", "ExamplesPanel", "PeriodicCallback")


# ----------------------------------------------------------------------------- reading the server


def start_server(home: str) -> _Server:
    """The soak's server: ``panel serve apps/`` with the debug report on SIGUSR1 and quick session disposal."""
    return _Server(home, "apps/", args=("--unused-session-lifetime", LIFETIME_MS, "--check-unused-sessions",
                                        LIFETIME_MS),
                   WORKBENCH_DEBUG_SESSIONS="1", WORKBENCH_EXAMPLES="0")


def debug_report(server: _Server, timeout: float = 60.0) -> dict:
    """Ask the server (SIGUSR1) for :func:`workbench.ui.serving.debug_report`; the parsed line."""
    seen = len(server.log)
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log[seen:]:
            if line.startswith("workbench-debug "):
                return json.loads(line[len("workbench-debug "):])
        time.sleep(0.1)
    raise RuntimeError(f"no debug report within {timeout} s: {''.join(server.log[-20:])}")


def settled(server: _Server, baseline: dict | None = None, timeout: float = 120.0) -> dict:
    """The report once every closed session is gone (no live Document beyond the baseline's) and no job is
    left in the queue; the last report if that does not happen within ``timeout``."""
    want = 0 if baseline is None else baseline["objects"].get("Document", 0)
    deadline = time.monotonic() + timeout
    while True:
        report = debug_report(server)
        gone = report["objects"].get("Document", 0) <= want and not (report["queue"] or {}).get("jobs")
        if gone or time.monotonic() > deadline:
            return report
        time.sleep(1.0)


def leftovers(baseline: dict, after: dict) -> list[str]:
    """What ``after`` holds that ``baseline`` did not: one line each (empty: nothing outlived its session)."""
    out = []
    for name in SESSION_OBJECTS:
        b, a = baseline["objects"].get(name, 0), after["objects"].get(name, 0)
        if a > b:
            out.append(f"{a - b} {name} object(s)")
    extra = sorted(set(after["threads"]) - set(baseline["threads"]))
    if len(after["threads"]) > len(baseline["threads"]) or extra:
        out.append(f"threads {len(baseline['threads'])} -> {len(after['threads'])} ({extra[:5]})")
    if after["periodic"] > baseline["periodic"]:
        out.append(f"periodic callbacks {baseline['periodic']} -> {after['periodic']}")
    # Panel's own one-shot collection after a session is destroyed ("<pid>_gc.collect", one key per process)
    tasks = [[t for t in r["scheduled"] if not t.endswith("gc.collect")] for r in (baseline, after)]
    if len(tasks[1]) > len(tasks[0]):
        out.append(f"scheduled tasks {tasks[0]} -> {tasks[1]}")
    bq, aq = baseline["queue"] or {}, after["queue"] or {}
    for key in ("jobs", "listeners"):
        if aq.get(key, 0) > bq.get(key, 0):
            out.append(f"queue {key} {bq.get(key, 0)} -> {aq.get(key, 0)}")
    for where in ("cache", "panel"):
        for key, n in after[where].items():
            if n > baseline[where].get(key, 0):
                out.append(f"{where} {key}: {baseline[where].get(key, 0)} -> {n}")
    if after["sessions"] > baseline["sessions"]:
        out.append(f"pn.state.session_info sessions {baseline['sessions']} -> {after['sessions']}")
    return out


# ----------------------------------------------------------------------------- one session


def _client_models() -> None:
    """Panel's Bokeh models, registered so that pulled documents can be decoded."""
    import panel.models
    import panel.models.plotly
    import panel.models.tabulator  # noqa: F401


def _find(doc, kind: str, **props):
    """The first model of ``doc`` whose class name is ``kind`` (or ends with ``.kind``) with these properties."""
    for m in list(doc.models):
        if type(m).__name__ == kind and all(getattr(m, k, None) == v for k, v in props.items()):
            return m
    return None


def headless_session(url: str, name: str, home: str, steps: int = STEPS, timeout: float = SESSION_TIMEOUT_S) -> float:
    """One session through the Bokeh client: open on the Train tab (``?tab=Train``), ``steps`` steps under run
    name ``name``, press Train, wait until the run is in the store ``home``, close. Returns its seconds.

    The end is read from the store, not from the page: here a pulled document does not show the server's later
    patches (Bokeh's client warns "reference already known"), while the client's own changes and events reach
    the server as a browser's do."""
    from bokeh.client import pull_session
    from bokeh.events import ButtonClick

    t0 = time.monotonic()
    session = pull_session(url=url, arguments={"tab": "Train"})   # opens on the Train tab (App's ?tab=)
    try:
        doc = session.document

        def wait(what, predicate):
            while True:
                got = predicate()
                if got:
                    return got
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{name}: no {what} within {timeout:.0f} s")
                time.sleep(0.2)
                session.force_roundtrip()   # the server's patches arrive while the client's loop runs

        button = wait("Train button", lambda: _find(doc, "Button", label="Train"))
        steps_box = wait("steps field", lambda: _find(doc, "Spinner", title="steps"))
        run_name = wait("run name field", lambda: _find(doc, "TextInput", title="run name"))
        steps_box.value = steps
        run_name.value = name
        session.force_roundtrip()
        doc.callbacks.send_event(ButtonClick(button))
        wait("saved run", lambda: any(Path(home, "runs").glob(f"*-{name}-*/run.json")))
        return time.monotonic() - t0
    finally:
        session.close()


async def browser_session(browser, url: str, name: str, steps: int = STEPS,
                          timeout: float = SESSION_TIMEOUT_S) -> float:
    """The same in a real Chromium page (a fresh context; nothing off 127.0.0.1 is fetched)."""
    t0 = time.monotonic()
    ctx = await browser.new_context(viewport=VIEWPORT)
    try:
        async def route(r, _request=None):
            if r.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
                await r.continue_()
            else:
                await r.abort()

        await ctx.route("**/*", route)
        ctx.set_default_timeout(timeout * 1000)
        page = await ctx.new_page()
        await page.goto(url, wait_until="commit")
        await page.locator(".bk-tab", has_text="Train").first.click()
        for label, value in (("steps", str(steps)), ("run name", name)):
            box = page.locator(".bk-input-group", has_text=label).locator("input").first
            await box.fill(value)
            await box.press("Enter")
        await page.wait_for_timeout(300)
        await page.locator("button.bk-btn", has_text="Train").first.click()
        await page.get_by_text(f"-{name}-").first.wait_for()   # the result line: "... saved as <id>-<name>-..."
        return time.monotonic() - t0
    finally:
        await ctx.close()


# ----------------------------------------------------------------------------- the waves


def _wave(url: str, home: str, names: list[str], browsers: int, browser_loop) -> tuple[list[float], list[str]]:
    """``names`` sessions at once: the first ``browsers`` in Chromium, the rest headless. (seconds, errors)."""
    times, errors = [], []
    lock = threading.Lock()

    def headless(name):
        try:
            dt = headless_session(url, name, home)
            with lock:
                times.append(dt)
        except Exception as e:  # noqa: BLE001 -- a failed session is counted and reported
            with lock:
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=headless, args=(n,), daemon=True) for n in names[browsers:]]
    for t in threads:
        t.start()
    if browsers:
        loop, browser = browser_loop

        async def some():
            return await asyncio.gather(*(browser_session(browser, url, n) for n in names[:browsers]),
                                        return_exceptions=True)

        for n, got in zip(names[:browsers], asyncio.run_coroutine_threadsafe(some(), loop).result(SESSION_TIMEOUT_S
                                                                                                  + 60)):
            if isinstance(got, BaseException):
                errors.append(f"{n} (browser): {type(got).__name__}: {str(got)[:200]}")
            else:
                times.append(got)
    for t in threads:
        t.join(SESSION_TIMEOUT_S + 30)
    errors += [f"{n}: still running" for n, t in zip(names[browsers:], threads) if t.is_alive()]
    return times, errors


class _Browser:
    """One Chromium for the soak, driven from an event loop on its own thread."""

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            from playwright.async_api import async_playwright

            self.pw = await async_playwright().start()
            return await self.pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        self.browser = asyncio.run_coroutine_threadsafe(start(), self.loop).result(120)
        return self.loop, self.browser

    def __exit__(self, *exc):
        async def stop():
            await self.browser.close()
            await self.pw.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def soak(n: int = N, wave: int = WAVE, browsers_per_wave: int = BROWSERS_PER_WAVE, warm_waves: int = 1,
         max_seconds: float = 1800) -> dict:
    """Open, train and close ``n`` sessions in waves of ``wave`` against one server; what it held before and
    after, and the sessions' times and failures."""
    _client_models()
    t_start = time.monotonic()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as home:
        server = start_server(home)
        try:
            with _Browser() as browser_loop:
                use = browser_loop if browsers_per_wave else None
                for w in range(warm_waves):   # the first sessions fill caches that every later one shares
                    _, errors = _wave(server.url, home, [f"warm-{w}-{i}" for i in range(wave)],
                                      min(browsers_per_wave, wave), use)
                    if errors:
                        raise RuntimeError(f"the warm-up wave failed: {errors[:3]}")
                baseline = settled(server)
                times, errors, done, peak = [], [], 0, baseline["rss_mib"]
                t_load = time.monotonic()
                while done < n and time.monotonic() - t_start < max_seconds:
                    k = min(wave, n - done)
                    got, errs = _wave(server.url, home, [f"soak-{done + i:03d}" for i in range(k)],
                                      min(browsers_per_wave, k), use)
                    times += got
                    errors += errs
                    done += k
                peak = max(peak, server.peak(t_load, time.monotonic()))
                after = settled(server, baseline)
                runs = len(list(Path(home, "runs").glob("*/run.json"))) if Path(home, "runs").exists() else 0
        finally:
            server.stop()
    return {"n": n, "opened": done, "wave": wave, "browsers": browsers_per_wave * -(-done // wave),
            "times": times, "errors": errors, "baseline": baseline, "after": after, "peak": peak, "runs": runs,
            "load": (load0[0], os.getloadavg()[0]), "seconds": time.monotonic() - t_start}


def rows(result: dict) -> list[dict]:
    """The table's rows of one :func:`soak`."""
    b, a, n = result["baseline"], result["after"], result["opened"]
    left = leftovers(b, a)
    ok_sessions = not result["errors"] and n == result["n"]
    times = sorted(result["times"])
    where = (f"{n} sessions (one per wave in Chromium, {result['browsers']} in all; the others Bokeh websocket "
             f"clients) in waves of {result['wave']}, each a {STEPS}-step digits training saved to the store "
             f"({result['runs']} runs stored); session times median {times[len(times) // 2] if times else 0:.1f} s; "
             f"{len(result['errors'])} failed{': ' + str(result['errors'][:2]) if result['errors'] else ''}; "
             f"load average {result['load'][0]:.1f} -> {result['load'][1]:.1f} (1 min), {os.cpu_count()} cores; "
             f"{result['seconds']:.0f} s")
    growth = (a["rss_mib"] - b["rss_mib"]) / max(1, n)
    return [
        {"entry": f"soak: server RSS after {n} sessions closed vs the baseline (after a warm-up wave)",
         "ours": a["rss_mib"], "reference": b["rss_mib"], "unit": "MiB", "ratio": a["rss_mib"] / b["rss_mib"],
         "target": "<= 1.1", "ok": bool(ok_sessions and a["rss_mib"] <= 1.1 * b["rss_mib"]),
         "note": f"{where}; peak {result['peak']:.0f} MiB"},
        {"entry": f"soak: server RSS growth per session over {n} sessions", "ours": growth, "reference": 1.0,
         "unit": "MiB", "ratio": growth / 1.0, "target": "<= 1", "ok": bool(ok_sessions and growth <= 1.0),
         "note": f"(after - baseline) / {n}"},
        {"entry": "soak: what outlived its session (threads, periodic callbacks, queue jobs and listeners, "
                  "sessions' objects, pn.state caches)",
         "ours": len(left), "reference": 0, "unit": "kinds", "ratio": float("nan"), "target": "none",
         "ok": not left,
         "note": ("; ".join(left) if left else "nothing") + f"; baseline threads {len(b['threads'])}, "
                 f"objects {json.dumps({k: v for k, v in b['objects'].items() if v})}"},
    ]


def run(quick: bool = False) -> list[dict]:
    return rows(soak(n=20 if quick else N, wave=WAVE))


if __name__ == "__main__":
    import sys

    import pandas as pd

    with pd.option_context("display.max_colwidth", 600, "display.width", 600):
        print(pd.DataFrame(run(quick="--quick" in sys.argv)).to_string(index=False))
