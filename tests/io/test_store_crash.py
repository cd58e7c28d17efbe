"""The run store under real SIGKILLs and concurrent writers.

SIGKILLs: a helper process imports the workbench once and forks writers on demand (a fresh
interpreter per kill would spend its time importing torch, not saving). Each writer opens the
store (which reconciles what the previous kill left) and saves runs in a loop (with an owner,
and marking every third run shared, so ``share``'s rewrite of ``run.json`` is killed too),
appending each run id to a log only after ``save`` returned; the test SIGKILLs it at a random
moment, 50 times, then counts the junk the kill left (temporary directories, run directories
without an index row) before the next writer cleans it. At the end a fresh store must list every
logged id, every run must load (no corrupt or half-written file), and no temporary or unindexed
directory may be left.

Concurrent writers: two processes save into one store at the same moment; every id either
returned is listed and loads, with its owner.
"""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import workbench as wb

HELPER = r"""
import os, sys, traceback
import pandas as pd
import workbench as wb

root, log, errors = sys.argv[1:4]


def tiny_run():
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1))
    metrics = pd.DataFrame({"step": [1, 1], "split": ["val", "val"], "metric": ["loss", "acc"], "value": [2.0, 0.1]})
    spec = {"name": "digits", **wb.data.check_options("digits")}
    return wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), dataset=spec, metrics=metrics,
                           name="crash")


tiny_run(), wb.RunStore   # import torch and the store here, once: a writer's short life goes to saving
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "fork":
        pid = os.fork()
        if pid == 0:                      # the writer: save until killed
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                store = wb.RunStore(root)
                run = tiny_run()
                owner = f"user{os.getpid() % 3}"
                n = 0
                while True:
                    rid = store.save(run, owner=owner)
                    os.write(fd, (rid + "\n").encode())   # only after save() returned
                    n += 1
                    if n % 3 == 0:
                        store.share(rid)
            except BaseException:
                with open(errors, "a") as f:
                    f.write(traceback.format_exc())
            finally:
                os._exit(1)
        print(pid, flush=True)
    elif cmd[0] == "reap":
        os.waitpid(int(cmd[1]), 0)        # a zombie's pid still looks alive
        print("reaped", flush=True)
    else:
        break
"""

KILLS = 50


def _ask(helper, line):
    helper.stdin.write(line + "\n")
    helper.stdin.flush()
    answer = helper.stdout.readline().strip()
    assert answer, f"helper died on {line!r}"
    return answer


def _indexed(index):
    db = sqlite3.connect(index, timeout=30)
    try:
        return {r[0] for r in db.execute("SELECT run_id FROM runs")}
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")
def test_sigkilled_saves_lose_nothing_and_leave_no_junk(tmp_path):
    root, log, errors = tmp_path / "home", tmp_path / "saved.txt", tmp_path / "errors.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_HOME": str(root)}
    helper = subprocess.Popen([sys.executable, "-c", HELPER, str(root), str(log), str(errors)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    rng = random.Random(10)
    left = {"tmp": 0, "unindexed": 0}
    try:
        assert helper.stdout.readline().strip() == "ready"
        for i in range(KILLS):
            pid = int(_ask(helper, "fork"))
            # mostly short lives (kills land inside saves); every tenth writer lives long enough, even on a
            # loaded machine, for several saves and a share() to return before its kill
            time.sleep(rng.uniform(0.05, 0.4) if i % 10 else 2.5)
            os.kill(pid, signal.SIGKILL)
            assert _ask(helper, f"reap {pid}") == "reaped"
            runs = root / "runs"
            if runs.is_dir() and (root / "index.sqlite").exists():
                left["tmp"] += any(p.name.startswith(".tmp-") for p in runs.iterdir())
                dirs = {p.name for p in runs.iterdir() if not p.name.startswith(".")}
                left["unindexed"] += bool(dirs - _indexed(root / "index.sqlite"))
    finally:
        helper.stdin.close()
        helper.wait(timeout=60)
    assert not errors.exists(), errors.read_text()
    saved = log.read_text().split() if log.exists() else []
    assert saved, "no save returned before the kills: the writers never got going"
    assert sum(left.values()) > 0, "no kill landed inside a save: the test did not exercise recovery"

    store = wb.RunStore(root)
    listed = set(store.list()["run_id"])
    assert set(saved) <= listed, f"lost runs whose save returned: {sorted(set(saved) - listed)}"
    names = {p.name for p in store.runs_dir.iterdir()}
    assert not [n for n in names if n.startswith(".")], sorted(names)       # no .tmp-* or .del-* left
    assert names == listed                                                  # no complete directory unindexed
    assert store.broken().empty
    for rid in listed:                                                      # and every listed run loads
        assert store.load(rid).model.config.d_model == 8
        assert store.owner(rid) in {"user0", "user1", "user2"}
    shared = {rid for rid in listed if store.read_json(rid)["shared"]}
    assert shared, "no share() ran before the kills"
    print(f"{len(saved)} saves returned, {len(listed)} runs listed; kills that left junk: {left}")


WRITER = r"""
import sys, time
import pandas as pd
import workbench as wb

root, owner, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1))
metrics = pd.DataFrame({"step": [1, 1], "split": ["val", "val"], "metric": ["loss", "acc"], "value": [2.0, 0.1]})
spec = {"name": "digits", **wb.data.check_options("digits")}
run = wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), dataset=spec, metrics=metrics, name="same")
store = wb.RunStore(root)
print("ready", flush=True)
while not __import__("os").path.exists(go):   # both start saving at the same moment
    time.sleep(0.01)
for _ in range(n):
    print(store.save(run, owner=owner), flush=True)
"""

SAVES_EACH = 25


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_saving_at_once_lose_nothing(tmp_path):
    root, go = tmp_path / "home", tmp_path / "go"
    wb.RunStore(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {owner: subprocess.Popen([sys.executable, "-c", WRITER, str(root), owner, str(SAVES_EACH), str(go)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for owner in ("ann", "bob")}
    try:
        for p in procs.values():
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        go.touch()
        out = {owner: p.communicate(timeout=240) for owner, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for owner, p in procs.items():
        assert p.returncode == 0, out[owner][1][-3000:]
    ids = {owner: out[owner][0].split() for owner in procs}
    assert all(len(v) == SAVES_EACH for v in ids.values()), {k: len(v) for k, v in ids.items()}
    every = ids["ann"] + ids["bob"]
    assert len(set(every)) == 2 * SAVES_EACH                                # ids unique across writers

    store = wb.RunStore(root)
    listing = store.list()
    assert sorted(listing["run_id"]) == sorted(every)                       # every returned id listed, nothing else
    assert sorted(p.name for p in store.runs_dir.iterdir()) == sorted(every)   # no junk, no unindexed directory
    for owner in procs:
        assert sorted(store.list(user=owner)["run_id"]) == sorted(ids[owner])
    for rid in every:
        assert store.load(rid).model.config.d_model == 8
    assert store.broken().empty
    db = sqlite3.connect(store.index_path)
    owners = [r[0] for r in db.execute("SELECT owner FROM runs ORDER BY rowid")]   # commit order
    db.close()
    switches = sum(a != b for a, b in zip(owners, owners[1:]))
    assert switches >= 2, f"the writers did not overlap (commit order {owners}): the test saw no concurrency"
