"""The Residual page's lenses, attention and causal-tracing views on a native Transformer, driven through their
widgets without a server, each checked against the engine called directly on the same model and input; the
views alone in a notebook (bound to a model in memory); their "As code" boxes executed."""
import numpy as np
import panel as pn
import pytest
import torch

import workbench as wb
from workbench import attention, lenses, tracing
from workbench.ui.residual import AttentionView, LensView, ModelInput, ResidualPage, StreamView, TracingView
from workbench.ui.session import DataStore

pytest.importorskip("panel")


@pytest.fixture(scope="module")
def trained():
    ds = wb.data.load("text", context=16, corpus_chars=4000)
    cfg = wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, vocab=list(ds.vocab), d_model=32,
                                      n_layers=2, n_heads=2, d_mlp=64)
    run = wb.train(wb.models.build(cfg), ds, wb.TrainConfig(steps=30, eval_every=30, eval_max=64), name="text")
    return run, ds


@pytest.fixture
def page(store, trained):
    run, ds = trained
    run_id = store.save(run)
    p = ResidualPage(DataStore(store))
    p.run_select.value = run_id
    p.analyse(wait=True)
    assert p.errors.text == "" and p.task.status == "done", p.errors.text
    return p


def _model(page):
    return page.lenses.subject.model


def _exec(view) -> dict:
    view.show_code()
    code = view.code.object
    assert code.startswith("```python\n") and code.endswith("\n```")
    scope = {}
    exec(compile(code.removeprefix("```python\n").removesuffix("\n```"), f"<{view.title} as code>", "exec"), scope)
    return scope


def test_analyse_fills_the_lens_and_attention_tabs_from_the_engine(page, trained):
    run, ds = trained
    x = ds.x_val[:1]
    model = _model(page)
    want = lenses.compare(model, x)
    got = page.lenses.result["compare"]
    assert list(got.lens.unique()) == ["logit"] and np.allclose(got.kl_to_final, want.kl_to_final)
    assert np.allclose(got.perplexity, np.exp(want.loss))
    heat = page.lenses.heat_pane.object
    assert heat.data[-1].y == ("commits",)                              # the commitment strip under the map
    assert page.attention.result["scores"].equals(attention.head_scores(model))
    frame = page.attention._patterns[0]
    pat = attention.pattern(model, x, 0)
    assert frame.pivot_table(index=["head", "query"], columns="key", values="weight").fillna(0).to_numpy() == \
        pytest.approx(pat.weights.reshape(-1, 16), abs=1e-6)
    assert len(page.attention.pattern_pane.object.data) == 2            # both heads, behind the figure's menu
    layout = page.__panel__()
    assert list(page.tabs._names) == ["Stream", "Lenses", "Attention", "Causal tracing"]
    assert page.contrib_pane in layout.select(pn.pane.Plotly)          # the first tab's first figure


def test_tuned_lens_trains_as_a_job_is_stored_with_the_run_and_loaded_again(page, store, monkeypatch):
    model = _model(page)
    run_id = page.run_select.value
    page.lenses.steps, page.lenses.seed = 12, 3
    page.lenses.run("tuned", wait=True)
    assert page.errors.text == "" and page.task.status == "done", page.errors.text
    assert "stored with run" in page.lenses.note.object
    stored = lenses.TunedLens.from_run(store, run_id)
    fit = lenses.train_tuned_lens(model, page.lenses.subject.training(), steps=12, batch_size=32, max_passes=100,
                                  seed=3)
    assert all(torch.equal(a, b) for a, b in zip(fit.lens.state_dict().values(), stored.state_dict().values()))
    cmp = page.lenses.result["compare"]
    want = lenses.compare(model, page.lenses.subject.x, tuned=stored)
    assert np.allclose(cmp.kl_to_final, want.kl_to_final, atol=1e-6)
    assert list(page.lenses.lens_select.options) == ["logit", "tuned"] and page.lenses.lens == "tuned"
    # the lens heat-map's lens and criterion re-slice the cached tables: no engine call
    with monkeypatch.context() as m:
        for name in ("compare", "top_tokens", "commitment"):
            m.setattr(lenses, name, lambda *a, **k: pytest.fail("recomputed"))
        page.lenses.criterion = "p50"
        page.lenses.lens = "logit"
        assert "logit lens" in page.lenses.heat_pane.object.layout.title.text
        page.lenses.lens_select.param.update(value="jacobian")         # never offered: refused, naming the field
        assert page.errors.text.startswith("lens must be one of")
    # another page (a new session) opening the run finds the stored lens
    other = ResidualPage(DataStore(store))
    other.run_select.value = run_id
    other.analyse(wait=True)
    assert "tuned lens loaded from run" in other.lenses.note.object
    assert set(other.lenses.result["compare"].lens) == {"logit", "tuned"}


