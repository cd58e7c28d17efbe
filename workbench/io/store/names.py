"""What the store is called and what it refuses: :class:`StoreError`, the store's home folder, the run
format tag, run ids, run names and user names. Names are untrusted (a text box, a login form): they are
checked and bounded here, where they are stored (``docs/security.md``, stored user strings).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

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
