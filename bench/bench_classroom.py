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
    """``panel serve apps/`` on 127.0.0.1 in a subprocess; RSS sampled in a thread."""

    def __init__(self, home: str):
        import psutil

        self.port = _free_port()
        env = launch_env(WORKBENCH_HOME=home, WORKBENCH_MODEL_ROOTS=home)   # the queue's defaults
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


def run(quick: bool = False) -> list[dict]:
    n, wave, after_s = (6, 3, 35.0) if quick else (30, 10, 60.0)
    jobs_n, steps = (6, 40) if quick else (30, 100)
    lm_n, lm_steps = (2, 5) if quick else (4, 30)
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
            repeats = 2 if quick else 3
            through_rows = _throughput("digits", jobs_n, steps, ("seq", "queue", "thread"), with_unqueued=not quick,
                                       repeats=repeats)
            through_rows += _throughput("lm", lm_n, lm_steps, ("seq", "queue"), with_unqueued=False, repeats=repeats)
            wait = t_closed + after_s - time.monotonic()
            if wait > 0:
                time.sleep(wait + 0.5)
            # the sampler ran on while the throughput was measured: the first sample after_s after the close
            after = next((r for t, r in list(server.samples) if t >= t_closed + after_s), float("nan"))
            waited = after_s
            last, last_s = server.rss(), time.monotonic() - t_closed
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
                         f"{last:.0f} MiB {last_s:.0f} s after; server {'still serving' if alive else 'GONE'}"})
    rows.extend(through_rows)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:   # one side of the throughput comparison (see _run_side)
        import json

        print(json.dumps(_side(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        raise SystemExit(0)
    import pandas as pd

    quick = "--quick" in sys.argv
    with pd.option_context("display.max_colwidth", 80, "display.width", 220):
        print(pd.DataFrame(run(quick=quick)).to_string(index=False))
