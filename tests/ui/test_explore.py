"""``wb.ui.explore`` and the explorers without a browser: each kind of object gets the view its dashboard page
embeds, bound to it; a choice set in code recomputes, checked against the engine called directly; values a
view never offered are refused with the checks' message and change nothing; ``wb.ui.doctor`` reports what the
notebook front end needs. (The explorers inside a real JupyterLab: tests/browser/test_browser_notebook.py.)"""
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pn = pytest.importorskip("panel")

import workbench as wb  # noqa: E402
from workbench import collapse, grokking, growth, lmc  # noqa: E402
from workbench.ui import explore  # noqa: E402
from workbench.ui import frontend  # noqa: E402
from workbench.ui.views import CollapseView, ConnectivityView, GrokkingView, GrowthView  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


@pytest.fixture(scope="module")
def pair(digits):
    torch.set_num_threads(1)
    cfg = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=16, n_layers=2)
    tc = wb.TrainConfig(steps=40, batch_size=64, lr=3e-3, eval_every=40)
    return lmc.train_pair(cfg, digits, seeds=(0, 1), train_config=tc)


@pytest.fixture(scope="module")
def grok_run():
    return grokking.run(grokking.GrokConfig(p=7, train_fraction=0.5, d_model=8, n_heads=2, d_mlp=16, steps=30,
                                            eval_every=10, every=10, n_key=2))


@pytest.fixture(scope="module")
def grown():
    khop = wb.recipes.KHOP
    ds = khop.load_data()
    model = wb.models.build(khop.model_config(ds, n_layers=1, d_model=16))
    schedule = growth.preset("layerwise", 6, start_layers=1, final_layers=3)
    return growth.grow(model, ds, schedule, wb.TrainConfig(steps=6, eval_every=3, eval_max=32, batch_size=16))


@pytest.fixture(scope="module")
def text_model():
    ds = wb.data.load("text", context=12, corpus_chars=2000)
    cfg = wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, vocab=list(ds.vocab), d_model=16,
                                      n_layers=2, n_heads=2, d_mlp=32)
    run = wb.train(wb.models.build(cfg), ds, wb.TrainConfig(steps=5, eval_every=5, eval_max=16), name="text")
    return run, ds


# ---------------------------------------------------------------------------- one explorer per kind of object


def test_two_models_get_the_connectivity_view_whose_barriers_are_the_engines(pair, digits):
    a, b = pair[0].model, pair[1].model
    view = explore(a, b, digits, methods=["none"], n_alphas=5, max_examples=256)
    assert type(view) is ConnectivityView and view.bound
    want = lmc.barrier(lmc.compare(a, b, digits, n_alphas=5, methods=("none", "weights"), max_examples=256))
    assert view.barrier("none") == pytest.approx(lmc.barrier_value(want, "val", "loss", "linear", method="none"))
    view.methods = ["none", "weights"]                      # only the new method is computed
    assert view.errors.text == "" and set(view.curves["method"]) == {"none", "weights"}
    assert view.barrier("weights") == pytest.approx(lmc.barrier_value(want, "val", "loss", "linear", method="weights"))
    assert {t.legendgroup.split(" (")[0] for t in view.curves_pane.object.data} == {"no alignment", "weight matching"}
    view.split = "train"
    assert {t.legendgroup for t in view.curves_pane.object.data} == {"no alignment (train)", "weight matching (train)"}
    view.n_alphas = 7
    assert sorted(view.curves["alpha"].unique()) == pytest.approx(np.linspace(0, 1, 7))
    # two stored-style Runs: the same view, their dataset rebuilt from the spec
    assert type(explore(pair[0], pair[1], n_alphas=3, methods=["none"], max_examples=64)) is ConnectivityView
    # curves computed elsewhere: the barrier view of them
    shown = explore(lmc.compare(a, b, digits, n_alphas=3, methods=("none",), max_examples=64))
    assert type(shown) is ConnectivityView and not shown.bound and shown.methods == ["none"]


