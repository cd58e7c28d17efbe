"""Residual stream page, driven through its widgets without a server."""
import dataclasses

import panel as pn
import pytest
import torch

import workbench as wb
from workbench import interop, residual, roots
from workbench.ui.session import DataStore
from workbench.ui.residual import ResidualPage

pytest.importorskip("panel")


def _config(ds, n_layers):
    return wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, vocab=list(ds.vocab), d_model=32,
                                       n_layers=n_layers, n_heads=2, d_mlp=64)


def _text_run(n_layers=2, steps=5, name="text"):
    ds = wb.data.load("text", context=16, corpus_chars=4000)
    model = wb.models.build(_config(ds, n_layers))
    return wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=steps, eval_max=64), name=name), ds


@pytest.fixture
def page_with_run(store):
    run, ds = _text_run()
    run_id = store.save(run)
    page = ResidualPage(DataStore(store))
    page.run_select.value = run_id
    return page, run, ds


def _shapes(pane):
    return pane.object["layout"].get("shapes", [])


def test_analyse_a_stored_run_and_select_layer_and_token_without_recomputing(page_with_run, monkeypatch):
    page, run, ds = page_with_run
    page.analyse(wait=True)
    assert page.errors.text == "" and page.task.status == "done"
    a = page.analysis
    assert a.n_layers == 2 and a.n_positions == 16 and page.position.end == 15
    assert not page.layer.disabled and not page.position.disabled
    x = ds.x_val[:1]
    expected = residual.contributions(run.model, x)
    assert a.contrib.equals(expected)
    bars = [t for t in page.contrib_pane.object["data"] if t["type"] == "bar"]
    assert [t["name"] for t in bars] == ["attn", "mlp", "layer"]

    calls = []
    for name in ("contributions", "logit_lens", "skip_effects", "logit_attribution", "decompose"):
        monkeypatch.setattr(residual, name, lambda *args, _n=name, **kw: calls.append(_n))
    page.layer.value = 1
    assert _shapes(page.contrib_pane)[-1]["x0"] == 0.5  # band over layer 1
    assert page.position_pane.object["layout"]["title"]["text"].startswith("Layer 1")
    page.position.value = 7
    title = page.attr_pane.object["layout"]["title"]["text"]
    assert "position 7" in title
    comps, values, target = a.attr_at[7]
    assert page.attr_pane.object["data"][0]["x"] == values
    assert title.endswith(f"(sum = logit {sum(values):.2f})")
    lens_box = _shapes(page.lens_pane)[-1]
    assert (lens_box["x0"], lens_box["y0"]) == (6.5, 0.5)
    page.lens_metric.value = "top1_agree"
    assert calls == []  # choosing a layer or a token only re-slices cached tables


def test_second_analysis_of_the_same_input_is_served_from_the_cache(page_with_run, monkeypatch):
    page, _, _ = page_with_run
    page.analyse(wait=True)
    first = page.analysis
    monkeypatch.setattr(residual, "contributions", lambda *a, **k: pytest.fail("recomputed"))
    page.analyse(wait=True)
    assert page.analysis is first


def test_typed_text_and_clear_errors(page_with_run):
    page, _, ds = page_with_run
    page.input_kind.value = "Typed text"
    page.text.value = "the cat"
    page.analyse(wait=True)
    assert page.errors.text == ""
    assert page.analysis.tokens == list("the cat") and page.position.end == 6
    page.text.value = "the cat \u00e9"
    page.analyse(wait=True)
    assert "characters not in the vocabulary" in page.errors.text   # the engine's message (OpenModel.encode)
    page.text.value = "x" * 40
    page.analyse(wait=True)
    assert "context is 16" in page.errors.text


def test_hugging_face_model_is_chosen_from_the_model_roots(store, tmp_path, monkeypatch):
    run, ds = _text_run()
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(tmp_path / "models"))
    path = interop.export_gpt2(run.model, tmp_path / "models" / "gpt2", vocab=ds.vocab, dataset=ds.spec())
    page = ResidualPage(DataStore(store))
    page.source.value = "Hugging Face model"
    assert page.hf_model.visible and page.hf_refresh.visible and not page.run_select.visible
    assert list(page.hf_model.options.values()) == [str(path.resolve())]
    # a value no listing offered (what a hostile client could send) is refused with the one message
    page.hf_model.options = {**page.hf_model.options, "forged": str(tmp_path / "missing")}
    page.hf_model.value = str(tmp_path / "missing")
    page.analyse(wait=True)
    assert page.errors.text == roots.REFUSED
    page.hf_model.value = str(path.resolve())
    page.analyse(wait=True)  # dataset sample 0 from the spec saved with the export
    assert page.errors.text == "", page.errors.text
    ours = residual.contributions(run.model, ds.x_val[:1])
    assert page.analysis.contrib[["rel_norm", "cosine"]].to_numpy() == pytest.approx(
        ours[["rel_norm", "cosine"]].to_numpy(), rel=1e-4, abs=1e-6)


