"""What each learner answered: predictions, check results, measured outcomes and explanations, one small
JSON file per user under the run store's home (``<WORKBENCH_HOME>/lessons/<user>.json``).

The store is small and defensive (``docs/security.md``, stored user strings):

- one file per user, named by the checked user name (:func:`workbench.core.checks.check_user`: no
  slashes, no dots first); only registered lesson, question and exercise names are keys;
- bounded: an explanation at most :data:`EXPLANATION_CHARS` characters, a message :data:`MESSAGE_CHARS`,
  a file :data:`FILE_BYTES` (more is refused); numbers finite;
- atomic writes (temporary file, fsync, rename: :func:`workbench.io.store.files.atomic_write`) under a
  per-user lock, mode 0640 (a teacher's group may read, other students may not);
- owner-checked: :meth:`LessonRecords.write` only for the user the caller is; on read a file must be
  owned by this process's account or by the operating-system account of its user (on a shared machine a
  student cannot plant a file in another student's name), and must name its own user inside.
  Reading other users' records is the teacher's (:meth:`LessonRecords.table` with ``users=None``).

A class on one machine (README "Lessons"): ``WORKBENCH_HOME`` the same folder for the dashboard and every
student's JupyterLab, its ``lessons/`` folder owned by the teachers' group with mode 3733 (setgid: files
get the group; sticky: nobody renames over a file they do not own; no listing for others).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import pandas as pd

from ..core import checks
from ..io.store.files import atomic_write
from ..io.store.index import _file_lock
from ..io.store.names import default_home

EXPLANATION_CHARS = 600
MESSAGE_CHARS = 600
FILE_BYTES = 256 * 1024
KINDS = ("predictions", "measures", "checks", "explanations")
COLUMNS = ["user", "lesson", "kind", "key", "value", "passed", "text", "attempts", "time"]


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _empty(user: str) -> dict:
    return {"format": "depth-workbench-lessons", "version": 1, "user": user, "lessons": {}}


class LessonRecords:
    """The lesson records under ``home`` (default: the run store's home, ``WORKBENCH_HOME``)."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.root = self.home / "lessons"
        self.refused: list[str] = []   # files skipped by the last read of the class, and why

    # ---------------------------------------------------------------- files
    def _path(self, user: str) -> Path:
        return self.root / f"{checks.check_user('user', user)}.json"

    @staticmethod
    def _os_uid(user: str) -> int | None:
        try:
            import pwd
        except ImportError:   # pragma: no cover - Windows
            return None
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            return None

    def _owner_ok(self, path: Path, user: str) -> bool:
        if not hasattr(os, "getuid"):   # pragma: no cover - Windows: no owners to check
            return True
        uid = path.stat().st_uid
        return uid == os.getuid() or uid == self._os_uid(user)

    def _load(self, user: str) -> dict:
        """``user``'s record (empty if none); StoreError-free: a foreign or broken file raises ValueError."""
        path = self._path(user)
        if not path.exists():
            return _empty(user)
        if not self._owner_ok(path, user):
            raise ValueError(f"{path}: not written by {user} (owned by another account): refused")
        if path.stat().st_size > FILE_BYTES:
            raise ValueError(f"{path}: larger than {FILE_BYTES} bytes: refused")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable lesson record ({e})") from None
        if not isinstance(doc, dict) or doc.get("user") != user or not isinstance(doc.get("lessons"), dict):
            raise ValueError(f"{path}: not a lesson record of {user}: refused")
        return doc

    def read(self, user: str) -> dict:
        """``user``'s record: ``{"user", "lessons": {lesson: {kind: {key: entry}}}}``."""
        return self._load(user)

    def write(self, user: str, lesson: str, kind: str, key: str, entry: dict, *, as_user: str) -> dict:
        """Set ``entry`` under ``lesson/kind/key`` of ``user``'s record (only when ``as_user`` is ``user``).

        Returns the entry as stored. ``entry`` values: strings (bounded), finite numbers, booleans, None.
        """
        checks.check_user("user", user)
        if as_user != user:
            raise PermissionError(f"{as_user} may not write the lesson record of {user}")
        checks.check_choice("kind", kind, KINDS)
        entry = self._clean(entry)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(user)
        with _file_lock(self.root / f".{user}.lock", exclusive=True, timeout=10.0, what="the lesson record"):
            doc = self._load(user)
            doc["lessons"].setdefault(lesson, {}).setdefault(kind, {})[key] = entry
            text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
            if len(text.encode("utf-8")) > FILE_BYTES:
                raise ValueError(f"the lesson record of {user} would exceed {FILE_BYTES} bytes: refused")

            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(tmp, 0o640)
            atomic_write(path, write)
        return entry

    @staticmethod
    def _clean(entry: dict) -> dict:
        if not isinstance(entry, dict):
            raise ValueError(f"entry must be a dict, got {type(entry).__name__}")
        out = {}
        for k, v in entry.items():
            if isinstance(v, str):
                limit = EXPLANATION_CHARS if k == "text" else MESSAGE_CHARS
                if len(v) > limit:
                    raise ValueError(f"{k} must be at most {limit} characters, got {len(v)}")
            elif isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
            elif not (v is None or isinstance(v, (bool, int, float))):
                raise ValueError(f"{k} must be text, a number, a flag or None, got {type(v).__name__}")
            out[str(k)] = v
        out.setdefault("time", _now())
        return out

    # ---------------------------------------------------------------- the class
    def users(self) -> list[str]:
        """User names with a record file here (names that are not user names are left out)."""
        if not self.root.is_dir():
            return []
        try:
            paths = sorted(p for p in self.root.iterdir() if p.suffix == ".json")
        except OSError as e:   # a folder this account may not list (a student's, in a class: mode 3733)
            self.refused.append(f"{self.root}: cannot list the lesson records ({e.strerror or e})")
            return []
        out = []
        for p in paths:
            try:
                out.append(checks.check_user("user", p.stem))
            except ValueError:
                continue
        return out

    def table(self, lesson: str | None = None, users: list[str] | None = None) -> pd.DataFrame:
        """Long table of records: ``user, lesson, kind, key, value, passed, text, attempts, time``.

        ``users``: whose records (None: everyone's, the teacher's view). Files that fail the owner or
        format checks are skipped and named in :attr:`refused`.
        """
        self.refused = []
        rows = []
        for user in (self.users() if users is None else users):   # users() may add to refused
            try:
                doc = self._load(user)
            except (ValueError, OSError) as e:
                self.refused.append(str(e))
                continue
            for les, kinds in doc["lessons"].items():
                if lesson is not None and les != lesson or not isinstance(kinds, dict):
                    continue
                for kind, entries in kinds.items():
                    if kind not in KINDS or not isinstance(entries, dict):
                        continue
                    for key, e in entries.items():
                        if not isinstance(e, dict):
                            continue
                        rows.append({"user": user, "lesson": les, "kind": kind, "key": key, "value": e.get("value"),
                                     "passed": e.get("passed"), "text": e.get("text") or e.get("message"),
                                     "attempts": e.get("attempts"), "time": e.get("time")})
        return pd.DataFrame(rows, columns=COLUMNS)
