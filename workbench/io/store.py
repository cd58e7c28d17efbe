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
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import torch

from ..core import data as _data
from ..core import models as _models
from ..core.training import Run, TrainConfig

__all__ = ["RunStore", "StoreError", "default_home", "STALE_TMP_SECONDS", "check_user", "USER_MAX_CHARS", "pack_run",
           "unpack_run", "PACKED_FILES", "check_run_name", "NAME_MAX_CHARS", "META_MAX_BYTES", "INDEX_BACKUPS"]

FORMAT = "depth-workbench-run"
VERSION = 1
_OLD_COLUMNS = ["run_id", "name", "created", "dataset", "family", "n_layers", "d_model", "steps", "status",
                "val_loss", "val_acc", "group_name", "stage", "parent"]   # indexes written before owners
_COLUMNS = _OLD_COLUMNS + ["owner", "shared"]
_ADDED = {"owner": "owner TEXT", "shared": "shared INTEGER NOT NULL DEFAULT 0"}   # how an old index gets them
_TABLE = f"runs ({', '.join(_OLD_COLUMNS + list(_ADDED.values()))}, PRIMARY KEY (run_id))"
_METRIC_COLUMNS = ["step", "split", "metric", "value"]
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]+")
_BACKUP = re.compile(r"index\.sqlite\.bak-(\d{8}-\d{6})(?:-(\d+))?")   # rebuild_index's old files

STALE_TMP_SECONDS = 15 * 60   # a temporary file or directory of an unknown writer untouched this long is junk
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
_TAG = re.compile(r"(\d+)@([A-Za-z0-9._-]+)@")   # "<pid>@<host>@" in temporary names


USER_MAX_CHARS = 64
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_USER_RULE = (f"a user name of 1 to {USER_MAX_CHARS} characters (letters, digits and _ . @ + -, "
              "starting with a letter or digit)")


def check_user(name: str, value) -> str:
    """A user name (signed-in user, run owner, teacher): ``value`` itself, or ValueError naming ``name``.

    Names are untrusted (a login form, an OAuth provider): 1 to 64 characters, letters, digits and
    ``_ . @ + -``, starting with a letter or digit; no spaces, slashes, quotes or markup.
    """
    if not isinstance(value, str) or len(value) > USER_MAX_CHARS or not _USER.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"{name} must be {_USER_RULE}, got {shown}")
    return value


class StoreError(RuntimeError):
    """A run is missing, truncated, foreign or inconsistent, or the index cannot be used."""


def default_home() -> Path:
    """``$WORKBENCH_HOME`` if set, else the platform's user data directory for the workbench."""
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("depth-workbench", appauthor=False))


# ============================================================================ durable writes


def _writer_tag() -> str:
    """``<pid>@<host>@``: who is writing a temporary file (read back by :func:`_is_stale`)."""
    return f"{os.getpid()}@{_HOST}@"


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file's (or a directory's entries') data to disk. Directories: POSIX only."""
    if directory and os.name == "nt":
        return  # Windows cannot open a directory for fsync; NTFS journals renames itself
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory (write, fsync), rename it over ``path``,
    then fsync the directory so that the rename itself survives a power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it on Windows: leave the call to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's process)
        return True
    return True


def _last_touched(path: Path) -> float:
    """Newest mtime of ``path`` and (for a directory) its entries."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def _is_stale(path: Path, now: float) -> bool:
    """A temporary file or directory whose writer is gone: a dead pid on this host, or else
    (another host, no tag) nothing changed for :data:`STALE_TMP_SECONDS`."""
    m = _TAG.search(path.name)
    if m and m.group(2) == _HOST and not _pid_alive(int(m.group(1))):
        return True
    try:
        return now - _last_touched(path) > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False  # removed meanwhile by its writer or another store


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


LOCK_TIMEOUT = 120.0   # seconds a save waits for a rebuild of the index (2.4 s for 337 runs was measured)
INDEX_BACKUPS = 3      # index.sqlite.bak-* files kept by rebuild_index (the newest; older ones are removed)


@contextlib.contextmanager
def _file_lock(path: Path, exclusive: bool, timeout: float = LOCK_TIMEOUT, what: str = "the run index"):
    """An advisory lock on ``path`` (``flock``: shared for writers of single runs, exclusive for a rebuild),
    held by every thread and process that uses the store (each acquisition opens its own descriptor, so
    threads of one process exclude each other too). Waits up to ``timeout`` seconds, then StoreError.
    Without ``fcntl`` (Windows) nothing is locked: do not rebuild while another process saves."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{path}: {what} is busy (rebuilding) for over {timeout:g} s; "
                                     "try again in a moment") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "run"


