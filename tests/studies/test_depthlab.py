"""The depth lab (workbench.depthlab, workbench.earlyexit) and LayerNorm Scaling, against hand computations.

References never go through ``BlockRunner``: hooks on the model's own modules (``hooks.record`` for ours,
forward hooks on the decoder layers for Hugging Face models), hand-run block loops, transformers' own
forward on a copy whose ``ModuleList`` holds the blocks in the order under test, brute force over every
chain, explicit Jacobians, constructed skip heat-maps with a known answer, and plain greedy decoding.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import workbench as wb
from workbench import depthlab as D
from workbench import earlyexit as E
from workbench import growth, hooks
from workbench.figures import depthlab as figs
from workbench.core.models import MLPConfig, TransformerConfig, build
from helpers.perturb import perturb_

IGNORE = -100


@pytest.fixture(scope="module")
def khop():
    return wb.data.load("khop", hops=2, nodes=5, queries=2, layout="table", n_train=200, n_val=40)


def _tf(ds, n_layers=3, norm="pre", seed=0):
    cfg = TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, d_model=16, n_heads=2, d_mlp=24,
                            n_layers=n_layers, norm=norm, seed=seed)
    return perturb_(build(cfg)).eval()


def _mlp(n_layers=3, norm="pre", seed=0):
    return perturb_(build(MLPConfig(d_in=10, n_classes=5, d_model=16, d_hidden=24, n_layers=n_layers, norm=norm,
                                    seed=seed))).eval()


def _hand(model, x, order):
    """Logits of the native model run along ``order`` by hand (parallel steps: mean of the block outputs)."""
    with torch.no_grad():
        h = model.embed(x)
        for it in order:
            h = torch.stack([model.blocks[i](h) for i in it]).mean(0) if isinstance(it, tuple) else model.blocks[it](h)
        return model.unembed(h)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ============================================================================ LayerNorm Scaling ("lns")


def test_lns_blocks_scale_the_normalised_input_by_one_over_sqrt_l(khop):
    model = _tf(khop, 3, "lns")
    x = torch.randn(2, khop.seq_len, 16)
    for l, blk in enumerate(model.blocks):
        s = 1 / math.sqrt(l + 1)
        assert float(blk.ln1.depth_scale) == pytest.approx(s) and float(blk.ln2.depth_scale) == pytest.approx(s)
        with torch.no_grad():
            ln = lambda t, m: F.layer_norm(t, (16,), m.weight, m.bias, m.eps)   # noqa: E731
            mid = x + blk.attn(ln(x, blk.ln1) * s)
            want = mid + blk.mlp(ln(mid, blk.ln2) * s)
            _close(blk(x), want)
    mlp = _mlp(3, "lns")
    v = torch.randn(4, 16)
    blk = mlp.blocks[2]
    with torch.no_grad():
        n = F.layer_norm(v, (16,), blk.pre_norm.weight, blk.pre_norm.bias) / math.sqrt(3)
        _close(blk(v), v + blk.proj(blk.act(blk.fc(n))))


@pytest.mark.parametrize("family", ["mlp", "transformer"])
@pytest.mark.parametrize("position", ["top", "bottom", 1])
def test_lns_growth_stays_function_preserving_and_places_the_new_scale(khop, family, position):
    model = _mlp(3, "lns") if family == "mlp" else _tf(khop, 3, "lns")
    x = torch.randn(5, 10) if family == "mlp" else khop.x_val[:5]
    with torch.no_grad():
        before = model(x)
    old = [float(b.pre_norm.depth_scale if family == "mlp" else b.ln1.depth_scale) for b in model.blocks]
    growth.add_layer(model, "zero", position=position)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    now = [float(b.pre_norm.depth_scale if family == "mlp" else b.ln1.depth_scale) for b in model.blocks]
    pos = {"top": 3, "bottom": 0}.get(position, position)
    assert now[pos] == pytest.approx(1 / math.sqrt(pos + 1))               # placed where it was inserted
    assert now[:pos] + now[pos + 1:] == old                                 # the others keep theirs
    assert model.config.n_layers == 4 and model.config.norm == "lns"


def test_lns_costs_what_pre_ln_costs_and_refuses_gpt2_export(khop):
    from workbench import flops, interop

    pre, lns = _tf(khop, 3, "pre"), _tf(khop, 3, "lns")
    assert wb.models.count_params(lns) == lns.config.param_count() == pre.config.param_count()
    assert flops.step_flops(lns, 4) == flops.step_flops(pre, 4)
    with pytest.raises(ValueError, match="LayerNorm Scaling"):
        interop.to_gpt2(lns)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_lns_permutation_symmetry_keeps_the_function(khop, family):
    """The scaled norms permute like LayerNorms (their depth scale is a scalar): a random permutation of every
    symmetry leaves the function of an lns model unchanged, and the REPAIR sites are each block's first layer."""
    from workbench import permute

    model = _mlp(3, "lns") if family == "mlp" else _tf(khop, 3, "lns")
    x = torch.randn(5, 10) if family == "mlp" else khop.x_val[:5]
    moved = permute.permute(model, permute.random_permutation(model, seed=2))
    with torch.no_grad():
        _close(moved(x), model(x), 1e-4)
    assert model.repair_sites() == [b.mlp_in for b in model.blocks]


