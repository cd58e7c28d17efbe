"""The SQLite index of the run directories (derived data: the directories are the truth): its schema and
the migration of an index written before owners, the store's lock (shared by saves, exclusive for a
rebuild), and recovery after a kill (:meth:`RunIndex.reconcile`, :meth:`RunIndex.rebuild_index`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
import sqlite3
import tempfile
import time
from pathlib import Path

import pandas as pd

from .files import _fsync, _is_stale, _remove, _writer_tag
from .names import _RUN_ID, StoreError, _bounded

_OLD_COLUMNS = ["run_id", "name", "created", "dataset", "family", "n_layers", "d_model", "steps", "status",
                "val_loss", "val_acc", "group_name", "stage", "parent"]   # indexes written before owners
_COLUMNS = _OLD_COLUMNS + ["owner", "shared"]
_ADDED = {"owner": "owner TEXT", "shared": "shared INTEGER NOT NULL DEFAULT 0"}   # how an old index gets them
_TABLE = f"runs ({', '.join(_OLD_COLUMNS + list(_ADDED.values()))}, PRIMARY KEY (run_id))"
_BACKUP = re.compile(r"index\.sqlite\.bak-(\d{8}-\d{6})(?:-(\d+))?")   # rebuild_index's old files


# ============================================================================ the lock


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


# ============================================================================ the index


class RunIndex:
    """The SQLite index of a store's run directories: sessions on it, its schema (an index written before
    owners gets their columns), and its recovery (:meth:`reconcile`, :meth:`rebuild_index`, :meth:`broken`).

    :class:`RunStore` is built on it. The index holds derived data only: a run directory is read and
    validated by ``_read_run``, which the store defines."""

    def __init__(self, root: Path):
        self.root = root
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.sqlite"
        self._lock_path = self.root / ".index.lock"   # shared: a save, delete or share; exclusive: rebuild_index
        self.index_error: StoreError | None = None   # set when index.sqlite is corrupt or foreign
        self._broken: dict[str, str] = {}

    @property
    def index_path(self) -> Path:
        return self._index

    def _read_run(self, run_id: str, allow_nonfinite: bool = False):
        raise NotImplementedError   # the store reads and validates a run directory

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
