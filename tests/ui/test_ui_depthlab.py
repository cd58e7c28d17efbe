"""Depth lab page driven from Python on tiny stored runs: every analysis of issue 25 end to end (the page's
job), its "As code" box executed, a pruned and a LayerSkip run saved as ordinary runs, and the bad input of
the issue refused with the engine's message naming the argument, nothing applied."""
import time

import pytest

pn = pytest.importorskip("panel")

import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench import growth  # noqa: E402
from workbench.ui.depthlab import ANALYSES, DepthLabPage  # noqa: E402
from workbench.ui.page import pages  # noqa: E402
from workbench.ui.session import DataStore  # noqa: E402
from workbench.ui.unroll import UnrollPage  # noqa: E402

IGNORE = -100
TC = dict(steps=5, eval_every=5, eval_max=64, batch_size=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One store with a 3-block k-hop Transformer, a char LM, a 2-block MLP, a 0-block MLP and a growth group."""
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    store = wb.RunStore(home)
    tc = wb.TrainConfig(**TC)
    kh = wb.data.load("khop", hops=2, nodes=5, queries=2, layout="table", n_train=200, n_val=40)
    text = wb.data.load("text", context=16, corpus_chars=2000)
    digits = wb.data.load("digits")
    ids = {"home": home}
    for key, ds, size in (("khop", kh, dict(d_model=16, n_heads=2, d_mlp=16, n_layers=3)),
                          ("text", text, dict(d_model=16, n_heads=2, d_mlp=16, n_layers=2)),
                          ("mlp", digits, dict(d_model=8, d_hidden=8, n_layers=2)),
                          ("empty", digits, dict(d_model=8, d_hidden=8, n_layers=0))):
        model = wb.models.build(wb.models.config_for(ds, **size))
        ids[key] = store.save(wb.train(model, ds, tc, name=key))
    grown = wb.models.build(wb.models.config_for(kh, d_model=16, n_heads=2, d_mlp=16, n_layers=1))
    growth.grow(grown, kh, [growth.Stage("train", 3), growth.Stage("add_layer", 3)], tc, store=store, group="gg")
    return ids


@pytest.fixture
def page(runs, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(runs["home"]))   # the "As code" box's wb.RunStore()
    p = DepthLabPage(DataStore(wb.RunStore(runs["home"])))
    p.__panel__()
    p.examples.value = 16
    return p


def _go(page, analysis, run_id=None):
    page.analysis.value = analysis
    if run_id is not None:
        page.run.value = run_id
    page.start_analysis(wait=True)
    return page


def _exec(page) -> dict:
    scope = {}
    code = page.code.object
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), "<as code>", "exec"), scope)
    return scope


def _hand(model, x, order):
    """Logits of a native model run along ``order`` by hand (the reference for pruning)."""
    with torch.no_grad():
        h = model.embed(x)
        for i in order:
            h = model.blocks[i](h)
        return model.unembed(h)


def test_page_is_registered_after_the_residual_stream():
    titles = [cls.title for cls in pages()]
    assert titles.index("Depth lab") == titles.index("Residual stream") + 1
    assert DepthLabPage in pages()


def test_rankings_strategies_and_oracle_as_the_engine_and_as_code(page, runs):
    store = wb.RunStore(runs["home"])
    model, ds = store.load(runs["khop"]).model.eval(), wb.data.load("khop", hops=2, nodes=5, queries=2,
                                                                     layout="table", n_train=200, n_val=40)
    x, y = ds.x_val[:16], ds.y_val[:16]
    _go(page, "rankings", runs["khop"])
    assert page.task.status == "done" and page.errors.text == ""
    ref = wb.depthlab.rankings(model, x, y=y, mask=y != IGNORE)
    assert page.results["rankings"]["score"].tolist() == pytest.approx(ref.table["score"].tolist())
    assert len(page.plots["rank"].object.data) == 3 and page.plots["angular"].object.data[0].z is not None
    assert "first block to remove" in page.status.object
    assert _exec(page)["ranks"].table["rank"].tolist() == page.results["rankings"]["rank"].tolist()

    page.every_span.value = False
    page.start.value, page.span_n.value, page.loop_k.value = 1, 2, 3
    _go(page, "strategies")
    t = page.results["strategies"]
    assert page.task.status == "done" and t["strategy"].tolist() == ["full", *wb.depthlab.STRATEGIES]
    loop = t[t["strategy"] == "loop"].iloc[0]
    assert loop["order"] == "0 1 2 1 2 1 2" and loop["k"] == 3
    logits = _hand(model, x, [0, 1, 2, 1, 2, 1, 2])   # the loop by hand
    sel = y != IGNORE
    assert loop["acc"] == pytest.approx(float((logits.argmax(-1)[sel] == y[sel]).float().mean()))
    assert {b.name for b in page.plots["strategies"].object.data} == {"blocks 1..2"}
    assert _exec(page)["strat"]["acc"].tolist() == pytest.approx(t["acc"].tolist())

    page.hops.value = "1, 2"
    _go(page, "oracle")
    assert page.task.status == "done", page.task.error
    summary = page.results["summary"]
    assert summary["hops"].tolist() == [1, 2] and summary["n"].tolist() == [16, 16]
    assert "mean oracle length" in page.status.object and "exhaustive" in page.status.object
    scope = _exec(page)
    assert scope["oracle"].summary()["mean_oracle_length"].tolist() == pytest.approx(
        summary["mean_oracle_length"].tolist(), nan_ok=True)


def test_prune_saves_an_ordinary_run_every_page_reads(page, runs):
    page.blocks.value, page.heal.value = "1", 0
    _go(page, "prune", runs["khop"])
    assert page.task.status == "done", page.task.error
    new = page.results["saved"]
    store = wb.RunStore(runs["home"])
    back, source = store.load(new), store.load(runs["khop"])
    assert back.model.config.n_layers == 2 and back.meta["removed"] == [1] and back.meta["parent"] == runs["khop"]
    x = wb.data.from_spec(source.dataset).x_val[:8]
    with torch.no_grad():   # the stored pruned model is the source with block 1 skipped
        torch.testing.assert_close(back.model.eval()(x), _hand(source.model.eval(), x, [0, 2]))
    assert new in page.datastore.runs["run_id"].tolist()                      # listed at once
    assert new in UnrollPage(DataStore(store)).run.options.values()         # and on other pages
    assert "It is an ordinary run" in page.status.object
    before = len(store.list())
    page.save_name.value, page.heal.value = "healed one", 2
    page.start_analysis(wait=True)
    healed = store.load(page.results["saved"])
    assert healed.name == "healed one" and healed.meta["healed_steps"] == 2 and len(store.list()) == before + 1
    assert any(trace.line.dash == "dash" for trace in page.plots["prune"].object.data)   # the healed line
    scope = _exec(page)
    assert scope["pruned"].meta["removed"] == [1] and len(store.list()) == before + 2


def test_prune_heal_curve_profile_and_effective_depth(page, runs):
    page.methods.value = ["block_influence", "random"]
    _go(page, "curve", runs["khop"])
    assert page.task.status == "done", page.task.error
    curve = page.results["curve"]
    assert set(curve["method"]) == {"block_influence", "random"} and sorted(set(curve["n_removed"])) == [0, 1, 2]
    assert _exec(page)["curve"]["acc"].tolist() == pytest.approx(curve["acc"].tolist())

    page.compare.value = runs["mlp"]
    page.n_directions.value = 1
    _go(page, "profile", runs["khop"])
    prof = page.results["profile"]
    assert page.task.status == "done" and prof["model"].nunique() == 2
    assert {"resid_norm", "cos_in_out", "rel_norm", "jac_dev", "skip_l2"} <= set(prof["metric"])
    assert page.status.object.count("deep half carries") == 2
    assert set(_exec(page)["prof"]["model"]) == set(prof["model"])

    page.analysis.value = "effective"
    assert page.group.value == "gg"
    page.start_analysis(wait=True)
    t = page.results["effective"]
    assert page.task.status == "done" and t["n_layers"].tolist() == [1, 2] and t["ratio"].isna().tolist()[0]
    assert list(page.plots["effective"].object.data[0].y) == [1, 2]
    assert _exec(page)["table"]["n_layers"].tolist() == [1, 2]


def test_early_exit_acceptance_and_layerskip_training_saved_as_a_run(page, runs):
    page.n_new.value, page.prompts.value, page.compare.value = 4, 2, "(none)"
    _go(page, "exit", runs["text"])
    assert page.task.status == "done", page.task.error
    assert page.results["exit"]["exit"].tolist() == [0, 1, 2]
    accept = page.results["accept"]
    assert accept["exit"].tolist() == [1, 2] and accept["matches_greedy"].all()
    assert len(page.plots["exit"].object.data) == 2                     # exit curve and acceptance
    scope = _exec(page)
    assert scope["accept"]["acceptance"].tolist() == pytest.approx(accept["acceptance"].tolist(), nan_ok=True)

    _go(page, "exit", runs["mlp"])   # not a char LM: no acceptance, and the page says why
    assert page.results["accept"] is None and "character LMs" in page.status.object

    page.ls_steps.value = 3
    _go(page, "layerskip", runs["text"])
    assert page.task.status == "done", page.task.error
    ls = wb.RunStore(runs["home"]).load(page.results["saved"])
    assert ls.meta["layerskip"]["p_max"] == 0.2 and ls.model.config.n_layers == 2
    assert set(page.results["exit"]["recipe"]) == {"LayerSkip", f"without: text {runs['text'][-6:]}"}
    assert page.results["saved"] in page.datastore.runs["run_id"].tolist()
    assert _exec(page)["ls_run"].meta["layerskip"]["seed"] == 0


def test_layerskip_training_shows_progress_and_stops(page, runs):
    page.analysis.value, page.run.value, page.ls_steps.value = "layerskip", runs["text"], 100_000
    page.start_analysis()
    deadline = time.monotonic() + 60
    while not page.task.message.startswith("step ") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert page.task.message.startswith("step ") and "/100000" in page.task.message and page.task.progress > 0
    assert page.run_button.disabled
    page.task.stop()
    page.task.join(60)
    assert page.task.status == "cancelled" and not page.run_button.disabled
    stopped = wb.RunStore(runs["home"]).load(page.results["saved"])    # what was trained is kept
    assert stopped.status == "cancelled" and stopped.metrics["step"].max() < 100_000


@pytest.mark.parametrize("analysis, setup, message", [
    ("strategies", dict(every_span=False, start=2, span_n=2),
     "n: the span of 2 blocks from block 2 runs past the last block 2 (n_layers = 3); n must be at most 1"),
    ("strategies", dict(loop_k=0), "k must be an integer in [1, 16], got 0"),
    ("strategies", dict(loop_k=17), "k must be an integer in [1, 16], got 17"),
    ("strategies", dict(every_span=False, strategies=["swap"], start=0, span_n=3), "n: swap exchanges two"),
    ("oracle", dict(hops="1, 9"), "hop counts: value 2 must be an integer in [1, 8], got 9"),
    ("prune", dict(blocks="1, x"), "blocks to remove must be whole numbers separated by commas"),
    ("prune", dict(blocks="1", heal=-1), "heal steps must be an integer in [0, 1000000], got -1"),
])
def test_bad_form_input_is_refused_before_any_job(page, runs, analysis, setup, message):
    page.analysis.value, page.run.value = analysis, runs["khop"]
    for name, value in setup.items():
        getattr(page, name).value = value
    jobs_before = page.task.job
    page.start_analysis(wait=True)
    assert message in page.errors.text
    assert page.task.job is jobs_before and page.task.status == "idle"     # nothing started


def test_engine_refusals_name_the_argument_and_change_nothing(page, runs):
    store = wb.RunStore(runs["home"])
    before = store.list()["run_id"].tolist()
    page.blocks.value, page.heal.value = "0, 1, 2", 3
    _go(page, "prune", runs["khop"])     # pruning every block: the engine refuses in the job, nothing is saved
    assert page.task.status == "error"
    assert "layers: pruning every block (3 of 3) leaves no residual stack" in page.errors.text
    page.blocks.value = "3"
    page.start_analysis(wait=True)
    assert "layers[0] must be an integer in [0, 2], got 3" in page.errors.text
    assert store.list()["run_id"].tolist() == before and store.load(runs["khop"]).model.config.n_layers == 3

    job = page.task.job
    _go(page, "strategies", runs["empty"])   # a model without a residual stack of blocks
    assert "model: it has no blocks to reorder, got n_layers = 0" in page.errors.text and page.task.job is job
    page.every_span.value, page.start.value, page.span_n.value = False, 0, 1
    page.start_analysis(wait=True)
    assert "model: it has no blocks to reorder, got n_layers = 0" in page.errors.text

    _go(page, "oracle", runs["mlp"])         # oracle depth is read against hops: a k-hop run only
    assert "oracle depth is read against k-hop hops" in page.errors.text and "'digits'" in page.errors.text

    page.n_new.value = 40                    # the prompt plus the new tokens must fit the context (16)
    _go(page, "exit", runs["text"])
    assert "n_new: the prompt's 8 tokens plus 40 new ones exceed the model's context of 16" in page.errors.text


def test_a_vanished_or_foreign_run_is_refused_naming_the_field(page, runs):
    page.analysis.value = "rankings"
    page.run.options = {**page.run.options, "forged": "20200101-000000-forged-abcdef"}
    page.run.value = "20200101-000000-forged-abcdef"
    page.start_analysis(wait=True)
    assert "stored run: it is no longer listed" in page.errors.text
    store = wb.RunStore(runs["home"])
    gone = store.save(store.load(runs["mlp"]), name="soon gone")
    page.datastore.refresh()
    page.run.value = gone
    store.delete(gone)                       # deleted after the page listed it: the job's open refuses it
    page.start_analysis(wait=True)
    assert page.task.status == "error" and page.errors.text.startswith("stored run: ")
    assert str(runs["home"]) not in page.errors.text
    # a run of another user: the signed-in student's view neither lists nor opens it
    student = DepthLabPage(DataStore(wb.RunStore(runs["home"]), user="student01"))
    assert student.run.options == {} and student.group.options == []
    student.start_analysis(wait=True)
    assert "stored run: pick one of your runs" in student.errors.text


def test_every_analysis_has_a_figure_and_code(page, runs):
    page.run.value = runs["khop"]
    for key in ANALYSES.values():
        page.analysis.value = key
        assert any(p.visible for p in page.plots.values()), key
        assert page.code.object.startswith("```python\n"), key
        assert sum(box.visible for box in page.option_boxes.values()) == 1
