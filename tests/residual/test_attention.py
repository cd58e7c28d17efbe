"""Attention patterns and head-type scores (workbench.attention), against independent references.

- Native Transformers: the pattern computed by hand from the weights (LayerNorm, the q/k rows of the fused
  projection, the causal mask, a softmax), and the forward's logits unchanged while patterns are watched.
- Hugging Face families (gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma, phi), built with SDPA attention:
  our patterns against ``transformers``' own ``output_attentions=True`` on an eager copy; the model's attention
  implementation is restored afterwards.
- Head-type scores: 1 on heads planted in a real model's weights (previous-token, self, first-token in one block;
  a two-block induction circuit), near 0 on the others; and on constructed pattern tensors.
- Memory: a layer's pattern is freed before the next layer's arrives (weak references).
"""
from __future__ import annotations

import copy
import gc
import math
import re
import weakref

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import attention as A

transformers = pytest.importorskip("transformers")

from helpers.hf_models import FAMILIES as HF, FAMS, tokens as hf_tokens  # noqa: E402

C_BIG = 400.0   # query scale of planted heads: logits 100 apart after the 1/sqrt(D) scaling, so the softmax is one-hot


def _tiny(norm="pre", n_layers=2, seed=0):
    cfg = wb.models.TransformerConfig(vocab_size=20, context=12, d_model=32, n_heads=4, d_mlp=32, n_layers=n_layers,
                                      norm=norm, seed=seed)
    model = wb.models.build(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():           # away from the N(0, 0.02) init, so patterns are far from uniform
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _hand_pattern(model, x, layer):
    """softmax(q k^T / sqrt(D) + causal mask) from the weights, with the block input from a plain hook."""
    blk = model.blocks[layer]
    seen = {}
    h = blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    z = blk.ln1(seen["x"])
    C, H = z.shape[-1], model.config.n_heads
    D = C // H
    W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    q = (z @ W[:C].T + b[:C]).view(*z.shape[:2], H, D).permute(0, 2, 1, 3)
    k = (z @ W[C:2 * C].T + b[C:2 * C]).view(*z.shape[:2], H, D).permute(0, 2, 1, 3)
    s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(D)
    T = x.shape[1]
    mask = torch.tensor([[0.0 if j <= i else -math.inf for j in range(T)] for i in range(T)])
    return torch.softmax(s + mask, dim=-1)


# ----------------------------------------------------------------------------- native patterns


@pytest.mark.parametrize("norm", ["pre", "peri", "none"])
def test_native_patterns_match_the_hand_computation_and_leave_the_output_unchanged(norm, one_thread):
    model = _tiny(norm)
    x = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    got = {}
    with torch.no_grad():
        plain = model(x)
        with A.watch_patterns(model, lambda l, p: got.__setitem__(l, p.clone())):
            watched = model(x)
        after = model(x)
    assert sorted(got) == [0, 1]
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], _hand_pattern(model, x, layer), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(watched, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))   # SDPA vs explicit
    assert torch.equal(after, plain)                              # the fused path is back
    assert all(not b.attn._pattern_fns for b in model.blocks)
    one = A.pattern(model, x[1], 1, head=2)
    torch.testing.assert_close(torch.from_numpy(one.weights[0]), _hand_pattern(model, x[1:2], 1)[0, 2])
    assert one.tokens == [str(int(t)) for t in x[1]] and one.heads == [2]


def test_pattern_frame_is_tidy_with_tokens_and_rows_sum_to_one(one_thread):
    model = _tiny()
    cfg = model.config
    model.config = type(cfg)(**{**cfg.__dict__, "vocab": [chr(97 + i) for i in range(20)]})
    x = torch.tensor([3, 1, 4, 1, 5])
    f = A.pattern(model, x, 0).frame()
    assert list(f.columns) == ["layer", "head", "query", "key", "query_token", "key_token", "weight"]
    assert len(f) == 4 * 15 and (f["key"] <= f["query"]).all()
    assert f[(f["query"] == 2) & (f["key"] == 0)]["query_token"].iloc[0] == "e"
    np.testing.assert_allclose(f.groupby(["head", "query"])["weight"].sum(), 1.0, rtol=1e-5)
    f2 = A.pattern(model, x, 0, labels=["A", "B", "C", "D", "E"]).frame()
    assert set(f2["key_token"]) == set("ABCDE")


