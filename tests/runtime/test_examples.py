"""The starter examples (workbench.runtime.examples): made once (idempotent), one set under two first starts at
once, removed and restored, never touching a user's run, visible and read-only to every signed-in user, their
stored results decoded to what was stored.

One real set in tiny mode (a few steps of each pipeline, ~10 s) checks the pipelines and what they store; the
bookkeeping tests swap the set's steps for a one-run step (``fast``), so they take a fraction of a second.
"""
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench.io.store import StoreError
from workbench.runtime import examples
from workbench.ui.session import UserStore

ROLES = [e.role for e in examples.EXAMPLES]


def _tiny_run(name: str) -> wb.training.Run:
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1))
    metrics = pd.DataFrame({"step": [1, 1], "split": ["val", "val"], "metric": ["loss", "acc"], "value": [2.0, 0.1]})
    spec = {"name": "digits", **wb.data.check_options("digits")}
    return wb.training.Run(model=model, train_config=wb.TrainConfig(steps=1), dataset=spec, metrics=metrics,
                           name=name)


@pytest.fixture
def fast(monkeypatch):
    """The set's steps replaced by one that saves a tiny run per role (``hold`` s while the lock is held)."""
    state = SimpleNamespace(hold=0.0, calls=[])

    def step(saver, tiny, monitor):
        state.calls.append(threading.get_ident())
        time.sleep(state.hold)
        for role in ROLES:
            saver.save(_tiny_run("x"), role=role, stored={"note": {"role": role}})

    monkeypatch.setattr(examples, "_STEPS", (("tiny runs", step, 1.0),))
    return state


def _files(store, run_id) -> dict:
    d = store.run_dir(run_id)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One real starter set, tiny (every pipeline a few steps), in its own store."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = wb.RunStore(tmp_path_factory.mktemp("examples"))
        ids = examples.make(store, tiny=True)
    finally:
        torch.set_num_threads(threads)
    return store, ids


def test_the_real_set_holds_every_role_owned_by_examples_shared_with_its_stored_results(made):
    store, ids = made
    listed = store.list()
    assert sorted(examples.example_ids(listed)) == sorted(ROLES) and len(ids) == len(ROLES)
    names = dict(zip(listed["run_id"], listed["name"]))
    assert {names[i] for i in ids} == {e.name for e in examples.EXAMPLES}
    for run_id in ids:
        doc = store.read_json(run_id)
        assert doc["owner"] == examples.OWNER and doc["shared"] is True and examples.is_example(doc)
        assert doc["meta"]["example"]["role"] in ROLES and doc["meta"]["example"]["set"] == examples.SET
    by_role = examples.example_ids(listed)
    stored = examples.results(store.read_json(by_role["pair-a"]))
    assert set(stored) == {"connectivity", "unroll", "sweeps", "scaling"}
    curves = stored["connectivity"]["curves"]
    assert {"method", "alpha", "split", "loss"} <= set(curves.columns) and len(curves)
    assert isinstance(stored["connectivity"]["plane"], wb.lmc.interpolation.Plane)
    assert isinstance(stored["scaling"]["fit"], wb.scaling.PowerLaw)
    assert set(stored["sweeps"]["table"]["d_model"]) == {8, 16}           # the Sweeps page's grid
    # the growth group: two stages of one group, each with the Depth lab's rankings of its own depth
    g0, g1 = (store.load(by_role[r]) for r in ("grow-0", "grow-1"))
    assert g0.meta["group"] == g1.meta["group"] and (g0.meta["stage"], g1.meta["stage"]) == (0, 1)
    assert g1.meta["parent"] == by_role["grow-0"]
    assert (g0.model.config.n_layers, g1.model.config.n_layers) == (1, 2)
    ranks = examples.results(store.read_json(by_role["grow-1"]))["depthlab"]["rankings"]
    assert set(ranks["layer"]) == {0, 1}
    # compose: the specialists' parent is the stored base, as the Compose page saves them
    spec = store.read_json(by_role["compose-grammar"])["meta"]
    assert spec["parent"] == by_role["compose-base"] and spec["domain"] == "grammar"
    table = examples.results(store.read_json(by_role["compose-base"]))["compose"]["table"]
    assert {"grammar", "arithmetic"} <= set(table["domain"])
    assert examples.status(store)["state"] == "ready"


def test_making_again_is_a_no_op(made):
    store, ids = made
    before = sorted(store.list()["run_id"])
    assert sorted(examples.make(store, tiny=True)) == sorted(ids)
    assert sorted(store.list()["run_id"]) == before


def test_a_signed_in_student_lists_and_opens_the_examples_read_only_and_a_teacher_may_delete(made, monkeypatch):
    store, ids = made
    student = UserStore(store, "student01", viewer="student01")
    assert set(ids) <= set(student.list()["run_id"])
    run_id = examples.example_ids(student.list())["pair-a"]
    assert student.load(run_id).model is not None and examples.results(student.read_json(run_id))
    with pytest.raises(StoreError, match="cannot delete"):
        student.delete(run_id)
    from workbench.ui.examples import ExamplesPanel, may_manage
    from workbench.ui.session import DataStore

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    pupil = DataStore(store, user="student01")
    assert not may_manage(pupil) and may_manage(DataStore(store, user="teach")) and may_manage(DataStore(store))
    panel = ExamplesPanel(datastore=pupil)
    assert not panel.remove_button.visible and not panel.act("remove")       # refused, with the reason
    assert "teacher" in panel.state.object and sorted(examples.example_ids(store.list()).values()) == sorted(ids)


