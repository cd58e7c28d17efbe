"""Run store: one directory per run plus an SQLite index. Never pickle.

Layout under the root (``RunStore(path)``; default ``$WORKBENCH_HOME`` or the user's
data directory)::

    index.sqlite                 one row per run (for list()); derived data, rebuilt from runs/
    runs/<run_id>/run.json       format tag, model config, train config, dataset spec, meta,
                                 frozen (names of the parameters with requires_grad=False),
                                 owner (the signed-in user who saved it, or null) and shared
    runs/<run_id>/model.safetensors   the state dict (weights and buffers: the fade-in gates too)
    runs/<run_id>/metrics.csv    tidy metrics

The run directories are the truth; the index only makes ``list()`` fast. A model's config,
its state dict and its frozen parameters describe it fully, so a reloaded model computes
exactly the saved function, also in the middle of a fade-in. Runs written before the gates
were buffers (no ``blocks.*.residual_scale`` in the weights, no ``frozen`` list) still load:
gates fully faded in, every parameter but a frozen substrate trainable.

Writing. ``save`` writes the three files into ``runs/.tmp-<pid>@<host>@<random>/`` (each file
through a temporary file: write, ``fsync``, ``os.replace``, ``fsync`` of the directory),
renames that directory to ``runs/<run_id>`` (``fsync`` of ``runs/``), then commits the index
row; ``save`` returns only after the commit. A kill leaves one of two kinds of junk, both
cleaned when a store is opened (:meth:`RunStore.reconcile`):

- a ``.tmp-*`` directory (killed while writing): removed when its writer is gone. The name
  carries the writer's pid and host: on the same host a pid that is no longer alive means
  stale at once; a directory from another host (or of the old unnamed form) is stale once
  nothing in it changed for :data:`STALE_TMP_SECONDS` (15 minutes, far longer than any save);
- a complete ``runs/<run_id>`` without an index row (killed between the rename and the
  commit): indexed once it passes the same validation as :meth:`RunStore.load` (config,
  weights, metrics). A directory that fails it is not indexed; :meth:`RunStore.broken`
  lists it with the reason (repair it, then call :meth:`RunStore.reconcile`).

Index rows whose directory is gone (a ``delete`` killed half-way) are dropped, and
``.del-*`` directories (the same) are removed.

Reading. A missing, corrupt or foreign ``index.sqlite`` never stops the store from opening:
``RunStore()`` records the problem in ``index_error`` and ``list``/``save``/``delete``
raise it as a :class:`StoreError` that names the file and says to call
:meth:`RunStore.rebuild_index` (which moves the file aside, keeping the newest
:data:`INDEX_BACKUPS` such copies, and builds a new index from the run directories under the store's
lock, so that no save made meanwhile is missing from it). ``load`` reads the run directory and works without the
index. Loading validates ``run.json`` with the configs' own ``validate()`` and the dataset
module's option checks, the weights against the config (names, shapes, finite values) and
the metrics table, and raises :class:`StoreError` naming the run, the file and the field.

Owners (classroom mode). ``save(run, owner=user)`` records the signed-in user in ``run.json`` and
the index; ``owner=None`` (no sign-in, a laptop) is a run of nobody in particular, as before.
``list(user=...)`` gives that user's own runs plus the runs marked shared (:meth:`RunStore.share`),
``load(..., user=...)`` and ``read_metrics(..., user=...)`` open only those, and ``delete(..., user=...)`` refuses another owner's run;
``user=None`` (a teacher, a notebook, the laptop) sees and may delete everything. An uploaded text
lives in its run's dataset spec, so a user's uploads are their runs' and follow the same rules. The
owner and the shared flag live in ``run.json`` (the truth), the index repeats them; an index
written before these columns existed gets them when the store opens (``owner`` null, ``shared``
0), and :meth:`RunStore.rebuild_index` reads them back from the run directories.

Files: ``names`` (StoreError, the home folder, run ids, run and user names), ``files`` (durable writes,
stale temporaries, weights), ``document`` (run.json and metrics.csv checks), ``index`` (the SQLite index,
the lock, reconcile and rebuild), ``runs`` (:class:`RunStore`), ``packing`` (runs as bytes).
"""
from __future__ import annotations

from .names import StoreError, default_home, check_user, USER_MAX_CHARS, check_run_name, NAME_MAX_CHARS
from .files import STALE_TMP_SECONDS
from .document import META_MAX_BYTES
from .index import INDEX_BACKUPS
from .runs import RunStore
from .packing import pack_run, unpack_run, PACKED_FILES

__all__ = [
    "RunStore", "StoreError", "default_home", "STALE_TMP_SECONDS", "check_user", "USER_MAX_CHARS", "pack_run",
    "unpack_run", "PACKED_FILES", "check_run_name", "NAME_MAX_CHARS", "META_MAX_BYTES", "INDEX_BACKUPS",
]
