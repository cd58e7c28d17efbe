"""The progress-and-stop protocol: a monitor of one's own, a stage's share of the progress, Stopped, and
TrainProgress (a monitor seen as training callbacks) with its payload choices."""
import threading

import pytest

import workbench as wb
from workbench.core import monitor


def _tiny():
    ds = wb.data.load("digits")
    return wb.models.build(wb.models.config_for(ds, d_model=8, n_layers=1, d_hidden=8)), ds


def test_a_monitor_of_ones_own_stops_from_another_thread_and_hands_on_its_reports():
    seen = []
    m = monitor.Monitor(lambda p, msg, payload: seen.append((p, msg, payload)))
    assert not m.stopped
    m.report(0.25, "a quarter", {"rows": [1]})
    t = threading.Thread(target=m.stop)
    t.start()
    t.join()
    assert m.stopped and seen == [(0.25, "a quarter", {"rows": [1]})]
    with pytest.raises(monitor.Stopped):
        monitor.check(m)
    event = threading.Event()
    follows = monitor.Monitor(stopped=event.is_set)
    assert not follows.stopped
    event.set()
    assert follows.stopped
    with pytest.raises(ValueError, match="on_report must be a function or None"):
        monitor.Monitor("print")


def test_a_part_maps_its_progress_onto_its_share_and_shares_the_stop():
    seen = []
    whole = monitor.Monitor(lambda p, msg, payload: seen.append(p))
    stage = monitor.part(whole, 0.6, 0.2)
    stage.report(0.0, "start")
    stage.report(0.5, "half")
    stage.report(1.0, "end")
    assert seen == pytest.approx([0.6, 0.7, 0.8])
    whole.stop()
    assert stage.stopped
    with pytest.raises(ValueError, match="start \\+ span must be at most 1"):
        monitor.part(whole, 0.9, 0.5)


def test_train_progress_reports_steps_and_stops_the_training():
    model, ds = _tiny()
    seen = []
    m = monitor.Monitor(lambda p, msg, payload: seen.append((p, msg, payload)))
    run = wb.train(model, ds, wb.TrainConfig(steps=20, eval_every=10), callbacks=[wb.jobs.TrainProgress(m)])
    progress = [p for p, _, _ in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and seen[-1][1].startswith("step 20/20, loss ")
    evals = [payload for _, _, payload in seen if payload is not None]
    assert [e["step"] for e in evals] == [10, 20] and {"split", "metric", "value"} <= set(evals[0]["rows"][0])

    class StopAt5(wb.Callback):
        def on_step(self, state):
            if state.step == 5:
                m2.stop()

    m2 = monitor.Monitor()
    run = wb.train(model, ds, wb.TrainConfig(steps=100, eval_every=100),
                   callbacks=[StopAt5(), wb.jobs.TrainProgress(m2)])
    assert run.status == "cancelled" and int(run.metrics["step"].max()) == 5


def test_train_progress_payload_choices():
    model, ds = _tiny()
    live, quiet = [], []
    rows_so_far = wb.jobs.TrainProgress(monitor.Monitor(lambda p, msg, payload: live.append(payload)), every=4,
                                        payload=lambda state: len(state.rows))
    wb.train(model, ds, wb.TrainConfig(steps=8, eval_every=8), callbacks=[rows_so_far])
    sent = [x for x in live if x is not None]
    assert len(sent) == 3 and sent == sorted(sent)          # steps 4 and 8, and the evaluation at step 8
    none = wb.jobs.TrainProgress(monitor.Monitor(lambda p, msg, payload: quiet.append(payload)), payload=False)
    wb.train(model, ds, wb.TrainConfig(steps=8, eval_every=4), callbacks=[none])
    assert quiet and all(x is None for x in quiet)
    with pytest.raises(ValueError, match="payload must be a function"):
        wb.jobs.TrainProgress(payload="rows")
    with pytest.raises(ValueError, match="monitor must be None or an object"):
        wb.jobs.TrainProgress(monitor="job")
