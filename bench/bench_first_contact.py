"""First contact: how long the starter examples take to make, and what they cost a session's page-ready time.

*Making the examples*: :func:`workbench.runtime.examples.make` on a fresh store, in this process with the
torch threads a server's one queue job gets on this machine (``floor(cores / max_jobs)``), wall seconds
against the 90 s target (two cores). Quick: the tiny set (a few steps of each pipeline; no target).

*Page-ready*: ``panel serve apps/`` on 127.0.0.1 (started and stopped by this module, by its pid; the
launch environment ``make serve`` sets), one Bokeh websocket session pulled
(``bokeh.client.pull_session``: connect + the server builds the App and its first tab + the document
arrives; no browser rendering) after a warm-up session, the median of ``N`` (9; quick: 3), the servers side by
side and pulled in turn (a change in the machine's load falls on all alike). Four stores:

- *fresh*: the examples made (what ``make serve`` shows after its first minute) against an *empty* store with
  the examples off (``WORKBENCH_EXAMPLES=0``: what a newcomer saw before);
- *500 runs*: 500 small runs plus the examples against the same 500 runs without them.

*Every tab*: in this process, a session's App built and every tab shown once (each page laid out, its example
drawn; the Residual page's analysis job is started, not waited for), the median of three sessions' total and
of their slowest tab, with the examples against the same store without them.

``BENCH_FIRST_CONTACT_BASE=/path/to/an/older/checkout`` adds two rows: page-ready here (examples made)
against that checkout's ``apps/`` on an empty store and on the 500 runs (the code before first contact).
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 90.0
N_RUNS = 500
BASE_ENV = "BENCH_FIRST_CONTACT_BASE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_THREAD_VARS = ("OMP_", "GOMP_", "MKL_", "KMP_", "WORKBENCH_")


def _launch_env(**extra) -> dict:
    """This environment without what steers threads or the queue, plus ``make serve``'s
    ``OMP_WAIT_POLICY=PASSIVE`` and ``extra`` (as :mod:`bench.bench_classroom` launches its server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_THREAD_VARS)}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", **extra}


def _client_models() -> None:
    """Panel's Bokeh models registered here, so that pulled documents decode."""
    import panel  # noqa: F401
    import panel.models  # noqa: F401
    import panel.models.plotly  # noqa: F401
    import panel.models.tabulator  # noqa: F401


def _open_session(url: str):
    """One session: (seconds until the whole document arrived, the ClientSession)."""
    from bokeh.client import pull_session

    t0 = time.perf_counter()
    session = pull_session(url=url)
    if not session.document.roots:
        raise RuntimeError("the pulled document is empty")
    return time.perf_counter() - t0, session


class _Server:
    """``panel serve apps/`` of ``app_root`` on ``home`` on 127.0.0.1; stopped (by its pid) with :meth:`stop`."""

    def __init__(self, home: str, examples_on: bool, app_root: Path = ROOT):
        self.port = _free_port()
        env = _launch_env(WORKBENCH_HOME=home, WORKBENCH_MODEL_ROOTS=home,
                          WORKBENCH_EXAMPLES="1" if examples_on else "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", "apps/", "--port", str(self.port), "--address", "127.0.0.1",
             "--allow-websocket-origin", f"127.0.0.1:{self.port}", "--num-procs", "1"],
            cwd=app_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/apps"

    def wait(self) -> None:
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"panel serve exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("panel serve did not answer within 180 s") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _page_ready(specs: dict, n: int) -> dict:
    """``{name: median seconds}`` of ``n`` pulled sessions per server, one warm-up session each; the servers
    (``specs``: ``{name: (home, examples_on, app_root)}``) run side by side and are pulled in turn, round after
    round (each round starting one server further on), so that a change in the machine's load falls on all alike."""
    _client_models()
    servers = {}
    try:
        for name, (home, on, app_root) in specs.items():   # one after another: each warm before the next starts
            server = servers[name] = _Server(home, on, app_root)
            server.wait()
            _, warm = _open_session(server.url)
            warm.close()
        times = {name: [] for name in servers}
        names = list(servers)
        for r in range(n):
            for name in names[r % len(names):] + names[:r % len(names)]:   # each round starts one further on
                dt, session = _open_session(servers[name].url)
                times[name].append(dt)
                session.close()
                time.sleep(0.5)   # the closed session's clean-up is done before the next pull
        return {name: statistics.median(ts) for name, ts in times.items()}
    finally:
        for server in servers.values():
            server.stop()


def _every_tab(home: str, repeats: int = 3) -> tuple[float, float]:
    """Median over ``repeats`` sessions of (all tabs' build seconds, the slowest tab's), in this process."""
    import panel as pn
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    import workbench as wb
    from workbench.ui import App

    totals, slowest = [], []
    for _ in range(repeats):
        doc = Document()
        with set_curdoc(doc):
            app = App(store=wb.RunStore(home))
            per = []
            for title in app.pages:
                t0 = time.perf_counter()
                page = app.show(title)
                per.append(time.perf_counter() - t0)
                if page.task is not None and page.task.job is not None:
                    page.task.stop()
        totals.append(sum(per))
        slowest.append(max(per))
        pn.state.reset()
    return statistics.median(totals), statistics.median(slowest)


