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

*Throughput* (no thrashing): driving 30 trainings through 30 browsers is too slow here, so the 30
sessions' jobs are submitted to a :class:`workbench.jobs.JobQueue` with the default settings (the
class and settings the server uses: ``max_jobs = max(1, cores - 1)``, ``floor(cores / max_jobs)``
torch threads per job) from 30 threads, one user each (side B); the reference runs the same 30 jobs
one after another in one process's main thread (side A, torch's default threads). Each job is a small
digits MLP training (own seed). Jobs finished per minute, ratio B / A, target >= 0.9. A second row
compares B with the same jobs one after another on one worker thread (side C): torch trains slower
off the main thread here, and that row shows what the queue itself costs. Each side runs in a fresh
interpreter (``python -m bench.bench_classroom --side seq|queue|thread N STEPS``), in the order
A B C C B A A B C, the median of three repeats a side (quick: two): on a 2-core machine shared with
other work a 2-thread torch run is sometimes ten times slower than the same run a minute later, so
single runs are too noisy to compare. The final losses of each job must be the same on every side.
The full run adds a row with the same 30 trainings started at once on 30 plain threads (what every
session starting its own thread did before the queue), for comparison (no target).
"""
from __future__ import annotations

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``panel serve apps/`` on 127.0.0.1 in a subprocess; RSS sampled in a thread."""

    def __init__(self, home: str):
        import psutil

        self.port = _free_port()
        env = {**os.environ, "WORKBENCH_HOME": home, "WORKBENCH_MODEL_ROOTS": home}
        for var in ("WORKBENCH_MAX_JOBS", "WORKBENCH_QUEUE_SIZE", "WORKBENCH_JOBS_PER_USER", "WORKBENCH_THREADS",
                    "WORKBENCH_DASK"):
            env.pop(var, None)   # the defaults
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", "apps/", "--port", str(self.port), "--address", "127.0.0.1",
             "--allow-websocket-origin", f"127.0.0.1:{self.port}", "--num-procs", "1"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)
        self.samples: list[tuple[float, float]] = []   # (monotonic time, RSS MiB)
        self._stop = threading.Event()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"panel serve exited with {self.proc.returncode} (port {self.port})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("panel serve did not answer within 120 s")
                time.sleep(0.3)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/apps"

    def rss(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.rss()))
            except Exception:   # the process is gone
                return
            self._stop.wait(0.2)

    def peak(self, since: float, until: float) -> float:
        return max(r for t, r in self.samples if since <= t <= until)

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)   # on_server_unloaded: the queue closes (up to 30 s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _client_models() -> None:
    """Register Panel's Bokeh models in this process so that pulled documents can be decoded."""
    import panel  # noqa: F401
    import panel.models  # noqa: F401
    import panel.models.plotly  # noqa: F401
    import panel.models.tabulator  # noqa: F401


def _open_session(url: str):
    """One simulated session: (seconds until the whole document arrived, the ClientSession)."""
    from bokeh.client import pull_session

    t0 = time.perf_counter()
    session = pull_session(url=url)
    if not session.document.roots:
        raise RuntimeError("the pulled document is empty")
    return time.perf_counter() - t0, session


def _sessions(server: _Server, n: int, wave: int, deadline: float) -> tuple[list[float], list, int]:
    """Open ``n`` sessions in waves of ``wave`` at once; returns (page-ready times, open sessions, failures)."""
    times, sessions, failed = [], [], 0
    lock = threading.Lock()

    def one():
        nonlocal failed
        try:
            dt, s = _open_session(server.url)
            with lock:
                times.append(dt)
                sessions.append(s)
        except Exception:
            with lock:
                failed += 1

    left = n
    while left > 0:
        if time.monotonic() > deadline:
            failed += left
            break
        k = min(wave, left)
        threads = [threading.Thread(target=one, daemon=True) for _ in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CONNECT_TIMEOUT)
        with lock:
            failed += sum(t.is_alive() for t in threads)
        left -= k
    return times, sessions, failed


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- throughput


def _train_job(ds, seed: int, steps: int) -> float:
    """One session's small training (digits MLP); returns the final validation loss."""
    import workbench as wb
    from workbench import jobs

    model = wb.models.build(wb.models.config_for(ds, d_model=64, n_layers=2, d_hidden=128, seed=seed))
    run = wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=steps, lr=3e-3, seed=seed),
                   callbacks=[jobs.TrainProgress()])
    return float(run.final("loss"))


def _one_after_another(ds, n: int, steps: int, threads: int) -> tuple[float, list[float]]:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    losses = [_train_job(ds, i, steps) for i in range(n)]
    return time.perf_counter() - t0, losses