def test_remove_and_restore_touch_only_example_runs(store, fast):
    mine = store.save(_tiny_run("example digits MLP seed 0"))            # a user's run named like one
    impostor = store.save(_tiny_run("notebook run"), owner=examples.OWNER)   # saved as "examples" from code
    before = {i: _files(store, i) for i in (mine, impostor)}
    first = examples.make(store)
    assert len(first) == len(ROLES)
    removed = examples.remove(store)
    assert sorted(removed) == sorted(first)
    assert examples.status(store) == {**examples.status(store), "state": "removed", "run_ids": []}
    assert examples.make(store) == [] and fast.calls and len(fast.calls) == 1   # removed stays removed
    again = examples.restore(store)
    assert len(again) == len(ROLES) and not set(again) & set(first)
    assert examples.status(store)["state"] == "ready"
    assert {i: _files(store, i) for i in (mine, impostor)} == before      # byte for byte, never touched
    assert set(store.list()["run_id"]) == {mine, impostor, *again}


def test_no_one_signs_in_as_the_owner_of_the_examples(tmp_path):
    (tmp_path / "class.txt").write_text("teach\nexamples\n")
    with pytest.raises(ValueError, match="line 2: 'examples' is reserved"):
        wb.classroom.read_class_list(tmp_path / "class.txt")
    with pytest.raises(ValueError, match="reserved"):
        wb.classroom.make_credentials(["examples"], tmp_path / "c.json")
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"teach": "pw", examples.OWNER: "pw"}))
    creds.chmod(0o600)
    with pytest.raises(ValueError, match="reserved"):
        wb.classroom.read_credentials(creds)


def test_two_first_starts_at_once_make_one_set(store, fast):
    fast.hold = 0.5     # the first start holds the lock while the second arrives
    got, errors = [], []

    def first_start():
        try:
            got.append(examples.make(wb.RunStore(store.root)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=first_start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(fast.calls) == 1                           # one made it, the other waited
    assert sorted(got[0]) == sorted(got[1]) and len(got[0]) == len(ROLES)
    assert len(store.list()) == len(ROLES)


def test_a_start_killed_half_way_is_made_again_without_leftovers(store, fast, monkeypatch):
    def dies(saver, tiny, monitor):
        saver.save(_tiny_run("x"), role="pair-a")
        raise KeyboardInterrupt   # the process dies here: nothing cleaned up by the step itself

    steps = examples._STEPS
    monkeypatch.setattr(examples, "_STEPS", (("dies", dies, 1.0),))
    with pytest.raises(KeyboardInterrupt):
        examples.make(store)
    assert examples.status(store)["state"] == "absent"
    # what a kill would leave (the cleanup above ran): an example run without a state file
    _Saver = examples._Saver
    _Saver(store, []).save(_tiny_run("x"), role="pair-b")
    monkeypatch.setattr(examples, "_STEPS", steps)
    ids = examples.make(store)
    assert len(ids) == len(ROLES) == len(store.list())                   # the leftover is gone


def test_start_runs_the_set_as_a_job_once_and_never_when_switched_off(store, fast, monkeypatch):
    fast.hold = 0.3
    monkeypatch.delenv(examples.ENV, raising=False)
    queue = wb.jobs.JobQueue(max_jobs=1, threads=1, executor="threads")
    try:
        job = examples.start(store.root, queue)                           # a path, as apps/app_hooks.py gives it
        assert job is not None and job.user == examples.OWNER
        assert examples.start(store, queue, action="restore") is None     # one job per store at a time
        assert examples.running(store) is job and examples.status(store)["state"] == "making"
        job.wait(30)
        assert job.status == "done" and examples.running(store) is None
        assert examples.status(store)["state"] == "ready" and examples.start(store, queue) is None   # made
        assert (store.root / examples.STATE_FILE).exists() and examples.status(str(store.root))["state"] == "ready"
    finally:
        queue.close()
    other = wb.RunStore(store.root.parent / "other")
    monkeypatch.setenv(examples.ENV, "0")
    assert examples.start(other) is None and examples.status(other)["state"] == "absent"


def test_stored_results_round_trip_as_plain_json():
    frame = pd.DataFrame({"layer": [0, 1, 2], "value": [0.5, np.nan, 1e-12], "name": ["a", None, "<b>"]})
    fit = wb.scaling.PowerLaw(a=2.0, alpha=0.5, c=0.1, n=6, band={"a": (1.0, 3.0)}, boot=np.ones((2, 3)))
    plane = wb.lmc.interpolation.Plane(grid=frame, points=frame.iloc[:1], split="val")
    data = {"f": frame, "arr": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3), "fit": fit,
            "plane": plane, "nested": [{"x": 1.5}, None, "text"]}
    text = json.dumps(examples.encode(data))                              # what run.json holds
    back = examples.decode(json.loads(text))
    pd.testing.assert_frame_equal(back["f"], frame)
    assert back["arr"].dtype == np.float32 and (back["arr"] == data["arr"]).all()
    assert back["n"] == 3 and back["nested"] == [{"x": 1.5}, None, "text"]
    assert (back["fit"].a, back["fit"].alpha, back["fit"].c, back["fit"].n) == (2.0, 0.5, 0.1, 6)
    assert back["fit"].band == {"a": [1.0, 3.0]} and back["fit"].boot.shape == (2, 3)
    pd.testing.assert_frame_equal(back["plane"].grid, frame)
    with pytest.raises(ValueError, match="cannot hold a object"):
        examples.encode({"x": object()})
