"""Depth-efficiency analyses of workbench.residual checked against hand computations on tiny models."""
import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import residual as R
from workbench.figures import residual as figs


def _model(n_layers=3, seed=0):
    cfg = wb.models.TransformerConfig(vocab_size=13, context=8, d_model=16, n_layers=n_layers, n_heads=2, d_mlp=32,
                                      seed=seed)
    return wb.models.build(cfg).eval()


def _x(B=3, T=8, seed=1):
    return torch.randint(0, 13, (B, T), generator=torch.Generator().manual_seed(seed))


def _stream(model, x, edit=None):
    """Residuals entering each block and the final one, by hand; ``edit(l, h) -> h`` before block l."""
    with torch.no_grad():
        h = model.embed(x)
        hs = []
        for l, b in enumerate(model.blocks):
            if edit is not None:
                h = edit(l, h)
            hs.append(h)
            h = b(h)
        hs.append(h)
        return hs, model.unembed(h)


def test_skip_from_position_reduce_max_and_l2_match_a_manual_forward():
    model, x = _model(), _x()
    t = 3
    res = R.skip_effects(model, x, reduce="max", from_position=t)
    hs, logits = _stream(model, x)
    with torch.no_grad():
        h = hs[1]
        out = model.blocks[1](h).clone()
        out[:, t:] = h[:, t:]                       # layer 1 is the identity at positions >= t
        h2 = model.blocks[2](out) - out
        d2 = hs[3] - hs[2]
        rel = (d2 - h2).norm(dim=-1) / d2.norm(dim=-1)
        skipped = model.unembed(model.blocks[2](out))
    got = res.heatmap.set_index(["skipped", "affected"]).loc[(1, 2), "effect"]
    assert got == pytest.approx(rel[:, t:].max().item(), rel=1e-4)
    assert rel[:, :t].abs().max() < 1e-5                         # causal: earlier positions unchanged
    l2 = (logits.softmax(-1) - skipped.softmax(-1)).norm(dim=-1)
    assert res.output.set_index("skipped").loc[1, "l2"] == pytest.approx(l2[:, t:].max().item(), rel=1e-4)
    with pytest.raises(ValueError, match="from_position must be an integer"):
        R.skip_effects(model, x, from_position=0)
    with pytest.raises(ValueError, match="from_position"):
        R.skip_effects(model, x, from_position=8)
    with pytest.raises(ValueError, match="reduce"):
        R.skip_effects(model, x, reduce="median")


def test_local_skip_removes_only_the_layers_own_contribution():
    model, x = _model(), _x()
    res = R.skip_effects(model, x, local=True)
    hs, logits = _stream(model, x)
    with torch.no_grad():
        d0 = hs[1] - hs[0]
        d2 = hs[3] - hs[2]
        d2_local = model.blocks[2](hs[2] - d0) - (hs[2] - d0)     # layer 2 on the original stream minus d_0
        rel = ((d2 - d2_local).norm(dim=-1) / d2.norm(dim=-1)).mean().item()
        q = model.unembed(hs[3] - d0).log_softmax(-1)
        p = logits.log_softmax(-1)
    assert res.heatmap.set_index(["skipped", "affected"]).loc[(0, 2), "effect"] == pytest.approx(rel, rel=1e-4)
    assert res.output.set_index("skipped").loc[0, "kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(),
                                                                         rel=1e-4)


def test_integrated_gradients_are_complete_per_layer():
    model, x = _model(), _x()
    ig = R.integrated_gradients(model, x[:2], steps=8, layers=[1, 3])
    x = x[:2]
    assert set(ig.layer) == {1, 3} and list(ig.columns) == ["layer", "position", "attribution"]
    hs, logits = _stream(model, x)
    tgt = logits[:, -1].argmax(-1)
    f = logits[:, -1].softmax(-1)[torch.arange(2), tgt]
    for l in (1, 3):
        def edit(k, h, l=l):
            return h.mean(1, keepdim=True).expand_as(h) if k == l else h
        if l < 3:
            _, lb = _stream(model, x, edit)
        else:
            lb = model.unembed(hs[3].mean(1, keepdim=True).expand_as(hs[3])).detach()
        fb = lb[:, -1].softmax(-1)[torch.arange(2), tgt]
        total = ig[ig.layer == l].attribution.sum()
        assert total == pytest.approx((f - fb).mean().item(), abs=2e-3 + 0.02 * abs((f - fb).mean().item())), l
    with pytest.raises(ValueError, match="steps"):
        R.integrated_gradients(model, x, steps=0)


