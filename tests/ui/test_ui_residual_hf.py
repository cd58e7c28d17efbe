"""The Residual stream page on a Hugging Face model of another family (a tiny random-init Llama saved with its
tokenizer in a model root): analysis, the estimate shown first, click-to-intervene (erase, skip, patch) and the
depth report, each checked against the engine called directly on the transformers model."""
from __future__ import annotations

import re

import pytest
import torch

from workbench import interop, residual
from workbench.ui.session import DataStore
from workbench.ui.residual import ResidualPage

transformers = pytest.importorskip("transformers")

ALPHABET = [chr(65 + i) for i in range(16)]   # "A".."P": one token each


@pytest.fixture(scope="module")
def llama_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(ALPHABET), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = root / "tiny-llama"
    model.save_pretrained(d)
    interop.gpt2._save_char_tokenizer(ALPHABET, d)
    return root, d


@pytest.fixture
def page(store, llama_root, monkeypatch):
    root, _ = llama_root
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(root))
    p = ResidualPage(DataStore(store))
    p.source.value = "Hugging Face model"
    p.input_kind.value = "Typed text"
    p.text.value = "ABCDEFGH"
    return p


def _reference(d):
    model, tok = interop.load_hf(d)
    return model, torch.tensor([tok("ABCDEFGH")["input_ids"]])


def _corrupt(d) -> str:
    """A corrupt text (last letter changed) whose top-1 next token differs from the clean text's."""
    model, x = _reference(d)
    with torch.no_grad():
        clean = int(model(input_ids=x).logits[0, -1].argmax())
        for i, c in enumerate(ALPHABET):
            if int(model(input_ids=torch.tensor([list(range(7)) + [i]])).logits[0, -1].argmax()) != clean:
                return "ABCDEFG" + c
    raise AssertionError("no corrupt text changes the answer")


def test_a_llama_folder_is_analysed_with_its_own_tokenizer(page, llama_root):
    page.analyse(wait=True)
    assert page.errors.text == "", page.errors.text
    model, x = _reference(llama_root[1])
    assert x.tolist() == [list(range(8))]
    ours = residual.contributions(model, x)
    assert page.analysis.contrib[["rel_norm", "cosine"]].to_numpy() == pytest.approx(
        ours[["rel_norm", "cosine"]].to_numpy(), rel=1e-4, abs=1e-6)
    assert page.analysis.tokens == ALPHABET[:8] and page.analysis.n_layers == 3
    held = next(iter(page.model_source._opened.values())).model      # the model the page measured its speeds on
    est = residual.estimate(held, 8, "report")
    assert f"{est['seconds']:.1f} s" in page.estimate_note.object      # shown before the job ran
    assert "tokenizer" in page.as_code() and "load_hf" in page.as_code()


def test_clicking_a_lens_cell_erases_there_and_shows_the_downstream_change(page, llama_root):
    page.analyse(wait=True)
    page.intervention.value = "erase"
    page.task._direct = True
    page.lens_pane.click_data = {"points": [{"x": 5, "y": 1, "pointNumber": [1, 5]}]}
    page.task.join(30)
    assert page.errors.text == "", page.errors.text
    assert (page.layer.value, page.position.value) == (1, 5)
    kind, layer, pos, result = page.last_intervention
    assert (kind, layer, pos) == ("erase", 1, 5)
    model, x = _reference(llama_root[1])
    ref = residual.erase(model, x, 1, 5)
    assert result.output["kl"].to_numpy() == pytest.approx(ref.output["kl"].to_numpy(), abs=1e-6)
    # causal: erasing token 5 cannot change the output at earlier tokens
    assert result.output["kl"].to_numpy()[:5] == pytest.approx(0.0, abs=1e-9)
    assert result.output["kl"].to_numpy()[5] > 0
    assert "Erased" in page.intervene_note.object


