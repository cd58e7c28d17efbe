"""Classroom mode: user names, teachers, credentials files, the panel serve line (parsed by Panel's own
argument parser), the Panel version gate, the Teacher page driven in Python (a real JobQueue and
RunStore, a fake signed-in user), and one bounded real server with --basic-auth on 127.0.0.1."""
import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pandas as pd
import pytest

import workbench as wb
from workbench import classroom
from workbench.runtime.classroom import ClassroomError

HOSTILE = "<script>alert('x')</script>"


# ============================================================================ names and teachers


@pytest.mark.parametrize("good", ["ann", "A", "a" * 64, "ann.smith@school.example", "s-01_b+x", "guest"])
def test_valid_user_names_pass(good):
    assert classroom.check_user("user", good) == good


@pytest.mark.parametrize("bad", ["", "a" * 65, "ann smith", "../x", "a/b", HOSTILE, "-ann", ".ann", "ann\n", "ánn",
                                 "ann;rm", 'a"b', 7, None, True, b"ann", ["ann"]])
def test_bad_user_names_are_refused_naming_the_field_and_rule(bad):
    with pytest.raises(ValueError, match=r"^owner must be a user name of 1 to 64 characters \(letters, digits"):
        classroom.check_user("owner", bad)


def test_teachers_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORKBENCH_TEACHERS", raising=False)
    assert classroom.teachers() == () and not classroom.is_teacher("ann")
    monkeypatch.setenv("WORKBENCH_TEACHERS", " teach , ann.b@x.org,,teach ")
    assert classroom.teachers() == ("teach", "ann.b@x.org")
    assert classroom.is_teacher("teach") and classroom.is_teacher("ann.b@x.org")
    assert not classroom.is_teacher("ann") and not classroom.is_teacher(None)   # no sign-in: no teacher
    assert not classroom.is_teacher("Teach")                                      # exact names
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach, bad name")
    with pytest.raises(ValueError, match="WORKBENCH_TEACHERS entry must be a user name"):
        classroom.teachers()
    with pytest.raises(ValueError, match="user must be a user name"):
        classroom.is_teacher("<b>")


# ============================================================================ credentials


