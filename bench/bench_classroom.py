"""Classroom scale: 30 simulated sessions against one served app on 127.0.0.1, and the job queue's throughput.

The server is the classroom's: ``panel serve apps/ --num-procs 1`` on 127.0.0.1 (a temporary
``WORKBENCH_HOME``, the queue settings at their defaults), started and stopped by this module (by its
pid), never reachable from outside this machine.

*Sessions* are Bokeh websocket clients (``bokeh.client.pull_session`` on the app's URL): each opens a
real server session -- the server runs ``apps/main.py`` and builds one ``App`` with every page for it,
exactly as for a browser tab -- and pulls the whole document. That is what works reliably on a
2-core machine shared with others (Chromium contexts cost ~10 s of CPU each to render the page); the
figure excludes the browser's own rendering. They arrive in waves of ``WAVE`` at once (10; quick: 3)
and stay connected until all ``N`` (30; quick: 6) are in, then all close. *Page-ready* = connect +
server builds the session + the document arrives; p50 and p90 over the N sessions, against one
session alone on the warm server (the median of three, one after another, before the waves).

*Memory*: the server's resident set (psutil on its pid, sampled every 0.2 s): just before the waves,
the peak while sessions open or stay connected, and 60 s (quick: 35 s) after all have closed (Bokeh
discards an unused session after ``--unused-session-lifetime`` 15 s, checked every 17 s; the RSS of a
Python process rarely shrinks back all the way, so "after" says how much of the peak stays).

*Launch environment*: the server and every side below run under :data:`LAUNCH_ENV`
(``OMP_WAIT_POLICY=PASSIVE``), the environment ``make serve``, ``make classroom`` and the README's
``panel serve`` line set; everything else that steers threads (``OMP_*``, ``GOMP_*``, ``MKL_*``,
``WORKBENCH_*``) is removed from the inherited environment, so each fresh interpreter gets exactly it.
Why: torch's CPU wheels run ATen's and MKL's parallel regions on GNU OpenMP (libgomp), whose idle
team threads spin (300 000 polls) before they sleep -- but only 1 000 polls once the process has more
OpenMP threads than cores (libgomp ``config/linux/wait.h``: ``gomp_managed_threads >
gomp_available_cpus``), which is the case as soon as a second thread (a queue job's) has its own team.
So one training in a process's main thread spins at full count and a job on a worker thread barely
spins: on a quiet machine the spinning main thread hands work to its team faster (the queue looked
0.7x as fast), and on a loaded one the spinning threads take the cores their partners need (the same
2-job digits run: 56-69 s and 28 s CPU in the main thread against 3.6-4.4 s on a worker thread, load
average 5-7). Passive waiting removes both: main and worker threads wait the same way. The variable
is read when libgomp loads (``import torch``), so it must be in the environment at process start
(``OMP_DISPLAY_ENV=VERBOSE`` shows ``GOMP_SPINCOUNT = '300000'`` by default, ``'0'`` with it).

*Throughput* (no thrashing): driving 30 trainings through 30 browsers is too slow here, so the 30
sessions' jobs are submitted to a :class:`workbench.jobs.JobQueue` with the default settings (the
class and settings the server uses: ``max_jobs = max(1, cores - 1)``, ``floor(cores / max_jobs)``
torch threads per job) from 30 threads, one user each (side B); the reference runs the same 30 jobs
one after another in one process's main thread (side A, torch's default threads). Two job kinds:
a small digits MLP training (30 jobs; quick: 6) and a character-LM Transformer (d_model 128, 4
layers; 4 jobs of 30 steps; quick: 2 of 5), each job its own seed. Jobs finished per minute, ratio B / A, target
>= 0.9. For the digits job a second row compares B with the same jobs one after another on one
worker thread (side C): what the queue itself costs. Each side runs in a fresh interpreter
(``python -m bench.bench_classroom --side seq|queue|thread|free KIND N STEPS``), in the order
A B C C B A A B C, the median of three repeats a side (quick: two): on a 2-core machine shared with
other work single runs are too noisy to compare. The final losses of each job must be the same on
every side. The full run adds a row with the same 30 digits trainings started at once on 30 plain
threads (what every session starting its own thread did before the queue), for comparison (no target).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_SECONDS = 900          # the whole entry (bounded): sessions that are not in by then count as failed
CONNECT_TIMEOUT = 180.0    # one session
# The server's launch environment (Makefile serve/classroom, the README's panel serve line): see the module.
LAUNCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_THREAD_VARS = ("OMP_", "GOMP_", "MKL_", "KMP_", "WORKBENCH_")


_START_ENV = {k: v for k, v in os.environ.items() if k.startswith(_THREAD_VARS)}   # before any library sets some


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables that steer threads or the queue, plus
    :data:`LAUNCH_ENV` and ``extra``: what a freshly launched server (or side) gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_THREAD_VARS)}
    return {**env, **LAUNCH_ENV, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``panel serve TARGET`` on 127.0.0.1 in a subprocess (``apps/``, or the floor's file); RSS sampled in a
    thread; its stderr lines in ``log``. ``profile``: a cProfile file the server writes when it stops (SIGINT
    ends it cleanly); ``args``: more ``panel serve`` options; ``env_extra``: more environment."""

    def __init__(self, home: str, target: str = "apps/", profile: str | None = None, args: tuple[str, ...] = (),
                 **env_extra: str):
        import psutil

        self.port = _free_port()
        self.path = Path(target.rstrip("/")).stem   # panel serve apps/ -> /apps; floor.py -> /floor
        env = launch_env(WORKBENCH_HOME=home, WORKBENCH_MODEL_ROOTS=home,   # the queue's defaults
                         **{"WORKBENCH_EXAMPLES": "0", **env_extra})   # no starter examples: bench_first_contact's
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        self.proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "panel", "serve", target, "--port", str(self.port), "--address",
             "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{self.port}", "--num-procs", "1", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.profiled = bool(profile)
        self.ps = psutil.Process(self.proc.pid)
        self.samples: list[tuple[float, float]] = []   # (monotonic time, RSS MiB)
        self.log: list[str] = []
        self._stop = threading.Event()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"panel serve exited with {self.proc.returncode} (port {self.port}): "
                                   f"{self.proc.stderr.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("panel serve did not answer within 120 s")
                time.sleep(0.3)
        # its stderr is read on (a full pipe would block the server)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.path}"

    def rss(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def cpu(self) -> float:
        """CPU seconds the server has used (user + system, its threads included)."""
        t = self.ps.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.rss()))
            except Exception:   # the process is gone
                return
            self._stop.wait(0.2)

    def peak(self, since: float, until: float) -> float:
        return max((r for t, r in self.samples if since <= t <= until), default=self.rss())

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            # SIGINT: Bokeh's server stops its loop and returns (cProfile then writes its file);
            # on_server_unloaded closes the queue (up to 30 s)
            os.kill(self.proc.pid, signal.SIGINT if self.profiled else signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- page-ready in Chromium

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1000}
SESSION_TIMEOUT_S = 150.0   # one session's page-ready; later it counts as failed