def test_lns_grown_and_pruned_model_round_trips_through_the_store(khop, store):
    model = _tf(khop, 3, "lns")
    growth.add_layer(model, "random", position="bottom", seed=5)
    pruned = D.prune(model, [2])
    run = wb.Run(model=pruned, train_config=wb.TrainConfig(), dataset=khop.spec(),
                 metrics=pd.DataFrame(columns=["step", "split", "metric", "value"]))
    back = store.load(store.save(run)).model
    x = khop.x_val[:6]
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    assert back.config.n_layers == 3
    assert [float(b.ln1.depth_scale) for b in back.blocks] == [float(b.ln1.depth_scale) for b in pruned.blocks]


# ============================================================================ 1. rankings


def _stream_by_hooks(model, x):
    """[h_0 .. h_L] (B, T, C) from hooks.record (resid_pre of every block and the last resid_post)."""
    L = len(model.blocks)
    with torch.no_grad(), hooks.record(model, names=["blocks.*.resid_pre", f"blocks.{L - 1}.resid_post"]) as c:
        model(x)
    hs = [c[f"blocks.{l}.resid_pre"] for l in range(L)] + [c[f"blocks.{L - 1}.resid_post"]]
    return [h if h.dim() == 3 else h[:, None] for h in hs]


def test_layer_similarity_matches_a_hand_computation(khop):
    model = _tf(khop, 4)
    x, y = khop.x_val[:12], khop.y_val[:12]
    mask = y != IGNORE
    hs = _stream_by_hooks(model, x)
    sim = D.layer_similarity(model, x, mask=mask)
    last = torch.tensor([int(r.nonzero().max()) for r in mask])
    for l in range(4):
        cos = F.cosine_similarity(hs[l], hs[l + 1], dim=-1)
        assert sim.influence.loc[l, "block_influence"] == pytest.approx(float((1 - cos)[mask].mean()), abs=1e-5)
    for r in sim.angular.itertuples():
        a, b = hs[r.start][torch.arange(12), last], hs[r.start + r.n][torch.arange(12), last]
        want = torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)).mean() / math.pi
        assert r.distance == pytest.approx(float(want), abs=1e-5)
    assert len(sim.angular) == 4 * 5 // 2
    every = D.layer_similarity(model, x, positions="all")
    cos = F.cosine_similarity(hs[0], hs[2], dim=-1)
    want = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
    assert every.angular.query("start == 0 and n == 2")["distance"].item() == pytest.approx(want, abs=1e-5)
    # a residual MLP: one "token" per example
    mlp = _mlp(3)
    v = torch.randn(9, 10)
    hs = _stream_by_hooks(mlp, v)
    got = D.layer_similarity(mlp, v).influence["block_influence"]
    want = [float(1 - F.cosine_similarity(hs[l], hs[l + 1], dim=-1).mean()) for l in range(3)]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rankings_order_scores_and_spearman(khop):
    model = _tf(khop, 4)
    x, y = khop.x_val[:12], khop.y_val[:12]
    r = D.rankings(model, x, y=y, mask=y != IGNORE)
    eff = wb.residual.skip_effects(model, x, y=y, mask=y != IGNORE)
    assert r.table[r.table["method"] == "skip"]["score"].tolist() == pytest.approx(eff.output["l2"].tolist())
    assert r.depth_score == pytest.approx(wb.residual.depth_score(eff))
    for method in ("block_influence", "angular", "skip"):
        sel = r.table[r.table["method"] == method]
        assert r.order(method) == sel.sort_values(["score", "layer"])["layer"].tolist()
        assert sorted(sel["rank"]) == [0, 1, 2, 3]
    scores = {m: r.table[r.table["method"] == m]["score"].to_numpy() for m in ("block_influence", "skip")}
    ranks = {m: np.argsort(np.argsort(s)) for m, s in scores.items()}   # no ties in random weights
    want = np.corrcoef(ranks["block_influence"], ranks["skip"])[0, 1]
    got = r.correlation.query("method_a == 'block_influence' and method_b == 'skip'")["spearman"].item()
    assert got == pytest.approx(want)
    fast = D.rankings(model, x, skip=False)
    assert set(fast.table["method"]) == {"block_influence", "angular"} and math.isnan(fast.depth_score)


# ============================================================================ 2. prune and heal


