"""Run store: exact round trips, atomic and fsynced writes, clear refusals of corrupt or foreign files (run.json,
weights, metrics, index.sqlite), rebuild_index, and the clean-up after killed saves (see also test_store_crash)."""
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.io.store import files as store_files
from workbench.io.store import index as store_index
from workbench.io.store import StoreError


@pytest.fixture(scope="module")
def mlp_run():
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.config_for(ds, d_model=32, d_hidden=32))
    return wb.train(model, ds, wb.TrainConfig(steps=10, eval_every=5)), ds


def test_round_trip_is_exact(store, mlp_run):
    run, ds = mlp_run
    run.meta = {"group": "g1", "stage": 2, "note": "hello"}
    rid = store.save(run)
    back = store.load(rid)
    sa, sb = run.model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.model.config == run.model.config and back.train_config == run.train_config
    pd.testing.assert_frame_equal(back.metrics, run.metrics, check_dtype=False)
    assert back.meta == run.meta and back.dataset == ds.spec()
    listing = store.list()
    assert listing.loc[0, "run_id"] == rid and listing.loc[0, "stage"] == 2 and listing.loc[0, "group_name"] == "g1"
    assert listing.loc[0, "val_acc"] == pytest.approx(run.final("acc"))


def test_tied_glyph_transformer_round_trip(store):
    ds = wb.data.load("modadd", p=5)
    cfg = wb.models.config_for(ds, d_model=16, n_heads=2, d_mlp=32, embedding="glyph", tie_embeddings=True)
    model = wb.models.build(cfg)
    run = wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=3))
    back = store.load(store.save(run)).model
    assert back.readout.weight is back.tok_embed.weight
    assert torch.equal(back(ds.x_val), model(ds.x_val))


def test_files_are_safetensors_and_json_never_pickle(store, mlp_run):
    rid = store.save(mlp_run[0])
    d = store.runs_dir / rid
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert "readout.weight" in header
    assert raw[:2] != b"\x80\x04"  # not a pickle stream
    assert json.loads((d / "run.json").read_text())["format"] == "depth-workbench-run"


def test_truncated_weights_are_refused(store, mlp_run):
    rid = store.save(mlp_run[0])
    p = store.runs_dir / rid / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(StoreError, match="truncated or foreign"):
        store.load(rid)


def test_foreign_and_broken_json_are_refused(store, mlp_run):
    rid = store.save(mlp_run[0])
    p = store.runs_dir / rid / "run.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(StoreError, match="not a depth-workbench run"):
        store.load(rid)
    p.write_text('{"format": "depth-workb')
    with pytest.raises(StoreError, match="not valid JSON"):
        store.load(rid)


def test_weights_of_another_shape_are_refused(store, mlp_run):
    rid = store.save(mlp_run[0])
    doc_path = store.runs_dir / rid / "run.json"
    doc = json.loads(doc_path.read_text())
    doc["model"]["d_model"] = 48
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="do not match the config"):
        store.load(rid)


def test_missing_and_malicious_ids(store):
    with pytest.raises(StoreError, match="does not exist"):
        store.load("20990101-000000-nothing-abcdef")
    with pytest.raises(StoreError, match="not a valid run id"):
        store.load("../../etc")


def test_failed_save_leaves_nothing_behind(store, mlp_run, monkeypatch):
    run = mlp_run[0]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(run.metrics), "to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save(run)
    assert list(store.runs_dir.iterdir()) == []
    assert len(store.list()) == 0


def test_delete_and_default_home(store, mlp_run, tmp_path, monkeypatch):
    rid = store.save(mlp_run[0])
    store.delete(rid)
    assert len(store.list()) == 0 and not (store.runs_dir / rid).exists()
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "elsewhere"))
    assert wb.RunStore().root == tmp_path / "elsewhere"


def test_list_is_newest_first_and_saving_order_breaks_ties(store, mlp_run):
    run, _ = mlp_run
    ids = [store.save(run, name=f"r{i}") for i in range(4)]   # usually within one second
    assert list(store.list()["run_id"]) == ids[::-1]


# ============================================================================ planted files (issue 10)