FLOOR_APP = '''"""Panel's floor for bench_classroom: the dashboard's template, extensions and tab names, each tab only its
page heading (generated by bench/bench_classroom.py)."""
import panel as pn

pn.extension(*{extensions!r}, notifications=True)
TITLES = {titles!r}
tabs = pn.Tabs(*[(t, pn.Column(pn.pane.Markdown("## " + t, margin=(0, 10)), sizing_mode="stretch_width"))
                 for t in TITLES], dynamic=True, sizing_mode="stretch_width")
pn.template.BootstrapTemplate(title="Depth Workbench", main=[tabs], header_background="#2f3e4e",
                              busy_indicator=None).servable()
'''


def tab_titles(home: str | Path) -> list[str]:
    """The tab names a session without sign-in gets, in order (``workbench.ui.App``'s own list, over the store
    at ``home``)."""
    from workbench.io.store import RunStore
    from workbench.ui.app import LazyPages
    from workbench.ui.session import DataStore

    return list(LazyPages(DataStore(RunStore(home), user=None)))


def _wait_for_examples(home: str | Path, server: "_Server", timeout: float) -> float:
    """Wait until the server has made the starter examples in ``home`` (their state file says ready); seconds."""
    t0 = time.monotonic()
    state = Path(home) / "examples.json"
    while time.monotonic() - t0 < timeout:
        try:
            if json.loads(state.read_text()).get("state") == "ready":
                return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited while making the examples: {''.join(server.log)[-2000:]}")
        time.sleep(1.0)
    raise RuntimeError(f"the examples were not made within {timeout:.0f} s")