def test_watch_patterns_keeps_one_layer_at_a_time(one_thread):
    model = _tiny(n_layers=3)
    x = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(1))
    _one_layer_at_a_time(model, x)


def _one_layer_at_a_time(model, x):
    refs, alive_before = [], []

    def fn(layer, p):
        gc.collect()
        alive_before.append([r() is not None for r in refs])
        refs.append(weakref.ref(p))
    with torch.no_grad(), A.watch_patterns(model, fn):
        wb.hooks.adapter(model).forward(x)
    assert len(refs) == wb.hooks.adapter(model).n_layers
    assert all(not any(alive) for alive in alive_before), alive_before


# ----------------------------------------------------------------------------- Hugging Face families


_SDPA: dict = {}


def _sdpa_model(family):
    if family not in _SDPA:
        cls, kw, _, _ = HF[family]
        torch.manual_seed(0)
        _SDPA[family] = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw),
                                                                      attn_implementation="sdpa").float().eval()
    return _SDPA[family]


@pytest.mark.parametrize("family", FAMS)
def test_hf_patterns_equal_transformers_output_attentions(family, one_thread):
    model = _sdpa_model(family)
    x = hf_tokens(3)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = ref_model(input_ids=x, output_attentions=True)
        plain = model(input_ids=x).logits
    got = {}
    with torch.no_grad(), A.watch_patterns(model, lambda l, p: got.__setitem__(l, p.clone())):
        logits = model(input_ids=x).logits
    assert model.config._attn_implementation == "sdpa"           # restored
    assert sorted(got) == list(range(len(ref.attentions)))
    for layer, w in enumerate(ref.attentions):
        assert got[layer].shape == w.shape == (x.shape[0], model.config.num_attention_heads, x.shape[1], x.shape[1])
        torch.testing.assert_close(got[layer], w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)
    one = A.pattern(model, x[0], 1, head=3)
    torch.testing.assert_close(torch.from_numpy(one.weights[0]), ref.attentions[1][0, 3], rtol=1e-5, atol=1e-6)
    scores = A.head_scores(model, x)
    assert len(scores) == len(A.KINDS) * len(ref.attentions) * model.config.num_attention_heads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_patterns_stream_one_layer_at_a_time(family, one_thread):
    _one_layer_at_a_time(_sdpa_model(family), hf_tokens(4))
    assert _sdpa_model(family).config._attn_implementation == "sdpa"


def test_the_attention_implementation_is_restored_after_an_error(one_thread):
    model = _sdpa_model("llama")

    def boom(layer, p):
        raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"), torch.no_grad(), A.watch_patterns(model, boom):
        model(input_ids=hf_tokens(0))
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- planted heads


def _planted_one_block(T=16, V=16):
    """One block, no norm, three heads of width 16 reading one-hot positions (dims 0..T-1):
    head 0 attends to the previous position, head 1 to itself, head 2 to position 0."""
    cfg = wb.models.TransformerConfig(vocab_size=V, context=T, d_model=48, n_heads=3, d_mlp=16, n_layers=1,
                                      norm="none")
    model = wb.models.build(cfg).eval()
    C, D = 48, 16
    with torch.no_grad():
        model.pos_embed.weight.zero_()
        model.pos_embed.weight[:, :T] = torch.eye(T)
        model.tok_embed.weight[:, :T] = 0.0          # tokens live in the other dimensions
        W, b = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias
        W[:2 * C].zero_()
        b[:2 * C].zero_()
        for j in range(T):                           # head 0: q_t = c e_t, k_j = e_{j+1}
            W[0 * D + j, j] = C_BIG
            if j + 1 < D:
                W[C + 0 * D + j + 1, j] = 1.0
        for j in range(D):                           # head 1: q_t = c e_t, k_j = e_j
            W[1 * D + j, j] = C_BIG
            W[C + 1 * D + j, j] = 1.0
        b[2 * D] = C_BIG                             # head 2: q = c u, k_j = [j == 0] u
        W[C + 2 * D, 0] = 1.0
    return model


