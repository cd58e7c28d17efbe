"""Classroom mode: one shared ``panel serve`` with sign-in, teachers, and the credentials it reads.

Without sign-in (a laptop, ``make serve``) the dashboard binds to 127.0.0.1 and nobody else can reach
it; every run belongs to nobody in particular. A classroom server listens on every interface, so it
must sign users in: our own auth module (``--auth-module apps/auth.py``; the rules in
:mod:`workbench.auth`) with a credentials file (a JSON object of user name -> password, written here
with mode 0600), a cookie secret that signs the login cookies, the teacher's ``host:port`` as the
only allowed websocket origin, logins and session tokens that live as long as a class, optionally
TLS, and one process (``--num-procs 1``: one job queue). :func:`serve_command` builds that line,
which holds no secret; :func:`serve_environment` the server's environment, which carries the cookie
secret (a command line is readable by every local account with ``ps``, an environment only by its
user). ``python -m workbench.classroom`` (``make classroom``) checks everything and runs it with
umask 077 (the store's new files are the server user's only). :func:`hold_home` keeps a second
server off the same store. ``docs/security.md`` says what is promised.

Users named in ``WORKBENCH_TEACHERS`` (comma-separated) see the Teacher page
(:mod:`workbench.ui.teacher`). Signed-in names reach the run store as owners
(:meth:`workbench.store.RunStore.save`), so :func:`check_user` bounds them.

Panel is never imported here (the engine does not import Panel); its version is read from the
installed distribution's metadata. Sign-in needs Panel 1.7.5 or later (cross-site scripting
fixes in the login and OAuth templates, 1.7.4/1.7.5).

Command line::

    python -m workbench.classroom credentials students.txt -o classroom-users.json
    python -m workbench.classroom serve --credentials classroom-users.json --host teacher.local --port 5006
    python -m workbench.classroom serve ... --ssl-certfile cert.pem --ssl-keyfile key.pem   # TLS
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

from ..core.checks import USER_MAX_CHARS, check_int, check_user   # no torch: the credentials command starts fast

__all__ = ["check_user", "teachers", "is_teacher", "MIN_PANEL", "panel_version", "check_panel",
           "read_class_list", "make_credentials", "read_credentials", "new_cookie_secret", "check_cookie_secret",
           "read_cookie_secret", "check_tls_files", "serve_command", "serve_environment", "hold_home", "release_home",
           "HomeInUse", "CLASS_SECONDS", "SESSION_SECONDS_RANGE", "USER_MAX_CHARS", "RESERVED_USERS"]

MIN_PANEL = (1, 7, 5)
CLASS_SECONDS = 2 * 60 * 60        # default --session-token-expiration: a double lesson
SESSION_SECONDS_RANGE = (300, 7 * 24 * 60 * 60)
MAX_USERS = 1000                   # names in one class list / credentials file
RESERVED_USERS = ("examples",)     # no one signs in as these: the owner of the starter runs (runtime.examples)
_PASSWORD_MAX = 256
_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]{2,45}\]")


class ClassroomError(RuntimeError):
    """The server cannot be started in classroom mode as asked (Panel too old, credentials unusable)."""


def _check_member(field: str, name) -> str:
    """A user name of a class (:func:`check_user`), not one of :data:`RESERVED_USERS`."""
    check_user(field, name)
    if name in RESERVED_USERS:
        raise ValueError(f"{field}: {name!r} is reserved (the owner of the example runs); choose another user name")
    return name


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

    Needs Panel >= 1.7.5 (a pre-release of 1.7.5 counts as older): the release with the cross-site
    scripting fixes in its login and OAuth templates. ``version``: check this version string instead of the installed one (tests).
    """
    if version is None:
        version = panel_version()
        if version is None:
            raise ClassroomError("Panel is not installed: classroom mode needs panel >= 1.7.5 (pip install 'panel>=1.7.5')")
    need = ".".join(map(str, MIN_PANEL))
    try:
        ok = _at_least(version, MIN_PANEL)
    except ValueError as e:
        raise ClassroomError(f"{e}: classroom mode needs panel >= {need}") from None
    if not ok:
        raise ClassroomError(f"Panel {version} is installed; classroom mode (sign-in) needs panel >= "
                             f"{need}, which fixes cross-site scripting holes in its login templates: "
                             f"pip install 'panel>={need}'")
    return version


# ============================================================================ credentials


def read_class_list(path: str | os.PathLike) -> list[str]:
    """User names from a text file, one a line (blank lines and ``#`` comments skipped), checked, no repeats."""
    text = Path(path).read_text(encoding="utf-8")
    names = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        _check_member(f"{path}: line {i}", line)
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
        _check_member(f"users[{i}]", u)
    dup = sorted({u for u in users if users.count(u) > 1})
    if dup:
        raise ValueError(f"users must not repeat a name, got {dup[0]!r} more than once")
    return users


