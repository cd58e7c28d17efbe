"""Classroom mode: one shared ``panel serve`` with sign-in, teachers, and the credentials it reads.

Without sign-in (a laptop, ``make serve``) the dashboard binds to 127.0.0.1 and nobody else can reach
it; every run belongs to nobody in particular. A classroom server listens on every interface, so it
must sign users in: Panel's ``--basic-auth`` with a credentials file (a JSON object of user name ->
password, written here with mode 0600), a ``--cookie-secret`` that signs the login cookie, the
teacher's ``host:port`` as the only allowed websocket origin, a session token that lives as long as
a class, and one process (``--num-procs 1``: one job queue). :func:`serve_command` builds that line;
``python -m workbench.classroom`` (``make classroom``) checks everything and runs it.

Users named in ``WORKBENCH_TEACHERS`` (comma-separated) see the Teacher page
(:mod:`workbench.ui.teacher`). Signed-in names reach the run store as owners
(:meth:`workbench.store.RunStore.save`), so :func:`check_user` bounds them.

Panel is never imported here (the engine does not import Panel); its version is read from the
installed distribution's metadata. Sign-in needs Panel 1.7.5 or later (cross-site scripting
fixes in the login and OAuth templates, 1.7.4/1.7.5).

Command line::

    python -m workbench.classroom credentials students.txt -o classroom-users.json
    python -m workbench.classroom serve --credentials classroom-users.json --host teacher.local --port 5006
    python -m workbench.classroom serve ... --print     # only print the panel serve line
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import socket
import stat
import sys
import tempfile
from pathlib import Path

from .store import USER_MAX_CHARS, check_user   # user names are checked where they become run owners

__all__ = ["check_user", "teachers", "is_teacher", "MIN_PANEL", "panel_version", "check_panel",
           "read_class_list", "make_credentials", "read_credentials", "new_cookie_secret", "serve_command",
           "CLASS_SECONDS", "USER_MAX_CHARS"]

MIN_PANEL = (1, 7, 5)
CLASS_SECONDS = 2 * 60 * 60        # default --session-token-expiration: a double lesson
_SECONDS_RANGE = (300, 7 * 24 * 60 * 60)
MAX_USERS = 1000                   # names in one class list / credentials file
_PASSWORD_MAX = 256
_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]{2,45}\]")


class ClassroomError(RuntimeError):
    """The server cannot be started in classroom mode as asked (Panel too old, credentials unusable)."""


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ============================================================================ teachers


def teachers() -> tuple[str, ...]:
    """The user names in ``WORKBENCH_TEACHERS`` (comma-separated; spaces around names ignored), in order.

    Unset or empty: no teachers. A bad name raises ValueError naming the variable.
    """
    raw = os.environ.get("WORKBENCH_TEACHERS", "")
    if len(raw) > MAX_USERS * (USER_MAX_CHARS + 1):
        raise ValueError(f"WORKBENCH_TEACHERS must list at most {MAX_USERS} names, got {len(raw)} characters")
    names = []
    for part in raw.split(","):
        part = part.strip()
        if part:
            check_user("WORKBENCH_TEACHERS entry", part)
            if part not in names:
                names.append(part)
    return tuple(names)


def is_teacher(user: str | None) -> bool:
    """Whether the signed-in ``user`` is named in ``WORKBENCH_TEACHERS``. ``None`` (no sign-in) is no teacher."""
    if user is None:
        return False
    check_user("user", user)
    return user in teachers()


# ============================================================================ Panel


def panel_version() -> str | None:
    """The installed Panel's version (from its distribution metadata; Panel is not imported), or None."""
    from importlib import metadata

    try:
        return metadata.version("panel")
    except metadata.PackageNotFoundError:
        return None


def _at_least(text: str, minimum: tuple) -> bool:
    """Whether version ``text`` is at least ``minimum`` (a pre-release of ``minimum`` is older)."""
    try:
        from packaging.version import InvalidVersion, Version   # packaging comes with bokeh, hence with Panel
    except ImportError:
        m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?((?:\.post\d+)?)(.*)", text)
        if not m:
            raise ValueError(f"cannot read the Panel version {text!r}") from None
        nums = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        return nums > minimum or (nums == minimum and not m.group(5))
    try:
        return Version(text) >= Version(".".join(map(str, minimum)))
    except InvalidVersion:
        raise ValueError(f"cannot read the Panel version {text!r}") from None


