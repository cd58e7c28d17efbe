"""The grow experiment: the presets (G_stack spends the layer-wise schedule's steps), its code grows what
run grows, the live payloads, and the sweeps' task built on the same preset."""
import pandas as pd
import pytest

import workbench as wb
from workbench import growth
from workbench.experiments import grow

CHOICES = dict(dataset="digits", model={"d_model": 16, "d_hidden": 16, "n_layers": 1},
               train={"eval_every": 2, "eval_max": 200, "lr": 3e-3, "batch_size": 32})


def test_presets_spend_the_same_steps():
    layerwise = grow.preset("layerwise", 5, start_layers=1, final_layers=3)
    gstack = grow.preset("gstack", 5, start_layers=1, final_layers=3)
    assert [(s.op, s.steps) for s in layerwise] == [("train", 5), ("add_layer", 5), ("add_layer", 5)]
    assert [(s.op, s.steps) for s in gstack] == [("train", 5), ("stack", 10)] and gstack[1].factor == 3
    assert sum(s.steps for s in gstack) == sum(s.steps for s in layerwise) == 15
    assert [(s.op, s.steps) for s in grow.preset("scratch", 5, final_layers=3)] == [("train", 15)]
    with pytest.raises(ValueError, match="final_layers"):
        grow.preset("gstack", 5, start_layers=2, final_layers=3)
    with pytest.raises(ValueError, match="preset must be one of"):
        grow.preset("stack", 5)


def test_the_code_grows_what_run_grows(store, run_code, without_time, one_thread):
    stages = grow.preset("layerwise", 3, final_layers=2)
    run = grow.run(**CHOICES, schedule=stages, store=store)
    scope = run_code(grow.as_code(**CHOICES, schedule=stages))
    assert scope["run"].model.config == run.model.config and run.model.config.n_layers == 2
    pd.testing.assert_frame_equal(without_time(scope["run"].metrics), without_time(run.metrics))
    assert sorted(store.list()["stage"].tolist()) == [0, 0, 1, 1]       # both saved every stage


def test_the_natural_criterion_as_code(store, run_code, without_time, one_thread):
    criterion = {"tau": 1.0, "check_every": 3, "candidates": ["add_layer"], "widen_factor": 2.0, "score_examples": 16}
    train = {**CHOICES["train"], "steps": 6}
    run = grow.run(CHOICES["dataset"], None, CHOICES["model"], train, criterion=criterion)
    scope = run_code(grow.as_code(CHOICES["dataset"], None, CHOICES["model"], train, criterion=criterion))
    pd.testing.assert_frame_equal(growth.trace_table(scope["run"]), growth.trace_table(run))
    pd.testing.assert_frame_equal(without_time(scope["run"].metrics), without_time(run.metrics))


def test_live_payloads_carry_every_stage_so_far(one_thread):
    seen = []
    m = wb.monitor.Monitor(lambda p, msg, payload: seen.append((p, payload)))
    run = grow.run(**CHOICES, schedule=grow.preset("layerwise", 4, final_layers=2), live_every=2, monitor=m)
    payloads = [x for _, x in seen if x is not None]
    stages = [x for x in payloads if x.get("stage_done")]
    assert len(stages) == 2 and len(stages[-1]["metrics"]) == len(run.metrics)
    pd.testing.assert_frame_equal(stages[-1]["blocks"], growth.block_table(run.model))
    last_live = [x for x in payloads if not x.get("stage_done")][-1]
    assert set(last_live["metrics"]["stage"]) == {0, 1}                # the finished stage and the current one
    progress = [p for p, _ in seen if p is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0


def test_the_sweep_task_compares_on_the_gstack_preset(monkeypatch, one_thread):
    seen = {}
    original = growth.compare

    def spy(stages, *args, **kwargs):
        seen["stages"] = stages
        return original(stages, *args, **kwargs)

    monkeypatch.setattr(growth, "compare", spy)
    out = grow.task("khop", steps=3, final_layers=2, d_model=8, n_heads=2, d_mlp=8, eval_every=3, eval_max=50,
                    data_options={"n_train": 200, "n_val": 50})
    assert out["status"] == "done" and {r["method"] for r in out["rows"]} == {"grown", "scratch"}
    assert [(s.op, s.steps) for s in seen["stages"]] == [(s.op, s.steps) for s in grow.preset("gstack", 3)]


def test_the_pages_as_code_box_grows_what_the_page_grew(store, run_code, without_time, one_thread):
    from workbench.ui import App
    from helpers.growpage import small

    page = App(store=store).pages["Grow"]
    small(page, steps=3)
    page.final_layers.value = 2
    page.fill_preset()
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    shown = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    assert shown == grow.as_code(page.dataset.value, *page.configs())
    scope = run_code(shown)
    pd.testing.assert_frame_equal(without_time(scope["run"].metrics), without_time(page.last_run.metrics))