def _under_queue(ds, n: int, steps: int) -> tuple[float, list[float], object]:
    """``n`` users submit one job each from ``n`` threads at once to a default JobQueue; all wait for theirs."""
    from workbench import jobs

    queue = jobs.JobQueue(executor="threads")
    losses: list = [None] * n
    errors: list = []
    go = threading.Barrier(n + 1)

    def student(i):
        try:
            go.wait(60)
            job = queue.submit(_train_job, ds, i, steps, user=f"student-{i:02d}", name=f"train {i}")
            losses[i] = job.result(timeout=600)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=student, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    go.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    seconds = time.perf_counter() - t0
    queue.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} queued jobs failed: {errors[0]}")
    return seconds, losses, queue


def _all_at_once(ds, n: int, steps: int, threads: int) -> float:
    """Before the queue: every session's training on its own thread at once (torch's default threads)."""
    import torch

    torch.set_num_threads(threads)
    ts = [threading.Thread(target=_train_job, args=(ds, i, steps), daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join(900)
    return time.perf_counter() - t0


def _side(side: str, n: int, steps: int) -> dict:
    """One side of the comparison, run in this (fresh) process: its seconds, the jobs' losses, the settings."""
    import torch

    import workbench as wb

    threads = torch.get_num_threads()   # one process's default: what "one after another" gets
    ds = wb.data.load("digits")
    _train_job(ds, 0, 5)   # warm-up: first-call costs on neither side
    out = {"threads": threads}
    if side == "seq":
        out["seconds"], out["losses"] = _one_after_another(ds, n, steps, threads)
    elif side == "queue":
        out["seconds"], out["losses"], queue = _under_queue(ds, n, steps)
        out["max_jobs"], out["job_threads"] = queue.max_jobs, queue.threads
    elif side == "thread":   # one after another on one worker thread (where the queue's jobs run)
        box = {}
        t = threading.Thread(target=lambda: box.update(zip(("seconds", "losses"),
                                                            _one_after_another(ds, n, steps, threads))))
        t.start()
        t.join()
        out.update(box)
    elif side == "free":
        out["seconds"] = _all_at_once(ds, n, steps, threads)
    else:
        raise ValueError(f"side must be one of ['seq', 'queue', 'thread', 'free'], got {side!r}")
    return out


def _run_side(side: str, n: int, steps: int) -> dict:
    """:func:`_side` in a fresh interpreter: each side starts from the same state (torch's thread pools of an
    earlier side's threads would otherwise slow the next side's main thread down)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    out = subprocess.run([sys.executable, "-m", "bench.bench_classroom", "--side", side, str(n), str(steps)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"the {side!r} side failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _throughput(n: int, steps: int, with_unqueued: bool, repeats: int) -> list[dict]:
    got = {"seq": [], "queue": [], "thread": []}
    # ABCCBA...: a shared machine's drift falls on every side
    order = [side for r in range(repeats) for side in (("seq", "queue", "thread"), ("thread", "queue", "seq"))[r % 2]]
    for side in order:
        got[side].append(_run_side(side, n, steps))
    seq_s = statistics.median(r["seconds"] for r in got["seq"])
    queue_s = statistics.median(r["seconds"] for r in got["queue"])
    thread_s = statistics.median(r["seconds"] for r in got["thread"])
    threads, q = got["seq"][0]["threads"], got["queue"][0]
    seconds = {side: ", ".join(f"{r['seconds']:.1f}" for r in got[side]) for side in got}
    seq_rate, queue_rate = n * 60 / seq_s, n * 60 / queue_s
    runs = [r["losses"] for r in got["seq"] + got["queue"] + got["thread"]]   # the same seeds: the same numbers on both sides
    same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for r in runs[1:] for a, b in zip(runs[0], r))
    rows = [{
        "entry": f"classroom: jobs finished per minute, {n} sessions' trainings under the job queue vs one after another",
        "ours": queue_rate, "reference": seq_rate, "unit": "jobs/min", "ratio": queue_rate / seq_rate,
        "target": ">= 0.9", "ok": bool(queue_rate / seq_rate >= 0.9 and same),
        "note": (f"JobQueue() defaults (max_jobs {q['max_jobs']}, {q['job_threads']} torch threads per job) fed from "
                 f"{n} threads, one user each (not through the browser); reference: the same {n} jobs one after "
                 f"another in one process's main thread, {threads} torch threads; digits MLP 64x2, {steps} steps "
                 f"each; each repeat a fresh process, ABCCBA.., the median of {repeats} a side (seconds: one after "
                 f"another {seconds['seq']}; queue {seconds['queue']}); "
                 f"same final losses both sides: {'yes' if same else 'NO'}"),
    }]
    thread_rate = n * 60 / thread_s
    rows.append({
        "entry": f"classroom: jobs per minute, {n} sessions' trainings under the job queue vs one after another "
                 "on one worker thread",
        "ours": queue_rate, "reference": thread_rate, "unit": "jobs/min", "ratio": queue_rate / thread_rate,
        "target": ">= 0.9", "ok": bool(queue_rate / thread_rate >= 0.9 and same),
        "note": (f"the queue's own cost (admission, round-robin, a thread per job) apart from torch's cost of "
                 f"training off the main thread; the same {n} jobs on one non-main thread of a fresh process "
                 f"(seconds {seconds['thread']})"),
    })
    if with_unqueued:
        free_rate = n * 60 / _run_side("free", n, steps)["seconds"]
        rows.append({
            "entry": f"classroom: jobs per minute, {n} trainings started at once on plain threads (no queue) "
                     "vs one after another",
            "ours": free_rate, "reference": seq_rate, "unit": "jobs/min", "ratio": free_rate / seq_rate,
            "target": "", "ok": True,
            "note": f"what every session starting its own training thread did before the queue ({threads} torch "
                    "threads each); for comparison",
        })
    return rows


# ----------------------------------------------------------------------------- the entry


def run(quick: bool = False) -> list[dict]:
    n, wave, after_s = (6, 3, 35.0) if quick else (30, 10, 60.0)
    jobs_n, steps = (6, 40) if quick else (30, 100)
    t_start = time.monotonic()
    deadline = t_start + MAX_SECONDS
    _client_models()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-classroom-") as home:
        server = _Server(home)
        try:
            cold = server.rss()
            _, warm = _open_session(server.url)   # the first session pays for imports and caches
            warm.close()
            alone = []
            for _ in range(3):
                dt, s = _open_session(server.url)
                alone.append(dt)
                s.close()
            single = statistics.median(alone)
            time.sleep(1.0)
            before = server.rss()
            t_load = time.monotonic()
            times, sessions, failed = _sessions(server, n, wave, deadline)
            time.sleep(1.0)
            for s in sessions:
                s.close()
            t_closed = time.monotonic()
            peak = server.peak(t_load, t_closed)

            # while the server discards the closed sessions, measure the queue's throughput in this process
            through_rows = _throughput(jobs_n, steps, with_unqueued=not quick, repeats=2 if quick else 3)
            wait = t_closed + after_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            after = server.rss()
            waited = time.monotonic() - t_closed
            alive = server.proc.poll() is None
        finally:
            server.stop()

    ok_sessions = failed == 0 and len(times) == n
    p50, p90 = (_percentile(times, 0.5), _percentile(times, 0.9)) if times else (float("nan"), float("nan"))
    where = (f"{n} websocket sessions (bokeh.client.pull_session) in waves of {wave} at once against panel serve "
             f"apps/ on 127.0.0.1; {failed} failed")
    rows.append({"entry": f"classroom: page-ready p50, {n} sessions in waves of {wave}, vs one session alone",
                 "ours": p50, "reference": single, "unit": "s", "ratio": p50 / single, "target": "",
                 "ok": ok_sessions,
                 "note": f"{where}; connect + the server builds the App + the document arrives (no browser "
                         f"rendering); alone: median of {len(alone)} on the warm server"})
    rows.append({"entry": f"classroom: page-ready p90, {n} sessions in waves of {wave}, vs one session alone",
                 "ours": p90, "reference": single, "unit": "s", "ratio": p90 / single, "target": "",
                 "ok": ok_sessions, "note": f"max {max(times) if times else float('nan'):.2f} s"})
    rows.append({"entry": f"classroom: server RSS at the peak with {n} sessions vs before",
                 "ours": peak, "reference": before, "unit": "MiB", "ratio": peak / before, "target": "",
                 "ok": ok_sessions,
                 "note": f"psutil RSS of the server pid every 0.2 s; cold start {cold:.0f} MiB; "
                         f"{(peak - before) / max(1, len(times)):.1f} MiB per session at the peak"})
    rows.append({"entry": f"classroom: server RSS {waited:.0f} s after all {n} sessions closed vs before",
                 "ours": after, "reference": before, "unit": "MiB", "ratio": after / before, "target": "",
                 "ok": alive,
                 "note": f"{after - before:+.0f} MiB vs before, {after - peak:+.0f} MiB vs the peak; "
                         f"server {'still serving' if alive else 'GONE'}"})
    rows.extend(through_rows)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:   # one side of the throughput comparison (see _run_side)
        import json

        print(json.dumps(_side(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        raise SystemExit(0)
    import pandas as pd

    quick = "--quick" in sys.argv
    with pd.option_context("display.max_colwidth", 80, "display.width", 220):
        print(pd.DataFrame(run(quick=quick)).to_string(index=False))