def _planted_induction(T=16, V=16):
    """Two blocks, no norm: block 0 head 0 copies the previous token's one-hot into dims 32..47; block 1 head 0
    matches the current token (dims 16..31) against it: an induction head. Key 0 is pushed away."""
    C, H = 64, 2
    D = C // H
    cfg = wb.models.TransformerConfig(vocab_size=V, context=T, d_model=C, n_heads=H, d_mlp=16, n_layers=2,
                                      norm="none")
    model = wb.models.build(cfg).eval()
    with torch.no_grad():
        model.pos_embed.weight.zero_()
        model.pos_embed.weight[:, :T] = torch.eye(T)
        model.tok_embed.weight.zero_()
        model.tok_embed.weight[:, 16:16 + V] = torch.eye(V)
        for blk in model.blocks:
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
            blk.mlp.proj.weight.zero_()
            blk.mlp.proj.bias.zero_()
        W = model.blocks[0].attn.qkv.weight
        for j in range(T):                           # previous-token head on positions
            W[j, j] = C_BIG
            if j + 1 < T:
                W[C + j + 1, j] = 1.0
        for i in range(V):                           # V: the token one-hot; O: into dims 32..47
            W[2 * C + i, 16 + i] = 1.0
            model.blocks[0].attn.proj.weight[32 + i, i] = 1.0
        W, b = model.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.bias
        for i in range(V):                           # q: current token, k: previous token
            W[i, 16 + i] = C_BIG
            W[C + i, 32 + i] = 1.0
        b[V] = -C_BIG                                # q . k gets -c at key 0
        W[C + V, 0] = 1.0
    return model


def _score(df, layer, head, kind):
    return float(df[(df["layer"] == layer) & (df["head"] == head) & (df["score_kind"] == kind)]["value"].iloc[0])


def test_planted_heads_score_one_on_their_kind_and_near_zero_on_the_others(one_thread):
    model = _planted_one_block()
    df = A.head_scores(model, half=8)
    assert list(df.columns) == ["layer", "head", "score_kind", "value"]
    for head, kind in ((0, "previous"), (1, "self"), (2, "first")):
        assert _score(df, 0, head, kind) == pytest.approx(1.0, abs=1e-6), kind
        for other in ("previous", "self", "first", "induction"):
            if other != kind:
                assert _score(df, 0, head, other) < 0.1, (kind, other)
    ind = _planted_induction()
    df = A.head_scores(ind, half=8)
    assert _score(df, 1, 0, "induction") == pytest.approx(1.0, abs=1e-6)
    assert _score(df, 0, 0, "previous") == pytest.approx(1.0, abs=1e-6)
    assert _score(df, 0, 0, "induction") < 0.15 and _score(df, 1, 0, "previous") < 0.15
    assert _score(df, 1, 0, "duplicate") < 0.15


def test_scores_across_stages_find_where_the_induction_head_forms(one_thread):
    stages = [("1 block", _planted_one_block()), ("2 blocks", _planted_induction())]
    df = A.head_scores_across(stages, kinds=["induction", "previous"], half=8)
    assert list(df.columns) == ["stage", "layer", "head", "score_kind", "value"]
    assert list(dict.fromkeys(df["stage"])) == ["1 block", "2 blocks"]
    ind = df[df.score_kind == "induction"]
    best = ind.loc[ind["value"].idxmax()]
    assert (best["stage"], best["layer"], best["head"]) == ("2 blocks", 1, 0)
    assert ind[ind.stage == "1 block"]["value"].max() < 0.2
    assert set(df[df.stage == "1 block"]["layer"]) == {0} and set(df[df.stage == "2 blocks"]["layer"]) == {0, 1}
    steps = A.head_scores_across([(0, _planted_one_block()), (100, _planted_one_block())], kinds=["self"],
                                 column="step", half=4)
    assert list(steps.columns)[0] == "step" and set(steps["step"]) == {0, 100}


