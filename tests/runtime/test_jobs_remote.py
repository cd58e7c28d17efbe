"""The page-job transport of runtime/jobs/remote.py, without the UI and without Dask: the plan's refusals and
swaps, payloads through the plain-data codec, and a page job run through ``run_page_job`` on the queue's
threads (the RemoteStore's saves and loads are the job's services, answered by the server's store object).
The same path on a real Dask cluster, from the pages, is in tests/ui/test_ui_dask.py."""
import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import jobs
from workbench.runtime.jobs import remote


def _tiny_run(steps=3):
    ds = wb.data.load("digits")
    cfg = wb.models.config_for(ds, d_model=16, n_layers=1, d_hidden=16)
    return wb.train(wb.models.build(cfg), ds, wb.TrainConfig(steps=steps, eval_every=steps, eval_max=16)), ds


def _save_a_copy(ctx, store, run, name):
    """A page job: report a frame, save the run it was given under a new name, return it and the id."""
    ctx.report({"rows": pd.DataFrame({"step": [1, 2], "value": [0.5, 0.25]})}, progress=0.5, message="half")
    return run, store.save(run, name=name)


class View:
    """A per-user view of a store, as the UI's UserStore: swapped for a RemoteStore only when named in stores."""


def test_plan_says_why_a_job_stays_on_the_servers_threads(store):
    run, _ = _tiny_run()
    assert "module-level" in remote.plan(lambda ctx: None, (), {})

    def nested(ctx):
        return None

    assert "module-level" in remote.plan(nested, (), {})
    assert "model object" in remote.plan(_save_a_copy, (store, run.model, "x"), {})
    other = wb.RunStore(store.root.parent / "other")
    assert "two different run stores" in remote.plan(_save_a_copy, (store, run, "x"), {"again": other})


def test_plan_swaps_stores_and_packs_runs(store):
    run, _ = _tiny_run()
    p = remote.plan(_save_a_copy, (store, run), {"name": "copy"})
    assert isinstance(p, remote.Plan) and p.store is store
    assert isinstance(p.args[0], jobs.RemoteStore) and isinstance(p.args[1], remote._PackedRun)
    assert p.kwargs == {"name": "copy"}
    assert set(p.services) == {"store.save", "store.load", "store.read_json"}

    assert remote.plan(_save_a_copy, (View(), run, "x"), {}).store is None
    view = View()
    assert remote.plan(_save_a_copy, (view, run, "x"), {}, stores=(View,)).store is view


@pytest.mark.parametrize("payload", [
    None, 3, "text", [1, 2.5, "a"], (1, (2, 3)), {"__page__": 1, "\\x": [2]},
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array(["a", "b"]),
    pd.DataFrame({"split": ["train", "val"], "value": [0.5, 1.5], "step": np.array([1, 2], dtype=np.int64)}),
    pd.Series([1.0, 2.0], name="loss"), torch.tensor([[1, 2]]),
])
def test_page_payloads_cross_as_plain_data_and_come_back_as_they_were(payload):
    encoded = remote._encode_payload(payload)
    import msgpack   # what Dask's topic serialises with: no pickle crosses

    encoded = msgpack.unpackb(msgpack.packb(encoded, use_bin_type=True), raw=False, strict_map_key=False)
    report = {"__page__": encoded, "has_payload": payload is not None, "progress": 0.25, "message": "m"}
    assert remote.is_page_report(report) and not remote.is_page_report({"rows": []})
    back, progress, message = remote.page_update(report)
    assert (progress, message) == (0.25, "m")
    if isinstance(payload, pd.DataFrame):
        pd.testing.assert_frame_equal(back, payload)
    elif isinstance(payload, pd.Series):
        pd.testing.assert_series_equal(back, payload)
    elif isinstance(payload, torch.Tensor):
        np.testing.assert_array_equal(back, payload.numpy())
    elif isinstance(payload, np.ndarray):
        np.testing.assert_array_equal(back, payload)
        assert back.shape == payload.shape
    else:
        assert back == payload and type(back) is type(payload)


def test_a_payload_that_is_not_plain_data_is_refused():
    with pytest.raises(TypeError, match="cannot hold"):
        remote._encode_payload({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="keys must be strings"):
        remote._encode_payload({1: 2})


def test_a_page_job_runs_through_the_transport_and_the_server_opens_what_it_saved(store):
    run, ds = _tiny_run()
    p = remote.plan(_save_a_copy, (store, run), {"name": "copy"})
    reports = []
    with jobs.JobQueue(max_jobs=1, executor="threads", report_interval=0.0) as queue:
        job = queue.submit(remote.run_page_job, _save_a_copy, p.args, p.kwargs, services=p.services,
                           on_progress=lambda j: reports.append(j.payload))
        value = job.result(timeout=60)
    assert isinstance(value[0], remote._SavedRun) and value[0].run_id == value[1]   # by id, not as files
    opened, run_id = remote.open_result(value, p.store)
    assert list(store.list()["name"]) == ["copy"] and opened.run_id == run_id
    x = torch.as_tensor(ds.x_val[:16])
    run.model.eval(), opened.model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(x), opened.model(x))
    update, progress, message = remote.page_update(next(r for r in reports if remote.is_page_report(r)))
    pd.testing.assert_frame_equal(update["rows"], pd.DataFrame({"step": [1, 2], "value": [0.5, 0.25]}))
    assert (progress, message) == (0.5, "half")


def test_a_saved_run_needs_the_store_to_be_opened():
    with pytest.raises(RuntimeError, match="had no store"):
        remote.open_result([remote._SavedRun("abc")], None)
