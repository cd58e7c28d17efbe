"""Server start/stop: the one job queue of this server process (``--num-procs 1``: one queue).

Every page's long computation goes through this queue (``workbench.ui.common.job_queue`` finds it in
``pn.state.cache``). Its settings come from the environment (``WORKBENCH_MAX_JOBS``,
``WORKBENCH_QUEUE_SIZE``, ``WORKBENCH_JOBS_PER_USER``, ``WORKBENCH_THREADS``; see ``workbench.jobs``).
Backend: ``WORKBENCH_DASK=tcp://host:port`` puts the queue on that Dask cluster, so the pages' jobs
(train, grow, connectivity, collapse, compose, unroll, grokking) run on its workers: progress comes back
through Dask's topics, Stop is cooperative then ``future.cancel()``, and runs come back as their files
(safetensors, run.json, metrics.csv) that this server -- the store's only writer -- saves through the
job's services (``workbench.ui.common.BackgroundTask``); one torch thread per task unless
``WORKBENCH_THREADS`` is set. Jobs that cannot be shipped (the Residual page's analyses hold the
session's model objects) run on this process's threads in the same queue. Unset: every job runs on
threads of this process with floor(cores / max jobs) torch threads each.

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


def on_server_loaded(server_context):
    import torch

    from workbench import jobs
    from workbench.ui.common import QUEUE_KEY

    queue = jobs.JobQueue()   # WORKBENCH_DASK if set, else threads
    if isinstance(queue.executor, jobs.ThreadExecutor):
        torch.set_num_threads(queue.threads)   # also for the little torch work done in UI callbacks
    pn.state.cache[QUEUE_KEY] = queue


def on_server_unloaded(server_context):
    from workbench.ui.common import QUEUE_KEY

    queue = pn.state.cache.pop(QUEUE_KEY, None)
    if queue is not None:
        queue.close(wait=30)   # running trainings stop and save what they have