def test_skip_from_a_token_and_patch_need_and_use_their_inputs(page, llama_root):
    page.analyse(wait=True)
    page.layer.value, page.position.value = 2, 3
    page.intervention.value = "patch"
    page.intervene(wait=True)
    assert "corrupt" in page.errors.text                        # patching without a corrupt run says why
    page.corrupt_text.value = "ABC"
    page.intervene(wait=True)
    assert "as many tokens as the text (8)" in page.errors.text
    page.corrupt_text.value = _corrupt(llama_root[1])
    page.intervene(wait=True)
    assert page.errors.text == "", page.errors.text
    table = page.last_intervention[3]
    # the clean residual at the last token entering layer 0 is the clean run itself there: full recovery
    assert table.loc[(table.layer == 0) & (table.position == 7), "recovery"].item() == pytest.approx(1.0, abs=1e-5)
    assert table.loc[(table.layer == 0) & (table.position == 3), "recovery"].item() == pytest.approx(0.0, abs=1e-5)
    page.intervention.value = "skip from here"
    page.intervene(wait=True)
    heat, out = page.last_intervention[3]
    model, x = _reference(llama_root[1])
    ref = residual.skip_effects(model, x, from_position=3)
    assert out["kl"].item() == pytest.approx(ref.output.loc[ref.output.skipped == 2, "kl"].item(), abs=1e-7)


def test_depth_report_button_gives_a_self_contained_html_file(page, llama_root):
    page.corrupt_text.value = _corrupt(llama_root[1])
    page.run_report(wait=True)
    assert page.errors.text == "", page.errors.text
    assert page.report is not None and len(page.report.patching) and len(page.report.ig)
    assert page.report_file.visible
    html = page.report_file.file.getvalue().decode()
    assert html.startswith("<!DOCTYPE html>") and not re.search(r"<script[^>]*\ssrc=", html)   # plotly.js inline
    assert "depth score" in page.report_note.object


def test_a_hub_name_that_names_a_server_path_is_refused(page, llama_root):
    page.hub_name.value = str(llama_root[1])
    page.analyse(wait=True)
    assert "Hub name must look like 'owner/name'" in page.errors.text
    page.hub_name.value = "../../etc"
    page.analyse(wait=True)
    assert "Hub name must look like" in page.errors.text


def test_lenses_attention_and_tracing_of_a_llama_folder_through_the_page(page, llama_root):
    """The new tabs on a Hugging Face family: the lens comparison and a tuned lens (nothing to store it with: a
    model folder), the pattern against transformers' eager ``output_attentions``, a causal trace, exact beside
    attribution patching, and the depth report with them."""
    from workbench import lenses

    page.corrupt_text.value = _corrupt(llama_root[1])
    page.analyse(wait=True)
    assert page.errors.text == "", page.errors.text
    model, x = _reference(llama_root[1])
    want = lenses.compare(model, x)
    assert page.lenses.result["compare"].kl_to_final.to_numpy() == pytest.approx(want.kl_to_final.to_numpy(), abs=1e-5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=x, output_attentions=True).attentions[2][0].numpy()
    page.attention.layer = 2
    page.task.join(30)
    frame = page.attention._patterns[2]
    got = frame.pivot_table(index=["head", "query"], columns="key", values="weight").fillna(0).to_numpy()
    assert got == pytest.approx(ref.reshape(-1, 8), abs=1e-5)
    page.lenses.steps = 3
    page.lenses.run("tuned", wait=True)
    assert page.errors.text == "" and "stored" not in page.lenses.note.object
    page.tracing.samples, page.tracing.subject_tokens = 2, (2, 3)
    page.tracing.run("trace", wait=True)
    assert page.errors.text == "" and len(page.tracing.trace.effects) == 3 * 8
    page.tracing.steps = 2
    page.tracing.run("patching", wait=True)
    assert page.errors.text == "" and set(page.tracing.comparison.grid.method) == {"exact", "atp", "ig"}
    page.run_report(wait=True)
    assert page.errors.text == "", page.errors.text
    assert set(page.report.lenses.lens) == {"logit", "tuned"} and page.report.attention_layer == 2