def _tiny_run(name="tiny", seed=0):
    """A run built without training: a small digits-shaped MLP and a hand-made metrics table."""
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1, seed=seed))
    metrics = pd.DataFrame({"step": [1, 1, 2, 2], "split": ["val"] * 4, "metric": ["loss", "acc"] * 2,
                            "value": [2.0, 0.1, 1.5, 0.25]})
    spec = {"name": "digits", **wb.data.check_options("digits")}
    return wb.training.Run(model=model, train_config=wb.TrainConfig(steps=2), dataset=spec, metrics=metrics,
                           name=name)


def _edit_json(store, rid, edit):
    p = store.runs_dir / rid / "run.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))
    return p


def _edit(path, value):
    """``lambda doc: ...`` setting (value) or deleting (value is _DEL) a dotted path."""
    def go(doc):
        *head, last = path.split(".")
        d = doc
        for k in head:
            d = d[k]
        if value is _DEL:
            del d[last]
        else:
            d[last] = value
    return go


_DEL = object()


@pytest.mark.parametrize("path, value, field", [
    ("train", _DEL, "'train'"),
    ("model", _DEL, "'model'"),
    ("dataset", _DEL, "'dataset'"),
    ("status", _DEL, "'status'"),
    ("model.d_in", _DEL, "'model.d_in'"),
    ("train.steps", "x", "steps"),
    ("train.lr", True, "lr"),
    ("train.foo", 1, "'train.foo'"),
    ("dataset", 5, "'dataset'"),
    ("dataset", {"seed": 0}, "'dataset.name'"),
    ("dataset.val_fraction", "lots", "val_fraction"),
    ("dataset.bogus", 1, "bogus"),
    ("dataset.name", "nope", "dataset"),
    ("model.d_model", "wide", "d_model"),
    ("model.family", "cnn", "family"),
    ("model.norm", "batch", "norm"),
    ("status", 3, "'status'"),
    ("name", None, "'name'"),
    ("meta", [1, 2], "'meta'"),
])
def test_invalid_run_json_is_refused_naming_run_file_and_field(store, path, value, field):
    rid = store.save(_tiny_run())
    p = _edit_json(store, rid, _edit(path, value))
    for call in (store.read_json, store.load):
        with pytest.raises(StoreError) as e:
            call(rid)
        msg = str(e.value)
        assert rid in msg and str(p) in msg and field in msg, msg


def test_planted_config_over_the_memory_budget_is_refused_before_building(store, monkeypatch):
    """The issue's 1.1 TB MLP: refused by the config's own validate() (its memory budget), never built."""
    rid = store.save(_tiny_run())
    _edit_json(store, rid, lambda d: d["model"].update(d_model=8192, d_hidden=65536, n_layers=256))
    with pytest.raises(StoreError, match="WORKBENCH_MAX_MODEL_MB"):
        store.read_json(rid)     # validation only: if this did not raise, load() below would try to allocate
    with pytest.raises(StoreError, match=rf"{rid}.*run.json.*'model'.*WORKBENCH_MAX_MODEL_MB"):
        store.load(rid)


def test_a_valid_planted_concatenation_spec_loads_and_a_bad_part_is_named(store):
    rid = store.save(_tiny_run())
    part = {"name": "digits", **wb.data.check_options("digits")}
    _edit_json(store, rid, lambda d: d.update(dataset={"name": "mixture", "parts": [part, part]}))
    assert store.load(rid).dataset["parts"] == [part, part]
    _edit_json(store, rid, lambda d: d.update(dataset={"name": "mixture", "parts": [part, {"name": 3}]}))
    with pytest.raises(StoreError, match=r"'dataset.parts\[1\].name'"):
        store.load(rid)


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused_unless_asked_for(store, bad):
    run = _tiny_run()
    rid = store.save(run)
    key = "readout.weight"
    _rewrite_weights(store.runs_dir / rid / "model.safetensors", lambda t: t[key].view(-1).__setitem__(3, bad))
    with pytest.raises(StoreError, match=rf"{rid}.*model.safetensors.*NaN or infinite.*{key}.*allow_nonfinite"):
        store.load(rid)
    back = store.load(rid, allow_nonfinite=True).model.state_dict()[key]
    assert back.view(-1)[3].item() == bad or (bad != bad and back.view(-1)[3].isnan())
    assert torch.isfinite(back.view(-1)[:3]).all()
    with pytest.raises(ValueError, match="allow_nonfinite must be True or False"):
        store.load(rid, allow_nonfinite="yes")