def test_jacobian_lens_fits_as_a_job_and_the_code_box_gives_the_same_table(page):
    model = _model(page)
    page.lenses.prompts = 2
    page.lenses.run("jacobian", wait=True)
    assert page.errors.text == "", page.errors.text
    assert "Jacobian lens fitted on 2 prompts" in page.lenses.note.object
    J = lenses.fit_jacobian_lens(model, page.lenses.subject.training()[:2])
    want = lenses.compare(model, page.lenses.subject.x, jacobian=J)
    got = page.lenses.result["compare"]
    assert np.allclose(got[got.lens == "jacobian"].kl_to_final, want[want.lens == "jacobian"].kl_to_final, atol=1e-5)
    page.lenses.steps = 5
    scope = _exec(page.lenses)
    code_table = scope["table"]
    assert set(code_table.lens) == {"logit", "tuned", "jacobian"}
    assert np.allclose(code_table[code_table.lens == "jacobian"].kl_to_final,
                       want[want.lens == "jacobian"].kl_to_final, atol=1e-5)


def test_attention_layer_head_and_scores_and_bad_layers(page, monkeypatch):
    model = _model(page)
    page.attention.layer = 1                     # not computed yet: one forward in the page's job
    page.task.join(30)
    assert page.errors.text == "" and 1 in page.attention._patterns
    assert np.allclose(page.attention._patterns[1].weight, attention.pattern(model, page.attention.subject.x,
                                                                             1).frame().weight, atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(attention, "pattern", lambda *a, **k: pytest.fail("recomputed"))
        page.attention.head = "1"
        assert len(page.attention.pattern_pane.object.data) == 1
        page.attention.layer = 0                 # cached: no engine call
        page.attention.score_kind = "previous"
        assert len(page.attention.scores_pane.object.data) == 1
        page.attention.head_select.param.update(value="7")             # never offered
        assert page.errors.text.startswith("head must be one of")
    page.attention.layer = 5                      # out of range: the engine's message, naming the argument
    page.task.join(30)
    assert "layer must be" in page.errors.text and "[0, 1]" in page.errors.text
    page.attention.layer = 0
    scope = _exec(page.attention)
    assert scope["scores"].equals(attention.head_scores(model))
    assert np.allclose(scope["pat"].weights, attention.pattern(model, page.attention.subject.x[:1], 0).weights)


def _ids(model, text):
    return torch.tensor([[model.config.vocab.index(c) for c in text]])


def _corrupt(model, text):
    """``text`` with its last character changed so that the model's next-token prediction changes."""
    with torch.no_grad():
        clean = int(model(_ids(model, text))[0, -1].argmax())
        for c in model.config.vocab:
            if c != text[-1] and int(model(_ids(model, text[:-1] + c))[0, -1].argmax()) != clean:
                return text[:-1] + c
    raise AssertionError("no corrupt text changes the answer")


def test_causal_trace_and_patching_beside_attribution_patching(page):
    model = _model(page)
    x = page.tracing.subject.x
    page.tracing.subject_tokens = (3, 5)
    page.tracing.samples, page.tracing.window = 4, 1
    page.tracing.kind = "mlp"
    page.tracing.run("trace", wait=True)
    assert page.errors.text == "", page.errors.text
    want = tracing.causal_trace(model, x, subject=(3, 6), kind="mlp", samples=4, window=1, seed=0)
    got = page.tracing.trace
    assert np.allclose(got.effects.prob, want.effects.prob, atol=1e-6) and got.clean == pytest.approx(want.clean)
    assert "subject noised" in page.tracing.note.object and "positions 3 to 5" in page.tracing.subject_note.object
    page.tracing.run("patching", wait=True)                    # a dataset sample has no corrupt text
    assert "patching needs a corrupt input" in page.errors.text
    page.tracing.kind_buttons.param.update(value="everything")
    page.tracing.run("trace", wait=True)
    assert page.errors.text.startswith("kind must be one of")
    page.tracing.kind = "resid"
    page.tracing.subject_tokens = (12, 40)                      # past the prompt: the engine says which bound
    page.tracing.run("trace", wait=True)
    assert "subject[1]" in page.errors.text
    clean, corrupt = "the cat sees", _corrupt(model, "the cat sees")
    page.input_kind.value = "Typed text"
    page.text.value, page.corrupt_text.value = clean, corrupt
    page.analyse(wait=True)
    page.tracing.steps = 4
    page.tracing.run("patching", wait=True)
    assert page.errors.text == "", page.errors.text
    comp = tracing.compare_patching(model, _ids(model, clean), _ids(model, corrupt), steps=4)
    assert comp.correlation.spearman.notna().all()
    got = page.tracing.comparison
    assert np.allclose(got.correlation.spearman, comp.correlation.spearman, equal_nan=True)
    assert "Spearman" in page.tracing.patch_note.object
    page.tracing.subject_tokens = (4, 6)
    scope = _exec(page.tracing)
    assert np.allclose(scope["comp"].grid.recovery, comp.grid.recovery, equal_nan=True, atol=1e-6)
    assert scope["tr"].subject == (4, 7)


def test_depth_report_carries_the_lenses_and_attention(page):
    page.attention.layer = 1
    page.task.join(30)
    page.run_report(wait=True)
    assert page.errors.text == "", page.errors.text
    rep = page.report
    assert rep.attention_layer == 1 and not rep.head_scores.empty and not rep.commitment.empty
    html = page.report_file.file.getvalue().decode()
    assert "Head-type scores" in html and "Attention pattern, layer 1" in html and "<script src" not in html
    assert "commitment" in page.report_note.object


def test_a_vector_model_gets_the_engines_message_for_attention(store):
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, n_layers=2, d_hidden=16))
    run_id = store.save(wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2)))
    page = ResidualPage(DataStore(store))
    page.run_select.value = run_id
    page.analyse(wait=True)
    assert page.errors.text == "" and page.lenses.result["tokens"] is None   # lenses: per layer, no heat-map
    page.attention.run("attention", wait=True)
    assert "has no attention" in page.errors.text