def test_scoring_formulas_on_constructed_patterns():
    T, half = 10, 5
    x = A.repeated_tokens(30, half, batch=2, seed=3)
    assert torch.equal(x[:, :half], x[:, half:]) and all(len(set(r[:half].tolist())) == half for r in x)
    eye = torch.eye(T)
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[1:, :-1] = torch.eye(T - 1)
    first = torch.zeros(T, T)
    first[:, 0] = 1
    induction = torch.zeros(T, T)
    induction[:half, 0] = 1
    for t in range(half, T):
        induction[t, t - half + 1] = 1
    duplicate = torch.zeros(T, T)
    duplicate[:half, 0] = 1
    for t in range(half, T):
        duplicate[t, t - half] = 1
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    heads = torch.stack([prev, eye, first, induction, duplicate, uniform])[None].expand(2, -1, -1, -1)
    s = A.score_patterns(heads, A.detection_masks(x))
    # by hand: queries with a target are t = 1..9 (previous, self, first) and t = 5..9 (induction, duplicate)
    want = {            # heads: previous, self, first, induction, duplicate
        "previous": [1, 0, 1 / 9, 1 / 9, 1 / 9],        # key 0 is the previous key of query 1
        "self": [0, 1, 0, 0, 0],
        "first": [1 / 9, 0, 1, 4 / 9, 5 / 9],           # queries 1..4 parked on key 0; the duplicate of 5 is 0
        "induction": [0, 0, 0, 1, 0],
        "duplicate": [0, 0, 1 / 5, 0, 1],               # query 5 repeats token 0
    }
    for kind, row in want.items():
        np.testing.assert_allclose(s[kind][:5].numpy(), row, atol=1e-6, err_msg=kind)
    # the uniform head: its mass on a single target key, 1/(t+1), averaged over the queries
    assert s["previous"][5].item() == pytest.approx(np.mean([1 / (t + 1) for t in range(1, T)]))
    assert s["induction"][5].item() == pytest.approx(np.mean([1 / (t + 1) for t in range(half, T)]))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument(one_thread):
    tf = _tiny()
    mlp = wb.models.build(wb.models.MLPConfig(d_in=4, n_classes=3, d_model=8, n_layers=1))
    with pytest.raises(ValueError, match="model: .*ResidualMLP has no attention"):
        A.head_scores(mlp, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="model: .*no attention"):
        with A.watch_patterns(mlp, lambda l, p: None):
            pass
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 1\], got 2"):
        A.pattern(tf, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 3\], got 4"):
        A.pattern(tf, torch.tensor([1, 2, 3]), 0, head=4)
    with pytest.raises(ValueError, match=r"layers\[\] must be an integer in \[0, 1\]"):
        A.head_scores(tf, layers=[5])
    with pytest.raises(ValueError, match="tokens must have at most the model's context of 12 positions, got 13"):
        A.head_scores(tf, torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must have at most the model's context of 64"):
        A.pattern(_sdpa_model("gpt2"), torch.ones(65, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="kinds"):
        A.head_scores(tf, kinds=["previous", "nonsense"])
    with pytest.raises(ValueError, match="models: every model must share one vocabulary"):
        A.head_scores_across([("a", tf), ("b", _planted_one_block())])
    with pytest.raises(ValueError, match="labels must be a list of 3"):
        A.pattern(tf, torch.tensor([1, 2, 3]), 0, labels=["a"])
    assert all(not b.attn._pattern_fns for b in tf.blocks)


# ----------------------------------------------------------------------------- figures


def test_figures_draw_the_frames_without_a_cdn():
    from workbench.figures import attention as F

    model = _planted_one_block()
    frame = A.pattern(model, A.repeated_tokens(16, 4, 1)[0], 0).frame()
    fig = F.pattern_figure(frame)
    assert len(fig.data) == 3 and [t.visible for t in fig.data] == [True, False, False]
    assert fig.layout.updatemenus and len(fig.layout.updatemenus[0].buttons) == 3
    z = np.array(fig.data[0].z, dtype=float)
    assert z[3, 2] == pytest.approx(1.0) and np.isnan(z[2, 3])          # query 3 -> key 2; no future keys
    assert list(fig.data[0].x)[:2] == list(fig.data[0].y)[:2]
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    assert "Plotly.newPlot" in html and not re.search(r"<script[^>]*\ssrc=", html)    # plotly.js inline, nothing fetched
    scores = A.head_scores(model, half=8)
    m = F.score_map(scores, "previous")
    assert np.array(m.data[0].z).shape == (1, 3)
    assert len(F.score_map(scores).data) == len(A.KINDS)
    across = A.head_scores_across([("1 block", model), ("2 blocks", _planted_induction())], half=8)
    fig = F.scores_across(across, "induction")
    assert {t.name for t in fig.data} == {"layer 0", "layer 1"}
    assert F.pattern_figure(pd.DataFrame()).layout.annotations