def write_floor(folder: str | Path, titles: list[str]) -> Path:
    """Write Panel's floor app (``floor.py``) into ``folder``: ``apps/main.py``'s ``pn.extension`` list and
    template (:meth:`workbench.ui.App.template`'s settings), ``titles`` as the tabs, each holding only a heading."""
    from workbench.ui.frontend import EXTENSIONS

    path = Path(folder) / "floor.py"
    path.write_text(FLOOR_APP.format(extensions=tuple(EXTENSIONS), titles=list(titles)))
    return path


# Page-ready, the same test for both apps, polled every 50 ms inside the page from its first script on:
# Bokeh's document is idle (every root view has finished rendering: its "document idle" log line and
# DocumentReady event), every tab name is visible (a .bk-tab whose text is the title, with a size), and
# the first tab's content is rendered (its "## <title>" heading shown). The moment is written to
# window.__wbReady (epoch ms), compared in Python with the wave's start.
READY_JS = r"""
(() => {
  const TITLES = %s;
  const deep = (root, sel, out) => {
    root.querySelectorAll(sel).forEach((el) => out.push(el));
    root.querySelectorAll('*').forEach((el) => { if (el.shadowRoot) deep(el.shadowRoot, sel, out); });
    return out;
  };
  const shown = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0
                                  && (!el.checkVisibility || el.checkVisibility()); };
  const text = (el) => el.textContent.replace('\u00b6', '').trim();
  const check = () => {
    const B = window.Bokeh;
    if (!B || !B.documents || !B.documents.length || !B.documents[0].is_idle) return false;
    const tabs = new Set(deep(document, '.bk-tab', []).filter(shown).map(text));
    if (!TITLES.every((t) => tabs.has(t))) return false;
    return deep(document, 'h2', []).some((h) => text(h) === TITLES[0] && shown(h));
  };
  const timer = setInterval(() => {
    if (window.__wbReady === undefined && check()) {
      window.__wbReady = performance.timeOrigin + performance.now();
      clearInterval(timer);
    }
  }, 50);
})();
"""


def _chromium_cpu(root_pid: int, exclude: set[int]) -> float:
    """CPU seconds of this process's Chromium descendants (live ones plus those the browser process reaped)."""
    import psutil

    total = 0.0
    for p in psutil.Process(root_pid).children(recursive=True):
        if p.pid in exclude:
            continue
        try:
            if "chrom" not in p.name().lower():
                continue
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


async def _wave(browser, url: str, titles: list[str], k: int) -> list[dict]:
    """``k`` fresh browser contexts (separate sessions, cookies and caches) open ``url`` at once; each one's
    page-ready seconds from the wave's start (None when it failed), websocket bytes, requests refused."""
    import asyncio

    script = READY_JS % json.dumps(titles)
    contexts, pages, stats = [], [], []
    for _ in range(k):
        ctx = await browser.new_context(viewport=VIEWPORT)
        st = {"ws_in": 0, "ws_out": 0, "ws_max": 0, "refused": [], "errors": []}

        async def route(r, _request=None, st=st):
            if r.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
                await r.continue_()
            else:   # nothing from the network: a class may have none
                st["refused"].append(r.request.url[:160])
                await r.abort()

        await ctx.route("**/*", route)
        await ctx.add_init_script(script)
        page = await ctx.new_page()

        def on_ws(ws, st=st):
            def got(payload, st=st):
                n = len(payload)
                st["ws_in"] += n
                st["ws_max"] = max(st["ws_max"], n)

            ws.on("framereceived", got)
            ws.on("framesent", lambda payload, st=st: st.__setitem__("ws_out", st["ws_out"] + len(payload)))

        page.on("websocket", on_ws)
        page.on("pageerror", lambda e, st=st: st["errors"].append(str(e)[:200]))
        contexts.append(ctx)
        pages.append(page)
        stats.append(st)

    async def one(page, st, t0):
        try:
            await page.goto(url, wait_until="commit", timeout=SESSION_TIMEOUT_S * 1000)
            await page.wait_for_function("window.__wbReady !== undefined", polling=200,
                                         timeout=SESSION_TIMEOUT_S * 1000)
            st["ready"] = (await page.evaluate("window.__wbReady") - t0) / 1000
            st["ws_in_ready"] = st["ws_in"]
        except Exception as e:  # noqa: BLE001 -- a session that never got ready counts as failed
            st["ready"] = None
            st["errors"].append(f"{type(e).__name__}: {str(e)[:200]}")

    t0 = time.time() * 1000
    await asyncio.gather(*(one(p, st, t0) for p, st in zip(pages, stats)))
    await asyncio.sleep(0.5)   # late frames of the first render
    for ctx in contexts:
        await ctx.close()
    return stats