def test_depth_score_is_the_centre_of_mass():
    out = pd.DataFrame({"skipped": [0, 1, 2], "kl": [0.0, 3.0, 1.0], "l2": [1.0, 1.0, 2.0]})
    assert R.depth_score(out) == pytest.approx((0 + 1 + 4) / 4)
    assert R.depth_score(out, metric="kl") == pytest.approx((3 + 2) / 4)
    model, x = _model(n_layers=2), _x(B=2)
    res = R.skip_effects(model, x)
    assert R.depth_score(res) == pytest.approx(R.depth_score(res.output))
    with pytest.raises(ValueError, match="metric"):
        R.depth_score(out, metric="cos")
    dvd = R.depth_vs_difficulty(model, {1: x, 2: _x(B=2, seed=2)})
    assert list(dvd.columns) == ["difficulty", "n_examples", "depth_score"] and list(dvd.difficulty) == [1, 2]


def test_erasure_matches_a_manual_forward():
    model, x = _model(), _x()
    er = R.erase(model, x, layer=1, position=2)
    hs, logits = _stream(model, x)
    mean = hs[1].reshape(-1, 16).mean(0)

    def edit(l, h):
        if l == 1:
            h = h.clone()
            h[:, 2] = mean
        return h
    hs2, logits2 = _stream(model, x, edit)
    tab = er.residual.set_index(["layer", "position"]).rel_change
    for l in (1, 2, 3):
        rel = ((hs2[l] - hs[l]).norm(dim=-1) / hs[l].norm(dim=-1)).mean(0)
        np.testing.assert_allclose([tab.loc[(l, t)] for t in range(8)], rel.numpy(), rtol=1e-4, atol=1e-6)
    assert tab.loc[(3, 0)] == pytest.approx(0, abs=1e-6)          # positions before the erased one are untouched
    p, q = logits.log_softmax(-1), logits2.log_softmax(-1)
    np.testing.assert_allclose(er.output.kl, (p.exp() * (p - q)).sum(-1).mean(0).numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="position must be an integer in \\[0, 7\\]"):
        R.erase(model, x, layer=0, position=8)


def test_layer_map_of_a_model_to_itself_is_exact_on_the_diagonal():
    model = _model(n_layers=2)
    xf, xe = _x(B=12, seed=3), _x(B=4, seed=4)
    lm = R.layer_map(model, model, xf, xe)
    assert len(lm) == 9
    diag = lm[lm.layer_a == lm.layer_b].rel_error
    assert (diag < 1e-6).all()
    assert lm[lm.layer_a != lm.layer_b].rel_error.min() > 1e-3
    with pytest.raises(ValueError, match="x_fit must hold more than"):
        R.layer_map(model, model, xf[:1], xe)


def test_patching_recovers_where_the_difference_is_and_matches_a_hand_patch():
    model = _model()
    clean = _x(B=2, T=5)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 1) % 13
    res = R.patch(model, clean, corrupt, answer=(1, 2))
    tab = res.set_index(["layer", "position"]).recovery
    assert tab.loc[(0, 3)] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(tab.loc[(0, t)]) < 1e-5 for t in range(5) if t != 3)
    assert tab.loc[(3, 4)] == pytest.approx(1.0, abs=1e-5)        # the final residual at the last position
    # hand-made: attn_out of layer 1 at position 3 replaced by the clean value
    pa = R.patch(model, clean, corrupt, answer=(1, 2), site="attn_out").set_index(["layer", "position"]).recovery
    with torch.no_grad():
        def run(x, attn_override=None):
            h = model.embed(x)
            attn = []
            for l, b in enumerate(model.blocks):
                a = b.attn(b.ln1(h))
                if l == 1 and attn_override is not None:
                    a = a.clone()
                    a[:, 3] = attn_override[:, 3]
                attn.append(a)
                h = h + a
                h = h + b.mlp(b.ln2(h))
            z = model.unembed(h)[:, -1]
            return float((z[:, 1] - z[:, 2]).mean()), attn
        mc, attn_clean = run(clean)
        mk, _ = run(corrupt)
        mp, _ = run(corrupt, attn_clean[1])
    assert pa.loc[(1, 3)] == pytest.approx((mp - mk) / (mc - mk), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="site"):
        R.patch(model, clean, corrupt, site="resid_mid")
    with pytest.raises(ValueError, match="same shape"):
        R.patch(model, clean, corrupt[:1])