def test_prune_equals_skipping_and_leaves_the_model_alone(khop):
    model = _tf(khop, 4)
    x = khop.x_val[:6]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = D.prune(model, [3, 1])
    ad = hooks.adapter(model)
    with torch.no_grad(), ad.skip(1), ad.skip(3):
        skipped = model(x)
    with torch.no_grad():
        _close(pruned(x), skipped)
    _close(pruned(x).detach(), _hand(model, x, [0, 2]))
    assert pruned.config.n_layers == 2 and len(model.blocks) == 4 and model.config.n_layers == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    mlp = _mlp(3)
    v = torch.randn(5, 10)
    with torch.no_grad(), hooks.adapter(mlp).skip(0):
        _close(D.prune(mlp, [0])(v), mlp(v))


def test_prune_refusals_name_the_argument_and_change_nothing(khop):
    model = _tf(khop, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers: pruning every block"):
        D.prune(model, [0, 1, 2])
    with pytest.raises(ValueError, match=r"layers\[1\]"):
        D.prune(model, [0, 3])
    with pytest.raises(ValueError, match="layers must list each block once"):
        D.prune(model, [1, 1])
    with pytest.raises(ValueError, match="model: removing blocks needs a workbench model"):
        D.prune(nn.Linear(3, 3), [0])
    assert len(model.blocks) == 3 and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_pruned_run_is_an_ordinary_run(khop, store):
    model = _tf(khop, 3)
    src = wb.Run(model=model, train_config=wb.TrainConfig(steps=3), dataset=khop.spec(),
                 metrics=pd.DataFrame(columns=["step", "split", "metric", "value"]), name="src")
    src_id = store.save(src)
    run = D.prune_run(store.load(src_id), [1], heal=wb.TrainConfig(steps=4, batch_size=8, eval_every=4, eval_max=16))
    assert run.meta["removed"] == [1] and run.meta["kept"] == [0, 2] and run.meta["parent"] == src_id
    assert run.meta["healed_steps"] == 4 and (run.metrics["step"] == 0).any()
    back = store.load(store.save(run))
    x = khop.x_val[:5]
    with torch.no_grad():
        assert torch.equal(back.model(x), run.model(x))
    assert back.model.config.n_layers == 2 and back.meta["removed"] == [1]
    assert len(wb.residual.contributions(back.model, x)) == 2 * 3        # other analyses read it
    unhealed = D.prune_run(model, [0], dataset=khop)
    assert set(unhealed.metrics["step"]) == {0} and unhealed.meta["healed_steps"] == 0
    with pytest.raises(ValueError, match="dataset is required"):
        D.prune_run(model, [0])


def test_prune_heal_curve_removes_what_each_ranking_says(khop):
    model = _tf(khop, 3)
    heal = wb.TrainConfig(steps=2, batch_size=8, eval_every=2, eval_max=16)
    df = D.prune_heal_curve(model, khop, methods=("block_influence", "angular", "random"), heal=heal,
                            rank_examples=16, eval_max=16)
    assert len(df) == 3 * 3 * 2 and set(df["healed"]) == {False, True}
    xr, yr = khop.x_val[:16], khop.y_val[:16]
    r = D.rankings(model, xr, y=yr, mask=yr != IGNORE, skip=False)
    sim = D.layer_similarity(model, xr, mask=yr != IGNORE)
    for k in (1, 2):
        row = df[(df["method"] == "block_influence") & (df["n_removed"] == k) & ~df["healed"]]
        assert row["removed"].item() == ",".join(map(str, sorted(r.order("block_influence")[:k])))
        s = sim.best_span(k)
        assert df[(df["method"] == "angular") & (df["n_removed"] == k)]["removed"].iloc[0] == \
            ",".join(map(str, range(s, s + k)))
    first = df[(df["n_removed"] == 0) & ~df["healed"]]
    ev = wb.evaluate(model, khop, "val", 16)
    assert first["acc"].tolist() == pytest.approx([ev["acc"]] * 3)
    with pytest.raises(ValueError, match=r"fractions\[0\]"):
        D.prune_heal_curve(model, khop, fractions=[1.0])


# ============================================================================ 3. strategies


def test_strategy_sequences():
    assert D.strategy_sequence(5, "skip", 1, 2) == [0, 3, 4]
    assert D.strategy_sequence(5, "swap", 2, 2) == [0, 1, 3, 2, 4]
    assert D.strategy_sequence(5, "reverse", 1, 3) == [0, 3, 2, 1, 4]
    assert D.strategy_sequence(5, "loop", 1, 2, k=3) == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    assert D.strategy_sequence(5, "parallel", 1, 3, k=2) == [0, (1, 2, 3), (1, 2, 3), 4]
    shuffled = D.strategy_sequence(6, "shuffle", 1, 4, seed=3)
    assert shuffled[0] == 0 and shuffled[5] == 5 and sorted(shuffled[1:5]) == [1, 2, 3, 4]
    assert shuffled == D.strategy_sequence(6, "shuffle", 1, 4, seed=3)
    assert all(D.strategy_sequence(3, "shuffle", 0, 2, seed=s) == [1, 0, 2] for s in range(8))   # never the own order
    assert D.sequence_label([0, (1, 2), 3]) == "0 (1|2) 3"


@pytest.mark.parametrize("bad,match", [
    (dict(strategy="loop", start=1, n=2, k=0), "k must be"),
    (dict(strategy="loop", start=1, n=2, k=17), "k must be"),
    (dict(strategy="reverse", start=2, n=3), "n: the span of 3 blocks from block 2 runs past the last block 3"),
    (dict(strategy="skip", start=4, n=1), "start must be"),
    (dict(strategy="swap", start=0, n=3), "n: swap exchanges two adjacent blocks"),
    (dict(strategy="parallel", start=0, n=1), "n: parallel needs a span of at least 2"),
    (dict(strategy="twist", start=0, n=2), "strategy must be"),
])
def test_strategy_refusals_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        D.strategy_sequence(4, **bad)


def test_each_strategy_equals_its_hand_run_sequence_and_costs_one_forward(khop):
    model = _tf(khop, 4)
    x, y = khop.x_val[:10], khop.y_val[:10]
    for strategy, start, n, k in (("skip", 1, 2, 1), ("swap", 1, 2, 1), ("reverse", 0, 4, 1), ("shuffle", 1, 3, 1),
                                  ("parallel", 1, 2, 1), ("parallel", 1, 3, 2), ("loop", 2, 2, 3)):
        seq = D.strategy_sequence(4, strategy, start, n, k=k, seed=1)
        _close(D.run_sequence(model, x, seq), _hand(model, x, seq))
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o: calls.append(1)) for b in model.blocks]
    try:
        df = D.strategies(model, x, y, strategies=("skip", "reverse", "loop", "parallel"), spans=[(1, 2)], k=2)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == int(df["length"].sum())                      # one forward each, nothing more
    assert df["strategy"].tolist() == ["full", "skip", "reverse", "loop", "parallel"]
    for row in df.itertuples():
        seq = [0, 1, 2, 3] if row.strategy == "full" else D.strategy_sequence(4, row.strategy, row.start, row.n, k=row.k)
        logits = _hand(model, x, seq)
        scored = y != IGNORE
        assert row.acc == pytest.approx(float((logits.argmax(-1) == y)[scored].float().mean()))
        assert row.loss == pytest.approx(float(F.cross_entropy(logits[scored], y[scored])), rel=1e-5)
    full = D.strategies(model, x, y, strategies=("swap",))
    assert full["start"].tolist() == [0, 0, 1, 2]