async def _page_ready(servers: dict, titles: list[str], n: int, wave: int, deadline: float) -> dict:
    """``n`` sessions per server in waves of ``wave``, the servers interleaved ABBA..: per server the sessions'
    stats, its CPU seconds over its waves, the browser's CPU seconds over its waves, its RSS peak."""
    from playwright.async_api import async_playwright

    names = list(servers)
    waves = math.ceil(n / wave)
    order = [name for w in range(waves) for name in (names if w % 2 == 0 else names[::-1])]
    out = {name: {"sessions": [], "server_cpu": 0.0, "browser_cpu": 0.0, "rss_peak": 0.0} for name in names}
    left = {name: n for name in names}
    server_pids = {s.proc.pid for s in servers.values()}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            warm = await browser.new_context()   # the browser's own first start, paid by neither
            await warm.close()
            for name in order:
                k = min(wave, left[name])
                server = servers[name]
                if time.monotonic() > deadline:
                    out[name]["sessions"] += [{"ready": None, "errors": ["out of time"], "refused": []}] * k
                    left[name] -= k
                    continue
                cpu0, bcpu0, t_load = server.cpu(), _chromium_cpu(os.getpid(), server_pids), time.monotonic()
                stats = await _wave(browser, server.url, titles, k)
                out[name]["server_cpu"] += server.cpu() - cpu0
                out[name]["browser_cpu"] += _chromium_cpu(os.getpid(), server_pids) - bcpu0
                out[name]["rss_peak"] = max(out[name]["rss_peak"], server.peak(t_load, time.monotonic()))
                out[name]["sessions"] += stats
                left[name] -= k
        finally:
            await browser.close()
    return out


def _warm_up(server: _Server) -> None:
    """One session through the Bokeh client, so that neither side's first browser session pays for imports."""
    # Panel's Bokeh models, to decode the pulled document
    import panel.models
    import panel.models.plotly
    import panel.models.tabulator  # noqa: F401
    from bokeh.client import pull_session

    s = pull_session(url=server.url)
    s.close()