def test_streaming_equals_cached_and_lens_top5_overlap_by_hand():
    model, x = _model(), _x()
    df, cache = R.contributions(model, x, cache=True)
    pd.testing.assert_frame_equal(df, R.contributions(model, x))
    assert "blocks.0.resid_mid" in cache
    lens = R.logit_lens(model, x)
    hs, logits = _stream(model, x)
    top_f = logits.topk(5, -1).indices
    top_l = model.unembed(hs[1]).topk(5, -1).indices
    overlap = torch.tensor([[len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(ra, rb)]
                            for ra, rb in zip(top_l, top_f)]).mean().item()
    assert lens.set_index("layer").loc[1, "top5_overlap"] == pytest.approx(overlap)
    assert lens.set_index("layer").loc[3, "top5_overlap"] == 1.0


def test_estimate_and_report():
    model, x = _model(n_layers=2), _x(B=2, T=4)
    e = R.estimate(model, 1024, "skip_effects")
    assert e["bytes"] > 0 and e["seconds"] > 0 and e["forwards"] == 3
    with pytest.raises(ValueError, match="analysis"):
        R.estimate(model, 10, "everything")
    rep = R.report(model, x, corrupt=(x + 1) % 13, steps=2, title="<b>mine</b>")
    assert rep.n_layers == 2 and not rep.patching.empty and np.isfinite(rep.depth_score)
    with pytest.raises(ValueError, match="erase_position"):
        R.report(model, x, erase_position=4)


def test_depth_report_html_is_self_contained_and_escaped(tmp_path):
    model, x = _model(n_layers=2), _x(B=2, T=4)
    rep = R.report(model, x, corrupt=(x + 1) % 13, steps=2, title="<b>mine</b>")
    path = figs.save_depth_report(rep, tmp_path / "r.html")
    text = open(path, encoding="utf-8").read()
    assert "&lt;b&gt;mine&lt;/b&gt;" in text and "<b>mine</b>" not in text
    assert "<script src=" not in text.replace(" ", "") and "<script src" not in text and text.count("Plotly.newPlot") >= 7
    from workbench.figures import residual as FR
    for fig in (FR.ig_heatmap(rep.ig), FR.patch_heatmap(rep.patching), FR.erasure_heatmap(rep.erasure),
                FR.depth_difficulty_figure(None), FR.layer_map_heatmap(R.layer_map(model, model, _x(B=6), x))):
        assert fig.layout.title.text


class _ParallelBlock(torch.nn.Module):
    """``h + attn(ln1(h)) + mlp(ln2(h))``: attention and MLP read the same residual (NeoX/Phi layout)."""

    def __init__(self, b):
        super().__init__()
        self.b = b
        self.resid_pre, self.attn_out = wb.models.HookPoint(), wb.models.HookPoint()
        self.mlp_out, self.resid_post = wb.models.HookPoint(), wb.models.HookPoint()

    def forward(self, h):
        h = self.resid_pre(h)
        return self.resid_post(h + self.attn_out(self.b.attn(self.b.ln1(h))) + self.mlp_out(self.b.mlp(self.b.ln2(h))))