# ============================================================================ run.json validation


def _required_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


_DOC_FIELDS = {"format": str, "version": int, "name": str, "created": str, "status": str,
               "model": dict, "train": dict, "dataset": dict}
NAME_MAX_CHARS = 200        # run.json "name": typed by a user, listed at every listing (and shown in every picker)
META_MAX_BYTES = 2 * 2**20  # run.json "meta" as JSON: the engine's notes (growth stages, collapse recipe, ...)


def check_run_name(value, field: str = "name") -> str:
    """A run name: ``value`` itself, or ValueError naming ``field`` (1 to :data:`NAME_MAX_CHARS` characters).

    Names are untrusted (a text box of the dashboard): bounded here, where they are stored, so that no
    listing reads a megabyte per run. Markup in a name is kept as text; every page escapes it.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty str, got {value!r}"[:300])
    if len(value) > NAME_MAX_CHARS:
        raise ValueError(f"{field} must be at most {NAME_MAX_CHARS} characters, got {len(value):,}")
    return value


def _validate_doc(doc: dict, where: str) -> tuple:
    """``(model_config, train_config)`` of a run document, or :class:`StoreError` naming ``where``
    (the run and its file) and the field. Uses the configs' own ``validate()`` and
    :func:`workbench.data.check_options`."""

    def bad(field: str, why: str):
        raise StoreError(f"{where}: field {field!r}: {why}")

    for key, typ in _DOC_FIELDS.items():
        if key not in doc:
            bad(key, "missing")
        if not isinstance(doc[key], typ) or isinstance(doc[key], bool):
            bad(key, f"must be a {'JSON object' if typ is dict else typ.__name__}, got {doc[key]!r}"[:300])
    if not isinstance(doc.get("meta", {}), dict):
        bad("meta", f"must be a JSON object, got {doc['meta']!r}"[:300])
    if doc.get("owner") is not None:
        try:
            check_user("owner", doc["owner"])
        except ValueError as e:
            bad("owner", str(e))
    if not isinstance(doc.get("shared", False), bool):
        bad("shared", f"must be true or false, got {doc['shared']!r}"[:300])

    m = doc["model"]
    fam = _models.FAMILIES.get(m.get("family")) if isinstance(m.get("family"), str) else None
    if fam is not None:
        for f in _required_fields(fam.config):
            if f not in m:
                bad(f"model.{f}", "missing")
    try:
        config = _models.config_from_dict(m)
        config.validate()
    except (ValueError, TypeError) as e:
        bad("model", f"invalid model config: {e}")

    t = doc["train"]
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(t) - allowed)
    if unknown:
        bad(f"train.{unknown[0]}", f"unknown train config field (allowed: {sorted(allowed)})")
    try:
        train_config = TrainConfig(**t).validate()
    except (ValueError, TypeError) as e:
        bad("train", f"invalid train config: {e}")

    try:
        _data.check_spec(doc["dataset"], allow_path=True)
    except (ValueError, TypeError) as e:
        bad(_spec_field(doc["dataset"], "dataset"), f"invalid dataset spec: {e}")
    frozen = doc.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen) or len(frozen) > _MAX_FROZEN:
        bad("frozen", f"must be a list of at most {_MAX_FROZEN} parameter names, got {frozen!r}"[:300])
    return config, train_config


_MAX_FROZEN = 100_000   # parameter names in run.json's "frozen" list


def _spec_field(spec, field: str) -> str:
    """Where in a dataset spec :func:`workbench.data.check_spec` failed, for the message: the part of a
    concatenation (``dataset.parts[1]``) and its ``name`` when that is what is wrong."""
    if not isinstance(spec, dict):
        return field
    parts = spec.get("parts")
    if isinstance(parts, list):
        for i, part in enumerate(parts):
            try:
                _data.check_spec(part, allow_path=True)
            except (ValueError, TypeError, RecursionError):
                return _spec_field(part, f"{field}.parts[{i}]")
        return field
    name = spec.get("name")
    if not isinstance(name, str) or name not in _data.names():
        return f"{field}.name"
    return field


def _check_metrics(metrics: pd.DataFrame, where: str) -> None:
    missing = [c for c in _METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise StoreError(f"{where}: metrics table lacks column(s) {missing} (needs {_METRIC_COLUMNS})")
    for c in ("step", "value"):
        if len(metrics) and not pd.api.types.is_numeric_dtype(metrics[c]):
            raise StoreError(f"{where}: metrics column {c!r} must be numeric, got dtype {metrics[c].dtype}")


def _bounded(text):
    """A stored string as the index holds it: at most :data:`NAME_MAX_CHARS` characters (a run saved before
    names were bounded keeps its whole name in run.json; listings read this)."""
    if isinstance(text, str) and len(text) > NAME_MAX_CHARS:
        return text[:NAME_MAX_CHARS - 1] + "…"
    return text


def _row(run_id: str, doc: dict, metrics: pd.DataFrame) -> list:
    """The index row of a run (the same whether written by save or rebuilt from its directory)."""
    val = metrics[metrics["split"] == "val"] if len(metrics) else metrics

    def last(metric):
        sel = val[val["metric"] == metric]["value"] if len(val) else []
        if not len(sel):
            return None
        v = float(sel.iloc[-1])
        return None if math.isnan(v) else v

    step = metrics["step"].max() if len(metrics) else 0
    steps = int(step) if pd.notna(step) else 0
    m, meta = doc["model"], doc.get("meta", {})
    return [run_id, _bounded(doc["name"]), doc["created"], doc["dataset"].get("name"), m["family"], m.get("n_layers"),
            m.get("d_model"), steps, doc["status"], last("loss"), last("acc"), _bounded(meta.get("group")), meta.get("stage"),
            meta.get("parent"), doc.get("owner"), int(doc.get("shared", False))]


# ============================================================================ the store


class RunStore:
    """Save, list, load and delete runs. Safe to share between notebooks and dashboard sessions
    (several processes may save at once). Opening a store cleans up after crashed saves
    (:meth:`reconcile`); a bad index is reported, not fatal (``index_error``)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.root = Path(path).expanduser() if path is not None else default_home()
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.sqlite"
        self._lock_path = self.root / ".index.lock"   # shared: a save, delete or share; exclusive: rebuild_index
        self.index_error: StoreError | None = None   # set when index.sqlite is corrupt or foreign
        self._broken: dict[str, str] = {}
        self.reconcile()

    @property
    def index_path(self) -> Path:
        return self._index

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # -------------------------------------------------------------- index access
    def _index_failure(self, reason: str) -> StoreError:
        return StoreError(f"{self._index}: {reason}. The runs in {self.runs_dir} are not affected: call "
                          "RunStore.rebuild_index() (store.rebuild_index()) to move this file aside and rebuild "
                          "the index from the run directories")

    def _translate(self, e: sqlite3.Error) -> StoreError:
        msg = str(e)
        if isinstance(e, sqlite3.OperationalError) and any(
                s in msg for s in ("locked", "busy", "unable to open", "readonly", "disk I/O", "full")):
            return StoreError(f"{self._index}: cannot use the run index now: {msg}")
        return self._index_failure(f"not a readable run index (corrupt or foreign SQLite file: {msg})")

    def _check_schema(self, db: sqlite3.Connection, deep: bool = False) -> None:
        """Create the runs table in an empty database; add the owner columns to an index written
        before them; refuse any other schema."""
        if deep:
            result = db.execute("PRAGMA quick_check").fetchone()
            if not result or result[0] != "ok":
                raise self._index_failure(f"corrupt SQLite file (quick_check: {result[0] if result else None})")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" in tables:
            cols = [r[1] for r in db.execute("PRAGMA table_info(runs)")]
            if cols != _COLUMNS and cols[:len(_OLD_COLUMNS)] == _OLD_COLUMNS and set(cols) <= set(_COLUMNS):
                self._migrate(db)
                cols = [r[1] for r in db.execute("PRAGMA table_info(runs)")]
            if cols != _COLUMNS:
                raise self._index_failure(f"foreign 'runs' table (columns {cols}, expected {_COLUMNS})")
            return
        others = sorted(t for t in tables if not t.startswith("sqlite_"))
        if others:
            raise self._index_failure(f"foreign SQLite file (tables {others}, no 'runs' table)")
        db.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE}")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Add the columns an older index lacks, in one write transaction (several processes may open
        the old file at once: the second finds the columns there after taking the lock)."""
        db.commit()
        db.execute("BEGIN IMMEDIATE")
        try:
            cols = [r[1] for r in db.execute("PRAGMA table_info(runs)")]
            for name in _COLUMNS[len(_OLD_COLUMNS):]:
                if name not in cols:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {_ADDED[name]}")
            db.commit()
        except BaseException:
            db.rollback()
            raise

    @contextlib.contextmanager
    def _session(self, deep: bool = False):
        """A connection to the checked index, committed on success and always closed.
        Any SQLite failure comes out as a :class:`StoreError` naming the file."""
        db = None
        try:
            db = sqlite3.connect(self._index, timeout=30)
            self._check_schema(db, deep=deep)
            yield db
            db.commit()
        except sqlite3.Error as e:
            err = self._translate(e)
            raise err from None
        finally:
            if db is not None:
                db.close()

    def _usable_index(self):
        """A session on the index, or the recorded ``index_error`` (re-checked: another process
        may have rebuilt it). A deleted index is rebuilt from the run directories at once."""
        if not self._index.exists():
            self.reconcile()
        if self.index_error is not None:
            try:
                with self._session(deep=True):
                    pass
            except StoreError:
                raise self.index_error from None
            self.index_error = None
        return self._session()

    # -------------------------------------------------------------- recovery
    def reconcile(self) -> dict:
        """Bring the index in line with the run directories (called on open); returns what it did.

        Removes stale temporary directories and files (see the module docstring), indexes
        complete run directories that have no index row (killed between rename and commit),
        drops index rows whose directory is gone and remembers directories that fail
        validation (:meth:`broken`). With a bad index only the clean-up runs and
        ``index_error`` is set. Returns ``{"removed": [paths], "indexed": [run ids],
        "dropped": [run ids], "broken": {run_id: reason}}``.
        """
        report = {"removed": self._remove_stale(), "indexed": [], "dropped": [], "broken": {}}
        try:
            with self._session(deep=True) as db:
                indexed = {r[0] for r in db.execute("SELECT run_id FROM runs")}
        except StoreError as e:   # reported, not raised: the store opens and load() works without the index
            self.index_error = e
            return report
        self.index_error = None
        dirs = self._run_dirs()          # listed after the SELECT: a row seen there has its directory already
        rows, broken = self._rows_for(sorted(set(dirs) - indexed))
        gone = sorted(indexed - set(dirs))
        with self._session() as db:
            db.executemany(f"INSERT OR IGNORE INTO runs VALUES ({', '.join('?' * len(_COLUMNS))})", rows)
            db.executemany("DELETE FROM runs WHERE run_id = ?", [(r,) for r in gone])
        self._broken = broken
        report.update(indexed=[r[0] for r in rows], dropped=gone, broken=dict(broken))
        return report

    def rebuild_index(self) -> dict:
        """Build a new index from the run directories and put it in place of ``index.sqlite``.

        The old file (corrupt, foreign or fine) is moved aside to ``index.sqlite.bak-<UTC time>`` in the
        store's root; the newest :data:`INDEX_BACKUPS` of those are kept, older ones removed. Directories
        that fail validation are not indexed and are reported (also by :meth:`broken`). The rebuild holds
        the store's lock exclusively from the scan of the run directories to the replacement of the file,
        and every save, delete and share holds it (shared) from its directory change to its index commit,
        so a run saved meanwhile -- by any thread or process -- is in the new index. A teacher's action
        on a class server (the pages refuse it to students). Returns ``{"indexed": [run ids], "broken":
        {run_id: reason}, "moved_to": Path | None, "removed": [old backups]}``.
        """
        self._remove_stale()
        with _file_lock(self._lock_path, exclusive=True):
            rows, broken = self._rows_for(sorted(self._run_dirs()))
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".index.sqlite.{_writer_tag()}", suffix=".tmp")
            os.close(fd)
            moved = None
            try:
                db = sqlite3.connect(tmp)
                try:
                    db.execute(f"CREATE TABLE {_TABLE}")
                    db.executemany(f"INSERT OR IGNORE INTO runs VALUES ({', '.join('?' * len(_COLUMNS))})", rows)
                    db.commit()
                finally:
                    db.close()
                _fsync(tmp)
                if self._index.exists():
                    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
                    n = 1 + max((int(m.group(2) or 1) for m in map(_BACKUP.fullmatch, (
                        p.name for p in self.root.glob(f"index.sqlite.bak-{stamp}*"))) if m and m.group(1) == stamp),
                                default=0)   # later than every backup of this second, pruned or not
                    moved = self.root / (f"index.sqlite.bak-{stamp}" + (f"-{n}" if n > 1 else ""))
                    os.replace(self._index, moved)
                    for suffix in ("-journal", "-wal", "-shm"):   # a hot journal belongs to the old file
                        side = self.root / f"index.sqlite{suffix}"
                        if side.exists():
                            os.replace(side, Path(f"{moved}{suffix}"))
                os.replace(tmp, self._index)
                _fsync(self.root, directory=True)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        self.index_error = None
        self._broken = broken
        return {"indexed": [r[0] for r in rows], "broken": dict(broken), "moved_to": moved,
                "removed": self._prune_backups()}

    def _prune_backups(self) -> list[str]:
        """Remove all but the newest :data:`INDEX_BACKUPS` ``index.sqlite.bak-*`` files (with their journals)."""
        found = []
        for p in self.root.glob("index.sqlite.bak-*"):
            m = _BACKUP.fullmatch(p.name)
            if m:
                found.append(((m.group(1), int(m.group(2) or 1)), p))
        found.sort(key=lambda t: t[0])
        removed = []
        for _, p in found[:max(0, len(found) - INDEX_BACKUPS)]:
            for q in (p, *(Path(f"{p}{suffix}") for suffix in ("-journal", "-wal", "-shm"))):
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
            removed.append(str(p))
        return removed

    def broken(self) -> pd.DataFrame:
        """Run directories that are not indexed because they fail validation (as of the last
        :meth:`reconcile` or :meth:`rebuild_index`): columns ``run_id``, ``path``, ``problem``."""
        return pd.DataFrame([{"run_id": k, "path": str(self.runs_dir / k), "problem": v}
                             for k, v in sorted(self._broken.items())], columns=["run_id", "path", "problem"])

    def _run_dirs(self) -> list[str]:
        return [p.name for p in self.runs_dir.iterdir() if not p.name.startswith(".") and p.is_dir()]

    def _rows_for(self, run_ids: list[str]) -> tuple[list, dict]:
        """Index rows of valid run directories (in saving order) and the reasons of the others."""
        found, broken = [], {}
        for rid in run_ids:
            if not _RUN_ID.fullmatch(rid):
                broken[rid] = f"{self.runs_dir / rid}: directory name is not a valid run id"
                continue
            try:
                doc, _, metrics = self._read_run(rid, allow_nonfinite=True)
                order = (self.runs_dir / rid / "run.json").stat().st_mtime_ns
            except StoreError as e:
                broken[rid] = str(e)
                continue
            except Exception as e:   # noqa: BLE001 -- one odd directory must not stop the store from opening
                broken[rid] = f"{self.runs_dir / rid}: {type(e).__name__}: {e}"
                continue
            found.append(((doc["created"], order), _row(rid, doc, metrics)))
        found.sort(key=lambda t: t[0])
        return [row for _, row in found], broken

    def _remove_stale(self) -> list[str]:
        """Remove temporary run directories, leftovers of deletes and temporary index files whose
        writer is gone; returns their paths."""
        now, removed = time.time(), []
        candidates = [p for p in self.runs_dir.iterdir() if p.name.startswith(".tmp-") and _is_stale(p, now)]
        candidates += [p for p in self.runs_dir.iterdir() if p.name.startswith(".del-")]   # a delete was cut short
        candidates += [p for p in self.root.glob(".index.sqlite.*.tmp") if _is_stale(p, now)]
        for p in candidates:
            _remove(p)
            removed.append(str(p))
        return removed

    # -------------------------------------------------------------- save
    def save(self, run: Run, name: str | None = None, owner: str | None = None) -> str:
        """Write a run atomically and index it; returns the new run id (also set on ``run.run_id``).

        ``owner``: the signed-in user the run belongs to (:func:`workbench.classroom.check_user`),
        None without sign-in. The run is checked as ``load`` would check it and the index is
        checked before anything is written; if indexing fails the directory is taken back, so a
        failed save leaves nothing. Once ``save`` returns, the run is on disk and indexed.
        """
        name = check_run_name(name or run.name)
        if owner is not None:
            check_user("owner", owner)
        created = _dt.datetime.now(_dt.timezone.utc)
        run_id = f"{created:%Y%m%d-%H%M%S}-{_slug(name)}-{uuid.uuid4().hex[:6]}"
        cfg = run.model.config
        doc = {
            "format": FORMAT, "version": VERSION, "run_id": run_id, "name": name,
            "created": created.isoformat(timespec="seconds"), "status": run.status,
            "model": _models.config_to_dict(cfg),
            "train": dataclasses.asdict(run.train_config), "dataset": run.dataset, "meta": run.meta,
            "frozen": _frozen_names(run.model), "owner": owner, "shared": False,
        }
        text = json.dumps(doc, indent=2, default=str)
        doc = json.loads(text)                      # exactly what load() will read
        meta_bytes = len(json.dumps(doc["meta"]).encode("utf-8"))
        if meta_bytes > META_MAX_BYTES:
            raise ValueError(f"meta must be at most {META_MAX_BYTES:,} bytes as JSON, got {meta_bytes:,}")
        _validate_doc(doc, f"run {name!r} (not saved)")
        if not isinstance(run.metrics, pd.DataFrame):
            raise StoreError(f"run {name!r} (not saved): metrics must be a DataFrame, got {type(run.metrics).__name__}")
        _check_metrics(run.metrics, f"run {name!r} (not saved)")
        row = _row(run_id, doc, run.metrics)
        with self._usable_index():
            pass                                    # a bad index fails here, before the directory is written
        final = self.runs_dir / run_id
        tmp_dir = Path(tempfile.mkdtemp(dir=self.runs_dir, prefix=f".tmp-{_writer_tag()}"))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
            _write_weights(tmp_dir / "model.safetensors", run.model, state)
            _atomic_write(tmp_dir / "metrics.csv", lambda p: run.metrics.to_csv(p, index=False))
            _atomic_write(tmp_dir / "run.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
            with _file_lock(self._lock_path, exclusive=False):   # a rebuild of the index sees all of this or none
                os.replace(tmp_dir, final)
                _fsync(self.runs_dir, directory=True)
                try:
                    with self._session() as db:
                        # OR REPLACE: another store's reconcile may have indexed this directory already
                        db.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(_COLUMNS))})", row)
                except BaseException:
                    trash = self.runs_dir / f".del-{run_id}"
                    with contextlib.suppress(OSError):
                        os.replace(final, trash)
                        shutil.rmtree(trash, ignore_errors=True)
                    raise
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)   # already renamed (and taken back) when the commit failed
            raise
        run.run_id = run_id
        return run_id

    # -------------------------------------------------------------- read
    def list(self, user: str | None = None) -> pd.DataFrame:
        """Indexed runs, newest first (within one second: the later saved first), one row each.

        ``user=None``: every run. A user name: that user's own runs and the runs marked shared.
        Columns include ``owner`` (None for runs saved without sign-in) and ``shared`` (bool).
        """
        where, args = "", ()
        if user is not None:
            where, args = "WHERE owner = ? OR shared = 1 ", (check_user("user", user),)
        with self._usable_index() as db:
            try:
                df = pd.read_sql_query(f"SELECT * FROM runs {where}ORDER BY created DESC, rowid DESC", db,
                                       params=args)
            except (pd.errors.DatabaseError, sqlite3.Error) as e:
                raise self._index_failure(f"unreadable run index ({e})") from None
        df["shared"] = df["shared"].fillna(0).astype(bool)
        df["owner"] = df["owner"].astype(object).where(df["owner"].notna(), None)
        return df

    @staticmethod
    def _visible(doc: dict, user: str | None) -> bool:
        return user is None or doc.get("owner") == user or bool(doc.get("shared", False))

    def owner(self, run_id: str) -> str | None:
        """Who saved the run (``run.json``'s ``owner``; None for a run saved without sign-in)."""
        return self.read_json(run_id).get("owner")

    def share(self, run_id: str, shared: bool = True) -> None:
        """Mark a run as shared (every signed-in user lists and opens it, read-only) or not.

        A teacher's action: the caller checks who may do it. ``run.json`` is rewritten atomically
        (the truth), then the index row; a kill in between leaves the index behind until
        :meth:`rebuild_index`, never a half-written file.
        """
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be True or False, got {shared!r}")
        self.read_json(run_id)
        with self._usable_index():
            pass
        path = self._dir(run_id) / "run.json"
        with _file_lock(self._lock_path, exclusive=False):
            doc = self.read_json(run_id)
            if doc.get("shared", False) != shared:
                doc["shared"] = shared
                text = json.dumps(doc, indent=2)
                stamp = path.stat()

                def write(p):
                    Path(p).write_text(text, encoding="utf-8")
                    os.utime(p, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))   # keeps the saving order of rebuilds

                _atomic_write(path, write)
            with self._session() as db:
                db.execute("UPDATE runs SET shared = ? WHERE run_id = ?", (int(shared), run_id))

    def _dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id.startswith("."):
            raise StoreError(f"run_id {run_id!r} is not a valid run id")
        d = self.runs_dir / run_id
        if not d.is_dir():
            raise StoreError(f"run {run_id!r} does not exist in {self.root}")
        return d

    def read_json(self, run_id: str) -> dict:
        """The run's ``run.json`` after checking that it is one of ours and that its model config,
        train config and dataset spec pass their own validation."""
        path = self._dir(run_id) / "run.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"run {run_id!r}: {path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"run {run_id!r}: {path}: not valid JSON (truncated or foreign file): {e}") from None
        except OSError as e:
            raise StoreError(f"run {run_id!r}: {path}: unreadable ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StoreError(f"run {run_id!r}: {path}: not a depth-workbench run (format tag missing or foreign)")
        if doc.get("version") != VERSION:
            raise StoreError(f"run {run_id!r}: {path}: unsupported run format version {doc.get('version')!r} "
                             f"(expected {VERSION})")
        _validate_doc(doc, f"run {run_id!r}: {path}")
        return doc

    def _read_run(self, run_id: str, allow_nonfinite: bool = False):
        """``(doc, model, metrics)`` of a run directory, all validated."""
        doc = self.read_json(run_id)
        d = self._dir(run_id)
        config = _models.config_from_dict(doc["model"])
        try:
            model = _models.FAMILIES[config.family].model(config)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise StoreError(f"run {run_id!r}: {d / 'run.json'}: field 'model': cannot build the model: {e}") from None
        _read_weights(d / "model.safetensors", model, f"run {run_id!r}", allow_nonfinite=allow_nonfinite,
                      diverged=doc["status"] == "diverged")
        _apply_frozen(model, doc.get("frozen", []), f"run {run_id!r}: {d / 'run.json'}")
        return doc, model, self._read_metrics(run_id)

    def _read_metrics(self, run_id: str) -> pd.DataFrame:
        path = self._dir(run_id) / "metrics.csv"
        try:
            metrics = pd.read_csv(path)
        except FileNotFoundError:
            raise StoreError(f"run {run_id!r}: {path}: missing") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
            raise StoreError(f"run {run_id!r}: {path}: unreadable ({e})") from None
        _check_metrics(metrics, f"run {run_id!r}: {path}")
        return metrics

    def read_metrics(self, run_id: str, user: str | None = None) -> pd.DataFrame:
        """The run's metrics table (``metrics.csv``, validated) without building its model.

        ``run_id`` must be a run id of this store (no path: checked as every method checks it) and,
        with ``user``, one that user may open (their own or shared; None: any run). What the Runs
        page shows and exports: no file of a run is read but through here, ``read_json`` and ``load``.
        """
        if user is not None:
            check_user("user", user)
        doc = self.read_json(run_id)
        if not self._visible(doc, user):
            raise StoreError(f"run {run_id!r} belongs to another user and is not shared: {user!r} cannot open it")
        return self._read_metrics(run_id)

    def load(self, run_id: str, device: str | torch.device | None = None, *, allow_nonfinite: bool = False,
             user: str | None = None) -> Run:
        """Rebuild the model from its config and weights, with metrics and configs.

        Weights with NaN or infinite values are refused unless ``allow_nonfinite=True`` (to
        inspect a run that diverged). ``user``: open the run for this signed-in user only if it
        is theirs or shared (None: any run). Works without the index.
        """
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        if user is not None:
            check_user("user", user)
            if not self._visible(self.read_json(run_id), user):
                raise StoreError(f"run {run_id!r} belongs to another user and is not shared: {user!r} cannot open it")
        doc, model, metrics = self._read_run(run_id, allow_nonfinite=allow_nonfinite)
        if device is not None:
            model = model.to(device)
        model.eval()
        return Run(model=model, train_config=TrainConfig(**doc["train"]), dataset=doc["dataset"], metrics=metrics,
                   status=doc["status"], name=doc["name"], meta=doc.get("meta", {}), run_id=run_id)

    def delete(self, run_id: str, user: str | None = None) -> None:
        """Remove a run's files and index row.

        ``user``: the signed-in user asking; only the run's owner may delete it (a shared run of the
        teacher's stays). ``user=None``: no sign-in, or a teacher: any run.
        """
        if user is not None:
            check_user("user", user)
        d = self._dir(run_id)
        if user is not None:
            try:
                owner = self.read_json(run_id).get("owner")
            except StoreError as e:
                raise StoreError(f"{e} (its owner cannot be read, so only a teacher can delete it)") from None
            if owner != user:
                whose = f"belongs to {owner!r}" if owner is not None else "was saved without sign-in"
                raise StoreError(f"run {run_id!r} {whose}: {user!r} cannot delete it (only its owner or a teacher)")
        with self._usable_index():
            pass
        trash = self.runs_dir / f".del-{run_id}"
        with _file_lock(self._lock_path, exclusive=False):
            os.replace(d, trash)  # atomic: the run disappears at once
            with self._session() as db:
                db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        shutil.rmtree(trash, ignore_errors=True)


def _frozen_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that do not train (``requires_grad=False``): frozen blocks, embeddings, substrate.

    ``requires_grad`` is not part of a state dict, so run.json carries it; :meth:`RunStore.load` applies it."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def _apply_frozen(model: torch.nn.Module, names: list[str], where: str) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise StoreError(f"{where}: field 'frozen': not parameters of the model: {unknown[:5]}")
    for n in names:
        params[n].requires_grad_(False)


def _write_weights(path: Path, model: torch.nn.Module, state: dict) -> None:
    from safetensors.torch import save_file

    # Tied weights appear twice in the state dict; safetensors stores each tensor once.
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key in seen:
            continue
        seen[key] = k
        unique[k] = v.clone()
    _atomic_write(path, lambda p: save_file(unique, p, metadata={"format": FORMAT}))


def _read_weights(path: Path, model: torch.nn.Module, where: str, allow_nonfinite: bool = False,
                  diverged: bool = False) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise StoreError(f"{where}: {path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"{where}: {path}: not a readable safetensors file (truncated or foreign): {e}") from None
    expected = model.state_dict()
    optional = model.optional_state_keys() if hasattr(model, "optional_state_keys") else set()
    shared = {k for k in expected if k not in tensors and k not in optional}   # old files lack the fade gates
    # Keys left out at save time must be tied aliases of a stored tensor.
    for k in shared:
        if not any(expected[k] is expected[j] or expected[k].data_ptr() == expected[j].data_ptr()
                   for j in tensors if j in expected):
            raise StoreError(f"{where}: {path}: weights do not match the config: missing {k!r}")
    extra = set(tensors) - set(expected)
    if extra:
        raise StoreError(f"{where}: {path}: weights do not match the config: unexpected {sorted(extra)[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise StoreError(f"{where}: {path}: weights do not match the config: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
        if v.dtype.is_floating_point != expected[k].dtype.is_floating_point or v.is_complex():
            raise StoreError(f"{where}: {path}: weights do not match the config: {k} has dtype {v.dtype}, "
                             f"expected {expected[k].dtype}")
        if not allow_nonfinite and v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            why = "the run diverged; " if diverged else ""
            raise StoreError(f"{where}: {path}: weights contain NaN or infinite values in {k!r} ({why}pass "
                             "allow_nonfinite=True to load them anyway)")
    model.load_state_dict(tensors, strict=False)
    if hasattr(model, "check_gates"):
        try:
            model.check_gates()
        except ValueError as e:
            raise StoreError(f"{where}: {path}: {e}") from None


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