def classroom_rows(n: int = 30, wave: int = 10, profile: str | None = None, max_seconds: float = 900,
                   examples: bool = True) -> list[dict]:
    """Page-ready of ``n`` Chromium sessions in waves of ``wave`` against ``panel serve apps/`` and against
    Panel's floor (:func:`write_floor`), interleaved; the rows of the table. ``profile``: write the
    server's cProfile there (our app's server only). ``examples``: the server makes its starter examples
    first and the waves start once they are stored (what a class sees); False: ``WORKBENCH_EXAMPLES=0``."""
    import asyncio

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    deadline = time.monotonic() + max_seconds
    with tempfile.TemporaryDirectory(prefix="bench-classroom-") as home:
        servers = {}
        try:
            servers["ours"] = _Server(home, "apps/", profile=profile, WORKBENCH_EXAMPLES="1" if examples else "0")
            made = _wait_for_examples(home, servers["ours"], 600) if examples else None
            titles = tab_titles(home)
            floor_path = write_floor(home, titles)
            servers["floor"] = _Server(home, str(floor_path))
            load0 = os.getloadavg()
            for s in servers.values():
                _warm_up(s)
            rss0 = {k: s.rss() for k, s in servers.items()}
            got = asyncio.run(_page_ready(servers, titles, n, wave, deadline))
        finally:
            for s in servers.values():
                s.stop()
    load1 = os.getloadavg()
    summary = {}
    for name, g in got.items():
        ok = [s for s in g["sessions"] if s.get("ready") is not None]
        ready = [s["ready"] for s in ok]
        summary[name] = {
            "p50": _percentile(ready, 0.5), "p90": _percentile(ready, 0.9),
            "failed": len(g["sessions"]) - len(ok),
            "ws": statistics.mean(s["ws_in_ready"] for s in ok) / 1024 if ok else float("nan"),
            "ws_max": max((s["ws_max"] for s in ok), default=0) / 1024,
            "refused": sum(len(s["refused"]) for s in g["sessions"]),
            "errors": [e for s in g["sessions"] for e in s["errors"]],
            "server_cpu": g["server_cpu"] / max(1, len(g["sessions"])),
            "browser_cpu": g["browser_cpu"] / max(1, len(g["sessions"])),
            "rss": (g["rss_peak"] - rss0[name]) / max(1, wave),
        }
    o, f = summary["ours"], summary["floor"]
    load = f"load average {load0[0]:.1f} -> {load1[0]:.1f} (1 min), {os.cpu_count()} cores"
    both_ok = o["failed"] == 0 and f["failed"] == 0 and o["refused"] == 0 and f["refused"] == 0
    where = (f"{n} Chromium sessions each (a fresh context each: its own session, cookies and cache) in waves of "
             f"{wave} at once, ours and the floor interleaved ABBA..; page-ready = Bokeh's document idle, every "
             f"tab name visible, the first tab's heading shown ({titles[0]!r}); "
             f"{f'the starter examples stored first ({made:.0f} s)' if examples else 'no examples'}; {load}")
    detail = (f"failed {o['failed']}/{f['failed']}; websocket bytes to page-ready {o['ws']:.0f}/{f['ws']:.0f} KiB "
              f"a session (largest frame {o['ws_max']:.0f}/{f['ws_max']:.0f} KiB); server CPU "
              f"{o['server_cpu']:.2f}/{f['server_cpu']:.2f} s a session, Chromium CPU {o['browser_cpu']:.1f}/"
              f"{f['browser_cpu']:.1f} s a session; server RSS at a wave's peak +{o['rss']:.1f}/+{f['rss']:.1f} MiB "
              f"a session; requests off 127.0.0.1 refused {o['refused']}/{f['refused']} (ours/floor)")
    refused = sorted({u for g in got.values() for s in g["sessions"] for u in s["refused"]})
    if refused:
        detail += f"; refused: {refused[:3]}"
    if o["errors"] or f["errors"]:
        detail += f"; page errors: {(o['errors'] + f['errors'])[:3]}"
    return [
        {"entry": f"classroom: page-ready p50, {n} Chromium sessions in waves of {wave}, ours vs Panel's floor",
         "ours": o["p50"], "reference": f["p50"], "unit": "s", "ratio": o["p50"] / f["p50"],
         "target": "<= 1.1", "ok": bool(both_ok and o["p50"] / f["p50"] <= 1.1),
         "note": f"{where}; the floor: the same template, extensions and tab names, each tab only its heading"},
        {"entry": f"classroom: page-ready p90, {n} Chromium sessions in waves of {wave}, ours vs Panel's floor",
         "ours": o["p90"], "reference": f["p90"], "unit": "s", "ratio": o["p90"] / f["p90"],
         "target": "<= 1.15", "ok": bool(both_ok and o["p90"] / f["p90"] <= 1.15), "note": detail},
    ]


# ----------------------------------------------------------------------------- throughput


def _train_job(ds, seed: int, steps: int) -> float:
    """One session's small training (digits MLP); returns the final validation loss."""
    import workbench as wb
    from workbench import jobs

    model = wb.models.build(wb.models.config_for(ds, d_model=64, n_layers=2, d_hidden=128, seed=seed))
    run = wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=steps, lr=3e-3, seed=seed),
                   callbacks=[jobs.TrainProgress()])
    return float(run.final("loss"))


def _train_lm(ds, seed: int, steps: int) -> float:
    """A bigger job: a character-LM Transformer (d_model 128, 4 layers, batch 32); the final validation loss
    (on 256 examples a split: the default 2048 would cost more than 30 steps of training)."""
    import workbench as wb
    from workbench import jobs

    model = wb.models.build(wb.models.config_for(ds, d_model=128, n_layers=4, seed=seed))
    run = wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=steps, batch_size=32, eval_max=256, seed=seed),
                   callbacks=[jobs.TrainProgress()])
    return float(run.final("loss"))


# kind -> (dataset, job, what the rows call it)
KINDS = {"digits": ("digits", _train_job, "digits MLP 64x2"),
         "lm": ("text", _train_lm, "character-LM Transformer d_model 128 x 4 layers, batch 32, eval on 256")}


