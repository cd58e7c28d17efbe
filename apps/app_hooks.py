"""Server start/stop: the one job queue of this server process (``--num-procs 1``: one queue).

Every page's long computation goes through this queue (``workbench.ui.session.job_queue`` finds it in
``pn.state.cache``). Its settings come from the environment (``WORKBENCH_MAX_JOBS``,
``WORKBENCH_QUEUE_SIZE``, ``WORKBENCH_JOBS_PER_USER``, ``WORKBENCH_THREADS``; see ``workbench.jobs``).
Backend: ``WORKBENCH_DASK=tcp://host:port`` puts the queue on that Dask cluster, so the pages' jobs
(train, grow, connectivity, collapse, compose, unroll, grokking) run on its workers: progress comes back
through Dask's topics, Stop is cooperative then ``future.cancel()``, and runs come back as their files
(safetensors, run.json, metrics.csv) that this server -- the store's only writer -- saves through the
job's services (``workbench.ui.task.BackgroundTask``); one torch thread per task unless
``WORKBENCH_THREADS`` is set. Jobs that cannot be shipped (the Residual page's analyses hold the
session's model objects) run on this process's threads in the same queue. Unset: every job runs on
threads of this process with floor(cores / max jobs) torch threads each.

At the first start on a store it submits the starter set of example runs to that queue
(:func:`workbench.runtime.examples.start`; ``WORKBENCH_EXAMPLES=0`` turns it off): every page then opens on
data; the sessions show its progress.

It also keeps one server per store (an advisory lock on ``WORKBENCH_HOME/server.lock``: a second server
on the same store refuses to start, naming the first), and installs :func:`workbench.ui.serving.install`:
the guard of Panel's component route, one log line for a widget value the browser forged, and the
per-student bound on open sessions (``WORKBENCH_SESSIONS_PER_USER``).

OpenMP threads wait passively here (``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise;
``make serve`` and ``make classroom`` set it too): libgomp reads it when torch loads, and on a loaded
class server busy-waiting OpenMP threads took the cores their partners needed (measured in
``bench/bench_classroom.py``; the README gives the numbers).
"""
import os
import sys

if "torch" not in sys.modules:   # only before torch (libgomp) is loaded does it take effect
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import panel as pn  # noqa: E402


HOME_LOCK_KEY = "workbench.home_lock"


def _port() -> str:
    """The port of this ``panel serve`` (read from its command line; Bokeh's default 5006)."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--port="):
            return arg.split("=", 1)[1]
    return os.environ.get("BOKEH_PORT", "5006")


def on_server_loaded(server_context):
    import torch

    from workbench import classroom, jobs
    from workbench.io.store import default_home
    from workbench.ui import serving
    from workbench.ui.session import QUEUE_KEY

    try:
        pn.state.cache[HOME_LOCK_KEY] = classroom.hold_home(default_home(), _port())
    except classroom.HomeInUse as e:
        print(f"workbench: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None   # out of the event loop: the server stops
    serving.install()

    queue = jobs.JobQueue()   # WORKBENCH_DASK if set, else threads
    if isinstance(queue.executor, jobs.ThreadExecutor):
        torch.set_num_threads(queue.threads)   # also for the little torch work done in UI callbacks
    pn.state.cache[QUEUE_KEY] = queue
    serving.warm_up()   # the first student does not pay for the imports; the start-up heap is frozen (gc)
    from workbench.runtime import examples

    try:   # the starter set, once per store, as a job of this queue (WORKBENCH_EXAMPLES=0: never)
        examples.start(default_home(), queue)
    except Exception as e:  # noqa: BLE001 -- the dashboard serves without them
        print(f"workbench: the example runs were not started: {e}", file=sys.stderr, flush=True)


def on_server_unloaded(server_context):
    from workbench.ui.session import QUEUE_KEY

    queue = pn.state.cache.pop(QUEUE_KEY, None)
    if queue is not None:
        queue.close(wait=30)   # running trainings stop and save what they have
    from workbench import classroom

    classroom.release_home(pn.state.cache.pop(HOME_LOCK_KEY, None))