def test_a_classifier_gets_the_collapse_view_read_layer_by_layer(pair, digits):
    model = pair[0].model
    x, y = digits.x_train[:300], digits.y_train[:300]
    view = explore(model, x, y, max_samples=300)
    assert type(view) is CollapseView and view.layer == -1
    ref = collapse.layer_metrics(model, x, y)
    want = ref[(ref.site == "features") & (ref.metric == "nc1")]["value"].item()
    assert view.measure_at("nc1") == pytest.approx(want, rel=1e-9)
    view.layer = 1                                          # another layer: the geometry of its class means
    assert view.errors.text == ""
    feats, labels, _ = collapse.collect(model, x, y, ["blocks.0.resid_post"])
    _, means, _ = collapse.class_means(feats["blocks.0.resid_post"], labels)
    centred = means - means.mean(0)
    cos = torch.nn.functional.normalize(centred, dim=1) @ torch.nn.functional.normalize(centred, dim=1).T
    assert np.allclose(view.geometry["gram"], cos.numpy(), atol=1e-9)
    assert view.measure_at("nc1") == pytest.approx(ref[(ref.layer == 1) & (ref.metric == "nc1")]["value"].item())
    assert [t.type for t in view.gram_pane.object.data] == ["heatmap", "heatmap"]   # no classifier inside the stack
    view.measure = "etf_error"
    assert view.layer_pane.object.layout.yaxis.title.text == "etf_error"
    assert type(explore(model, digits, max_samples=64)) is CollapseView


def test_a_collapse_run_and_a_tracker_show_the_records(digits):
    run = collapse.train_collapse("digits", epochs=2, every=1, d_model=16, n_layers=1, max_samples=64)
    view = explore(run)
    assert type(view) is CollapseView and view.bound and len(view.table) > 0
    assert {t.name for t in view.layer_pane.object.data} == {"epoch 0", "epoch 1", "epoch 2"}
    model, cfg, ds = collapse.recipe("digits", epochs=1, d_model=16, n_layers=1)
    tracker = collapse.track(every=1, max_samples=64)
    wb.train(model, ds, cfg, callbacks=[tracker])
    tview = explore(tracker)
    assert type(tview) is CollapseView and not tview.bound
    assert np.allclose(tview.geometry["gram"], collapse.geometry(tracker.latest["means"])["gram"])


def test_a_grown_run_gets_the_growth_view_stage_by_stage(grown):
    view = explore(grown)
    assert type(view) is GrowthView and len(view.stages) == 3 and view.stage == 2
    for k, entry in enumerate(grown.meta["stages"]):
        view.stage = k
        got = view.at_stage()
        assert view.errors.text == "" and got["n_layers"] == entry["n_layers"]
        assert got["frozen"] == sum(entry["frozen"]) and got["end"] == entry["end_step"]
        strip = view.strip_pane.object.data[0]
        assert list(strip.x) == ["embed"] + [f"block {i}" for i in range(entry["n_layers"])] + ["head"]
        val = grown.metrics.query("split == 'val' and metric == 'loss' and step <= @entry['end_step']")
        assert got["val_loss"] == pytest.approx(val.sort_values("step")["value"].iloc[-1])
    view.x = "flops"
    assert view.curves_pane.object.layout.xaxis.title.text == "training FLOPs"
    assert list(view.timeline_pane.object.data[0].y) == growth.timeline_table(grown)["n_layers"].tolist()


def test_the_stage_runs_of_a_growth_group_read_from_the_store(store):
    khop = wb.recipes.KHOP
    ds = khop.load_data()
    model = wb.models.build(khop.model_config(ds, n_layers=1, d_model=16))
    run = growth.grow(model, ds, growth.preset("layerwise", 4, start_layers=1, final_layers=2),
                      wb.TrainConfig(steps=4, eval_every=2, eval_max=32, batch_size=16), store=store, group="g1")
    runs = [store.load(rid) for rid in run.meta["stage_run_ids"]]
    view = explore(runs[::-1])                                # any order: sorted by stage
    assert [s["n_layers"] for s in view.stages] == [1, 2]
    view.stage = 0
    assert list(view.strip_pane.object.data[0].x) == ["embed", "block 0", "head"]