# ---------------------------------------------------------------------------- alone in a notebook


def test_the_views_work_alone_bound_to_a_model_in_memory(trained):
    run, ds = trained
    model, x = run.model, ds.x_val[0]
    subject = ModelInput.of(model, x)
    assert subject.tokens == [ds.vocab[int(t)] for t in x] and subject.x.shape == (1, 16)
    stream = StreamView(subject=subject)
    assert stream.analysis is not None and stream.analysis.n_layers == 2
    stream.layer = 1
    assert stream.contrib_pane.object["layout"]["shapes"][-1]["x0"] == 0.5
    stream.__panel__()
    lens_view = LensView(subject=subject)
    assert set(lens_view.result["compare"].lens) == {"logit"}
    lens_view.steps = 120          # one prompt, 100 passes at most: fewer tokens than asked, and it says so
    assert lens_view.run("tuned") and set(lens_view.result["compare"].lens) == {"logit", "tuned"}
    assert "100 of 120 steps" in lens_view.note.object and "fewer tokens than asked" in lens_view.note.object
    assert "stored" not in lens_view.note.object                        # a model in memory: nothing to store with
    view = AttentionView(subject=subject)
    assert view.result["scores"].equals(attention.head_scores(model))
    tr = TracingView(subject=subject)
    tr.samples = 2
    assert tr.run("trace") and len(tr.trace.effects) == 2 * 16
    tr.subject_tokens = (3, 99)
    assert not tr.run("trace") and "subject[1]" in tr.errors.text       # the view's own error box
    empty = LensView()
    assert not empty.run("lenses") and "no model and input yet" in empty.errors.text