def test_no_model_folders_says_how_to_add_one(store, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(tmp_path / "empty"))
    page = ResidualPage(DataStore(store))
    page.source.value = "Hugging Face model"
    assert page.no_hf_models.visible and page.hf_model.options == {}
    page.analyse(wait=True)
    assert "No Hugging Face model folders" in page.errors.text
    path = interop.export_gpt2(_text_run()[0].model, tmp_path / "empty" / "m", vocab=list("ab"))
    page.hf_refresh.clicks += 1  # Refresh lists it
    assert list(page.hf_model.options.values()) == [str(path.resolve())] and not page.no_hf_models.visible


def test_growth_run_can_be_stepped_stage_by_stage(store):
    ds = wb.data.load("text", context=16, corpus_chars=4000)
    model = wb.models.build(_config(ds, 1))
    ids, parent = [], None
    for stage in range(3):
        if stage:
            wb.growth.add_layer(model, init="zero")
            wb.growth.freeze(model, below=stage)
        run = wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=3, eval_max=32), name=f"grow-{stage}")
        run.meta = {"group": "g1", "stage": stage, "parent": parent}
        parent = store.save(run)
        ids.append(parent)
    page = ResidualPage(DataStore(store))
    # a page opened after the growth shows its newest run, the last stage (filling the stage slider
    # used to reset it to stage 0 and pull the run choice along)
    assert page.run_select.value == ids[2] and page.stage.value == ids[2]
    page.run_select.value = ids[0]
    assert page.stage.visible and list(page.stage.options.values()) == ids
    page.analyse(wait=True)
    assert page.errors.text == "" and page.analysis.n_layers == 1
    assert page.stages_pane.visible
    lines = page.stages_pane.object.data
    assert [t.name for t in lines] == ["stage 0", "stage 1", "stage 2"]
    assert list(lines[2].x) == [0, 1, 2]
    across = page.attention.result["across"]            # head scores of every stage, on the same tokens
    assert sorted(set(across["stage"])) == [0, 1, 2] and page.attention.across_pane.visible
    assert across[across.stage == 2].layer.max() == 2 and across[across.stage == 0].layer.max() == 0
    page.stage.value = ids[2]  # analyses the chosen stage in the background
    page.task.join(60)
    assert page.run_select.value == ids[2] and page.analysis.n_layers == 3 and page.layer.end == 2


def test_vector_model_uses_a_batch_of_samples(store):
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=32, n_layers=2, d_hidden=32))
    run_id = store.save(wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=3)))
    page = ResidualPage(DataStore(store))
    page.run_select.value = run_id
    page.analyse(wait=True)
    assert page.errors.text == ""
    assert page.position.disabled and list(page.analysis.contrib.sublayer.unique()) == ["layer"]
    page.input_kind.value = "Typed text"
    page.text.value = "1 2"
    page.analyse(wait=True)
    assert "sequence model" in page.errors.text


def test_page_shows_the_stored_run_and_empty_figures_before_analysing(page_with_run):
    page, run, _ = page_with_run
    layout = page.__panel__()
    shown = layout.select(pn.widgets.Select)
    assert page.run_select in shown and page.run_select.value == run.run_id
    assert any(run.run_id[-6:] in label for label in page.run_select.options)
    plots = layout.select(pn.pane.Plotly)
    assert page.contrib_pane in plots and page.contrib_pane.object.data == ()
    assert "What each layer writes" in page.contrib_pane.object.layout.title.text
    assert f"load({run.run_id!r})" in page.code.object   # the As code box names the chosen run


def test_a_run_saved_while_the_page_is_open_becomes_the_selection(page_with_run, store):
    page, run, _ = page_with_run
    first = page.run_select.value
    later = page.datastore.save(run, name="later")
    assert page.run_select.value == later != first
    page.run_select.value = first                              # the user's own choice then stays
    page.datastore.refresh()
    assert page.run_select.value == first


# ---------------------------------------------------------------------------- a mixture from the Compose page


def _specialist_runs(store, steps=3):
    """Two tiny specialists fine-tuned from one base over one frozen substrate, saved in ``store``."""
    domains = wb.compose.shared_text(["grammar", "arithmetic"], context=16, corpus_chars=3000)
    cfg = wb.models.config_for(domains["grammar"], d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                               embedding="frozen-random")
    base = wb.models.build(cfg)
    tc = wb.TrainConfig(steps=steps, batch_size=16, eval_every=steps, eval_max=16)
    runs = wb.compose.train_specialists(base, domains, tc)
    runs["arithmetic"].model.blocks.append(wb.models.build(
        dataclasses.replace(cfg, n_layers=1)).blocks[0])     # members may differ in depth: 1 and 2 blocks
    runs["arithmetic"].model.sync_config()
    return [store.save(r) for r in runs.values()], domains