def test_weights_with_missing_extra_or_renamed_keys_are_refused(store):
    rid = store.save(_tiny_run())
    path = store.runs_dir / rid / "model.safetensors"
    original = path.read_bytes()
    key = "readout.weight"
    _rewrite_weights(path, lambda t: t.pop(key))
    with pytest.raises(StoreError, match=rf"do not match the config: missing '{key}'"):
        store.load(rid)
    path.write_bytes(original)
    _rewrite_weights(path, lambda t: t.update(extra=torch.zeros(2)))
    with pytest.raises(StoreError, match=r"do not match the config: unexpected \['extra'\]"):
        store.load(rid)
    path.write_bytes(original)
    _rewrite_weights(path, lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(StoreError, match=r"do not match the config: readout.weight has dtype torch.int32"):
        store.load(rid)
    path.write_bytes(original)
    assert torch.equal(store.load(rid).model.readout.weight, _tiny_run().model.readout.weight)


def test_metrics_without_their_columns_are_refused(store):
    rid = store.save(_tiny_run())
    (store.runs_dir / rid / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StoreError, match=r"metrics.csv: metrics table lacks column\(s\) \['step', 'split', 'metric', "
                                         r"'value'\]"):
        store.load(rid)


def test_save_checks_the_run_before_writing_anything(store):
    run = _tiny_run()
    run.dataset = 5
    with pytest.raises(StoreError, match=r"run 'tiny' \(not saved\): field 'dataset'"):
        store.save(run)
    run = _tiny_run()
    run.train_config = wb.TrainConfig(steps="x")
    with pytest.raises(StoreError, match="not saved.*steps"):
        store.save(run)
    assert list(store.runs_dir.iterdir()) == [] and len(store.list()) == 0


# ---------------------------------------------------------------------------- corrupt or foreign index (item 9)


def _foreign_runs_table(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, title TEXT, score REAL)")
    db.execute("INSERT INTO runs VALUES (1, 'someone else''s data', 0.5)")
    db.commit()
    db.close()


def _foreign_other_tables(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER, path TEXT)")
    db.commit()
    db.close()


def _random_bytes(path):
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))


def _truncated(path):
    path.write_bytes(path.read_bytes()[:1000] + b"\x00garbage" * 50)


