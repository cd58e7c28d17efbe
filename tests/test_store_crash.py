"""The run store under real SIGKILLs: no run whose save() returned is lost, and no junk survives the next open.

A helper process imports the workbench once and forks writers on demand (a fresh interpreter
per kill would spend its time importing torch, not saving). Each writer opens the store (which
reconciles what the previous kill left) and saves runs in a loop, appending each run id to a log
only after ``save`` returned; the test SIGKILLs it at a random moment, then counts the junk the
kill left (temporary directories, run directories without an index row) before the next writer
cleans it. At the end a fresh store must list every logged id, and leave no temporary or
unindexed directory.
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
                while True:
                    rid = store.save(run)
                    os.write(fd, (rid + "\n").encode())   # only after save() returned
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

KILLS = 30


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
        for _ in range(KILLS):
            pid = int(_ask(helper, "fork"))
            time.sleep(rng.uniform(0.1, 0.6))
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
    print(f"{len(saved)} saves returned, {len(listed)} runs listed; kills that left junk: {left}")