@pytest.mark.parametrize("family", ["gpt2", "neox_parallel", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi"])
def test_the_views_read_every_adapter_family(family):
    """Alone, bound to a tiny random-init Hugging Face model: the lens comparison (the logit lens is the model at
    the output), a tuned-lens fit, the pattern against transformers' own ``output_attentions`` (eager) and a
    causal trace whose restored final residual gives the clean probability back."""
    hf = pytest.importorskip("helpers.hf_models")
    model = hf.build(family)
    x = torch.randint(1, hf.V_, (1, 6), generator=torch.Generator().manual_seed(2))
    subject = ModelInput.of(model, x)
    assert subject.tokens == [str(int(i)) for i in x[0]]
    lens_view = LensView(subject=subject)
    cmp = lens_view.result["compare"]
    assert cmp[cmp.layer == cmp.layer.max()].kl_to_final.abs().max() < 1e-5
    lens_view.steps = 2
    assert lens_view.run("tuned"), lens_view.errors.text
    assert set(lens_view.result["compare"].lens) == {"logit", "tuned"}
    view = AttentionView(subject=subject)
    with torch.no_grad():
        ref = model(input_ids=x, output_attentions=True).attentions[0][0].numpy()
    frame = view._patterns[0]
    got = frame.pivot_table(index=["head", "query"], columns="key", values="weight").fillna(0).to_numpy()
    assert got == pytest.approx(ref.reshape(-1, 6), abs=1e-5)
    tr = TracingView(subject=subject)
    tr.samples, tr.subject_tokens = 2, (1, 2)
    assert tr.run("trace"), tr.errors.text
    last = tr.trace.effects[(tr.trace.effects.position == 5) & (tr.trace.effects.layer == tr.trace.effects.layer.max())]
    assert last.prob.item() == pytest.approx(tr.trace.clean, abs=1e-5)


def test_the_explorer_intervenes_where_the_lens_heat_map_is_clicked(trained):
    from workbench.ui.residual import ResidualExplorer

    run, ds = trained
    x = ds.x_val[0]
    explorer = ResidualExplorer.of(run.model, x)
    explorer.__panel__()
    explorer.stream.lens_pane.click_data = {"points": [{"x": 6, "y": 1, "pointNumber": [1, 6]}]}
    kind, layer, pos, result = explorer.interventions.last
    assert (kind, layer, pos) == ("erase", 1, 6)
    ref = wb.residual.erase(run.model, x[None], 1, 6)
    assert np.allclose(result.output.kl, ref.output.kl, atol=1e-6)
    assert result.output.kl.to_numpy()[:6] == pytest.approx(0.0, abs=1e-9)     # causal: earlier tokens unchanged
    assert explorer.lenses is not None and explorer.attention.result is not None


def test_stop_ends_a_tuned_lens_training_with_the_lens_so_far(page):
    page.lenses.steps = 5000
    page.lenses.run("tuned", wait=False)
    for _ in range(600):
        if page.task.progress > 0:
            break
        page.task.wait(0.05)
    page.task.stop()
    page.task.join(60)
    assert page.task.status == "cancelled"
    note = page.lenses.note.object
    assert "fewer tokens than asked" in note and "stopped" in note and "stored" not in note


def test_the_pages_code_box_runs_the_stream_and_the_intervention(page):
    page.layer.value, page.position.value = 1, 4
    page.show_code()
    code = page.code.object.removeprefix("```python\n").removesuffix("\n```")
    scope = {}
    exec(compile(code, "<Residual stream as code>", "exec"), scope)
    assert scope["er"].residual.equals(wb.residual.erase(_model(page), page.stream.subject.x, 1, 4).residual)
    assert wb.residual.contributions(scope["model"], scope["x"]).equals(page.analysis.contrib)
