"""The run store: save, list, load, share and delete runs, with their owners (a signed-in user sees their own
runs and the shared ones). Every file of a run is read through here: ``read_json``, ``read_metrics``,
``load``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

import pandas as pd
import torch

from ...core import models as _models
from ...core.training import Run, TrainConfig
from .document import META_MAX_BYTES, _check_metrics, _validate_doc
from .files import _apply_frozen, _frozen_names, _fsync, _read_weights, _write_weights, _writer_tag, atomic_write
from .index import _COLUMNS, RunIndex, _file_lock, _row
from .names import _RUN_ID, FORMAT, VERSION, StoreError, _slug, check_run_name, check_user, default_home


# ============================================================================ the store


class RunStore(RunIndex):
    """Save, list, load and delete runs. Safe to share between notebooks and dashboard sessions
    (several processes may save at once). Opening a store cleans up after crashed saves
    (:meth:`reconcile`); a bad index is reported, not fatal (``index_error``)."""

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__(Path(path).expanduser() if path is not None else default_home())
        self.reconcile()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

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
            atomic_write(tmp_dir / "metrics.csv", lambda p: run.metrics.to_csv(p, index=False))
            atomic_write(tmp_dir / "run.json", lambda p: Path(p).write_text(text, encoding="utf-8"))
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
        path = self.run_dir(run_id) / "run.json"
        with _file_lock(self._lock_path, exclusive=False):
            doc = self.read_json(run_id)
            if doc.get("shared", False) != shared:
                doc["shared"] = shared
                text = json.dumps(doc, indent=2)
                stamp = path.stat()

                def write(p):
                    Path(p).write_text(text, encoding="utf-8")
                    os.utime(p, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))   # keeps the saving order of rebuilds

                atomic_write(path, write)
            with self._session() as db:
                db.execute("UPDATE runs SET shared = ? WHERE run_id = ?", (int(shared), run_id))

    def run_dir(self, run_id: str) -> Path:
        """The folder of run ``run_id`` (``runs/<run_id>``), or :class:`StoreError` for an id that is not a run
        id of this store (no path, no dot name) or a run that does not exist. Where a run's extra files (its
        lenses) live; nothing in it is trusted before the store's own reads validate it."""
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id.startswith("."):
            raise StoreError(f"run_id {run_id!r} is not a valid run id")
        d = self.runs_dir / run_id
        if not d.is_dir():
            raise StoreError(f"run {run_id!r} does not exist in {self.root}")
        return d

    def read_json(self, run_id: str) -> dict:
        """The run's ``run.json`` after checking that it is one of ours and that its model config,
        train config and dataset spec pass their own validation."""
        path = self.run_dir(run_id) / "run.json"
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
        d = self.run_dir(run_id)
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
        path = self.run_dir(run_id) / "metrics.csv"
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
        d = self.run_dir(run_id)
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
