"""Run store: exact round trips, atomic writes, and clear refusals of corrupt or foreign files."""
import json
import struct

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.store import StoreError


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