def check_panel(version: str | None = None) -> str:
    """The installed Panel's version if it can serve with sign-in safely; else :class:`ClassroomError`.

    Needs ``--basic-auth`` and the login-template XSS fixes: Panel >= 1.7.5 (a pre-release of 1.7.5
    counts as older). ``version``: check this version string instead of the installed one (tests).
    """
    if version is None:
        version = panel_version()
        if version is None:
            raise ClassroomError("Panel is not installed: classroom mode needs panel >= 1.7.5 (pip install 'panel>=1.7.5')")
        _check_basic_auth_support()
    need = ".".join(map(str, MIN_PANEL))
    try:
        ok = _at_least(version, MIN_PANEL)
    except ValueError as e:
        raise ClassroomError(f"{e}: classroom mode needs panel >= {need}") from None
    if not ok:
        raise ClassroomError(f"Panel {version} is installed; classroom mode (sign-in with --basic-auth) needs panel >= "
                             f"{need}, which fixes cross-site scripting holes in its login templates: "
                             f"pip install 'panel>={need}'")
    return version


def _check_basic_auth_support() -> None:
    """The installed Panel has a basic-auth provider (read from its files, not imported)."""
    from importlib import metadata

    try:
        auth = Path(metadata.distribution("panel").locate_file("panel/auth.py"))
        text = auth.read_text(encoding="utf-8")
    except (OSError, metadata.PackageNotFoundError):
        return   # an unusual installation (zipped): the version check stands alone
    if "class BasicAuthProvider" not in text:
        raise ClassroomError(f"the installed Panel ({auth}) has no BasicAuthProvider: --basic-auth is not supported; "
                             "install panel >= 1.7.5")


# ============================================================================ credentials


def read_class_list(path: str | os.PathLike) -> list[str]:
    """User names from a text file, one a line (blank lines and ``#`` comments skipped), checked, no repeats."""
    text = Path(path).read_text(encoding="utf-8")
    names = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        check_user(f"{path}: line {i}", line)
        if line in names:
            raise ValueError(f"{path}: line {i}: user {line!r} is listed twice")
        names.append(line)
    if not names or len(names) > MAX_USERS:
        raise ValueError(f"{path}: a class list must name 1 to {MAX_USERS} users, got {len(names)}")
    return names


def _check_users(users) -> list[str]:
    if isinstance(users, (str, bytes)) or not hasattr(users, "__iter__"):
        raise ValueError(f"users must be a list of user names, got {_shown(users)}")
    users = list(users)
    if not 1 <= len(users) <= MAX_USERS:
        raise ValueError(f"users must name 1 to {MAX_USERS} users, got {len(users)}")
    for i, u in enumerate(users):
        check_user(f"users[{i}]", u)
    dup = sorted({u for u in users if users.count(u) > 1})
    if dup:
        raise ValueError(f"users must not repeat a name, got {dup[0]!r} more than once")
    return users


