"""Server start-up: decide torch's thread count once for the whole process (it is process-wide)."""
import os


def on_server_loaded(server_context):
    import torch

    torch.set_num_threads(int(os.environ.get("WORKBENCH_THREADS", max(1, (os.cpu_count() or 2)))))
