"""Run store: one directory per run plus an SQLite index. Never pickle.

Layout under the root (``RunStore(path)``; default ``$WORKBENCH_HOME`` or the user's
data directory)::

    index.sqlite                 one row per run (for list())
    runs/<run_id>/run.json       format tag, model config, train config, dataset spec, meta
    runs/<run_id>/model.safetensors
    runs/<run_id>/metrics.csv    tidy metrics

A run directory is written under a temporary name and renamed into place, each file
itself via temporary file + ``os.replace``, so a crash never leaves a half-written run
that looks complete. Loading checks the format tag and the weights against the config
and raises :class:`StoreError` with the file and the reason otherwise.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

import pandas as pd
import torch

from . import models as _models
from .training import Run, TrainConfig

__all__ = ["RunStore", "StoreError", "default_home"]

FORMAT = "depth-workbench-run"
VERSION = 1
_COLUMNS = ["run_id", "name", "created", "dataset", "family", "n_layers", "d_model", "steps", "status",
            "val_loss", "val_acc", "group_name", "stage", "parent"]


class StoreError(RuntimeError):
    """A run is missing, truncated, foreign or inconsistent."""


def default_home() -> Path:
    """``$WORKBENCH_HOME`` if set, else the platform's user data directory for the workbench."""
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("depth-workbench", appauthor=False))


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "run"


class RunStore:
    """Save, list, load and delete runs. Safe to share between notebooks and dashboard sessions."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.root = Path(path).expanduser() if path is not None else default_home()
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.sqlite"
        with self._db() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(_COLUMNS)}, PRIMARY KEY (run_id))")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._index, timeout=30)
        return db

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # -------------------------------------------------------------- save
    def save(self, run: Run, name: str | None = None) -> str:
        """Write a run atomically and index it; returns the new run id (also set on ``run.run_id``)."""
        name = name or run.name
        created = _dt.datetime.now(_dt.timezone.utc)
        run_id = f"{created:%Y%m%d-%H%M%S}-{_slug(name)}-{uuid.uuid4().hex[:6]}"
        cfg = run.model.config
        doc = {
            "format": FORMAT, "version": VERSION, "run_id": run_id, "name": name,
            "created": created.isoformat(timespec="seconds"), "status": run.status,
            "model": _models.config_to_dict(cfg),
            "train": dataclasses.asdict(run.train_config), "dataset": run.dataset, "meta": run.meta,
        }
        tmp_dir = Path(tempfile.mkdtemp(dir=self.runs_dir, prefix=".tmp-"))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
            _write_weights(tmp_dir / "model.safetensors", run.model, state)
            _atomic_write(tmp_dir / "metrics.csv", lambda p: run.metrics.to_csv(p, index=False))
            _atomic_write(tmp_dir / "run.json", lambda p: Path(p).write_text(json.dumps(doc, indent=2, default=str)))
            os.replace(tmp_dir, self.runs_dir / run_id)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        val = run.metrics[(run.metrics["split"] == "val")] if len(run.metrics) else run.metrics
        last = lambda metric: (float(val[val["metric"] == metric]["value"].iloc[-1])  # noqa: E731
                               if len(val) and (val["metric"] == metric).any() else None)
        steps = int(run.metrics["step"].max()) if len(run.metrics) else 0
        row = [run_id, name, doc["created"], run.dataset.get("name"), cfg.family, cfg.n_layers, cfg.d_model,
               steps, run.status, last("loss"), last("acc"), run.meta.get("group"), run.meta.get("stage"),
               run.meta.get("parent")]
        with self._db() as db:
            db.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(_COLUMNS))})", row)
        run.run_id = run_id
        return run_id

    # -------------------------------------------------------------- read
    def list(self) -> pd.DataFrame:
        """All indexed runs, newest first (within one second: the later saved first), one row each."""
        with self._db() as db:
            df = pd.read_sql_query("SELECT * FROM runs ORDER BY created DESC, rowid DESC", db)
        return df

    def _dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id) or run_id.startswith("."):
            raise StoreError(f"run_id {run_id!r} is not a valid run id")
        d = self.runs_dir / run_id
        if not d.is_dir():
            raise StoreError(f"run {run_id!r} does not exist in {self.root}")
        return d

    def read_json(self, run_id: str) -> dict:
        """The run's ``run.json`` after checking that it is one of ours."""
        path = self._dir(run_id) / "run.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{path}: missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: not valid JSON (truncated or foreign file): {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StoreError(f"{path}: not a depth-workbench run (format tag missing or foreign)")
        if doc.get("version") != VERSION:
            raise StoreError(f"{path}: unsupported run format version {doc.get('version')!r} (expected {VERSION})")
        return doc

    def load(self, run_id: str, device: str | torch.device | None = None) -> Run:
        """Rebuild the model from its config and weights, with metrics and configs."""
        doc = self.read_json(run_id)
        d = self._dir(run_id)
        try:
            config = _models.config_from_dict(doc["model"])
            model = (_models.ResidualMLP if config.family == "mlp" else _models.Transformer)(config)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{d / 'run.json'}: invalid model config: {e}") from None
        _read_weights(d / "model.safetensors", model)
        try:
            metrics = pd.read_csv(d / "metrics.csv")
        except FileNotFoundError:
            raise StoreError(f"{d / 'metrics.csv'}: missing") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise StoreError(f"{d / 'metrics.csv'}: unreadable ({e})") from None
        if device is not None:
            model = model.to(device)
        model.eval()
        return Run(model=model, train_config=TrainConfig(**doc["train"]), dataset=doc["dataset"], metrics=metrics,
                   status=doc["status"], name=doc["name"], meta=doc.get("meta", {}), run_id=run_id)

    def delete(self, run_id: str) -> None:
        """Remove a run's files and index row."""
        d = self._dir(run_id)
        trash = self.runs_dir / f".del-{run_id}"
        os.replace(d, trash)  # atomic: the run disappears at once
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        shutil.rmtree(trash, ignore_errors=True)


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


def _read_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise StoreError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"{path}: not a readable safetensors file (truncated or foreign): {e}") from None
    expected = model.state_dict()
    shared = {k for k in expected if k not in tensors}
    # Keys left out at save time must be tied aliases of a stored tensor.
    for k in shared:
        if not any(expected[k] is expected[j] or expected[k].data_ptr() == expected[j].data_ptr()
                   for j in tensors if j in expected):
            raise StoreError(f"{path}: weights do not match the config: missing {k!r}")
    extra = set(tensors) - set(expected)
    if extra:
        raise StoreError(f"{path}: weights do not match the config: unexpected {sorted(extra)[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise StoreError(f"{path}: weights do not match the config: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)
