"""What the store is called and what it refuses: :class:`StoreError`, the store's home folder, the run
format tag, run ids, run names and user names. Names are untrusted (a text box, a login form): they are
checked and bounded here, where they are stored (``docs/security.md``, stored user strings).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ...core.checks import USER_MAX_CHARS, check_user  # noqa: F401  (re-exported: the store's names)

FORMAT = "depth-workbench-run"
VERSION = 1
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]+")


class StoreError(RuntimeError):
    """A run is missing, truncated, foreign or inconsistent, or the index cannot be used."""


def default_home() -> Path:
    """``$WORKBENCH_HOME`` if set, else the platform's user data directory for the workbench."""
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("depth-workbench", appauthor=False))


# ============================================================================ user names
# one rule for every user name (signed-in users, run owners, teachers): workbench.core.checks.check_user


# ============================================================================ run names


NAME_MAX_CHARS = 200        # run.json "name": typed by a user, listed at every listing (and shown in every picker)


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


def _bounded(text):
    """A stored string as the index holds it: at most :data:`NAME_MAX_CHARS` characters (a run saved before
    names were bounded keeps its whole name in run.json; listings read this)."""
    if isinstance(text, str) and len(text) > NAME_MAX_CHARS:
        return text[:NAME_MAX_CHARS - 1] + "…"
    return text


def _slug(text: str) -> str:
    """The part of a new run id that comes from its name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "run"
