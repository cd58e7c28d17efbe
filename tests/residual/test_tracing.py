"""Causal tracing and attribution patching (workbench.tracing), against independent references.

- Causal tracing: the corrupt probability against a noisy forward written here (native: the model's parts by
  hand; Hugging Face: ``inputs_embeds``), the clean one against a plain forward; restoring the last position's
  final residual gives the clean probability, restoring every position of a layer's residual gives it too, and
  restoring a position before the subject changes nothing. Every adapter family.
- Attribution patching: exact (equal to ``residual.patch``) on a model that is linear in every site (no norms, no
  MLP, uniform attention); on a nonlinear model the first-order term against central finite differences along the
  patch direction, and not equal to patching; the integrated-gradients version at block 0's input is complete
  (its recoveries sum to 1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench import residual as R
from workbench import tracing as TR

transformers = pytest.importorskip("transformers")

from helpers.hf_models import FAMS, build as hf_build, tokens as hf_tokens  # noqa: E402


def _model(norm="pre", n_layers=3, seed=0, linear=False, dtype=torch.float32):
    cfg = wb.models.TransformerConfig(vocab_size=20, context=10, d_model=32, n_heads=4, d_mlp=32, n_layers=n_layers,
                                      norm="none" if linear else norm, seed=seed)
    model = wb.models.build(cfg).eval().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(dtype))
        if linear:     # uniform attention (q = k = 0) and no MLP: the logits are affine in every site
            C = cfg.d_model
            for b in model.blocks:
                b.attn.qkv.weight[:2 * C] = 0
                b.attn.qkv.bias[:2 * C] = 0
                b.mlp.proj.weight.zero_()
                b.mlp.proj.bias.zero_()
    return model


def _noise(samples, n, C, seed):
    """The documented draw: ``torch.randn((samples, n_subject, C))`` from a generator seeded with ``seed``."""
    return torch.randn((samples, n, C), generator=torch.Generator().manual_seed(seed))


def _native_noisy_prob(model, x, subject, answer, samples, nu, seed):
    s, e = subject
    with torch.no_grad():
        tok = model.tok_embed(x)                                          # (1, T, C)
        std = float(tok[0, s:e].std(unbiased=False))
        h = (tok + model.pos_embed(torch.arange(x.shape[1]))).expand(samples, -1, -1).clone()
        h[:, s:e] += _noise(samples, e - s, h.shape[-1], seed) * nu * std
        for blk in model.blocks:
            h = blk(h)
        logits = model.readout(model.final_norm(h))
    return float(logits[:, -1].softmax(-1)[:, answer].mean())


# ----------------------------------------------------------------------------- causal tracing


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_causal_trace_endpoints_on_a_native_model(norm, one_thread):
    model = _model(norm)
    x = torch.tensor([3, 7, 1, 9, 4, 2, 8, 5])
    tr = TR.causal_trace(model, x, (2, 4), samples=6, seed=3)
    T, L = 8, 3
    assert list(tr.effects.columns) == ["position", "layer", "prob", "effect"] and len(tr.effects) == T * L
    with torch.no_grad():
        p = model(x[None])[0, -1].softmax(-1)
    assert tr.answer == int(p.argmax()) and tr.clean == pytest.approx(float(p.max()), abs=1e-6)
    assert tr.corrupt == pytest.approx(_native_noisy_prob(model, x[None], (2, 4), tr.answer, 6, 3.0, 3), abs=1e-6)
    assert abs(tr.clean - tr.corrupt) > 1e-4                       # the noise does something
    cell = tr.effects.set_index(["position", "layer"])
    assert cell.loc[(T - 1, L - 1), "prob"] == pytest.approx(tr.clean, abs=1e-5)     # last position, final residual
    before = tr.effects[tr.effects.position < 2]
    np.testing.assert_allclose(before["effect"], 0.0, atol=1e-6)   # causal: no noise there to undo
    np.testing.assert_allclose(tr.effects["effect"], tr.effects["prob"] - tr.corrupt, atol=1e-7)
    f = tr.frame()
    assert {"kind", "clean", "corrupt"} <= set(f.columns) and (f["kind"] == "resid").all()


def test_restoring_every_state_gives_clean_and_none_gives_corrupt(one_thread):
    model = _model()
    x = torch.tensor([[3, 7, 1, 9, 4, 2, 8, 5]])
    tr = TR.causal_trace(model, x, (1, 4), answer=5, samples=4, seed=0)
    ad = wb.hooks.adapter(model)
    with torch.no_grad(), wb.hooks.record(model, names=["blocks.*.resid_post"]) as cache:
        model(x)
    clean = {("resid_pre", l + 1): cache[f"blocks.{l}.resid_post"] for l in range(3)}
    tracer = TR._Tracer(ad, x, (1, 4), 5, _noise(4, 3, 32, 0) * 3.0 * float(model.tok_embed(x)[0, 1:4].detach().std(
        unbiased=False)), clean)
    with torch.no_grad():
        every = tracer.prob([[("resid_pre", l, t) for t in range(8)] for l in (1, 2, 3)])
        none = tracer.prob([[]])
    np.testing.assert_allclose(every, tr.clean, atol=1e-6)
    assert none[0] == pytest.approx(tr.corrupt, abs=1e-7)
    assert none[0] == pytest.approx(_native_noisy_prob(model, x, (1, 4), 5, 4, 3.0, 0), abs=1e-6)


def test_windows_follow_rome():
    # ROME: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    for L, w in ((12, 10), (5, 3), (4, 1), (3, 10)):
        for l in range(L):
            assert list(TR._window(l, L, w)) == list(range(max(0, l - w // 2), min(L, l + (w + 1) // 2)))
    assert TR._restores("mlp", 2, 4, 12, 10) == [("mlp_out", l, 4) for l in range(0, 7)]
    assert TR._restores("resid", 2, 4, 12, 10) == [("resid_pre", 3, 4)]


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_window_traces_leave_positions_before_the_subject_alone(kind, one_thread):
    model = _model()
    x = torch.tensor([3, 7, 1, 9, 4, 2, 8, 5])
    tr = TR.causal_trace(model, x, (3, 5), kind=kind, window=2, samples=3)
    assert tr.kind == kind and tr.window == 2 and len(tr.effects) == 8 * 3
    np.testing.assert_allclose(tr.effects[tr.effects.position < 3]["effect"], 0.0, atol=1e-6)
    assert tr.effects["effect"].abs().max() > 1e-4
    # a window wider than the model restores the same blocks from every layer: one probability per position
    wide = TR.causal_trace(model, x, (3, 5), kind=kind, window=8, samples=3)
    assert len(set(np.round(wide.effects[wide.effects.position == 7]["prob"], 7))) == 1


@pytest.mark.parametrize("family", FAMS)
def test_causal_trace_on_every_hf_family(family, one_thread):
    model = hf_build(family)
    x = hf_tokens(5)[:1]
    T, L = x.shape[1], model.config.num_hidden_layers
    tr = TR.causal_trace(model, x, (1, 3), samples=5, seed=2)
    with torch.no_grad():
        p = model(input_ids=x).logits[0, -1].softmax(-1)
        emb = model.get_input_embeddings()(x)                      # what the first decoder layer adds noise to
        std = float(emb[0, 1:3].std(unbiased=False))
        e = emb.expand(5, -1, -1).clone()
        e[:, 1:3] += _noise(5, 2, e.shape[-1], 2) * 3.0 * std
        ref = model(inputs_embeds=e).logits[:, -1].softmax(-1)[:, tr.answer].mean()
    assert tr.clean == pytest.approx(float(p.max()), abs=1e-5)
    assert tr.corrupt == pytest.approx(float(ref), abs=1e-5)
    cell = tr.effects.set_index(["position", "layer"])
    assert cell.loc[(T - 1, L - 1), "prob"] == pytest.approx(tr.clean, abs=1e-5)
    np.testing.assert_allclose(tr.effects[tr.effects.position < 1]["effect"], 0.0, atol=1e-5)
    mlp = TR.causal_trace(model, x, (1, 3), kind="mlp", window=2, samples=3)
    assert len(mlp.effects) == T * L and np.isfinite(mlp.effects["prob"]).all()


# ----------------------------------------------------------------------------- attribution patching


def _pair(seed=0, B=4, T=8, V=20):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(0, V, (B, 3), generator=g)
    return clean, corrupt


@pytest.mark.parametrize("site", R.PATCH_SITES)
def test_attribution_patching_is_exact_on_a_model_linear_in_the_site(site, one_thread):
    model = _model(linear=True)
    clean, corrupt = _pair()
    exact = R.patch(model, clean, corrupt, answer=(1, 2), site=site)
    scale = exact["recovery"].abs().max()
    for method in ("atp", "ig"):
        est = TR.attribution_patching(model, clean, corrupt, answer=(1, 2), site=site, method=method, steps=3)
        assert list(est.columns) == ["layer", "position", "recovery"]
        assert est[["layer", "position"]].equals(exact[["layer", "position"]])
        np.testing.assert_allclose(est["recovery"], exact["recovery"], atol=1e-5 * max(scale, 1.0))
    if site != "mlp_out":
        assert scale > 0.1


def test_attribution_patching_is_first_order_on_a_nonlinear_model(one_thread):
    model = _model("pre", dtype=torch.float64)
    clean, corrupt = _pair(1)
    est = TR.attribution_patching(model, clean, corrupt, answer=(1, 2), site="resid_pre")
    exact = R.patch(model, clean, corrupt, answer=(1, 2), site="resid_pre")
    assert np.nanmax(np.abs(est["recovery"] - exact["recovery"])) > 1e-2          # patching is not linear here
    ad = wb.hooks.adapter(model)
    with torch.no_grad(), wb.hooks.record(model, names=["blocks.*.resid_pre"]) as cache:
        model(clean)
        a_clean = {l: cache[f"blocks.{l}.resid_pre"].clone() for l in range(3)}
    with torch.no_grad(), wb.hooks.record(model, names=["blocks.*.resid_pre"]) as cache:
        model(corrupt)
        a_corrupt = {l: cache[f"blocks.{l}.resid_pre"].clone() for l in range(3)}

    def m(x, layer=None, t=None, eps=0.0):
        hook = None
        if layer is not None:
            d = (a_clean[layer] - a_corrupt[layer])[:, t]

            def pre(module, args):
                h = args[0].clone()
                h[:, t] += eps * d
                return (h,)
            hook = model.blocks[layer].register_forward_pre_hook(pre)
        with torch.no_grad():
            z = model(x)[:, -1]
        if hook is not None:
            hook.remove()
        return float((z[:, 1] - z[:, 2]).mean())
    den = m(clean) - m(corrupt)
    cells = est.set_index(["layer", "position"])["recovery"]
    for layer, t in ((0, 3), (1, 2), (2, 4), (1, 7)):
        fd = (m(corrupt, layer, t, 1e-4) - m(corrupt, layer, t, -1e-4)) / 2e-4
        assert cells[(layer, t)] * den == pytest.approx(fd, rel=1e-5, abs=1e-8), (layer, t)


def test_integrated_gradients_at_the_input_are_complete(one_thread):
    model = _model("pre", dtype=torch.float64)
    clean, corrupt = _pair(2)
    ig = TR.attribution_patching(model, clean, corrupt, answer=(1, 2), method="ig", steps=64)
    first = ig[ig.layer == 0]["recovery"].sum()
    assert first == pytest.approx(1.0, abs=2e-3)                     # midpoint rule: O(1/steps^2)
    atp = TR.attribution_patching(model, clean, corrupt, answer=(1, 2))
    assert abs(atp[atp.layer == 0]["recovery"].sum() - 1.0) > 5 * abs(first - 1.0)


def test_compare_patching_grid_and_rank_correlation(one_thread):
    model = _model()
    clean, corrupt = _pair(3)
    comp = TR.compare_patching(model, clean, corrupt, answer=(1, 2), sites=["resid_pre", "mlp_out"], steps=4)
    assert list(comp.grid.columns) == ["site", "layer", "position", "method", "recovery"]
    assert set(comp.grid["method"]) == {"exact", "atp", "ig"}
    exact = comp.grid[(comp.grid.site == "mlp_out") & (comp.grid.method == "exact")]
    pd.testing.assert_series_equal(exact["recovery"].reset_index(drop=True),
                                   R.patch(model, clean, corrupt, (1, 2), "mlp_out")["recovery"], check_names=False)
    assert list(comp.correlation.columns) == ["site", "method", "spearman", "pvalue", "n"]
    from scipy.stats import spearmanr
    wide = comp.frame()
    sub = wide[wide.site == "resid_pre"]
    want = spearmanr(sub["exact"], sub["atp"]).statistic
    got = comp.correlation.set_index(["site", "method"]).loc[("resid_pre", "atp"), "spearman"]
    assert got == pytest.approx(want) and -1 <= got <= 1
    assert comp.correlation.set_index(["site", "method"]).loc[("resid_pre", "atp"), "n"] == 4 * 8


@pytest.mark.parametrize("family", ["gpt2", "neox_parallel", "llama", "gemma", "phi"])
def test_attribution_patching_runs_on_hf_families(family, one_thread):
    model = hf_build(family)
    clean = hf_tokens(7)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] % 60) + 1
    comp = TR.compare_patching(model, clean, corrupt, answer=(3, 4), sites=["resid_pre", "attn_out"], steps=2)
    L, T = model.config.num_hidden_layers, clean.shape[1]
    grid = comp.grid
    assert len(grid[(grid.site == "resid_pre") & (grid.method == "atp")]) == (L + 1) * T
    assert len(grid[(grid.site == "attn_out") & (grid.method == "ig")]) == L * T
    # a position before the change: its activations are equal in both runs, so every method gives 0
    early = grid[grid.position < 2]["recovery"].to_numpy()
    np.testing.assert_allclose(early, 0.0, atol=1e-5)
    assert np.isfinite(comp.correlation["spearman"]).all()


# ----------------------------------------------------------------------------- bad input and figures


def test_bad_input_names_the_argument(one_thread):
    model = _model()
    mlp = wb.models.build(wb.models.MLPConfig(d_in=4, n_classes=3, d_model=8, n_layers=1))
    x = torch.tensor([3, 7, 1, 9, 4])
    with pytest.raises(ValueError, match="model: causal_trace needs a sequence model"):
        TR.causal_trace(mlp, torch.zeros(1, 4), (0, 1))
    with pytest.raises(ValueError, match=r"subject\[1\] must be an integer in \[2, 5\], got 9"):
        TR.causal_trace(model, x, (1, 9))
    with pytest.raises(ValueError, match="subject must be a pair"):
        TR.causal_trace(model, x, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        TR.causal_trace(model, x, (1, 2), kind="mlp_out")
    with pytest.raises(ValueError, match="tokens must have at most the model's context of 10 positions, got 11"):
        TR.causal_trace(model, torch.zeros(11, dtype=torch.long), (1, 2))
    with pytest.raises(ValueError, match=r"answer must be an integer in \[0, 19\]"):
        TR.causal_trace(model, x, (1, 2), answer=20)
    with pytest.raises(ValueError, match="tokens must be one prompt"):
        TR.causal_trace(model, torch.zeros(2, 5, dtype=torch.long), (1, 2))
    clean, corrupt = _pair(T=8)
    with pytest.raises(ValueError, match="clean and corrupt must have the same shape"):
        TR.attribution_patching(model, clean, corrupt[:, :7])
    with pytest.raises(ValueError, match="site must be one of"):
        TR.attribution_patching(model, clean, corrupt, site="resid_post")
    with pytest.raises(ValueError, match="method must be one of"):
        TR.attribution_patching(model, clean, corrupt, method="eap")
    with pytest.raises(ValueError, match="model: attribution_patching needs a sequence model"):
        TR.attribution_patching(mlp, torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"sites\[\] must be one of"):
        TR.compare_patching(model, clean, corrupt, sites=["nope"])


def test_figures():
    from workbench.figures import tracing as F

    model = _model()
    tr = TR.causal_trace(model, torch.tensor([3, 7, 1, 9, 4]), (1, 3), samples=2)
    fig = F.trace_heatmap(tr.frame(), ["a", "b", "c", "d", "e"], tr.subject)
    assert list(fig.data[0].y) == ["0:a", "1:b*", "2:c*", "3:d", "4:e"]
    assert np.array(fig.data[0].z).shape == (5, 3) and fig.data[0].zmin == pytest.approx(tr.corrupt)
    clean, corrupt = _pair(T=6)
    comp = TR.compare_patching(model, clean, corrupt, answer=(1, 2), steps=2)
    fig = F.patching_comparison(comp.grid, comp.correlation)
    assert len(fig.data) == 3 and "Spearman rho" in fig.layout.annotations[1].text
    assert np.array(fig.data[0].z).shape == (4, 6)
    assert F.trace_heatmap(None).layout.annotations
