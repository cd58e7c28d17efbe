"""The run store against a hostile class (issue 21, items 4, 5 and 13): bounded names, files of a run read
only by id and owner, and a rebuild of the index that loses no run saved meanwhile and keeps a bounded
number of backups."""
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import workbench as wb
from workbench import store as store_module
from workbench.io.store import INDEX_BACKUPS, NAME_MAX_CHARS, RunStore, StoreError, pack_run
from workbench.ui.session import DataStore, UserStore

ROOT = Path(__file__).resolve().parents[2]


def _tiny_run(name="tiny"):
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=8, n_layers=1,
                                                d_hidden=8))
    return wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16), name=name)


@pytest.fixture(scope="module")
def run():
    return _tiny_run()


# ----------------------------------------------------------------------------- item 13: bounded names


def test_a_run_name_longer_than_the_bound_is_refused_naming_the_field(store, run):
    with pytest.raises(ValueError, match=rf"name must be at most {NAME_MAX_CHARS} characters, got 5,242,880"):
        store.save(run, name="x" * (5 * 2**20))
    assert len(store.list()) == 0 and not [p for p in store.runs_dir.iterdir()]   # nothing half-written
    rid = store.save(run, name="y" * NAME_MAX_CHARS)                                 # the bound itself is fine
    assert store.list()["name"].tolist() == ["y" * NAME_MAX_CHARS]
    assert store.load(rid).name == "y" * NAME_MAX_CHARS
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        store.save(run, name=["not", "a", "name"])


def test_oversized_meta_is_refused_naming_the_field(store, run):
    big = _tiny_run()
    big.meta = {"notes": "z" * (store_module.META_MAX_BYTES + 1)}
    with pytest.raises(ValueError, match="meta must be at most"):
        store.save(big)
    assert len(store.list()) == 0


def test_a_huge_name_saved_before_the_bound_is_listed_shortened_and_kept_whole(store, run):
    rid = store.save(run, name="short")
    path = store.runs_dir / rid / "run.json"
    doc = json.loads(path.read_text())
    doc["name"] = "<b>" + "n" * (2 * 2**20)        # as an older version wrote it
    path.write_text(json.dumps(doc))
    store.rebuild_index()
    listed = store.list()["name"].iloc[0]
    assert len(listed) == NAME_MAX_CHARS and listed.startswith("<b>nnn") and listed.endswith("…")
    assert len(store.load(rid).name) == 2 * 2**20 + 3                               # no run is lost


# ----------------------------------------------------------------------------- item 4: files by id and owner


@pytest.fixture
def owned(store, run):
    ids = {user: store.save(run, name=f"{user}-run", owner=user) for user in ("alice", "bob", "teach")}
    store.share(ids["teach"])
    return ids


def test_read_metrics_reads_a_run_by_id_for_its_owner_only(store, owned):
    metrics = store.read_metrics(owned["alice"], user="alice")
    expected = pd.read_csv(store.runs_dir / owned["alice"] / "metrics.csv")
    pd.testing.assert_frame_equal(metrics, expected)
    assert len(store.read_metrics(owned["teach"], user="alice"))                    # shared: readable
    with pytest.raises(StoreError, match="belongs to another user"):
        store.read_metrics(owned["bob"], user="alice")
    assert len(store.read_metrics(owned["bob"]))                                    # user=None: a teacher


@pytest.mark.parametrize("forged", ["../..", "../../etc", "..", ".", "/etc/passwd", "runs/../x", ".tmp-1@h@x",
                                    "a/b", "", "x" * 5000 + "/", "%2e%2e%2f"])
def test_read_metrics_refuses_anything_but_a_run_id(store, owned, forged, tmp_path):
    # a metrics.csv placed where a path id would reach
    (store.root / "metrics.csv").write_text("step,split,metric,value\n1,val,loss,0.5\n")
    with pytest.raises(StoreError):
        store.read_metrics(forged, user="alice")
    with pytest.raises(StoreError):
        store.read_metrics(forged)


