"""Grow page driven from Python: presets fill the stage editor, a run lands in the store per stage,
bad stages show a message, and "add a layer now" grows the running model between steps."""

import pandas as pd
import pytest

pn = pytest.importorskip("panel")

from workbench import data, growth, recipes  # noqa: E402
from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.grow import GrowPage, frame_to_stages, stages_to_frame  # noqa: E402
from helpers.growpage import grow_pressing_add_now, small  # noqa: E402


def test_presets_fill_the_stage_editor(store):
    page = GrowPage(DataStore(store))
    page.__panel__()
    # the default recipe (recipes.KHOP) filled every field: task, options, width, optimizer, schedule
    r = recipes.KHOP
    assert page.dataset.value == r.dataset == "khop"
    assert {k: page.dataset_widgets[k].value for k in r.data_options} == dict(r.data_options)
    assert {k: page.model_widgets[k].value for k in r.model_options()} == r.model_options()
    assert (page.train_widgets["lr"].value, page.train_widgets["batch_size"].value) == (r.lr, r.batch_size)
    assert page.stage_steps.value == r.steps_per_stage and page.final_layers.value == r.final_layers == 2
    assert list(page.stages.value["op"]) == ["train", "add_layer"]
    assert list(page.stages.value["steps"]) == [r.steps_per_stage] * 2
    # the text recipe switches the task and fills its fields too
    page.recipe.value = next(k for k in page.recipe.options if "TEXT" in k)
    assert page.dataset.value == "text" and page.dataset_widgets["corpus_chars"].value == 30000
    assert page.model_widgets["d_mlp"].value == recipes.TEXT.d_mlp and page.stage_steps.value == 200
    page.final_layers.value = 3
    page.fill_preset()
    assert list(page.stages.value["op"]) == ["train", "add_layer", "add_layer"]
    page.preset.value = "G_stack at step N"
    page.start_layers.value, page.final_layers.value = 2, 4
    page.fill_preset()
    assert list(page.stages.value["op"]) == ["train", "stack"]
    page.preset.value = "Scratch"
    page.fill_preset()
    assert list(page.stages.value["op"]) == ["train"]


def test_stage_table_round_trip():
    stages = [growth.Stage("train", 5), growth.Stage("add_layer", 7, freeze="old", lr=1e-3, init="copy"),
              growth.Stage("stack", 3, freeze=2)]
    back = frame_to_stages(stages_to_frame(stages))
    assert [(s.op, s.steps, s.freeze, s.lr, s.init) for s in back] == \
           [("train", 5, None, None, "zero"), ("add_layer", 7, "old", 1e-3, "copy"), ("stack", 3, 2, None, "zero")]


def test_grow_run_updates_plots_strip_and_store(store):
    page = GrowPage(DataStore(store))
    small(page)
    page.final_layers.value = 3
    page.fill_preset()  # one layer at a time, 1 -> 3 blocks, lower layers frozen
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    run = page.last_run
    assert run.model.config.n_layers == 3
    assert len(page.plot.object.data) >= 3
    strip = page.strip.object.data[0]
    assert list(strip.x) == ["embed", "block 0", "block 1", "block 2", "head"]
    assert ["frozen" in t for t in strip.text] == [True, True, True, False, False]
    listing = page.datastore.runs
    assert sorted(listing["stage"].tolist()) == [0, 1, 2]
    assert len(page.stage_table.object) == 3
    page.x_axis.value = "flops"
    assert page.plot.object.layout.xaxis.title.text == "training FLOPs"
    assert "growth.grow" in page.code.object


def test_bad_stage_shows_a_message(store):
    page = GrowPage(DataStore(store))
    small(page)
    page.stages.value = pd.DataFrame([{"op": "train", "steps": 0, "freeze": "", "lr": "", "init": "zero"}])
    page.start(wait=True)
    assert "steps must be an integer" in page.errors.text and page.errors.text.endswith("got 0")
    page.stages.value = pd.DataFrame([{"op": "add_layer", "steps": 3, "freeze": "9", "lr": "", "init": "zero"}])
    page.start(wait=True)
    assert "freeze must be" in page.errors.text and page.last_run is None


def test_add_a_layer_now_during_a_run(store):
    page = GrowPage(DataStore(store))
    pressed = grow_pressing_add_now(page, steps=40)
    assert page.task.status == "done", page.task.error
    assert pressed.is_set()
    run = page.last_run
    assert run.model.config.n_layers == 2
    assert [s["op"] for s in run.meta["stages"]] == ["train", "add_layer"]
    assert sum(s["steps_done"] for s in run.meta["stages"]) == 40
    assert page.add_now.disabled


def _small_khop(page, steps=3):
    assert page.dataset.value == "khop"
    page.dataset_widgets["n_train"].value, page.dataset_widgets["n_val"].value = 200, 50
    page.model_widgets["d_model"].value = 16
    page.model_widgets["d_mlp"].value = 16
    page.train_widgets["eval_every"].value = steps
    page.stage_steps.value = steps
    page.fill_preset()