def test_a_grokking_run_gets_its_progress_measures(grok_run):
    for obj in (grok_run, grok_run.metrics):
        view = explore(obj)
        assert type(view) is GrokkingView and view.steps == [0, 10, 20, 30] and view.step == 30
    view.step = 10
    table = grokking.measures_table(grok_run.metrics).set_index("step")
    got = view.at_step()
    assert got["keys"] == [int(table.loc[10, "key_rank_1"]), int(table.loc[10, "key_rank_2"])]
    assert got["restricted_loss"] == pytest.approx(table.loc[10, "restricted_loss"])
    acc = grok_run.metrics.query("metric == 'acc' and split == 'val' and step == 10")["value"].item()
    assert got["val_acc"] == pytest.approx(acc)
    shapes = view.loss_pane.object.layout.shapes
    assert any(s.type == "line" and s.x0 == 10 for s in shapes)
    bars = view.spectrum_pane.object.data[0]
    norms = grok_run.metrics.query("split == 'measure' and step == 10 and metric.str.startswith('fourier_')")
    assert list(bars.y) == pytest.approx(norms["value"].tolist())


def test_a_sequence_model_gets_the_residual_stream_explorer(text_model):
    from workbench.ui.residual import ResidualExplorer

    run, ds = text_model
    view = explore(run.model, ds.x_val[0])
    assert type(view) is ResidualExplorer
    view.stream.layer = 1
    assert view.stream.errors.text == ""
    assert type(explore(run)) is ResidualExplorer                   # a Run: its validation windows
    assert type(explore(run.model, ds)) is ResidualExplorer


def test_a_hugging_face_model_in_memory_gets_the_residual_stream_explorer():
    from helpers.hf_models import build, tokens

    from workbench.ui.residual import ResidualExplorer

    model = build("gpt2")
    view = explore(model, tokens()[0])
    assert type(view) is ResidualExplorer and view.stream.analysis.n_layers == 3


def test_the_pages_embed_the_same_views(store):
    from workbench.ui.collapse import CollapsePage
    from workbench.ui.connectivity import ConnectivityPage
    from workbench.ui.grokking import GrokkingPage
    from workbench.ui.grow import GrowPage
    from workbench.ui.session import DataStore

    ds = DataStore(store)
    for page_cls, view_cls in ((ConnectivityPage, ConnectivityView), (CollapsePage, CollapseView),
                               (GrowPage, GrowthView), (GrokkingPage, GrokkingView)):
        page = page_cls(ds)
        assert type(page.view) is view_cls
        panes = [p for p in vars(page.view).values() if isinstance(p, pn.pane.Plotly)]
        shown = list(_walk(page.__panel__()))
        assert panes and all(any(o is p for o in shown) for p in panes)  # the page draws every figure of the view


def _walk(layout):
    yield layout
    for child in getattr(layout, "objects", []):
        yield from _walk(child)


# ---------------------------------------------------------------------------- refusals


def test_an_object_it_cannot_show_is_refused_saying_what_it_can_show(pair):
    for obj, others in ((3, ()), ("model.safetensors", ()), (pd.DataFrame({"a": [1]}), ()), (pair[0].model, ())):
        with pytest.raises(ValueError, match="explore shows: a model") as e:
            explore(obj, *others)
        assert "growth group" in str(e.value) and "grokking" in str(e.value)
    with pytest.raises(ValueError, match="view must be one of"):
        explore(pair[0], view="attention")
    with pytest.raises(ValueError, match="holds no grokking progress measures"):
        explore(pair[0], view="grokking")