def test_credentials_file_has_random_passwords_and_mode_0600(tmp_path):
    path = tmp_path / "users.json"
    users = [f"s{i:02d}" for i in range(30)] + ["teach"]
    creds = classroom.make_credentials(users, path)
    assert list(creds) == users
    assert json.loads(path.read_text()) == creds                      # exactly what Panel's basic auth reads
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(set(creds.values())) == len(users) and all(len(p) == 12 for p in creds.values())
    assert classroom.read_credentials(path) == creds
    with pytest.raises(ValueError, match="exists already: pass overwrite=True"):
        classroom.make_credentials(["x"], path)
    assert json.loads(path.read_text()) == creds                      # kept
    again = classroom.make_credentials(["x"], path, overwrite=True)
    assert json.loads(path.read_text()) == again and list(again) == ["x"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


@pytest.mark.parametrize("users, match", [
    ([], r"users must name 1 to 1000 users, got 0"),
    ("ann", r"users must be a list of user names"),
    (["ann", "ann"], r"must not repeat a name, got 'ann'"),
    (["ann", HOSTILE], r"users\[1\] must be a user name"),
])
def test_bad_class_lists_are_refused(tmp_path, users, match):
    with pytest.raises(ValueError, match=match):
        classroom.make_credentials(users, tmp_path / "u.json")
    assert not (tmp_path / "u.json").exists()


def test_read_class_list_and_credential_file_checks(tmp_path):
    listing = tmp_path / "class.txt"
    listing.write_text("# period 3\nann\n\n  bob  # back row\ncarol\n")
    assert classroom.read_class_list(listing) == ["ann", "bob", "carol"]
    listing.write_text("ann\nbob smith\n")
    with pytest.raises(ValueError, match=r"class.txt: line 2 must be a user name"):
        classroom.read_class_list(listing)
    listing.write_text("ann\nann\n")
    with pytest.raises(ValueError, match="line 2: user 'ann' is listed twice"):
        classroom.read_class_list(listing)

    creds = tmp_path / "c.json"
    with pytest.raises(ValueError, match="does not exist: create it with"):
        classroom.read_credentials(creds)
    for text, match in [("{", "not valid JSON"), ("[]", "must be a JSON object"), ('{"a b": "pw"}', "must be a user"),
                        ('{"ann": ""}', "the password of 'ann' must be a string"), ('{"ann": 3}', "password")]:
        creds.write_text(text)
        os.chmod(creds, 0o600)
        with pytest.raises(ValueError, match=match):
            classroom.read_credentials(creds)
    if os.name == "posix":
        creds.write_text('{"ann": "pw"}')
        os.chmod(creds, 0o644)
        with pytest.raises(ValueError, match=r"readable by others \(mode 644\).*chmod 600"):
            classroom.read_credentials(creds)
        os.chmod(creds, 0o600)
        assert classroom.read_credentials(creds) == {"ann": "pw"}


# ============================================================================ the command line


def _panel_args(cmd):
    """Parse a ``panel serve`` command with Panel's own parser (an independent check of the flags)."""
    from panel.command.serve import Serve

    parser = argparse.ArgumentParser()
    Serve(parser)
    assert cmd[:2] == ["panel", "serve"] or cmd[1:4] == ["-m", "panel", "serve"]
    return parser.parse_args(cmd[cmd.index("serve") + 1:])


def test_serve_command_is_the_classroom_line():
    cmd = classroom.serve_command(host="teacher.school.example", port=5007, session_seconds=5400)
    assert shlex.join(cmd) == (
        "panel serve apps/ --port 5007 --auth-module apps/auth.py "
        "--address 0.0.0.0 --allow-websocket-origin teacher.school.example:5007 "
        "--session-token-expiration 5400 --num-procs 1")
    a = _panel_args(cmd)
    assert a.files == ["apps/"] and a.port == 5007 and a.auth_module == "apps/auth.py"
    assert a.cookie_secret is None and a.basic_auth is None and a.address == "0.0.0.0"
    assert a.allow_websocket_origin == ["teacher.school.example:5007"]
    assert a.session_token_expiration == 5400 and a.num_procs == 1
    assert a.ssl_certfile is None and a.ssl_keyfile is None
    py = classroom.serve_command(host="10.0.0.5", python="/usr/bin/python3")
    assert py[:3] == ["/usr/bin/python3", "-m", "panel"]
    a = _panel_args(py)
    assert a.port == 5006 and a.session_token_expiration == classroom.CLASS_SECONDS
    assert _panel_args(classroom.serve_command(host="[::1]")).allow_websocket_origin == ["[::1]:5006"]
    tls = _panel_args(classroom.serve_command(host="h", ssl_certfile="cert.pem", ssl_keyfile="key.pem"))
    assert tls.ssl_certfile == "cert.pem" and tls.ssl_keyfile == "key.pem"
    assert _panel_args(classroom.serve_command(host="h", apps="/srv/wb/apps")).auth_module == "/srv/wb/apps/auth.py"


@pytest.mark.parametrize("kwargs, match", [
    ({"host": "teacher host"}, "host must be the host name"),
    ({"host": "a.example:80"}, "host must be the host name"),
    ({"host": "x;rm -rf /"}, "host must be the host name"),
    ({"host": ""}, "host must be the host name"),
    ({"port": 0}, r"port must be an integer in \[1, 65535\], got 0"),
    ({"port": "5006"}, r"port must be an integer in \[1, 65535\]"),
    ({"port": True}, r"port must be an integer"),
    ({"session_seconds": 60}, r"session_seconds must be an integer in \[300, 604800\], got 60"),
    ({"session_seconds": 3600.0}, r"session_seconds must be an integer"),
    ({"ssl_certfile": "c.pem"}, "ssl_certfile and ssl_keyfile must be given together"),
    ({"ssl_keyfile": "k.pem"}, "ssl_certfile and ssl_keyfile must be given together"),
    ({"ssl_certfile": "", "ssl_keyfile": "k.pem"}, "ssl_certfile must be the path of a PEM file"),
    ({"auth_module": "auth.txt"}, "auth_module must be the path of a .py file"),
])
def test_serve_command_refuses_bad_arguments(kwargs, match):
    args = {"host": "teacher.local", **kwargs}
    with pytest.raises(ValueError, match=match):
        classroom.serve_command(**args)


@pytest.mark.parametrize("secret, match", [
    ("short", "cookie secret must be a string of 32 to 256"),
    ("a b" * 20, "without spaces"),
    (None, "cookie secret must be"),
    ("x" * 257, "32 to 256"),
])
def test_bad_cookie_secrets_are_refused(secret, match):
    with pytest.raises(ValueError, match=match):
        classroom.serve_environment("u.json", cookie_secret=secret)


def test_new_cookie_secrets_are_random_and_accepted():
    a, b = classroom.new_cookie_secret(), classroom.new_cookie_secret()
    assert a != b and len(a) >= 43
    assert classroom.serve_environment("u.json", cookie_secret=a)["PANEL_COOKIE_SECRET"] == a


def test_serve_environment_carries_the_secret_and_drops_other_sign_in_settings(tmp_path):
    secret = classroom.new_cookie_secret()
    base = {"PATH": "/bin", "PANEL_BASIC_AUTH": "pw", "PANEL_OAUTH_PROVIDER": "github", "PANEL_OAUTH_KEY": "k",
            "BOKEH_AUTH_MODULE": "/tmp/evil.py", "BOKEH_COOKIE_SECRET": "old", "PANEL_COOKIE_SECRET": "old",
            "WORKBENCH_COOKIE_SECURE": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    env = classroom.serve_environment(tmp_path / "u.json", cookie_secret=secret, session_seconds=600, base=base)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE", "PANEL_COOKIE_SECRET": secret,
                   "WORKBENCH_CREDENTIALS": str((tmp_path / "u.json").resolve()), "WORKBENCH_SESSION_SECONDS": "600"}
    tls = classroom.serve_environment("u.json", cookie_secret=secret, tls=True, base={})
    assert tls["WORKBENCH_COOKIE_SECURE"] == "1" and tls["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match=r"session_seconds must be an integer in \[300, 604800\]"):
        classroom.serve_environment("u.json", cookie_secret=secret, session_seconds=10)


@pytest.mark.parametrize("version, ok", [("1.7.5", True), ("1.7.6", True), ("1.9.4", True), ("2.0.0", True),
                                         ("1.7.5.post1", True), ("1.7.4", False), ("1.7.5rc1", False),
                                         ("1.6.3", False), ("0.14.4", False)])
def test_panel_version_gate(version, ok):
    if ok:
        assert classroom.check_panel(version) == version
    else:
        with pytest.raises(ClassroomError, match=r"needs panel >= 1\.7\.5, which fixes cross-site scripting"):
            classroom.check_panel(version)


def test_installed_panel_passes_the_gate():
    import panel

    assert classroom.panel_version() == panel.__version__
    assert classroom.check_panel() == panel.__version__


def test_cli_prints_the_line_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    users = tmp_path / "class.txt"
    users.write_text("ann\nteach\n")
    creds = tmp_path / "users.json"
    assert classroom.main(["credentials", str(users), "-o", str(creds)]) == 0
    out = capsys.readouterr().out
    saved = json.loads(creds.read_text())
    table = dict(line.split() for line in out.splitlines()[1:])
    assert table == saved and len(saved) == 2
    monkeypatch.setenv("WORKBENCH_COOKIE_SECRET", "x" * 40)
    assert classroom.main(["serve", "--credentials", str(creds), "--host", "h.local", "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert "x" * 40 not in line
    assert line == shlex.join(classroom.serve_command(host="h.local", python=sys.executable))
    assert classroom.main(["serve", "--credentials", str(tmp_path / "none.json"), "--print"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert classroom.main(["serve", "--credentials", str(creds), "--host", "bad host", "--print"]) == 2
    assert "host must be" in capsys.readouterr().err
    monkeypatch.setenv("WORKBENCH_COOKIE_SECRET", "short")
    assert classroom.main(["serve", "--credentials", str(creds), "--host", "h.local", "--print"]) == 2
    assert "cookie secret must be a string of 32 to 256" in capsys.readouterr().err


def test_the_credentials_command_imports_no_torch():
    """``python -m workbench.classroom credentials`` writes a JSON file: it starts without torch (the user-name
    rule lives in ``core.checks``, which the run store re-exports)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "workbench.classroom", "credentials", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "workbench.core.checks" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported"
    assert wb.store.check_user is classroom.check_user is wb.checks.check_user


def _exec_of(monkeypatch, argv):
    """Run ``classroom.main(argv)`` up to its exec: ``(path, args, env, umask)`` it would have exec'd."""
    seen = {}
    monkeypatch.setattr(classroom.os, "execve", lambda path, args, env: seen.update(path=path, args=args, env=env))
    monkeypatch.setattr(classroom.os, "umask", lambda mask: seen.update(umask=mask) or 0o022)
    assert classroom.main(argv) == 0
    return seen["path"], seen["args"], seen["env"], seen.get("umask")


def test_the_cookie_secret_is_in_no_command_line(tmp_path, monkeypatch, capsys):
    creds = tmp_path / "users.json"
    classroom.make_credentials(["ann", "teach"], creds)
    secret = "S3cr3t-" + "q" * 40
    monkeypatch.setenv("WORKBENCH_COOKIE_SECRET", secret)
    monkeypatch.setenv("PANEL_BASIC_AUTH", "pw")                     # would replace our sign-in: dropped
    monkeypatch.delenv("WORKBENCH_ALLOW_HUB", raising=False)
    path, args, env, umask = _exec_of(monkeypatch, ["serve", "--credentials", str(creds), "--host", "h.local"])
    assert path == sys.executable == args[0]
    assert not any(secret in a for a in args)                         # ps shows nothing secret
    assert secret not in capsys.readouterr().err                      # nor does the printed line
    assert env["PANEL_COOKIE_SECRET"] == secret                       # Panel reads it from there
    assert "WORKBENCH_COOKIE_SECRET" not in env and "PANEL_BASIC_AUTH" not in env
    assert env["WORKBENCH_CREDENTIALS"] == str(creds.resolve()) and umask == 0o077
    assert "WORKBENCH_ALLOW_HUB" not in env                            # Hub names: only when the teacher says so
    assert _exec_of(monkeypatch, ["serve", "--credentials", str(creds), "--host", "h", "--allow-hub"]
                    )[2]["WORKBENCH_ALLOW_HUB"] == "1"
    a = _panel_args(args)
    assert a.cookie_secret is None and a.auth_module == "apps/auth.py"

    monkeypatch.delenv("WORKBENCH_COOKIE_SECRET")                     # none given: a new random one
    _, args2, env2, _ = _exec_of(monkeypatch, ["serve", "--credentials", str(creds), "--host", "h.local"])
    assert len(env2["PANEL_COOKIE_SECRET"]) >= 43 and env2["PANEL_COOKIE_SECRET"] != secret
    assert not any(env2["PANEL_COOKIE_SECRET"] in a for a in args2)

    kept = tmp_path / "cookie-secret"                                 # or a file of the teacher's, mode 600
    kept.write_text(secret + "\n")
    os.chmod(kept, 0o600)
    _, args3, env3, _ = _exec_of(monkeypatch, ["serve", "--credentials", str(creds), "--host", "h.local",
                                               "--cookie-secret-file", str(kept)])
    assert env3["PANEL_COOKIE_SECRET"] == secret and not any(secret in a for a in args3)
    if os.name == "posix":
        os.chmod(kept, 0o644)
        assert classroom.main(["serve", "--credentials", str(creds), "--host", "h", "--cookie-secret-file",
                               str(kept), "--print"]) == 2
        assert "readable by others (mode 644)" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                    # the old option is gone
        classroom.main(["serve", "--credentials", str(creds), "--cookie-secret", secret, "--print"])


def test_tls_options_reach_panel_serve_and_make_cookies_secure(tmp_path, monkeypatch, capsys):
    creds = tmp_path / "users.json"
    classroom.make_credentials(["ann"], creds)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(key, 0o600)
    _, args, env, _ = _exec_of(monkeypatch, ["serve", "--credentials", str(creds), "--host", "h.local",
                                             "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    a = _panel_args(args)
    assert a.ssl_certfile == str(cert) and a.ssl_keyfile == str(key) and env["WORKBENCH_COOKIE_SECURE"] == "1"
    if os.name == "posix":
        os.chmod(key, 0o640)
        assert classroom.main(["serve", "--credentials", str(creds), "--host", "h", "--ssl-certfile", str(cert),
                               "--ssl-keyfile", str(key), "--print"]) == 2
        err = capsys.readouterr().err
        assert "TLS key file" in err and "readable by others (mode 640)" in err
    assert classroom.main(["serve", "--credentials", str(creds), "--host", "h", "--ssl-certfile",
                           str(tmp_path / "none.pem"), "--ssl-keyfile", str(key), "--print"]) == 2
    assert "TLS certificate" in capsys.readouterr().err


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_shows_the_exact_line_serve_command_builds():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Classroom mode", 1)[1].split("\n## ", 1)[0]
    block = section.split(".venv/bin/python -m panel serve", 1)[1].split("```", 1)[0]
    shown = shlex.split((".venv/bin/python -m panel serve" + block).replace("\\\n", " "))
    built = classroom.serve_command(host="teacher.school.example", python=".venv/bin/python")
    assert shown == built
    for variable in ("WORKBENCH_TEACHERS", "WORKBENCH_MAX_JOBS", "WORKBENCH_QUEUE_SIZE", "WORKBENCH_JOBS_PER_USER",
                     "WORKBENCH_THREADS", "WORKBENCH_DASK", "127.0.0.1", "make classroom", "WORKBENCH_COOKIE_SECRET",
                     "COOKIE_SECRET_FILE", "SSL_CERTFILE", "WORKBENCH_SESSIONS_PER_USER", "docs/security.md"):
        assert variable in section, variable


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_classroom_runs_the_classroom_command():
    secret = "m4ke-" + "z" * 40
    env = {**os.environ, "WORKBENCH_COOKIE_SECRET": secret}
    out = subprocess.run(["make", "-n", "classroom", "CLASS_HOST=h.example", "PORT=5011", "CLASS_SECONDS=3600",
                          "CLASS_LIST=class.txt"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.replace("\\\n", " ").split())
    assert '.venv/bin/python -m workbench.classroom credentials "class.txt" -o "classroom-users.json"' in text
    assert ('.venv/bin/python -m workbench.classroom serve --credentials "classroom-users.json" --host "h.example" '
            '--port 5011 --session-seconds 3600') in text
    assert secret not in out.stdout and "--cookie-secret " not in text and "cookie-secret-file" not in text
    out = subprocess.run(["make", "-n", "classroom", "CLASS_HOST=h.example", "COOKIE_SECRET_FILE=/srv/wb/secret",
                          "SSL_CERTFILE=cert.pem", "SSL_KEYFILE=key.pem", "ALLOW_HUB=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=env)
    text = " ".join(out.stdout.replace("\\\n", " ").split())
    assert out.returncode == 0 and secret not in out.stdout
    assert '--cookie-secret-file "/srv/wb/secret" --ssl-certfile "cert.pem" --ssl-keyfile "key.pem" --allow-hub' in text


# ============================================================================ the Teacher page


@pytest.fixture
def queue():
    q = wb.jobs.JobQueue(max_jobs=1, queue_size=10, jobs_per_user=2, threads=1, executor="threads")
    yield q
    for job in q.jobs():
        job.cancel()
    q.close()


def _blocker(release: threading.Event):
    def task():
        ctx = wb.jobs.current()
        while not release.is_set() and not ctx.stopped:
            time.sleep(0.01)
        return "stopped" if ctx.stopped else "released"
    return task


def _page(monkeypatch, store, queue, user):
    from workbench.ui import teacher
    from workbench.ui.session import DataStore

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach,head")
    monkeypatch.setattr(teacher, "current_user", lambda: user)
    return teacher.TeacherPage(DataStore(store), queue=queue)


def _tiny_run(name):
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1))
    metrics = pd.DataFrame({"step": [1, 1], "split": ["val", "val"], "metric": ["loss", "acc"], "value": [2.0, 0.1]})
    spec = {"name": "digits", **wb.data.check_options("digits")}
    return wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), dataset=spec, metrics=metrics,
                           name=name)


def _wait(cond, what):
    for _ in range(2000):
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_teacher_sees_the_queue_escaped_and_stops_any_job(monkeypatch, store, queue):
    release = threading.Event()
    try:
        a = queue.submit(_blocker(release), user="ann", name="train digits")
        _wait(lambda: a.status == "running", "the first job to start")
        b = queue.submit(_blocker(release), user="bob", name=HOSTILE)
        c = queue.submit(_blocker(release), user="carol", name="grow")
        page = _page(monkeypatch, store, queue, "teach")
        assert page.allowed and page.__panel__() is not page.notice
        html_table = page.jobs_view.object
        assert "<script>" not in html_table and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_table
        for job in (a, b, c):
            assert f"<td style='padding:2px 8px'>{job.user}</td>" in html_table
        assert list(page.job_select.options.values()) == [a.id, b.id, c.id]   # running first, then queue order
        labels = list(page.job_select.options)
        assert "running" in labels[0] and "(position 1)" in labels[1] and "(position 2)" in labels[2]

        page.job_select.value = b.id                                           # a waiting job: removed
        assert page.stop_selected()
        assert b.status == "cancelled" and [j.id for j in queue.jobs()] == [a.id, c.id]
        assert list(page.job_select.options.values()) == [a.id, c.id]
        assert "removed from the queue" in page.status.object and "<script>" not in page.status.object
        page.job_select.value = a.id                                           # a running one: asked to stop
        assert page.stop_selected()
        assert a.wait(20) and a.status == "cancelled" and a.result() == "stopped"
        _wait(lambda: c.status == "running", "the queue to move on")
        page.refresh()
        assert list(page.job_select.options.values()) == [c.id]
    finally:
        release.set()


def test_others_see_one_line_and_cannot_act(monkeypatch, store, queue):
    from workbench.ui import teacher

    release = threading.Event()
    try:
        job = queue.submit(_blocker(release), user="ann", name="mine")
        for user in ("ann", None):                     # a student; a server without sign-in
            page = _page(monkeypatch, store, queue, user)
            assert not page.allowed and page.__panel__() is page.notice
            assert page.notice.object == classroom_message()
            assert page.job_select.options == {} and page.jobs_view.object == teacher.jobs_html([])  # nothing read
            page.job_select.options = {"x": job.id}
            page.job_select.value = job.id
            assert not page.stop_selected() and not job.stop_requested
        # a page built for a teacher stops acting once its session is no teacher's
        page = _page(monkeypatch, store, queue, "teach")
        page.job_select.value = job.id
        monkeypatch.setattr(teacher, "current_user", lambda: "ann")
        assert not page.stop_selected() and not job.stop_requested and job.status == "running"
    finally:
        release.set()


def classroom_message():
    from workbench.ui.text import escape_md
    from workbench.ui.teacher import NOT_A_TEACHER

    return escape_md(NOT_A_TEACHER)


def test_teacher_marks_a_run_shared_and_students_then_see_it(monkeypatch, store, queue):
    mine = store.save(_tiny_run("ann's run"), owner="ann")
    lesson = store.save(_tiny_run(HOSTILE), owner="teach")
    page = _page(monkeypatch, store, queue, "teach")
    assert set(page.run_select.options.values()) == {mine, lesson}
    assert "Shared runs</b>: none" in page.shared_view.object
    assert set(store.list(user="bob")["run_id"]) == set()
    page.run_select.value = lesson
    assert page.share_selected(True)
    assert set(store.list(user="bob")["run_id"]) == {lesson}
    assert store.read_json(lesson)["shared"] is True
    assert "&lt;script&gt;" in page.shared_view.object and "<script>" not in page.shared_view.object
    assert any("[shared]" in label for label, rid in page.run_select.options.items() if rid == lesson)
    assert page.run_select.value == lesson
    with pytest.raises(wb.StoreError, match="cannot delete it"):
        store.delete(lesson, user="bob")                                   # read-only for students
    assert page.share_selected(False)
    assert store.list(user="bob").empty
    # a run deleted meanwhile: the page says so and keeps working
    store.delete(mine)
    page.run_select.value = mine
    assert not page.share_selected(True)
    assert "does not exist" in page.errors.text


def test_no_queue_in_this_process_is_said_not_fatal(monkeypatch, store):
    import panel as pn

    page = _page(monkeypatch, store, None, "head")
    assert pn.state.cache.get("workbench.queue") is None
    assert "has no job queue" in page.jobs_view.object and page.stop_button.disabled
    assert not page.stop_selected()
    q = wb.jobs.JobQueue(max_jobs=1, executor="threads")
    try:
        pn.state.cache["workbench.queue"] = q                             # where app_hooks keeps the server's
        release = threading.Event()
        job = q.submit(_blocker(release), user="ann", name="x")
        page.refresh()
        assert list(page.job_select.options.values()) == [job.id]
        release.set()
        job.wait(20)
    finally:
        pn.state.cache.pop("workbench.queue", None)
        q.close()


def test_current_user_reads_panels_signed_in_user(monkeypatch):
    import panel as pn

    from workbench.ui import teacher

    assert teacher.current_user() is None                                  # no server, no sign-in
    monkeypatch.setattr(type(pn.state), "user", property(lambda self: "teach"))
    assert teacher.current_user() == "teach"
    monkeypatch.setattr(type(pn.state), "user", property(lambda self: HOSTILE))
    with pytest.raises(ValueError, match="signed-in user must be a user name"):
        teacher.current_user()


def test_a_hostile_signed_in_name_is_refused_not_treated_as_no_sign_in(monkeypatch, store, queue):
    import panel as pn

    from workbench.ui import teacher
    from workbench.ui.session import DataStore

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    monkeypatch.setattr(type(pn.state), "user", property(lambda self: HOSTILE))
    page = teacher.TeacherPage(DataStore(store), queue=queue)
    assert not page.allowed and page.__panel__() is page.notice
    assert "user must be a user name" in page.notice.object and "<script>" not in page.notice.object
    monkeypatch.setattr(type(pn.state), "user", property(lambda self: "teach"))
    assert teacher.TeacherPage(DataStore(store), queue=queue).allowed


def test_the_teacher_page_is_registered():
    from workbench.ui import page, teacher

    assert page.REGISTRY["Teacher"] is teacher.TeacherPage
    assert teacher.TeacherPage in page.pages()


# ============================================================================ a real server with sign-in


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_signed_in_server_refuses_an_unauthenticated_request(tmp_path):
    app = tmp_path / "app.py"
    app.write_text("import panel as pn\npn.panel('the-secret-page').servable()\n")
    creds = tmp_path / "users.json"
    passwords = classroom.make_credentials(["ann"], creds)
    port = _free_port()
    cmd = classroom.serve_command(host="127.0.0.1", port=port, apps=str(app), python=sys.executable,
                                  auth_module=os.path.join(REPO, "apps", "auth.py"))
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"           # the test listens on this machine only
    base = {k: v for k, v in os.environ.items() if not k.startswith("PANEL_")}
    env = classroom.serve_environment(creds, cookie_secret=classroom.new_cookie_secret(), base=base)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        base_url = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(_NoRedirect)
        deadline = time.monotonic() + 90
        while True:
            try:
                form = opener.open(f"{base_url}/login", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "panel serve did not start within 90 s"
                time.sleep(0.5)
        token = re.search(r'name="_xsrf" value="([^"]+)"', form.read().decode()).group(1)
        xsrf = re.search(r"workbench_xsrf=([^;]+)", form.headers.get("Set-Cookie")).group(1)
        with pytest.raises(urllib.error.HTTPError) as refused:        # no cookie: sent to the login page
            opener.open(f"{base_url}/app", timeout=10)
        assert refused.value.code in (302, 401, 403)
        assert "login" in (refused.value.headers.get("Location") or "login")
        assert b"the-secret-page" not in refused.value.read()

        def post(password):
            body = urllib.parse.urlencode({"username": "ann", "password": password, "_xsrf": token}).encode()
            req = urllib.request.Request(f"{base_url}/login", data=body,
                                         headers={"Cookie": f"workbench_xsrf={xsrf}", "Origin": base_url})
            with pytest.raises(urllib.error.HTTPError) as answer:
                opener.open(req, timeout=10)
            return answer.value

        wrong = post("wrong")
        assert wrong.code == 401 and b"Wrong user name or password" in wrong.read()
        assert "user=" not in (wrong.headers.get("Set-Cookie") or "")
        ok = post(passwords["ann"])                                      # signed in: redirected with a cookie
        assert ok.code == 302
        assert "user=" in ", ".join(ok.headers.get_all("Set-Cookie") or [])
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not shutil.which("openssl"), reason="makes a self-signed certificate with openssl")
def test_tls_serving_sets_secure_cookies(tmp_path):
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    classroom.check_tls_files(cert, key)
    app = tmp_path / "app.py"
    app.write_text("import panel as pn\npn.panel('the-secret-page').servable()\n")
    creds = tmp_path / "users.json"
    passwords = classroom.make_credentials(["ann"], creds)
    port = _free_port()
    cmd = classroom.serve_command(host="127.0.0.1", port=port, apps=str(app), python=sys.executable,
                                  auth_module=os.path.join(REPO, "apps", "auth.py"), ssl_certfile=str(cert),
                                  ssl_keyfile=str(key))
    cmd[cmd.index("0.0.0.0")] = "127.0.0.1"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PANEL_", "WORKBENCH_"))}
    env = classroom.serve_environment(creds, cookie_secret=classroom.new_cookie_secret(), tls=True, base=base)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                form = opener.open(f"{url}/login", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "panel serve did not start within 90 s"
                time.sleep(0.5)
        assert "secure" in form.headers.get("Set-Cookie").lower()          # even the form's token cookie
        token = re.search(r'name="_xsrf" value="([^"]+)"', form.read().decode()).group(1)
        xsrf = re.search(r"workbench_xsrf=([^;]+)", form.headers.get("Set-Cookie")).group(1)
        body = urllib.parse.urlencode({"username": "ann", "password": passwords["ann"], "_xsrf": token}).encode()
        req = urllib.request.Request(f"{url}/login", data=body, headers={"Cookie": f"workbench_xsrf={xsrf}",
                                                                          "Origin": url})
        with pytest.raises(urllib.error.HTTPError) as ok:
            opener.open(req, timeout=10)
        assert ok.value.code == 302
        cookies = [c.lower() for c in ok.value.headers.get_all("Set-Cookie")]
        signed_in = [c for c in cookies if c.startswith(("user=", "workbench_session="))]
        assert len(signed_in) == 2
        assert all("; secure" in c and "httponly" in c and "samesite=strict" in c for c in signed_in)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10).read()   # no plain HTTP
    finally:
        server.kill()
        server.wait(timeout=30)