def test_residual_page_opens_a_mixture_built_on_the_compose_page(store, monkeypatch):
    from workbench.ui.compose import ComposePage

    datastore = DataStore(store)
    page = ResidualPage(datastore)
    page.source.value = "Compose mixture (this session)"
    assert page.no_mixture.visible and "Compose" in page.no_mixture.object and not page.mixture_select.visible
    page.analyse(wait=True)
    assert "build a logit mixture on the Compose page first" in page.errors.text

    ids, domains = _specialist_runs(store)
    compose_page = ComposePage(datastore)
    compose_page.specialists.value = ids
    compose_page.merges.value = ["logit mean", "probability mixture", "gated mixture"]
    compose_page.run_compose(wait=True)
    assert compose_page.compose_task.status == "done", compose_page.compose_task.error
    names = ["mixture: logit mean (grammar + arithmetic)", "mixture: gated mixture (grammar + arithmetic)"]
    assert list(datastore.session_models) == names          # probability mixtures are not offered
    assert "Residual stream page" in compose_page.message.object

    # the newest mixture is offered; choose the plain logit mean
    assert not page.no_mixture.visible and page.mixture_select.visible and page.member.visible
    assert page.mixture_select.options == names and page.mixture_select.value == names[1]
    page.mixture_select.value = names[0]
    assert page.member.options == {"m0: grammar": 0, "m1: arithmetic": 1}
    assert page.domain.options == ["grammar", "arithmetic"]
    page.domain.value = "arithmetic"
    page.analyse(wait=True)
    assert page.errors.text == "" and page.task.status == "done", (page.errors.text, page.task.error)
    a = page.analysis
    mixture = datastore.session_models[names[0]]
    x = domains["arithmetic"].x_val[:1]
    assert a.mixture and a.n_members == 2 and a.member == 0 and a.n_layers == 1
    # the attribution covers both members and adds up to the mixture's own logit at every position
    assert {c.split()[0] for c in a.attribution.component} == {"m0", "m1"}
    with torch.no_grad():
        logits = mixture(x)[0]
    for pos in (0, 9, 15):
        comps, values, target = a.attr_at[pos]
        assert target == int(logits[pos].argmax())
        assert sum(values) == pytest.approx(float(logits[pos, target]), abs=1e-4)
    assert "the mixture's logit" in page.attr_pane.object["layout"]["title"]["text"]
    assert "Mixture of 2 members" in page.summary.object

    # another member: re-sliced from the cached tables, no engine call
    calls = []
    for name in ("contributions", "logit_lens", "skip_effects", "logit_attribution", "decompose"):
        monkeypatch.setattr(residual, name, lambda *args, _n=name, **kw: calls.append(_n))
    page.member.value = 1
    assert calls == [] and page.analysis.member == 1 and page.analysis.n_layers == 2 and page.layer.end == 1
    monkeypatch.undo()
    expected = residual.contributions(mixture, x)
    expected = expected[expected.member == 1].drop(columns="member").reset_index(drop=True)
    assert page.analysis.contrib.equals(expected)
    assert len(page.analysis.skip.heatmap) == 1 and list(page.analysis.skip.output.skipped) == [0, 1]
    lens = page.lens_pane.object["data"][0]
    assert len(lens["z"]) == 3                               # member 1: layers 0, 1 and its output
    page.layer.value = 1
    page.position.value = 4
    page.member.param.update(value=7)                        # a member the page never offered: refused
    assert page.errors.text.startswith("member must be one of") and page.analysis.member == 1
    page.domain.param.update(value="poetry")
    page.analyse(wait=True)
    assert page.errors.text.startswith("samples from must be one of")

    # typed text works on a mixture as on a model
    page.input_kind.value = "Typed text"
    assert not page.domain.visible
    page.text.value = "1+2=3"
    page.analyse(wait=True)
    assert page.errors.text == "" and page.analysis.tokens == list("1+2=3") and page.analysis.member == 1


def test_a_run_that_vanished_or_was_forged_is_refused_in_the_page(page_with_run, store, tmp_path):
    page, run, _ = page_with_run
    run_id = page.run_select.value
    for forged in ("not-a-run", "../../etc", run_id[:-1] + ("0" if run_id[-1] != "0" else "1")):
        page.run_select.param.update(value=forged)        # what a hostile client can send
        page.analyse(wait=True)
        assert page.task.status == "error" and page.errors.text.startswith("run: ")
        assert str(tmp_path) not in page.errors.text
    page.run_select.value = run_id
    store.delete(run_id)                                   # vanishes after it was offered
    page.analyse(wait=True)
    assert page.errors.text.startswith("run: ") and "does not exist" in page.errors.text