def test_values_a_view_never_offered_are_refused_and_change_nothing(pair, digits, grok_run, grown):
    conn = explore(pair[0].model, pair[1].model, digits, methods=["none"], n_alphas=5, max_examples=64)
    before = conn.curves_pane.object
    for name, value, message in (("methods", ["none", "magic"], "alignment[] must be one of"),
                                 ("methods", [], "alignment must be a non-empty list"),
                                 ("split", "test", "split must be one of ['both', 'val', 'train'], got 'test'"),
                                 ("n_alphas", 500, "alphas must be an integer in [3, 51], got 500")):
        setattr(conn, name, value)
        assert message in conn.errors.text
        assert getattr(conn, name) == {"methods": ["none"], "split": "both", "n_alphas": 5}[name]   # back
        assert conn.curves_pane.object is before                                                 # not redrawn
    conn.split = "val"
    assert conn.errors.text == ""                                                    # a good value clears the box
    grok = explore(grok_run)
    grok.step = 15
    assert "step must be one of [0, 10, 20, 30], got 15" in grok.errors.text and grok.step == 30
    view = explore(grown)
    view.stage = 9
    assert "stage must be an integer in [0, 2], got 9" in view.errors.text and view.stage == 2
    view.stage_slider.value = 7                                                      # a forged widget value
    assert "got 7" in view.errors.text and view.stage == 2 and view.stage_slider.value == 2
    view.x = "time"
    assert "x axis must be one of ['step', 'flops'], got 'time'" in view.errors.text and view.x == "step"
    col = explore(pair[0].model, digits.x_train[:64], digits.y_train[:64])
    col.layer = 5
    assert "layer must be one of [0, 1, 2, -1], got 5" in col.errors.text and col.layer == -1


# ---------------------------------------------------------------------------- the front end


def test_doctor_prints_versions_lab_extensions_and_what_is_missing(tmp_path, monkeypatch):
    out = io.StringIO()
    found = frontend.doctor(file=out)
    text = out.getvalue()
    for name in ("panel", "bokeh", "pyviz_comms", "jupyterlab", "jupyter_bokeh"):
        assert re.search(rf"^  {name}\s+{re.escape(found['versions'][name] or 'missing')}", text, re.M), name
    assert found["versions"]["panel"] == pn.__version__
    assert found["lab_extensions"]["@pyviz/jupyterlab_pyviz"] is not None       # the venv's JupyterLab has it
    # a JupyterLab environment without the extensions, in VS Code, without jupyter_bokeh
    lab = tmp_path / "labextensions" / "@pyviz" / "jupyterlab_pyviz"
    real = frontend._version
    monkeypatch.setattr(frontend, "_version", lambda p: None if p == "jupyter_bokeh" else real(p))
    out = io.StringIO()
    found = frontend.doctor(file=out, paths=[str(tmp_path / "labextensions")], environ={"VSCODE_PID": "1"},
                            modules={})
    text = out.getvalue()
    assert found["front_end"] == "VS Code" and "lab extension @pyviz/jupyterlab_pyviz: not found" in text
    assert any("pyviz_comms' JupyterLab extension" in m for m in found["missing"])
    assert any("depth-workbench[notebook]" in m for m in found["missing"])
    assert re.search(r"^  jupyter_bokeh\s+missing", text, re.M)
    lab.mkdir(parents=True)
    (lab / "package.json").write_text('{"version": "9.9.9"}')
    found = frontend.doctor(file=io.StringIO(), paths=[str(tmp_path / "labextensions")], environ={}, modules={})
    assert found["lab_extensions"]["@pyviz/jupyterlab_pyviz"][0] == "9.9.9" and found["missing"] == []
    assert frontend.front_end({}, {"google.colab": object()}) == "Colab"


def test_the_notebook_extension_list_is_the_dashboards():
    main = (ROOT / "apps" / "main.py").read_text()
    call = re.search(r"pn\.extension\(([^)]*)\)", main).group(1)
    assert "EXTENSIONS" in call or set(re.findall(r'"(\w+)"', call)) == set(frontend.EXTENSIONS)


def test_pyproject_documents_the_front_end_extra():
    text = (ROOT / "pyproject.toml").read_text()
    notebook = re.search(r"^notebook = \[(.*)\]", text, re.M)
    assert notebook and "jupyter_bokeh" in notebook.group(1)
    deps = text.split("[project.optional-dependencies]")[0]
    assert "ipywidgets" not in deps           # no file of the package uses it (jupyter_bokeh brings its own)