def make_credentials(users, path: str | os.PathLike, *, overwrite: bool = False,
                     password_bytes: int = 9) -> dict[str, str]:
    """Write a credentials file with a random password for each user; returns ``{user: password}``.

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
        _check_member(f"credentials file {path}: user", user)
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


def serve_command(*, host: str, port: int = 5006, session_seconds: int = CLASS_SECONDS, apps: str = "apps/",
                  python: str | None = None, auth_module: str | None = None, ssl_certfile: str | None = None,
                  ssl_keyfile: str | None = None) -> list[str]:
    """The ``panel serve`` command line of classroom mode, as a list of arguments (``shlex.join`` prints it).

    It holds no secret (``ps`` shows a command line to every local account): the cookie secret and
    the credentials file reach the server through its environment (:func:`serve_environment`).
    ``host:port`` is what the students' browsers use (the only allowed websocket origin);
    ``session_seconds`` how long a session token stays valid (a class); ``python``: run
    ``<python> -m panel`` instead of the ``panel`` script; ``auth_module``: the sign-in module
    (default ``<apps>/auth.py``); ``ssl_certfile`` and ``ssl_keyfile``: serve over TLS (both or
    neither). Only the arguments are checked here; :func:`check_panel`, :func:`read_credentials` and
    :func:`check_tls_files` check the installation and the files.
    """
    host = _check_host(host)
    port = check_int("port", port, 1, 65535)
    seconds = check_int("session_seconds", session_seconds, *SESSION_SECONDS_RANGE)
    if not isinstance(apps, str) or not apps:
        raise ValueError(f"apps must be the path of the apps directory, got {_shown(apps)}")
    if auth_module is None:
        auth_module = f"{apps.rstrip('/')}/auth.py"
    if not isinstance(auth_module, str) or not auth_module.endswith(".py"):
        raise ValueError(f"auth_module must be the path of a .py file, got {_shown(auth_module)}")
    for name, value in (("ssl_certfile", ssl_certfile), ("ssl_keyfile", ssl_keyfile)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name} must be the path of a PEM file, got {_shown(value)}")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("ssl_certfile and ssl_keyfile must be given together (a certificate and its key) or not at all")
    head = [python, "-m", "panel"] if python else ["panel"]
    tls = ["--ssl-certfile", ssl_certfile, "--ssl-keyfile", ssl_keyfile] if ssl_certfile else []
    return [*head, "serve", apps, "--port", str(port),
            "--auth-module", auth_module,
            "--address", "0.0.0.0",
            "--allow-websocket-origin", f"{host}:{port}",
            "--session-token-expiration", str(seconds),
            "--num-procs", "1", *tls]


def check_cookie_secret(secret) -> str:
    """``secret`` if it can sign the login cookies: 32 to 256 printable characters without spaces."""
    if not isinstance(secret, str) or not 32 <= len(secret) <= 256 or not secret.isprintable() \
            or any(c.isspace() for c in secret):
        raise ValueError("the cookie secret must be a string of 32 to 256 printable characters without spaces "
                         "(new_cookie_secret() makes one)")
    return secret


def read_cookie_secret(path: str | os.PathLike) -> str:
    """The cookie secret kept in a file (one line; POSIX: not readable by group or others), checked."""
    path = Path(path)
    _check_private(path, "cookie secret file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cookie secret file {path}: unreadable ({e})") from None
    return check_cookie_secret(text.strip())


def _check_private(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: unreadable ({e})") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): it is a secret; "
                         f"run chmod 600 {shlex.quote(str(path))}")


def check_tls_files(certfile, keyfile) -> None:
    """The certificate exists and the private key exists and is readable by its owner only."""
    if not Path(certfile).is_file():
        raise ValueError(f"TLS certificate {certfile} does not exist")
    _check_private(Path(keyfile), "TLS key file")


# variables of the server's environment that would replace or loosen the sign-in of classroom mode
_FOREIGN_AUTH = ("PANEL_BASIC_AUTH", "PANEL_OAUTH_PROVIDER", "PANEL_OAUTH_OPTIONAL", "PANEL_OAUTH_GUEST_ENDPOINTS",
                 "BOKEH_AUTH_MODULE", "BOKEH_COOKIE_SECRET", "PANEL_COOKIE_SECRET")


def serve_environment(credentials: str | os.PathLike, *, cookie_secret: str, session_seconds: int = CLASS_SECONDS,
                      tls: bool = False, base: dict | None = None) -> dict[str, str]:
    """The environment of the classroom ``panel serve``: ``base`` (default ``os.environ``) without any other
    sign-in setting, plus ``PANEL_COOKIE_SECRET`` (signs the cookies; the environment of a process is
    readable by its own user and root only, unlike its command line), ``WORKBENCH_CREDENTIALS`` (absolute
    path), ``WORKBENCH_SESSION_SECONDS`` (how long a login lives), ``WORKBENCH_COOKIE_SECURE=1`` with TLS,
    and ``OMP_WAIT_POLICY=PASSIVE`` unless set (see :mod:`apps.app_hooks`)."""
    check_cookie_secret(cookie_secret)
    seconds = check_int("session_seconds", session_seconds, *SESSION_SECONDS_RANGE)
    if not isinstance(credentials, (str, os.PathLike)) or not str(credentials):
        raise ValueError(f"credentials must be the path of a credentials file, got {_shown(credentials)}")
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in _FOREIGN_AUTH and not k.startswith("PANEL_OAUTH_")}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(PANEL_COOKIE_SECRET=cookie_secret, WORKBENCH_CREDENTIALS=str(Path(credentials).resolve()),
               WORKBENCH_SESSION_SECONDS=str(seconds))
    env.pop("WORKBENCH_COOKIE_SECURE", None)
    if tls:
        env["WORKBENCH_COOKIE_SECURE"] = "1"
    return env


# ============================================================================ one server per store


LOCK_NAME = "server.lock"


class HomeInUse(RuntimeError):
    """Another server process serves this ``WORKBENCH_HOME`` already."""


def hold_home(home: str | os.PathLike, port) -> "object":
    """Take the advisory lock of the store root ``home`` for this server process (``fcntl.flock`` on
    ``home/server.lock``, which then says ``pid port``), or raise :class:`HomeInUse` naming the server
    that holds it. Keep the returned file open as long as the server runs; the lock goes with the
    process (also when it is killed). Two servers on one store would double every cap of the job queue.
    Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        return None
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read(200).split()
        f.close()
        pid, other = (holder + ["?", "?"])[:2]
        raise HomeInUse(f"another workbench server (pid {pid}, port {other}) already serves WORKBENCH_HOME={home}: "
                        f"stop it first, or give this one another WORKBENCH_HOME") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {port}\n")
    f.flush()
    return f


