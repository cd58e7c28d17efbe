"""A run as bytes: the three files of its folder, written and read back by a store itself, so that a Dask
worker can send a run to the server's store (the only writer) with no pickle.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ...core.training import Run
from .runs import RunStore

# ----------------------------------------------------------------------------- runs as bytes

PACKED_FILES = ("run.json", "model.safetensors", "metrics.csv")
PACK_MAX_BYTES = 8 * 2**30   # a packed run larger than this is refused (the three files together)


def pack_run(run: Run) -> dict[str, bytes]:
    """The files of ``run``'s folder as bytes: ``{"run.json", "model.safetensors", "metrics.csv": bytes}``.

    Written by :meth:`RunStore.save` itself into a temporary store (so the run is checked exactly as
    a save checks it, and the bytes are exactly what a run folder holds; no pickle). What a Dask
    worker sends the server, whose store is the only writer (``workbench.jobs.RemoteStore``).
    ``run.run_id`` is left as it was.
    """
    if not isinstance(run, Run):
        raise ValueError(f"run must be a workbench Run, got {type(run).__name__}")
    before = run.run_id
    with tempfile.TemporaryDirectory(prefix="workbench-pack-") as tmp:
        try:
            run_id = RunStore(tmp).save(run)
        finally:
            run.run_id = before
        folder = Path(tmp) / "runs" / run_id
        return {name: (folder / name).read_bytes() for name in PACKED_FILES}


def unpack_run(files: dict, device: str | torch.device | None = None, *, allow_nonfinite: bool = False) -> Run:
    """The :class:`Run` whose folder's files are ``files`` (from :func:`pack_run`), validated exactly as
    :meth:`RunStore.load` validates a run folder (config, weights, metrics); ``run_id`` is None.

    ``allow_nonfinite``: as for ``load`` (a diverged run's weights hold NaN). Raises
    :class:`StoreError` naming the file and the field, ``ValueError`` for anything but the three files as bytes.
    """
    if not isinstance(files, dict) or sorted(files) != sorted(PACKED_FILES):
        shown = sorted(map(str, files))[:10] if isinstance(files, dict) else type(files).__name__
        raise ValueError(f"files must be a dict with exactly the keys {list(PACKED_FILES)}, got {shown}")
    bad = [k for k, v in files.items() if not isinstance(v, (bytes, bytearray, memoryview))]
    if bad:
        raise ValueError(f"files must hold bytes, got {type(files[bad[0]]).__name__} for {bad[0]!r}")
    total = sum(len(v) for v in files.values())
    if total > PACK_MAX_BYTES:
        raise ValueError(f"files must be at most {PACK_MAX_BYTES} bytes together, got {total}")
    with tempfile.TemporaryDirectory(prefix="workbench-unpack-") as tmp:
        store = RunStore(tmp)
        run_id = "packed"
        folder = store.runs_dir / run_id
        folder.mkdir()
        for name in PACKED_FILES:
            (folder / name).write_bytes(bytes(files[name]))
        run = store.load(run_id, device, allow_nonfinite=allow_nonfinite)
    run.run_id = None   # the run has no id until a store saves it
    return run