def test_the_user_view_forwards_nothing_but_locations(store, owned):
    view = DataStore(store, user="alice").store
    assert isinstance(view, UserStore)
    with pytest.raises(StoreError, match="belongs to another user"):
        view.read_metrics(owned["bob"])
    assert len(view.read_metrics(owned["alice"], user=None))       # the session decides, not the caller
    with pytest.raises(StoreError, match="belongs to another user"):
        view.read_metrics(owned["bob"], user=None)
    for hidden in ("reconcile", "_dir", "_read_metrics", "_session", "delete_all"):
        with pytest.raises(AttributeError):
            getattr(view, hidden)
    assert view.owner == "alice"                                    # the saving owner: the session's user
    assert view.root == store.root and view.runs_dir == store.runs_dir and view.index_error is None


# ----------------------------------------------------------------------------- item 5: rebuilding the index


def test_only_a_teacher_rebuilds_the_index(store, owned, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    student = DataStore(store, user="alice")
    assert not student.may_rebuild
    with pytest.raises(StoreError, match="only a teacher can rebuild the run index"):
        student.rebuild_index()
    with pytest.raises(StoreError, match="only a teacher can rebuild the run index"):
        student.store.rebuild_index()
    assert not list(store.root.glob("index.sqlite.bak-*"))          # nothing was moved aside
    teacher = DataStore(store, user="teach")
    assert teacher.may_rebuild and DataStore(store).may_rebuild      # a teacher, the laptop
    report = teacher.rebuild_index()
    assert sorted(report["indexed"]) == sorted(owned.values())


def test_rebuilding_keeps_a_bounded_number_of_backups(store, owned):
    moved = []
    for _ in range(INDEX_BACKUPS + 3):
        moved.append(store.rebuild_index()["moved_to"])
    backups = sorted(p.name for p in store.root.glob("index.sqlite.bak-*"))
    assert len(backups) == INDEX_BACKUPS
    assert {Path(m).name for m in moved[-INDEX_BACKUPS:]} == set(backups)   # the newest are kept
    assert sorted(store.list()["run_id"]) == sorted(owned.values())


def test_saves_from_threads_during_rebuilds_all_reach_the_index(store, run):
    files = pack_run(run)
    errors, saved = [], []

    def saver(k):
        try:
            mine = RunStore(store.root)
            for i in range(6):
                saved.append(mine.save(wb.store.unpack_run(files), name=f"t{k}-{i}"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    rebuilds = 0
    while any(t.is_alive() for t in threads):
        RunStore(store.root).rebuild_index()
        rebuilds += 1
    for t in threads:
        t.join()
    assert not errors, errors
    assert rebuilds >= 2
    assert len(saved) == 18
    with sqlite3.connect(store.index_path) as db:        # the index itself, no reconcile first
        indexed = {r[0] for r in db.execute("SELECT run_id FROM runs")}
    assert set(saved) <= indexed, sorted(set(saved) - indexed)


_SAVER = """
import sys, json
from pathlib import Path
from workbench.store import RunStore, unpack_run
root, src, tag, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
files = {name: (src / name).read_bytes() for name in ("run.json", "model.safetensors", "metrics.csv")}
store = RunStore(root)
ids = [store.save(unpack_run(files), name=f"{tag}-{i}") for i in range(n)]
print(json.dumps(ids))
"""


def test_saves_from_processes_during_rebuilds_all_reach_the_index(store, run, tmp_path):
    src = tmp_path / "packed"
    src.mkdir()
    for name, data in pack_run(run).items():
        (src / name).write_bytes(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(store.root), str(src), f"p{k}", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for k in range(2)]
    rebuilds, t0 = 0, time.monotonic()
    while any(p.poll() is None for p in procs) and time.monotonic() - t0 < 120:
        store.rebuild_index()
        rebuilds += 1
        time.sleep(0.02)
    saved = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        saved += json.loads(out.strip().splitlines()[-1])
    assert len(saved) == 16 and rebuilds >= 2
    with sqlite3.connect(store.index_path) as db:
        indexed = {r[0] for r in db.execute("SELECT run_id FROM runs")}
    assert set(saved) <= indexed, sorted(set(saved) - indexed)
    assert len(list(store.root.glob("index.sqlite.bak-*"))) <= INDEX_BACKUPS