def make_credentials(users, path: str | os.PathLike, *, overwrite: bool = False,
                     password_bytes: int = 9) -> dict[str, str]:
    """Write a ``--basic-auth`` credentials file with a random password for each user; returns ``{user: password}``.

    The file is JSON ``{user: password}`` created with mode 0600 (it holds passwords in clear, as
    Panel reads them), written whole or not at all. An existing file is kept unless
    ``overwrite=True``. ``password_bytes`` of randomness each (``secrets.token_urlsafe``; 9 bytes:
    12 characters).
    """
    users = _check_users(users)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(password_bytes, int) or isinstance(password_bytes, bool) or not 6 <= password_bytes <= 64:
        raise ValueError(f"password_bytes must be an integer in [6, 64], got {password_bytes!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists already: pass overwrite=True (--force) to replace it and its passwords")
    creds = {u: secrets.token_urlsafe(password_bytes) for u in users}
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600) if hasattr(os, "fchmod") else os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(creds, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return creds


def read_credentials(path: str | os.PathLike, *, check_mode: bool = True) -> dict[str, str]:
    """The ``{user: password}`` of a credentials file, checked: a JSON object of valid user names to
    non-empty passwords, and (POSIX, ``check_mode``) not readable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"credentials file {path} does not exist: create it with `python -m workbench.classroom "
                         f"credentials CLASS_LIST -o {path}` (or make_credentials)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"credentials file {path}: unreadable ({e})") from None
    if check_mode and os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"credentials file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                         f"it holds passwords; run chmod 600 {shlex.quote(str(path))}")
    try:
        creds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"credentials file {path}: not valid JSON ({e})") from None
    if not isinstance(creds, dict) or not 1 <= len(creds) <= MAX_USERS:
        raise ValueError(f"credentials file {path}: must be a JSON object of 1 to {MAX_USERS} user names -> passwords")
    for user, password in creds.items():
        check_user(f"credentials file {path}: user", user)
        if not isinstance(password, str) or not 1 <= len(password) <= _PASSWORD_MAX:
            raise ValueError(f"credentials file {path}: the password of {user!r} must be a string of 1 to "
                             f"{_PASSWORD_MAX} characters")
    return creds


def new_cookie_secret() -> str:
    """A random secret for ``--cookie-secret`` (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


# ============================================================================ the command line


def _check_host(host) -> str:
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        raise ValueError(f"host must be the host name or address students type in their browser (letters, digits, "
                         f"- and . ; an IPv6 address in brackets), got {_shown(host)}")
    return host


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {_shown(value)}")
    return value


def serve_command(credentials: str | os.PathLike, *, host: str, port: int = 5006, cookie_secret: str,
                  session_seconds: int = CLASS_SECONDS, apps: str = "apps/", python: str | None = None) -> list[str]:
    """The ``panel serve`` command line of classroom mode, as a list of arguments (``shlex.join`` prints it).

    ``host:port`` is what the students' browsers use (the only allowed websocket origin);
    ``session_seconds`` how long a session token stays valid (a class); ``python``: run
    ``<python> -m panel`` instead of the ``panel`` script. Only the arguments are checked here;
    :func:`check_panel` and :func:`read_credentials` check the installation and the file.
    """
    host = _check_host(host)
    port = _check_int("port", port, 1, 65535)
    seconds = _check_int("session_seconds", session_seconds, *_SECONDS_RANGE)
    if not isinstance(cookie_secret, str) or not 32 <= len(cookie_secret) <= 256 or not cookie_secret.isprintable() \
            or any(c.isspace() for c in cookie_secret):
        raise ValueError("cookie_secret must be a string of 32 to 256 printable characters without spaces "
                         "(new_cookie_secret() makes one)")
    if not isinstance(credentials, (str, os.PathLike)) or not str(credentials):
        raise ValueError(f"credentials must be the path of a credentials file, got {_shown(credentials)}")
    if not isinstance(apps, str) or not apps:
        raise ValueError(f"apps must be the path of the apps directory, got {_shown(apps)}")
    head = [python, "-m", "panel"] if python else ["panel"]
    return [*head, "serve", apps, "--port", str(port),
            "--basic-auth", str(credentials),
            "--cookie-secret", cookie_secret,
            "--address", "0.0.0.0",
            "--allow-websocket-origin", f"{host}:{port}",
            "--session-token-expiration", str(seconds),
            "--num-procs", "1"]


def _redacted(args: list[str]) -> str:
    shown = list(args)
    if "--cookie-secret" in shown:
        i = shown.index("--cookie-secret") + 1
        shown[i] = "<secret>"
    return shlex.join(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.classroom", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("credentials", help="write a credentials file with random passwords for a class list")
    c.add_argument("class_list", help="text file: one user name a line")
    c.add_argument("-o", "--output", default="classroom-users.json")
    c.add_argument("--force", action="store_true", help="replace an existing file (new passwords for everyone)")
    s = sub.add_parser("serve", help="check Panel and the credentials, then run panel serve in classroom mode")
    s.add_argument("--credentials", default="classroom-users.json")
    s.add_argument("--host", default=None, help="host name students use (default: this machine's name)")
    s.add_argument("--port", type=int, default=5006)
    s.add_argument("--session-seconds", type=int, default=CLASS_SECONDS)
    s.add_argument("--cookie-secret", default=None, help="default: $WORKBENCH_COOKIE_SECRET, else a new random one")
    s.add_argument("--apps", default="apps/")
    s.add_argument("--print", action="store_true", help="print the command line (secret hidden) and exit")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "credentials":
            creds = make_credentials(read_class_list(args.class_list), args.output, overwrite=args.force)
            width = max(len(u) for u in creds)
            print(f"wrote {args.output} (mode 600) for {len(creds)} users; hand each their password:")
            for user, password in creds.items():
                print(f"  {user:<{width}}  {password}")
            return 0
        version = check_panel()
        creds = read_credentials(args.credentials)
        secret = args.cookie_secret or os.environ.get("WORKBENCH_COOKIE_SECRET") or new_cookie_secret()
        cmd = serve_command(args.credentials, host=args.host or socket.gethostname(), port=args.port,
                            cookie_secret=secret, session_seconds=args.session_seconds, apps=args.apps,
                            python=sys.executable)
        teachers_ = teachers()
    except (ValueError, ClassroomError, OSError) as e:
        print(f"classroom: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(_redacted(cmd))
        return 0
    missing = [t for t in teachers_ if t not in creds]
    print(f"classroom mode: Panel {version}, {len(creds)} users, teachers: {', '.join(teachers_) or 'none'}"
          + (f" (not in the credentials file: {', '.join(missing)})" if missing else ""), file=sys.stderr)
    print(_redacted(cmd), file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("PANEL_COOKIE_SECRET", "PANEL_BASIC_AUTH")}
    os.execve(cmd[0], cmd, env)   # Panel refuses a secret or basic-auth given both ways: the arguments win
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