def test_khop_layout_and_queries_reach_the_dataset(store):
    page = GrowPage(DataStore(store))
    defaults = recipes.KHOP.data_options
    assert page.dataset_widgets["layout"].value == defaults["layout"] == "table"
    assert page.dataset_widgets["queries"].value == defaults["queries"]
    assert list(page.dataset_widgets["layout"].options) == list(data.KHOP_LAYOUTS) == ["edges", "table"]
    _small_khop(page)
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    spec = page.last_run.dataset
    assert (spec["layout"], spec["queries"], spec["hops"], spec["nodes"]) == \
           ("table", defaults["queries"], defaults["hops"], defaults["nodes"])
    assert page.last_run.model.config.context == defaults["nodes"] + 1 + defaults["queries"]
    assert "layout='table'" in page.code.object and f"queries={defaults['queries']}" in page.code.object
    # another layout and number of queries go through as well
    page.dataset_widgets["layout"].value, page.dataset_widgets["queries"].value = "edges", 3
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    spec = page.last_run.dataset
    assert (spec["layout"], spec["queries"]) == ("edges", 3)
    assert page.last_run.model.config.context == 2 * defaults["nodes"] + 1 + 2 * 3


@pytest.mark.parametrize("field, value, message", [
    ("queries", 0, "khop.queries must be in [1, 52], got 0"),
    ("queries", 99, "khop.queries must be in [1, 52], got 99"),
    ("queries", None, "khop.queries must be an integer in [1, 52]"),
    ("length", 3, "khop.length must be 0 or nodes=8 with layout='table', got 3"),
    ("layout", "grid", "khop.layout must be one of ['edges', 'table']"),
])
def test_bad_khop_options_show_a_message(store, field, value, message):
    page = GrowPage(DataStore(store))
    _small_khop(page)
    page.dataset_widgets[field].param.update(value=value)
    page.start(wait=True)
    assert message in page.errors.text
    assert page.last_run is None and len(page.datastore.runs) == 0


@pytest.mark.parametrize("task, options", [("text", {"context": 16, "corpus_chars": 2000}), ("modadd", {"p": 11})])
def test_grow_on_the_other_sequence_tasks(store, task, options):
    page = GrowPage(DataStore(store))
    page.dataset.value = task
    for key, value in options.items():
        page.dataset_widgets[key].value = value
    page.model_widgets["d_model"].value, page.model_widgets["d_mlp"].value = 16, 32
    page.train_widgets["eval_every"].value, page.train_widgets["eval_max"].value = 2, 64
    page.stage_steps.value, page.final_layers.value = 2, 2
    page.fill_preset()
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.last_run.model.config.n_layers == 2
    assert page.last_run.dataset["name"] == task
    assert sorted(page.datastore.runs["stage"].tolist()) == [0, 1]


def test_natural_criterion_growth_draws_the_eta_trace_and_timeline(store):
    page = GrowPage(DataStore(store))
    small(page)
    page.model_widgets["d_model"].value, page.model_widgets["d_hidden"].value = 8, 4
    page.mode.value = next(k for k in page.mode.options if k.startswith("Natural"))
    assert page.criterion_box.visible and page.eta_plot.visible and not page.preset.visible
    page.tau.value = 0.5
    page.start(wait=True)
    assert "tau must be a finite number in [1.0, 1000000000.0], got 0.5" in page.errors.text and page.last_run is None
    page.tau.value, page.total_steps.value, page.check_every.value, page.score_examples.value = 1.0, 6, 3, 8
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    run = page.last_run
    trace = growth.trace_table(run)
    assert trace["accepted"].sum() == 1 and set(trace["step"]) == {3}   # tau=1: the best proposal is taken
    names = [d.name for d in page.eta_plot.object.data]
    assert "eta" in names and any(n.endswith("accepted") for n in names if n != "eta' accepted")
    depth, width = page.timeline.object.data
    assert list(depth.y) == growth.timeline_table(run)["n_layers"].tolist()
    assert list(width.y) == growth.timeline_table(run)["width"].tolist() and len(width.y) == 2
    assert "1 proposals accepted" in page.result.object
    assert 'criterion="natural"' in page.code.object and "tau=1.0" in page.code.object
    assert sorted(page.datastore.runs["stage"].tolist()) == [0, 1]


def test_widen_stage_from_the_table(store):
    page = GrowPage(DataStore(store))
    small(page, steps=2)
    page.model_widgets["d_hidden"].value = 4
    assert "widen" in page.stages.editors["op"]["values"] and "orthogonal" in page.stages.editors["init"]["values"]
    page.stages.value = pd.DataFrame([{"op": "train", "steps": 2, "freeze": "", "lr": "", "init": "zero"},
                                      {"op": "widen", "steps": 2, "freeze": "", "lr": "", "init": "orthogonal"}])
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.last_run.model.blocks[0].fc.out_features == 8
    assert list(page.timeline.object.data[1].y) == [4, 8]
    assert "hidden units 8" in page.result.object