@pytest.mark.parametrize("plant", [_random_bytes, _foreign_runs_table, _foreign_other_tables, _truncated])
def test_bad_index_gives_store_error_and_rebuild_index_recovers(tmp_path, plant):
    root = tmp_path / "home"
    s = wb.RunStore(root)
    ids = [s.save(_tiny_run(f"r{i}", seed=i)) for i in range(3)]
    before = s.list()
    index = root / "index.sqlite"
    if plant is not _truncated:
        index.unlink()
    plant(index)
    planted = index.read_bytes()

    bad = wb.RunStore(root)                       # opens: a bad index does not stop the store (or the dashboard)
    assert isinstance(bad.index_error, StoreError) and str(index) in str(bad.index_error)
    for call in (bad.list, lambda: bad.save(_tiny_run("new")), lambda: bad.delete(ids[0])):
        with pytest.raises(StoreError) as e:
            call()
        assert not isinstance(e.value, sqlite3.Error)
        assert str(index) in str(e.value) and "RunStore.rebuild_index()" in str(e.value)
    assert sorted(p.name for p in (root / "runs").iterdir()) == sorted(ids)   # save wrote nothing
    assert torch.equal(bad.load(ids[1]).model.readout.weight, _tiny_run(seed=1).model.readout.weight)

    report = bad.rebuild_index()
    assert sorted(report["indexed"]) == sorted(ids) and report["broken"] == {}
    assert report["moved_to"].read_bytes() == planted     # moved aside, never deleted
    after = bad.list()
    key = lambda df: df.sort_values("run_id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(after), key(before))
    assert wb.RunStore(root).index_error is None
    assert bad.save(_tiny_run("new")) in set(wb.RunStore(root).list()["run_id"])


def test_index_replaced_while_open_makes_save_fail_before_writing(store):
    store.save(_tiny_run())
    store.index_path.unlink()
    _foreign_runs_table(store.index_path)
    n = len(list(store.runs_dir.iterdir()))
    with pytest.raises(StoreError, match="foreign 'runs' table.*rebuild_index"):
        store.save(_tiny_run("second"))
    assert len(list(store.runs_dir.iterdir())) == n
    db = sqlite3.connect(store.index_path)
    assert db.execute("SELECT title FROM runs").fetchall() == [("someone else's data",)]   # untouched
    db.close()


def test_deleted_index_is_rebuilt_from_the_directories(store):
    ids = [store.save(_tiny_run(f"r{i}")) for i in range(2)]
    store.index_path.unlink()
    assert sorted(store.list()["run_id"]) == sorted(ids)


# ---------------------------------------------------------------------------- reconcile after crashes (item 8)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_open_indexes_a_complete_directory_whose_row_was_never_committed(store):
    ids = [store.save(_tiny_run(f"r{i}", seed=i)) for i in range(3)]
    before = store.list().set_index("run_id")
    db = sqlite3.connect(store.index_path)
    db.execute("DELETE FROM runs WHERE run_id = ?", (ids[1],))     # killed between the rename and the commit
    db.commit()
    db.close()
    fresh = wb.RunStore(store.root)
    after = fresh.list().set_index("run_id")
    assert set(after.index) == set(ids)
    pd.testing.assert_series_equal(after.loc[ids[1]], before.loc[ids[1]])
    assert fresh.broken().empty


def test_incomplete_or_invalid_directories_are_listed_as_broken_not_indexed(store):
    good = store.save(_tiny_run("good"))
    rids = {}
    for what in ("no-metrics", "bad-json", "nan-free-but-bad-shape", "empty"):
        rids[what] = store.save(_tiny_run(what))
    (store.runs_dir / rids["no-metrics"] / "metrics.csv").unlink()
    _edit_json(store, rids["bad-json"], _edit("train.steps", "x"))
    _edit_json(store, rids["nan-free-but-bad-shape"], _edit("model.d_model", 48))
    for f in (store.runs_dir / rids["empty"]).iterdir():
        f.unlink()
    (store.runs_dir / "not a run id").mkdir()
    db = sqlite3.connect(store.index_path)
    db.execute(f"DELETE FROM runs WHERE run_id IN ({','.join('?' * 4)})", list(rids.values()))
    db.commit()
    db.close()
    fresh = wb.RunStore(store.root)
    assert list(fresh.list()["run_id"]) == [good]
    broken = fresh.broken().set_index("run_id")["problem"]
    assert set(broken.index) == set(rids.values()) | {"not a run id"}
    assert "metrics.csv: missing" in broken[rids["no-metrics"]]
    assert "steps" in broken[rids["bad-json"]]
    assert "do not match the config" in broken[rids["nan-free-but-bad-shape"]]
    assert "run.json: missing" in broken[rids["empty"]]
    assert "not a valid run id" in broken["not a run id"]
    # repaired by hand, it is indexed on the next reconcile
    _edit_json(fresh, rids["bad-json"], _edit("train.steps", 2))
    assert fresh.reconcile()["indexed"] == [rids["bad-json"]]
    assert set(fresh.list()["run_id"]) == {good, rids["bad-json"]}


def test_stale_temporaries_are_removed_and_live_ones_kept(store):
    host = store_files._HOST
    old = time.time() - 2 * store_files.STALE_TMP_SECONDS
    names = {
        "dead": f".tmp-{_dead_pid()}@{host}@abc",              # writer gone: stale at once
        "alive": f".tmp-{os.getpid()}@{host}@abc",             # this process: a save in progress
        "other-host-fresh": ".tmp-1@elsewhere.example@abc",    # unknown writer, recent: kept
        "other-host-old": ".tmp-1@elsewhere.example@def",      # unknown writer, untouched for long: stale
        "untagged-fresh": ".tmp-x8y9z0",
        "untagged-old": ".tmp-a1b2c3",
        "delete-leftover": ".del-20240101-000000-x-abcdef",    # a delete cut short: finished
    }
    for key, name in names.items():
        d = store.runs_dir / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
        if key.endswith("-old"):
            os.utime(d / "model.safetensors", (old, old))
            os.utime(d, (old, old))
    idx_tmp = store.root / f".index.sqlite.{_dead_pid()}@{host}@xyz.tmp"
    idx_tmp.write_bytes(b"half an index")
    wb.RunStore(store.root)
    gone = {k for k, n in names.items() if not (store.runs_dir / n).exists()}
    assert gone == {"dead", "other-host-old", "untagged-old", "delete-leftover"}
    assert not idx_tmp.exists()
    assert all(sorted(p.name for p in (store.runs_dir / names[k]).iterdir()) == ["model.safetensors"]
               for k in ("alive", "other-host-fresh", "untagged-fresh"))


def test_rows_whose_directory_is_gone_are_dropped(store):
    a, b = store.save(_tiny_run("a")), store.save(_tiny_run("b"))
    os.replace(store.runs_dir / a, store.runs_dir / f".del-{a}")     # delete killed before its row went
    fresh = wb.RunStore(store.root)
    assert list(fresh.list()["run_id"]) == [b] and not (store.runs_dir / f".del-{a}").exists()


def test_every_file_and_rename_is_fsynced_before_it_counts(store, monkeypatch):
    """Each file: written, fsynced, renamed, its directory fsynced; then the run directory's rename and
    runs/ fsynced; all before the index row is committed."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name fsynced descriptors")
    events = []
    real_fsync, real_replace, real_connect = os.fsync, os.replace, sqlite3.connect

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    class Conn:
        def __init__(self, *a, **k):
            self._db = real_connect(*a, **k)

        def __getattr__(self, name):
            return getattr(self._db, name)

        def commit(self):
            events.append(("commit",))
            return self._db.commit()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(sqlite3, "connect", Conn)
    rid = store.save(_tiny_run())
    monkeypatch.undo()
    final = str(store.runs_dir / rid)
    replaces = [i for i, e in enumerate(events) if e[0] == "replace"]
    names = {os.path.basename(events[i][2]) for i in replaces[:-1]}
    assert names == {"model.safetensors", "metrics.csv", "run.json"} and events[replaces[-1]][2] == final
    synced = lambda i, path: any(e == ("fsync", os.path.realpath(path)) for e in events[:i])  # noqa: E731
    for i in replaces[:-1]:
        src, dst = events[i][1], events[i][2]
        assert synced(i, src), f"{src} renamed before fsync"
        nxt = replaces[replaces.index(i) + 1]
        assert any(e == ("fsync", os.path.realpath(os.path.dirname(dst))) for e in events[i:nxt])
    last = replaces[-1]
    commit = max(i for i, e in enumerate(events) if e == ("commit",))
    assert any(e == ("fsync", os.path.realpath(store.runs_dir)) for e in events[last:commit])


# ---------------------------------------------------------------------------- owners and shared runs (classroom)


def _owned_store(store):
    ids = {"ann": store.save(_tiny_run("a1"), owner="ann"), "ann2": store.save(_tiny_run("a2"), owner="ann"),
           "bob": store.save(_tiny_run("b1"), owner="bob"), "teach": store.save(_tiny_run("t1"), owner="teach"),
           "nobody": store.save(_tiny_run("n1"))}
    return ids


def test_owner_is_recorded_in_run_json_and_the_index(store):
    ids = _owned_store(store)
    for key, rid in ids.items():
        doc = json.loads((store.runs_dir / rid / "run.json").read_text())
        expected = None if key == "nobody" else key.rstrip("2")
        assert doc["owner"] == expected and doc["shared"] is False
        assert store.owner(rid) == expected
    listing = store.list().set_index("run_id")
    assert list(listing.columns[-2:]) == ["owner", "shared"]
    assert {rid: listing.loc[rid, "owner"] for rid in ids.values()} == {
        rid: (None if k == "nobody" else k.rstrip("2")) for k, rid in ids.items()}
    assert listing["shared"].dtype == bool and not listing["shared"].any()


def test_list_for_a_user_gives_their_runs_plus_shared_ones(store):
    ids = _owned_store(store)
    assert set(store.list()["run_id"]) == set(ids.values())          # no user: everything, as before
    assert set(store.list(user="ann")["run_id"]) == {ids["ann"], ids["ann2"]}
    assert set(store.list(user="bob")["run_id"]) == {ids["bob"]}
    assert store.list(user="carol").empty
    store.share(ids["teach"])
    store.share(ids["nobody"])
    assert set(store.list(user="bob")["run_id"]) == {ids["bob"], ids["teach"], ids["nobody"]}
    assert set(store.list(user="carol")["run_id"]) == {ids["teach"], ids["nobody"]}
    row = store.list(user="carol").set_index("run_id").loc[ids["teach"]]
    assert row["shared"] is True or row["shared"] == True  # noqa: E712 -- numpy bool
    assert json.loads((store.runs_dir / ids["teach"] / "run.json").read_text())["shared"] is True
    store.share(ids["nobody"], shared=False)
    assert set(store.list(user="carol")["run_id"]) == {ids["teach"]}
    # the newest-first order holds within a user's view too
    mine = (ids["ann"], ids["ann2"], ids["teach"])
    assert list(store.list(user="ann")["run_id"]) == [r for r in store.list()["run_id"] if r in mine]


def test_load_for_a_user_opens_own_and_shared_runs_only(store):
    ids = _owned_store(store)
    assert store.load(ids["ann"], user="ann").name == "a1"
    with pytest.raises(StoreError, match="belongs to another user and is not shared"):
        store.load(ids["bob"], user="ann")
    with pytest.raises(StoreError, match="not shared"):
        store.load(ids["nobody"], user="ann")
    store.share(ids["teach"])
    assert store.load(ids["teach"], user="ann").name == "t1"
    assert store.load(ids["bob"]).name == "b1"                       # no user (teacher, notebook): any run


def test_nobody_deletes_another_owners_run(store):
    ids = _owned_store(store)
    store.share(ids["teach"])
    for rid, user in [(ids["bob"], "ann"), (ids["teach"], "ann"), (ids["nobody"], "ann")]:
        with pytest.raises(StoreError, match=f"{user!r} cannot delete it"):
            store.delete(rid, user=user)
        assert (store.runs_dir / rid).is_dir() and rid in set(store.list()["run_id"])
    store.delete(ids["ann"], user="ann")
    assert ids["ann"] not in set(store.list()["run_id"]) and not (store.runs_dir / ids["ann"]).exists()
    store.delete(ids["bob"])                                          # a teacher: user=None
    assert set(store.list()["run_id"]) == {ids["ann2"], ids["teach"], ids["nobody"]}


@pytest.mark.parametrize("bad", ["", "a" * 65, "ann smith", "../etc", "<script>", "ann'; DROP TABLE runs;--", "-ann",
                                 "ann\n", "ánn", 3, None, b"ann", True])
def test_hostile_owner_names_are_refused_with_a_message(store, bad):
    n = len(list(store.runs_dir.iterdir()))
    if bad is not None:
        with pytest.raises(ValueError, match=r"owner must be a user name of 1 to 64 characters"):
            store.save(_tiny_run(), owner=bad)
        assert len(list(store.runs_dir.iterdir())) == n               # nothing written
        for call in (lambda: store.list(user=bad), lambda: store.delete("x", user=bad),
                     lambda: store.load("x", user=bad)):
            with pytest.raises(ValueError, match=r"user must be a user name"):
                call()
    for good in ("ann", "a" * 64, "ann.smith@school.example", "s-01_b+x"):
        assert store.owner(store.save(_tiny_run(), owner=good)) == good


def test_a_planted_owner_or_shared_flag_in_run_json_is_refused(store):
    rid = store.save(_tiny_run(), owner="ann")
    _edit_json(store, rid, _edit("owner", "<img src=x onerror=alert(1)>"))
    with pytest.raises(StoreError, match=r"run\.json: field 'owner'"):
        store.load(rid)
    _edit_json(store, rid, _edit("owner", "ann"))
    _edit_json(store, rid, _edit("shared", "yes"))
    with pytest.raises(StoreError, match=r"field 'shared': must be true or false"):
        store.load(rid)
    with pytest.raises(ValueError, match="shared must be True or False"):
        store.share(rid, shared=1)


def test_rebuild_index_recovers_owners_and_shared_flags(store):
    ids = _owned_store(store)
    store.share(ids["teach"])
    before = store.list()
    store.index_path.unlink()
    store.rebuild_index()
    key = lambda df: df.sort_values("run_id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(store.list()), key(before))
    assert set(store.list(user="bob")["run_id"]) == {ids["bob"], ids["teach"]}


def test_share_keeps_the_saving_order(store):
    a, b = store.save(_tiny_run("a")), store.save(_tiny_run("b"))
    order = list(store.list()["run_id"])
    store.share(a)
    store.index_path.unlink()
    store.rebuild_index()
    assert list(store.list()["run_id"]) == order == [b, a]


def _old_index(store):
    """Rewrite index.sqlite in the format written before owners (14 columns), keeping its rows."""
    db = sqlite3.connect(store.index_path)
    rows = db.execute(f"SELECT {', '.join(store_index._OLD_COLUMNS)} FROM runs").fetchall()
    db.close()
    store.index_path.unlink()
    db = sqlite3.connect(store.index_path)
    db.execute(f"CREATE TABLE runs ({', '.join(store_index._OLD_COLUMNS)}, PRIMARY KEY (run_id))")
    db.executemany(f"INSERT INTO runs VALUES ({', '.join('?' * 14)})", rows)
    db.commit()
    db.close()
    return rows


def test_an_index_written_before_owners_opens_and_gets_the_columns(store):
    old = store.save(_tiny_run("old"))
    rows = _old_index(store)
    assert len(rows) == 1
    fresh = wb.RunStore(store.root)
    assert fresh.index_error is None
    listing = fresh.list()
    assert list(listing["run_id"]) == [old] and listing.loc[0, "owner"] is None and not listing.loc[0, "shared"]
    db = sqlite3.connect(store.index_path)
    assert [r[1] for r in db.execute("PRAGMA table_info(runs)")] == store_index._COLUMNS
    db.close()
    new = fresh.save(_tiny_run("new"), owner="ann")
    assert set(fresh.list(user="ann")["run_id"]) == {new}
    fresh.share(old)
    assert set(fresh.list(user="ann")["run_id"]) == {new, old}


def test_two_stores_opening_an_old_index_at_once_both_migrate_it(store):
    store.save(_tiny_run("old"))
    _old_index(store)
    script = ("import sys, workbench as wb\n"
              "s = wb.RunStore(sys.argv[1]); assert s.index_error is None, s.index_error\n"
              "print(len(s.list()), len(s.list(user='ann')))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].split() for o in outs] == [["1", "0"]] * 3
    db = sqlite3.connect(store.index_path)
    assert [r[1] for r in db.execute("PRAGMA table_info(runs)")] == store_index._COLUMNS
    db.close()


def test_pack_and_unpack_a_trained_run_gives_the_same_run(store):
    """pack_run -> unpack_run: identical weights, metrics and configs, the same outputs; validated as load is."""
    from workbench.io.store import StoreError, pack_run, unpack_run

    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=2, d_hidden=16))
    run = wb.train(model, ds, wb.TrainConfig(steps=6, eval_every=3, seed=1))
    files = pack_run(run)
    assert sorted(files) == ["metrics.csv", "model.safetensors", "run.json"] and run.run_id is None
    back = unpack_run(files)
    reference = store.load(store.save(run))         # what the store itself round-trips
    a, b = run.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(back.metrics, reference.metrics)
    assert back.train_config == run.train_config and back.model.config == run.model.config
    assert back.dataset == run.dataset and back.status == run.status and back.run_id is None
    x = torch.as_tensor(ds.x_val[:16])
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(back.model(x), run.model(x))
    with pytest.raises(ValueError, match="exactly the keys"):
        unpack_run({"run.json": files["run.json"]})
    with pytest.raises(StoreError, match="safetensors"):
        unpack_run({**files, "model.safetensors": files["model.safetensors"][:100]})