def _one_after_another(job, ds, n: int, steps: int, threads: int) -> tuple[float, list[float]]:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    losses = [job(ds, i, steps) for i in range(n)]
    return time.perf_counter() - t0, losses


def _under_queue(job_fn, ds, n: int, steps: int) -> tuple[float, list[float], object]:
    """``n`` users submit one job each from ``n`` threads at once to a default JobQueue; all wait for theirs."""
    from workbench import jobs

    queue = jobs.JobQueue(executor="threads")
    losses: list = [None] * n
    errors: list = []
    go = threading.Barrier(n + 1)

    def student(i):
        try:
            go.wait(60)
            job = queue.submit(job_fn, ds, i, steps, user=f"student-{i:02d}", name=f"train {i}")
            losses[i] = job.result(timeout=900)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=student, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    go.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(900)
    seconds = time.perf_counter() - t0
    queue.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} queued jobs failed: {errors[0]}")
    return seconds, losses, queue


def _all_at_once(job, ds, n: int, steps: int, threads: int) -> float:
    """Before the queue: every session's training on its own thread at once (torch's default threads)."""
    import torch

    torch.set_num_threads(threads)
    ts = [threading.Thread(target=job, args=(ds, i, steps), daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join(900)
    return time.perf_counter() - t0


def _side(side: str, kind: str, n: int, steps: int) -> dict:
    """One side of the comparison, run in this (fresh) process: its seconds, the jobs' losses, the settings."""
    import torch

    import workbench as wb

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    threads = torch.get_num_threads()   # one process's default: what "one after another" gets
    data, job, _ = KINDS[kind]
    ds = wb.data.load(data)
    job(ds, 0, 3)   # warm-up: first-call costs on neither side
    out = {"threads": threads, "env": {k: _START_ENV[k] for k in sorted(_START_ENV) if not k.startswith("WORKBENCH_")}}
    if side == "seq":
        out["seconds"], out["losses"] = _one_after_another(job, ds, n, steps, threads)
    elif side == "queue":
        out["seconds"], out["losses"], queue = _under_queue(job, ds, n, steps)
        out["max_jobs"], out["job_threads"] = queue.max_jobs, queue.threads
    elif side == "thread":   # one after another on one worker thread (where the queue's jobs run)
        box = {}
        t = threading.Thread(target=lambda: box.update(zip(("seconds", "losses"),
                                                            _one_after_another(job, ds, n, steps, threads))))
        t.start()
        t.join()
        out.update(box)
    elif side == "free":
        out["seconds"] = _all_at_once(job, ds, n, steps, threads)
    else:
        raise ValueError(f"side must be one of ['seq', 'queue', 'thread', 'free'], got {side!r}")
    return out


def _run_side(side: str, kind: str, n: int, steps: int) -> dict:
    """:func:`_side` in a fresh interpreter under the server's launch environment (:func:`launch_env`): each
    side starts from the same state (torch's thread pools of an earlier side's threads would otherwise slow
    the next side's main thread down) and waits for its OpenMP threads the way the server does."""
    import json

    out = subprocess.run([sys.executable, "-m", "bench.bench_classroom", "--side", side, kind, str(n), str(steps)],
                         cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the {side!r} side failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _throughput(kind: str, n: int, steps: int, sides: tuple[str, ...], with_unqueued: bool,
                repeats: int) -> list[dict]:
    got = {side: [] for side in sides}
    # ABCCBA...: a shared machine's drift falls on every side
    order = [side for r in range(repeats) for side in (sides if r % 2 == 0 else sides[::-1])]
    for side in order:
        got[side].append(_run_side(side, kind, n, steps))
    med = {side: statistics.median(r["seconds"] for r in got[side]) for side in sides}
    threads, q = got["seq"][0]["threads"], got["queue"][0]
    env = " ".join(f"{k}={v}" for k, v in got["seq"][0]["env"].items()) or "(none)"
    seconds = {side: ", ".join(f"{r['seconds']:.1f}" for r in got[side]) for side in got}
    seq_rate, queue_rate = n * 60 / med["seq"], n * 60 / med["queue"]
    runs = [r["losses"] for side in sides for r in got[side]]   # the same seeds: the same numbers on every side
    same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for r in runs[1:] for a, b in zip(runs[0], r))
    what = KINDS[kind][2]
    rows = [{
        "entry": f"classroom: jobs finished per minute, {n} {kind} trainings under the job queue vs one after another",
        "ours": queue_rate, "reference": seq_rate, "unit": "jobs/min", "ratio": queue_rate / seq_rate,
        "target": ">= 0.9", "ok": bool(queue_rate / seq_rate >= 0.9 and same),
        "note": (f"JobQueue() defaults (max_jobs {q['max_jobs']}, {q['job_threads']} torch threads per job) fed from "
                 f"{n} threads, one user each (not through the browser); reference: the same {n} jobs one after "
                 f"another in one process's main thread, {threads} torch threads; {what}, {steps} steps "
                 f"each; launch environment {env} on every side; each repeat a fresh process, ABBA.., the median "
                 f"of {repeats} a side (seconds: one after another {seconds['seq']}; queue {seconds['queue']}); "
                 f"same final losses on every side: {'yes' if same else 'NO'}"),
    }]
    if "thread" in sides:
        thread_rate = n * 60 / med["thread"]
        rows.append({
            "entry": f"classroom: jobs per minute, {n} {kind} trainings under the job queue vs one after another "
                     "on one worker thread",
            "ours": queue_rate, "reference": thread_rate, "unit": "jobs/min", "ratio": queue_rate / thread_rate,
            "target": ">= 0.9", "ok": bool(queue_rate / thread_rate >= 0.9 and same),
            "note": (f"the queue's own cost (admission, round-robin, a thread per job) apart from where torch "
                     f"runs; the same {n} jobs on one non-main thread of a fresh process "
                     f"(seconds {seconds['thread']})"),
        })
    if with_unqueued:
        free_rate = n * 60 / _run_side("free", kind, n, steps)["seconds"]
        rows.append({
            "entry": f"classroom: jobs per minute, {n} {kind} trainings started at once on plain threads (no queue) "
                     "vs one after another",
            "ours": free_rate, "reference": seq_rate, "unit": "jobs/min", "ratio": free_rate / seq_rate,
            "target": "", "ok": True,
            "note": f"what every session starting its own training thread did before the queue ({threads} torch "
                    "threads each); for comparison",
        })
    return rows


# ----------------------------------------------------------------------------- the entry


def run(quick: bool = False, parts: tuple[str, ...] = ("pages", "queue"), profile: str | None = None,
        examples: bool | None = None) -> list[dict]:
    """The table's rows: page-ready in Chromium against Panel's floor (``"pages"``) and the queue's throughput
    (``"queue"``)."""
    n, wave = (6, 3) if quick else (30, 10)
    jobs_n, steps = (6, 40) if quick else (30, 100)
    lm_n, lm_steps = (2, 5) if quick else (4, 30)
    repeats = 2 if quick else 3
    rows: list[dict] = []
    if "pages" in parts:
        rows += classroom_rows(n, wave, profile=profile, max_seconds=MAX_SECONDS, examples=not quick if examples is None else examples)
    if "queue" in parts:
        load0 = os.getloadavg()[0]
        through = _throughput("digits", jobs_n, steps, ("seq", "queue", "thread"), with_unqueued=not quick,
                              repeats=repeats)
        through += _throughput("lm", lm_n, lm_steps, ("seq", "queue"), with_unqueued=False, repeats=repeats)
        load = f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (1 min)"
        for row in through:
            row["note"] = f"{row['note']}; {load}"
        rows += through
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:   # one side of the throughput comparison (see _run_side)
        import json

        print(json.dumps(_side(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        raise SystemExit(0)
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m bench.bench_classroom")
    parser.add_argument("--quick", action="store_true", help="6 sessions in waves of 3, fewer jobs")
    parser.add_argument("--only", choices=["pages", "queue"], help="only page-ready, or only the queue")
    parser.add_argument("--profile", help="write our server's cProfile to this file (page-ready only)")
    parser.add_argument("--examples", choices=["yes", "no"], help="make the starter examples first (default: "
                                                                   "yes, and no with --quick)")
    args = parser.parse_args()
    parts = (args.only,) if args.only else ("pages", "queue")
    with pd.option_context("display.max_colwidth", 400, "display.width", 400):
        print(pd.DataFrame(run(quick=args.quick, parts=parts, profile=args.profile,
                                  examples=None if args.examples is None else args.examples == "yes")).to_string(index=False))