def _tiny_runs(store, n: int) -> None:
    """``n`` small MLP runs with a few metric rows each (a class's worth of students' runs)."""
    import pandas as pd

    import workbench as wb

    spec = {"name": "digits", **wb.data.check_options("digits")}
    for i in range(n):
        model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1, seed=i))
        metrics = pd.DataFrame({"step": [10, 10, 20, 20], "split": ["val"] * 4, "metric": ["loss", "acc"] * 2,
                                "value": [2.0, 0.2, 1.5, 0.4]})
        store.save(wb.training.Run(model=model, train_config=wb.TrainConfig(steps=20), dataset=spec, metrics=metrics,
                                   name=f"student-run-{i:03d}"), owner=None)


def run(quick: bool = False) -> list[dict]:
    import torch

    import workbench as wb
    from workbench.runtime import examples, jobs

    n = 3 if quick else 9
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-first-contact-"))
    threads = torch.get_num_threads()
    try:
        fresh, empty = tmp / "fresh", tmp / "empty"
        probe = jobs.JobQueue(executor="threads")
        queue_threads = probe.threads   # what the server's one job gets here
        probe.close()
        torch.set_num_threads(queue_threads)
        t0 = time.perf_counter()
        made = examples.make(wb.RunStore(fresh), tiny=quick)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        rows.append({"entry": f"first contact: the starter examples made ({len(made)} runs{', tiny' if quick else ''})",
                     "ours": seconds, "reference": TARGET_SECONDS, "unit": "s", "ratio": seconds / TARGET_SECONDS,
                     "target": "" if quick else "<= 1", "ok": quick or seconds <= TARGET_SECONDS,
                     "note": f"{os.cpu_count()} cores, {queue_threads} torch threads (one queue job), load average "
                             f"{os.getloadavg()[0]:.1f}; the browser test's server: artifacts/first-contact-seeding.json"})
        wb.RunStore(empty)
        big, big_plain = tmp / "big", tmp / "big-plain"
        shutil.copytree(fresh, big)
        _tiny_runs(wb.RunStore(big), N_RUNS)
        wb.RunStore(big_plain)
        shutil.copytree(big / "runs", big_plain / "runs", dirs_exist_ok=True)
        plain = wb.RunStore(big_plain)
        examples.remove(plain)                                  # the same 500 runs, no examples
        (big_plain / examples.STATE_FILE).unlink()

        base = os.environ.get(BASE_ENV, "").strip()
        specs = {"fresh": (str(fresh), True, ROOT), "empty": (str(empty), False, ROOT), "big": (str(big), True, ROOT),
                 "big_plain": (str(big_plain), False, ROOT)}
        if base:   # one server per store: the older code gets copies of the two stores
            for name, home in (("base_empty", empty), ("base_big", big_plain)):
                shutil.copytree(home, tmp / name, ignore=shutil.ignore_patterns("server.lock", "*.lock"))
                specs[name] = (str(tmp / name), False, Path(base))
        ready = _page_ready(specs, n)
        note = (f"panel serve apps/ on 127.0.0.1, bokeh.client.pull_session after a warm-up session, median of {n} "
                f"(the servers side by side, pulled in turn); first tab: Start here")
        rows.append({"entry": "first contact: page-ready, fresh store with the examples vs an empty store without",
                     "ours": ready["fresh"], "reference": ready["empty"], "unit": "s",
                     "ratio": ready["fresh"] / ready["empty"], "target": "<= 1.2",
                     "ok": ready["fresh"] <= 1.2 * ready["empty"], "note": note})
        rows.append({"entry": f"first contact: page-ready, {N_RUNS} runs + the examples vs the {N_RUNS} runs without",
                     "ours": ready["big"], "reference": ready["big_plain"], "unit": "s",
                     "ratio": ready["big"] / ready["big_plain"], "target": "<= 1.2",
                     "ok": ready["big"] <= 1.2 * ready["big_plain"], "note": note})
        rows.append({"entry": f"first contact: page-ready, {N_RUNS} runs + the examples vs the examples alone",
                     "ours": ready["big"], "reference": ready["fresh"], "unit": "s",
                     "ratio": ready["big"] / ready["fresh"], "target": "", "ok": True,
                     "note": "what a class's runs cost a new session"})
        if base:
            for name, label in (("empty", "an empty store"), ("big_plain", f"{N_RUNS} runs")):
                ref = ready["base_empty" if name == "empty" else "base_big"]
                ours = ready["fresh" if name == "empty" else "big"]
                rows.append({"entry": f"first contact: page-ready with the examples vs the code at {Path(base).name} "
                                      f"on {label}", "ours": ours, "reference": ref, "unit": "s", "ratio": ours / ref,
                             "target": "<= 1.2", "ok": ours <= 1.2 * ref, "note": f"{BASE_ENV}={base}"})

        torch.set_num_threads(1)
        tabs = {name: _every_tab(str(home)) for name, home in
                (("fresh", fresh), ("empty", empty), ("big", big), ("big_plain", big_plain))}
        torch.set_num_threads(threads)
        for ours, ref, label in (("fresh", "empty", "fresh store"), ("big", "big_plain", f"{N_RUNS} runs")):
            (total, worst), (rtotal, rworst) = tabs[ours], tabs[ref]
            rows.append({"entry": f"first contact: every tab built once, {label}, with the examples vs without",
                         "ours": total, "reference": rtotal, "unit": "s", "ratio": total / rtotal, "target": "",
                         "ok": True, "note": f"in-process App, one torch thread, median of 3 sessions; slowest tab "
                                             f"{worst:.2f} s (without: {rworst:.2f} s)"})
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    import pandas as pd

    with pd.option_context("display.max_colwidth", 90, "display.width", 220):
        print(pd.DataFrame(run(quick="--quick" in sys.argv)).to_string(index=False))
