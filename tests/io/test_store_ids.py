"""Fuzzing the run ids a browser or a caller can hand to :class:`workbench.RunStore`.

A run id reaches the store from the Runs page, a notebook or a planted directory name. Whatever it
is (a path with ``..``, an absolute path, a NUL byte, a non-string, a near miss of a real id), every
method that takes one either acts on exactly that run or raises :class:`StoreError` / ValueError
naming the id; no file outside ``runs/`` is read or removed, and the real runs stay intact.
"""
from __future__ import annotations

import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench.io.store import StoreError

PATHISH = st.sampled_from(["..", ".", "../..", "../outside", "/etc/passwd", "runs/../..", ".del-x", ".tmp-x",
                           "a/b", "a\\b", "a\x00b", "", " ", "~", "${HOME}", "%2e%2e", "..\\..", "\u202e", "é"])
TEXT = st.text(alphabet=string.printable + "\x00/\\.é\u202e", max_size=40)
OTHER = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.binary(max_size=8),
                  st.lists(st.integers(), max_size=2))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store with one real run, and a sentinel file beside the store that must survive."""
    root = tmp_path_factory.mktemp("ids")
    store = wb.RunStore(root / "home")
    ds = wb.data.load("digits")
    torch.manual_seed(0)
    run = wb.train(wb.models.build(wb.models.config_for(ds, d_model=8, d_hidden=8)), ds,
                   wb.TrainConfig(steps=2, eval_every=1))
    rid = store.save(run, name="real")
    sentinel = root / "outside"
    sentinel.write_text("keep me")
    return store, rid, sentinel


def _methods(store):
    return {
        "read_json": lambda i: store.read_json(i),
        "load": lambda i: store.load(i),
        "owner": lambda i: store.owner(i),
        "share": lambda i: store.share(i, True),
        "delete": lambda i: store.delete(i, user="mallory"),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_id=st.one_of(PATHISH, TEXT, OTHER), method=st.sampled_from(["read_json", "load", "owner", "share",
                                                                       "delete"]))
def test_any_run_id_is_refused_by_name_or_names_the_real_run(planted, run_id, method):
    store, rid, sentinel = planted
    call = _methods(store)[method]
    if run_id == rid:
        if method == "delete":  # mallory does not own it: refused, and the run stays
            with pytest.raises(StoreError, match="cannot delete"):
                call(run_id)
        else:
            call(run_id)
    else:
        with pytest.raises((StoreError, ValueError)) as err:
            call(run_id)
        assert "run" in str(err.value) and repr(run_id)[:20] in str(err.value)
    assert sentinel.read_text() == "keep me"
    assert store.list()["run_id"].tolist() == [rid]
    assert store.load(rid).name == "real"


def test_a_near_miss_of_a_real_id_is_not_that_run(planted):
    store, rid, _ = planted
    for near in (rid + " ", " " + rid, rid.upper() if rid.upper() != rid else rid + "x", rid + "/", "./" + rid,
                 f"../runs/{rid}", f"{rid}/../{rid}"):
        with pytest.raises(StoreError):
            store.read_json(near)
    assert store.list()["run_id"].tolist() == [rid]