def test_strategies_refuse_models_without_a_residual_stack_and_change_nothing(khop):
    model = _tf(khop, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = khop.x_val[:4]
    with pytest.raises(ValueError, match="model: Linear has no residual stack"):
        D.run_sequence(nn.Linear(4, 4), torch.randn(2, 4), [0])
    with pytest.raises(ValueError, match="model: Linear has no residual stack"):
        D.strategies(nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="k must be"):
        D.strategies(model, x, k=0)
    with pytest.raises(ValueError, match="n: the span"):
        D.strategies(model, x, strategies=("loop",), spans=[(2, 2)])
    with pytest.raises(ValueError, match=r"sequence\[1\]"):
        D.run_sequence(model, x, [0, 3])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not model.training


class _StopAfter:
    def __init__(self, n):
        self.n, self.reports = n, 0

    @property
    def stopped(self):
        return self.reports >= self.n

    def report(self, progress=None, message="", payload=None, **kw):
        self.reports += 1


def test_strategies_stop_with_what_is_done(khop):
    model = _tf(khop, 3)
    df = D.strategies(model, khop.x_val[:4], monitor=_StopAfter(2))
    assert len(df) == 2


# ============================================================================ Hugging Face families


HF_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=64)
HF = {
    "gpt2": ("GPT2Config", dict(vocab_size=64, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=0,
                                eos_token_id=0), lambda m: (m.transformer, "h")),
    "neox": ("GPTNeoXConfig", dict(HF_COMMON, use_parallel_residual=True), lambda m: (m.gpt_neox, "layers")),
    "llama": ("LlamaConfig", dict(HF_COMMON, num_key_value_heads=2), lambda m: (m.model, "layers")),
    "mistral": ("MistralConfig", dict(HF_COMMON, num_key_value_heads=2), lambda m: (m.model, "layers")),
    "qwen2": ("Qwen2Config", dict(HF_COMMON, num_key_value_heads=2), lambda m: (m.model, "layers")),
    "qwen3": ("Qwen3Config", dict(HF_COMMON, num_key_value_heads=2, head_dim=8), lambda m: (m.model, "layers")),
    "gemma": ("GemmaConfig", dict(HF_COMMON, num_key_value_heads=1, head_dim=8), lambda m: (m.model, "layers")),
    "phi": ("PhiConfig", dict(HF_COMMON), lambda m: (m.model, "layers")),
}
_HF_CACHE: dict = {}


