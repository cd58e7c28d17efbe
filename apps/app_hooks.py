"""Server start/stop: the one job queue of this server process (``--num-procs 1``: one queue).

Every page's long computation goes through this queue (``workbench.ui.common.job_queue`` finds it in
``pn.state.cache``). Its settings come from the environment (``WORKBENCH_MAX_JOBS``,
``WORKBENCH_QUEUE_SIZE``, ``WORKBENCH_JOBS_PER_USER``, ``WORKBENCH_THREADS``; see ``workbench.jobs``).
The queue runs the pages' jobs on threads of this process -- they report to the browser session that
started them, so they cannot be shipped to Dask workers -- and gives each job floor(cores / max jobs)
torch threads; the Sweeps page sends its points to the Dask scheduler named by ``WORKBENCH_DASK`` when
that is set.
"""
import panel as pn


def on_server_loaded(server_context):
    import torch

    from workbench import jobs
    from workbench.ui.common import QUEUE_KEY

    queue = jobs.JobQueue(executor="threads")
    torch.set_num_threads(queue.threads)   # also for the little torch work done in UI callbacks
    pn.state.cache[QUEUE_KEY] = queue


def on_server_unloaded(server_context):
    from workbench.ui.common import QUEUE_KEY

    queue = pn.state.cache.pop(QUEUE_KEY, None)
    if queue is not None:
        queue.close(wait=30)   # running trainings stop and save what they have
