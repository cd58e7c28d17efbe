"""One server per store: a second server on the same WORKBENCH_HOME refuses to start and names the first
(pid, port); the lock goes with the first server's process, also when it is killed. Real processes."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers.classroom_server import ROOT, free_port, start_classroom

from workbench import classroom

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_hold_home_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = classroom.hold_home(tmp_path / "home", 5006)
    try:
        assert (tmp_path / "home" / "server.lock").read_text() == f"{os.getpid()} 5006\n"
        with pytest.raises(classroom.HomeInUse, match=rf"another workbench server \(pid {os.getpid()}, port 5006\) "
                                                      rf"already serves WORKBENCH_HOME={tmp_path / 'home'}"):
            classroom.hold_home(tmp_path / "home", 5007)                # flock: one holder per open file
        assert (tmp_path / "home" / "server.lock").read_text() == f"{os.getpid()} 5006\n"
        other = classroom.hold_home(tmp_path / "elsewhere", 5007)       # another store is another lock
        classroom.release_home(other)
    finally:
        classroom.release_home(first)
    again = classroom.hold_home(tmp_path / "home", 5008)
    assert (tmp_path / "home" / "server.lock").read_text() == f"{os.getpid()} 5008\n"
    classroom.release_home(again)


def _laptop_server(home, port):
    """``make serve``'s line (127.0.0.1, no sign-in) on the store ``home``."""
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORKBENCH_CREDENTIALS", None)
    return subprocess.Popen([sys.executable, "-m", "panel", "serve", "apps/", "--port", str(port), "--address",
                             "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_up(proc, port, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/apps", timeout=5).read(100)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not start")


def test_a_second_server_on_the_same_store_refuses_to_start(tmp_path):
    home = tmp_path / "home"
    port1 = free_port()
    first = _laptop_server(home, port1)
    try:
        _wait_up(first, port1)
        port2 = free_port()
        second = _laptop_server(home, port2)                            # make serve again, another port
        try:
            out, _ = second.communicate(timeout=120)
        finally:
            if second.poll() is None:
                second.kill()
        text = out.decode()
        assert second.returncode not in (0, None), text[-2000:]
        assert f"another workbench server (pid {first.pid}, port {port1}) already serves WORKBENCH_HOME={home}" \
            in text
        with pytest.raises(RuntimeError, match=rf"pid {first.pid}, port {port1}"):
            start_classroom(tmp_path)                                   # the classroom line on it: refused too
        urllib.request.urlopen(f"http://127.0.0.1:{port1}/apps", timeout=30).read(100)   # the first goes on
        first.send_signal(signal.SIGKILL)                               # killed: its lock goes with it
        first.wait(30)
        room = start_classroom(tmp_path)
        try:
            assert (home / "server.lock").read_text().split()[0] == str(room.proc.pid)
        finally:
            room.stop()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(30)