def release_home(handle) -> None:
    """Let go of :func:`hold_home`'s lock (the file stays; the next server rewrites it)."""
    if handle is not None:
        with contextlib.suppress(OSError):
            handle.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.classroom", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("credentials", help="write a credentials file with random passwords for a class list")
    c.add_argument("class_list", help="text file: one user name a line")
    c.add_argument("-o", "--output", default="classroom-users.json")
    c.add_argument("--force", action="store_true", help="replace an existing file (new passwords for everyone)")
    s = sub.add_parser("serve", help="check Panel and the credentials, then run panel serve in classroom mode",
                       allow_abbrev=False)
    s.add_argument("--credentials", default="classroom-users.json")
    s.add_argument("--host", default=None, help="host name students use (default: this machine's name)")
    s.add_argument("--port", type=int, default=5006)
    s.add_argument("--session-seconds", type=int, default=CLASS_SECONDS,
                   help="how long a login and a session token live (a class)")
    s.add_argument("--cookie-secret-file", default=None,
                   help="a file (mode 600) holding the cookie secret; default: $WORKBENCH_COOKIE_SECRET, "
                        "else a new random one (never on the command line)")
    s.add_argument("--ssl-certfile", default=None, help="serve over TLS with this certificate (PEM)")
    s.add_argument("--ssl-keyfile", default=None, help="... and this private key (PEM, mode 600)")
    s.add_argument("--allow-hub", action="store_true",
                   help="let students name Hugging Face Hub models (sets WORKBENCH_ALLOW_HUB=1; default: the "
                        "model folders only)")
    s.add_argument("--apps", default="apps/")
    s.add_argument("--print", action="store_true", help="print the command line and exit")
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
        if args.cookie_secret_file:
            secret = read_cookie_secret(args.cookie_secret_file)
        else:
            secret = check_cookie_secret(os.environ.get("WORKBENCH_COOKIE_SECRET") or new_cookie_secret())
        cmd = serve_command(host=args.host or socket.gethostname(), port=args.port,
                            session_seconds=args.session_seconds, apps=args.apps, python=sys.executable,
                            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
        if args.ssl_certfile:
            check_tls_files(args.ssl_certfile, args.ssl_keyfile)
        env = serve_environment(args.credentials, cookie_secret=secret, session_seconds=args.session_seconds,
                                tls=bool(args.ssl_certfile))
        env.pop("WORKBENCH_COOKIE_SECRET", None)
        if args.allow_hub:
            env["WORKBENCH_ALLOW_HUB"] = "1"
        teachers_ = teachers()
    except (ValueError, ClassroomError, OSError) as e:
        print(f"classroom: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(cmd))
        return 0
    missing = [t for t in teachers_ if t not in creds]
    print(f"classroom mode: Panel {version}, {len(creds)} users, teachers: {', '.join(teachers_) or 'none'}"
          + (f" (not in the credentials file: {', '.join(missing)})" if missing else ""), file=sys.stderr)
    print(shlex.join(cmd), file=sys.stderr)
    os.umask(0o077)   # the server's new store files: its own user's only
    os.execve(cmd[0], cmd, env)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