class _ParallelModel(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config
        self.blocks = torch.nn.ModuleList(_ParallelBlock(b) for b in base.blocks)

    def forward(self, x):
        h = self.base.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.base.unembed(h)


class _ParallelAdapter(wb.hooks.Adapter):
    family, parallel = "transformer", True

    def __init__(self, model):
        self.model, self.n_layers, self.n_heads = model, len(model.blocks), model.config.n_heads
        self._points = {f"blocks.{i}.{s}": getattr(b, s) for i, b in enumerate(model.blocks)
                        for s in ("resid_pre", "attn_out", "mlp_out", "resid_post")}

    def site_names(self):
        return list(self._points)

    def add_hook(self, name, fn):
        return self._points[name].register_forward_hook(lambda m, a, out: (fn(out), None)[1])

    def replace_hook(self, name, fn):
        return self._points[name].register_forward_hook(lambda m, a, out: fn(out))

    def forward(self, x):
        return self.model(x)

    def final_norm(self):
        return self.model.base.final_norm

    def readout(self):
        return self.model.base.readout.weight, self.model.base.readout.bias

    def block(self, layer):
        return self.model.blocks[layer]


def test_parallel_blocks_two_writers_reading_one_residual():
    model = _ParallelModel(_model())
    ad, x = _ParallelAdapter(model), _x()
    df = R.contributions(ad, x).set_index(["layer", "sublayer"])
    with torch.no_grad():
        h = model.base.embed(x)
        b = model.blocks[0].b
        a, m = b.attn(b.ln1(h)), b.mlp(b.ln2(h))
    assert df.loc[(0, "mlp"), "rel_norm"] == pytest.approx((m.norm(dim=-1) / h.norm(dim=-1)).mean().item(), rel=1e-5)
    assert df.loc[(0, "layer"), "rel_norm"] == pytest.approx(((a + m).norm(dim=-1) / h.norm(dim=-1)).mean().item(),
                                                             rel=1e-5)
    res = R.skip_effects(ad, x)
    with torch.no_grad():
        h2 = model.base.embed(x)
        for i, blk in enumerate(model.blocks):
            h2 = h2 if i == 1 else blk(h2)
        p, q = model(x).log_softmax(-1), model.base.unembed(h2).log_softmax(-1)
    assert res.output.set_index("skipped").loc[1, "kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(),
                                                                         rel=1e-4)
    clean = _x(B=2, T=4)
    corrupt = (clean + 1) % 13
    pm = R.patch(ad, clean, corrupt, answer=(1, 2), site="mlp_out")
    assert list(pm.columns) == ["layer", "position", "recovery"] and len(pm) == 3 * 4


def test_report_carries_the_lenses_commitment_head_scores_and_attention(tmp_path):
    """An untrained tuned lens is the logit lens (zero translators), so the report's tuned rows equal its logit
    rows; at the output every lens is the model, so every token has committed by layer L."""
    model, x = _model(n_layers=2), _x(B=2, T=6)
    tuned = wb.lenses.TunedLens(model)
    rep = R.report(model, x, steps=2, tuned=tuned, attention_layer=1, labels=list("abcdef"))
    cmp = rep.lenses.set_index(["lens", "layer"])
    for col in ("kl_to_final", "top1_agree", "perplexity"):
        assert cmp.loc["tuned", col].to_numpy() == pytest.approx(cmp.loc["logit", col].to_numpy(), abs=1e-6)
    assert cmp.loc[("logit", 2), "kl_to_final"] == pytest.approx(0.0, abs=1e-6)
    top1 = rep.commitment[rep.commitment.criterion == "top1"]
    assert set(top1.lens) == {"logit", "tuned"} and len(top1) == 2 * 6 and top1.layer.le(2).all()
    assert set(rep.lens_tokens.batch) == {0} and set(rep.lens_tokens.layer) == {0, 1, 2}
    assert rep.head_scores.equals(wb.attention.head_scores(model))
    want = wb.attention.pattern(model, x[:1], 1).weights
    got = rep.attention.pivot_table(index=["head", "query"], columns="key", values="weight").fillna(0.0).to_numpy()
    assert got == pytest.approx(want.reshape(-1, 6), abs=1e-6)
    assert rep.attention_layer == 1 and rep.attention.query_token.iloc[-1] == "f"
    text = open(figs.save_depth_report(rep, tmp_path / "r.html", tokens=list("abcdef")), encoding="utf-8").read()
    for title in ("Lenses per layer", "commitment layer under", "Head-type scores", "Attention pattern, layer 1"):
        assert title in text
    assert "<script src" not in text
    no_attention = R.report(model, x, steps=2, attention_layer=None)
    assert no_attention.attention.empty and set(no_attention.lenses.lens) == {"logit"}
    with pytest.raises(ValueError, match="attention_layer"):
        R.report(model, x, attention_layer=2)