def _hf(family):
    transformers = pytest.importorskip("transformers")
    if family not in _HF_CACHE:
        cls, kw, _ = HF[family]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw)).float().eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        _HF_CACHE[family] = model
    return _HF_CACHE[family]


def _hf_reordered(family, model, order):
    """A copy of the transformers model whose layer list holds ``order`` (the reference of a block order)."""
    twin = copy.deepcopy(model)
    parent, attr = HF[family][2](twin)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in order]))
    cfg = twin.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(order))
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in order]
    return twin


def _hf_stream(family, model, x):
    """[h_0 .. h_L] from forward hooks on the model's own decoder layers."""
    parent, attr = HF[family][2](model)
    layers = getattr(parent, attr)
    ins, out = {}, []
    hs = [l.register_forward_pre_hook(lambda m, a, k, i=i: ins.__setitem__(i, a[0] if a else k["hidden_states"]),
                                      with_kwargs=True) for i, l in enumerate(layers)]
    hs.append(layers[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return [ins[i] for i in range(len(layers))] + [out[-1]]


def test_hf_pass_throughs_are_removed_after_an_error():
    model = _hf("llama")
    x = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=x).logits

    def boom(module, args, kwargs):
        raise RuntimeError("boom")
    h = model.model.layers[1].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            D.run_sequence(model, x, [0, 1, 2])
    finally:
        h.remove()
    assert all("forward" not in blk.__dict__ for blk in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


@pytest.mark.parametrize("family", list(HF))
def test_hf_families_run_any_block_order_and_read_the_stream(family):
    model = _hf(family)
    x = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    for order in ([0, 1, 2], [0, 2], [2, 1, 0], [0, 1, 1, 2]):
        with torch.no_grad():
            want = _hf_reordered(family, model, order)(input_ids=x, use_cache=False).logits
        _close(D.run_sequence(model, x, order), want, 1e-4)
    parent, attr = HF[family][2](model)
    assert all("forward" not in blk.__dict__ for blk in getattr(parent, attr))     # pass-throughs removed
    hs = _hf_stream(family, model, x)
    sim = D.layer_similarity(model, x, positions="all")
    for l in range(3):
        cos = F.cosine_similarity(hs[l].float(), hs[l + 1].float(), dim=-1)
        assert sim.influence.loc[l, "block_influence"] == pytest.approx(float((1 - cos).mean()), abs=1e-5)
    prof = D.depth_profile(model, x, n_directions=1, skip=False)
    assert set(prof["metric"]) == {"resid_norm", "norm_growth", "cos_in_out", "rel_norm", "jac_dev"}


def test_hf_oracle_exit_curve_and_speculation_read_the_model():
    model = _hf("llama")
    x = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    o = D.oracle_depth(model, x)
    for row in o.examples.itertuples():
        if row.chain:
            chain = [int(c) for c in row.chain.split()]
            logits = D.run_sequence(model, x[row.example:row.example + 1], chain)
            y = wb.residual.next_token_targets(x[row.example:row.example + 1])
            assert bool((logits.argmax(-1)[y != IGNORE] == y[y != IGNORE]).all())
    curve = E.exit_curve(model, x)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    y = wb.residual.next_token_targets(x)
    assert curve.iloc[-1]["acc"] == pytest.approx(float((logits.argmax(-1) == y)[y != IGNORE].float().mean()))
    res = E.speculate(model, x[0], exit_layer=1, n_new=6, n_draft=3)
    seq = x[:1]
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert res.tokens == seq[0, 6:].tolist()


# ============================================================================ 4. oracle depth


def test_exhaustive_oracle_equals_brute_force_and_greedy_is_an_upper_bound(khop):
    model = _tf(khop, 3)
    x, y = khop.x_val[:16], khop.y_val[:16]
    o = D.oracle_depth(model, x, y)
    assert o.method == "exhaustive" and o.n_layers == 3
    scored = y != IGNORE
    for i in range(16):
        best = None
        for ms in itertools.product((0, 1, 2), repeat=3):
            chain = [l for l in range(3) for _ in range(ms[l])]
            pred = _hand(model, x[i:i + 1], chain).argmax(-1)[0]
            if bool((pred[scored[i]] == y[i][scored[i]]).all()) and (best is None or len(chain) < best):
                best = len(chain)
        got = o.examples.loc[i, "oracle_length"]
        assert (best is None and math.isnan(got)) or got == best
    full = _hand(model, x, [0, 1, 2]).argmax(-1)
    assert o.examples["full_correct"].tolist() == [bool((full[i][scored[i]] == y[i][scored[i]]).all())
                                                   for i in range(16)]
    g = D.oracle_depth(model, x, y, exhaustive_max=0)
    assert g.method == "greedy"
    both = o.examples.merge(g.examples, on="example", suffixes=("", "_greedy"))
    ok = both["oracle_length_greedy"].notna()
    assert (both["oracle_length_greedy"][ok] >= both["oracle_length"][ok]).all()
    for row in g.examples[g.examples["chain"] != ""].itertuples():
        pred = _hand(model, x[row.example:row.example + 1], [int(c) for c in row.chain.split()]).argmax(-1)[0]
        assert bool((pred[scored[row.example]] == y[row.example][scored[row.example]]).all())
    skip_only = D.oracle_depth(model, x, y, repeat=False)
    assert skip_only.n_chains <= 8
    assert ((skip_only.examples["oracle_length"] >= o.examples["oracle_length"]) |
            skip_only.examples["oracle_length"].isna()).all()


def test_width_for_params_picks_the_closest_budget(khop):
    for L in (1, 3):
        cfg = D.width_for_params(khop, L, 5000)
        assert cfg.n_layers == L and cfg.d_mlp == 2 * cfg.d_model and cfg.d_model % 2 == 0
        for d in (cfg.d_model - 2, cfg.d_model + 2):
            other = wb.models.config_for(khop, n_layers=L, d_model=d, n_heads=2, d_mlp=2 * d)
            assert abs(other.param_count() - 5000) >= abs(cfg.param_count() - 5000)
    assert D.width_for_params(wb.data.load("digits"), 2, 3000, mlp_ratio=1).d_hidden > 0


def test_oracle_histogram_and_summary_by_hops():
    ds, hops = D.hop_tagged_khop(hops=(1, 2), nodes=4, n_train=20, n_val=12, seed=3)
    assert ds.vocab[-2:] == ["#1", "#2"] and hops.tolist() == [1, 2] * 6
    assert ds.x_val[:, 0].tolist() == [ds.vocab_size - 2, ds.vocab_size - 1] * 6
    plain = wb.data.load("khop", hops=2, nodes=4, queries=1, layout="table", n_train=10, n_val=10, seed=3 + 1000)
    assert torch.equal(ds.x_val[1, 1:], plain.x_val[0]) and torch.equal(ds.y_val[1, 1:], plain.y_val[0])
    model = build(wb.models.config_for(ds, d_model=16, n_heads=2, d_mlp=16, n_layers=2))
    o = D.oracle_depth(model, ds.x_val, ds.y_val, hops=hops)
    hist = o.histogram()
    assert set(hist["hops"]) == {1, 2}
    assert hist.groupby("hops")["count"].sum().tolist() == [6, 6]
    assert hist.groupby("hops")["share"].sum().tolist() == pytest.approx([1.0, 1.0])
    summ = o.summary()
    assert summ["n"].tolist() == [6, 6]


# ============================================================================ 5. curse of depth


def test_depth_profile_against_hooks_and_an_explicit_jacobian(khop):
    model = _tf(khop, 3)
    x = khop.x_val[:3]
    prof = D.depth_profile(model, x, n_directions=3, seed=7)
    get = lambda m, l: prof.query("metric == @m and layer == @l")["value"].item()   # noqa: E731
    hs = _stream_by_hooks(model, x)
    for l in range(3):
        assert get("resid_norm", l) == pytest.approx(float(hs[l].norm(dim=-1).mean()), rel=1e-5)
        cos = F.cosine_similarity(hs[l], hs[l + 1], dim=-1)
        assert get("cos_in_out", l) == pytest.approx(float(cos.mean()), abs=1e-5)
    contrib = wb.residual.contributions(model, x).query("sublayer == 'layer'")
    assert [get("rel_norm", l) for l in range(3)] == pytest.approx(contrib["rel_norm"].tolist())
    eff = wb.residual.skip_effects(model, x)
    assert [get("skip_l2", l) for l in range(3)] == pytest.approx(eff.output["l2"].tolist())
    # ||(J - I) v|| with J the explicit Jacobian of each example's block map and the same seeded directions
    g = torch.Generator().manual_seed(7)
    B, T, C = hs[0].shape
    for l in range(3):
        total = 0.0
        vs = []
        for _ in range(3):
            v = torch.randn(B, T, C, generator=g)
            vs.append(v / v.reshape(B, -1).norm(dim=1).view(B, 1, 1))
        for b in range(B):
            J = torch.autograd.functional.jacobian(lambda t: model.blocks[l](t[None])[0], hs[l][b]).reshape(T * C, T * C)
            for v in vs:
                total += float(((J - torch.eye(T * C)) @ v[b].reshape(-1)).pow(2).sum())
        assert get("jac_dev", l) == pytest.approx(math.sqrt(total / (3 * B)), rel=1e-4)


def test_a_block_near_the_identity_has_no_jacobian_deviation_and_deep_half_shares(khop):
    model = _tf(khop, 4)
    model.blocks[3].zero_output_()
    prof = D.depth_profile(model, khop.x_val[:4], n_directions=2)
    assert prof.query("metric == 'jac_dev' and layer == 3")["value"].item() == pytest.approx(0.0, abs=1e-6)
    assert prof.query("metric == 'skip_l2' and layer == 3")["value"].item() == pytest.approx(0.0, abs=1e-6)
    half = D.deep_half(prof).set_index("metric")
    sel = prof[prof["metric"] == "rel_norm"]
    assert half.loc["rel_norm", "deep_share"] == pytest.approx(sel["value"].iloc[2:].sum() / sel["value"].sum())
    assert half.loc["rel_norm", "shallow"] == pytest.approx(sel["value"].iloc[:2].mean())


# ============================================================================ 7. effective depth


def _effects(future: list[float]):
    L = len(future)
    heat = pd.DataFrame([(s, l, future[s] if l == s + 1 else future[s] / 2) for s in range(L) for l in range(s + 1, L)],
                        columns=["skipped", "affected", "effect"])
    return wb.residual.SkipEffects(heat, pd.DataFrame(), L)


def test_effective_depth_on_constructed_heatmaps():
    r = D.effective_depth(None, effects=_effects([0.9, 0.8, 0.1, 0.0]))
    assert (r["effective_depth"], r["ratio"], r["peak_layer"]) == (2.0, 0.5, 0)
    assert D.effective_depth(None, effects=_effects([0.2, 0.9, 0.6, 0.5, 0.0]))["effective_depth"] == 4.0
    assert D.effective_depth(None, effects=_effects([0.2, 0.9, 0.6, 0.5, 0.0]), threshold=0.7)["effective_depth"] == 2.0
    assert math.isnan(D.effective_depth(None, effects=_effects([0.0]))["ratio"])
    with pytest.raises(ValueError, match="threshold"):
        D.effective_depth(None, effects=_effects([0.5, 0.0]), threshold=1.0)


def test_effective_depth_across_growth_stages(khop, store):
    model = _tf(khop, 1)
    growth.grow(model, khop, [growth.Stage("train", 3), growth.Stage("add_layer", 3, init="zero")],
                wb.TrainConfig(steps=3, batch_size=8, eval_every=3, eval_max=16), store=store, group="g1")
    runs = D.group_runs(store, "g1")
    x = khop.x_val[:8]
    df = D.effective_depth_stages(runs, x)
    assert df["stage"].tolist() == [0, 1] and df["n_layers"].tolist() == [1, 2]
    assert math.isnan(df["ratio"].iloc[0])
    want = D.effective_depth(runs[1].model, x)
    assert df["effective_depth"].iloc[1] == want["effective_depth"]
    with pytest.raises(ValueError, match="group: no stored run"):
        D.group_runs(store, "nope")


def test_effective_depth_is_a_sweep_metric():
    from workbench import sweeps

    out = sweeps.train_task("khop", steps=3, n_layers=2, d_model=16, n_heads=2, d_mlp=16, effective_depth=True,
                            data_options=dict(hops=1, nodes=4, layout="table", n_train=40, n_val=20))
    rows = {r["metric"]: r["value"] for r in out["rows"]}
    assert {"effective_depth", "effective_depth_ratio"} <= set(rows)
    assert math.isnan(rows["effective_depth_ratio"]) or 0 < rows["effective_depth_ratio"] <= 1


# ============================================================================ 6. early exit


def test_dropout_rates_rise_from_zero_to_p_max():
    rates = E.dropout_rates(5, 0.2)
    assert rates == pytest.approx([0.2 * (2 ** (l / 4) - 1) for l in range(5)])
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and E.dropout_rates(1, 0.5) == [0.0]


def test_layerskip_loss_by_hand(khop):
    model = _tf(khop, 3).train()
    x, y = khop.x_val[:8], khop.y_val[:8]
    loss = E.LayerSkipLoss(p_max=0.0, exit_scale=0.5)
    for want_exit in (1, 2, 1):
        assert loss.exit_layer(3) == want_exit
        got = loss(model, x, y)
        with torch.no_grad():
            h = model.embed(x)
            hs = [h]
            for b in model.blocks:
                hs.append(b(hs[-1]))
            ce = lambda h: F.cross_entropy(model.unembed(h)[y != IGNORE], y[y != IGNORE])   # noqa: E731
            want = float((0.5 * ce(hs[want_exit]) + ce(hs[3])) / 1.5)
        assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    # layer dropout: the same seeded draws, per example and block, by hand
    drop = E.LayerSkipLoss(p_max=0.9, exit_scale=0.0, seed=4)
    got = drop(model, x, y)
    g = torch.Generator().manual_seed(4)
    rates = E.dropout_rates(3, 0.9)
    with torch.no_grad():
        h = model.embed(x)
        for l, b in enumerate(model.blocks):
            out = b(h)
            keep = ~(torch.rand(8, generator=g) < rates[l])
            h = torch.where(keep.view(-1, 1, 1), out, h)
        want = float(F.cross_entropy(model.unembed(h)[y != IGNORE], y[y != IGNORE]))
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    run = E.train_layerskip(_tf(khop, 2), khop, wb.TrainConfig(steps=3, batch_size=8, eval_every=3, eval_max=8))
    assert run.meta["layerskip"]["p_max"] == 0.1 and run.status == "completed"


def test_exit_curve_reads_the_shared_head(khop):
    model = _tf(khop, 3)
    x, y = khop.x_val[:10], khop.y_val[:10]
    curve = E.exit_curve(model, x, y)
    hs = _stream_by_hooks(model, x)
    scored = y != IGNORE
    for e in range(4):
        with torch.no_grad():
            logits = model.unembed(hs[e])
        assert curve.loc[e, "acc"] == pytest.approx(float((logits.argmax(-1) == y)[scored].float().mean()))
        assert curve.loc[e, "loss"] == pytest.approx(float(F.cross_entropy(logits[scored], y[scored])), rel=1e-5)


def test_self_speculation_equals_greedy_decoding():
    ds = wb.data.load("text", context=16, corpus_chars=2000)
    model = perturb_(build(wb.models.config_for(ds, d_model=16, n_heads=2, d_mlp=16, n_layers=3))).eval()
    prompt = ds.x_val[0, :5]
    seq = prompt[None]
    for _ in range(9):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    for exit_layer in (1, 2, 3):
        res = E.speculate(model, prompt, exit_layer, n_new=9, n_draft=3)
        assert res.tokens == seq[0, 5:].tolist()
        assert res.drafted >= res.accepted >= 0
    assert E.speculate(model, prompt, 3, n_new=9, n_draft=3).acceptance == 1.0
    curve = E.acceptance_curve(model, ds.x_val[:2, :5], n_new=6, n_draft=2)
    assert curve["exit"].tolist() == [1, 2, 3] and curve["matches_greedy"].all()
    assert curve["acceptance"].iloc[-1] == 1.0 and curve["tokens_per_verify"].iloc[-1] == pytest.approx(6 / 2)
    with pytest.raises(ValueError, match="n_new: the prompt's 5 tokens plus 12"):
        E.speculate(model, prompt, 1, n_new=12)
    with pytest.raises(ValueError, match="exit_layer must be"):
        E.speculate(model, prompt, 4, n_new=3)


# ============================================================================ figures


def test_figures_draw_the_tables(khop):
    import plotly.graph_objects as go

    model = _tf(khop, 3)
    x, y = khop.x_val[:8], khop.y_val[:8]
    r = D.rankings(model, x, y=y)
    prof = D.depth_profile(model, x, n_directions=1)
    oracle = D.oracle_depth(model, x, y)
    curve = E.exit_curve(model, x, y)
    figures = [figs.angular_heatmap(r.angular), figs.rankings_figure(r.table, r.correlation),
               figs.prune_heal_figure(pd.DataFrame([("skip", 0, 0.0, "", False, 0.5, 1.0),
                                                    ("skip", 1, 0.33, "2", True, 0.4, 1.2)],
                                                   columns=["method", "n_removed", "fraction", "removed", "healed",
                                                            "acc", "loss"])),
               figs.strategies_figure(D.strategies(model, x, y, strategies=("skip",))),
               figs.oracle_histogram(oracle.histogram(), 3), figs.depth_profile_figure(prof.assign(model="pre")),
               figs.exit_curve_figure(curve.assign(recipe="plain"), pd.DataFrame(
                   [(1, 0.5, 1, 2, 1.5, True)], columns=["exit", "acceptance", "accepted", "drafted",
                                                         "tokens_per_verify", "matches_greedy"]).assign(recipe="plain")),
               figs.effective_depth_figure(pd.DataFrame({"stage": [0, 1], "n_layers": [1, 2],
                                                         "effective_depth": [np.nan, 1.0], "ratio": [np.nan, 0.5]}))]
    for fig in figures:
        assert isinstance(fig, go.Figure) and len(fig.data) >= 1
    for build_fig in (figs.angular_heatmap, figs.rankings_figure, figs.prune_heal_figure, figs.strategies_figure,
                      figs.oracle_histogram, figs.depth_profile_figure, figs.exit_curve_figure,
                      figs.effective_depth_figure):
        assert len(build_fig(None).data) == 0
