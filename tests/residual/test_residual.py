"""Residual-stream tools checked against independent computations (plain forward hooks, manual forwards)."""
import numpy as np
import pandas.testing as pd_testing
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import residual as R


def _transformer(norm="pre", n_layers=3, tie=False, seed=0):
    cfg = wb.models.TransformerConfig(vocab_size=19, context=12, d_model=32, n_layers=n_layers, n_heads=4, d_mlp=64,
                                      norm=norm, tie_embeddings=tie, seed=seed)
    return wb.models.build(cfg).eval()


def _mlp(norm="pre", n_layers=3):
    return wb.models.build(wb.models.MLPConfig(d_in=10, n_classes=5, d_model=24, n_layers=n_layers, d_hidden=32,
                                               norm=norm)).eval()


def _tokens(B=5, T=12, V=19, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _independent_layer_contributions(model, x):
    """||y - x|| / ||x|| and cos(y - x, x) per block from hooks on the block modules themselves."""
    ins, outs = {}, {}
    handles = []
    for i, b in enumerate(model.blocks):
        def hook(module, args, out, i=i):
            ins[i], outs[i] = args[0], out
        handles.append(b.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    res = {}
    for i in ins:
        xi, d = ins[i], outs[i] - ins[i]
        rel = torch.linalg.vector_norm(d, dim=-1) / torch.linalg.vector_norm(xi, dim=-1)
        cos = F.cosine_similarity(d, xi, dim=-1)
        res[i] = (rel.mean().item(), cos.mean().item())
    return res


@pytest.mark.parametrize("make,x", [(lambda: _transformer("pre"), _tokens()), (lambda: _transformer("peri"), _tokens()),
                                    (lambda: _mlp("pre"), torch.randn(7, 10)), (lambda: _mlp("none"), torch.randn(7, 10))])
def test_whole_layer_contributions_match_plain_forward_hooks(make, x, device):
    model, x = make().to(device), x.to(device)
    df = R.contributions(model, x)
    ref = _independent_layer_contributions(model, x)
    layer = df[df.sublayer == "layer"].set_index("layer")
    assert sorted(layer.index) == sorted(ref)
    for i, (rel, cos) in ref.items():
        assert layer.loc[i, "rel_norm"] == pytest.approx(rel, rel=1e-5, abs=1e-6)
        assert layer.loc[i, "cosine"] == pytest.approx(cos, rel=1e-5, abs=1e-6)


def test_attention_and_mlp_contributions_match_module_outputs(device):
    model, x = _transformer("pre").to(device), _tokens().to(device)
    got = R.contributions(model, x).set_index(["layer", "sublayer"])
    for i, b in enumerate(model.blocks):
        store = {}
        hs = [b.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0])),
              b.attn.register_forward_hook(lambda m, a, o: store.__setitem__("a", o)),
              b.mlp.register_forward_hook(lambda m, a, o: store.__setitem__("m", o))]
        with torch.no_grad():
            model(x)
        for h in hs:
            h.remove()
        xa = store["x"] + store["a"]
        n = lambda t: torch.linalg.vector_norm(t, dim=-1)  # noqa: E731
        assert got.loc[(i, "attn"), "rel_norm"] == pytest.approx((n(store["a"]) / n(store["x"])).mean().item(), rel=1e-5)
        assert got.loc[(i, "mlp"), "rel_norm"] == pytest.approx((n(store["m"]) / n(xa)).mean().item(), rel=1e-5)
        assert got.loc[(i, "mlp"), "cosine"] == pytest.approx(
            F.cosine_similarity(store["m"], xa, dim=-1).mean().item(), rel=1e-4, abs=1e-6)


def test_per_position_and_mask_average_consistently():
    model, x = _transformer(), _tokens()
    overall = R.contributions(model, x)
    per_pos = R.contributions(model, x, per_position=True)
    assert set(per_pos.position) == set(range(x.shape[1]))
    mean_of_positions = per_pos.groupby(["layer", "sublayer"], sort=False)[["rel_norm", "cosine"]].mean().reset_index()
    assert overall[["rel_norm", "cosine"]].to_numpy() == pytest.approx(mean_of_positions[["rel_norm", "cosine"]].to_numpy(),
                                                                        rel=1e-6)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, -1] = True  # only the last position (as for k-hop answers)
    last = R.contributions(model, x, mask=mask)
    at_last = per_pos[per_pos.position == x.shape[1] - 1].reset_index(drop=True)
    assert last[["rel_norm", "cosine"]].to_numpy() == pytest.approx(at_last[["rel_norm", "cosine"]].to_numpy(), rel=1e-6)
    chunked = R.contributions(model, x, batch_size=2)
    assert chunked[["rel_norm", "cosine"]].to_numpy() == pytest.approx(overall[["rel_norm", "cosine"]].to_numpy(), rel=1e-6)


@pytest.mark.parametrize("make,x,per_head", [
    (lambda: _transformer("pre"), _tokens(), False), (lambda: _transformer("pre"), _tokens(), True),
    (lambda: _transformer("peri"), _tokens(), False), (lambda: _transformer("pre", tie=True), _tokens(), True),
    (lambda: _mlp("pre"), torch.randn(6, 10), False), (lambda: _transformer("pre", n_layers=0), _tokens(), False)])
def test_decomposition_is_complete(make, x, per_head, device):
    model, x = make().to(device), x.to(device)
    dec = R.decompose(model, x, per_head=per_head)
    # the final residual, computed independently: the input of the final norm
    store = {}
    h = model.final_norm.register_forward_pre_hook(lambda m, a: store.__setitem__("r", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    final = store["r"] if store["r"].dim() == 3 else store["r"][:, None]
    torch.testing.assert_close(dec.final, final)
    torch.testing.assert_close(dec.total(), final, atol=1e-5, rtol=1e-5)
    n_blocks = len(model.blocks)
    if isinstance(model, wb.models.Transformer):
        per_layer = (model.config.n_heads + 2) if per_head else 2
        assert len(dec) == 2 + n_blocks * per_layer
    else:
        assert dec.labels == ["embed"] + [f"L{i}.block" for i in range(n_blocks)]
    assert len(dec.norms()) == len(dec)


def test_per_head_decomposition_refuses_peri_ln():
    with pytest.raises(ValueError, match="pre-LN"):
        R.decompose(_transformer("peri"), _tokens(), per_head=True)


def test_logit_attribution_sums_to_the_logit(device):
    model, x = _transformer("pre").to(device), _tokens().to(device)
    with torch.no_grad():
        logits = model(x).cpu()
    for target in (None, 3):
        df = R.logit_attribution(model, x, target=target, per_head=True)
        tgt = logits.argmax(-1) if target is None else torch.full(x.shape, target)
        total = df.groupby(["batch", "position"]).attribution.sum().to_numpy().reshape(x.shape)
        torch.testing.assert_close(torch.tensor(total, dtype=torch.float32), logits.gather(-1, tgt[..., None])[..., 0],
                                   atol=1e-4, rtol=1e-4)
    mlp, xv = _mlp("pre").to(device), torch.randn(4, 10).to(device)
    df = R.logit_attribution(mlp, xv)
    assert df.attribution.groupby(df.batch).sum().to_numpy() == pytest.approx(
        mlp(xv).max(-1).values.detach().cpu().numpy(), abs=1e-4)


def test_zero_initialised_new_layer_contributes_exactly_zero(device):
    growth = pytest.importorskip("workbench.growth")
    for model, x in ((_transformer("pre"), _tokens()), (_transformer("peri"), _tokens()), (_mlp("pre"), torch.randn(6, 10))):
        model, x = model.to(device), x.to(device)
        with torch.no_grad():
            before = model(x)
        growth.add_layer(model, init="zero")
        model.eval()
        assert {p.device for p in model.parameters()} == {x.device}     # the new block on the model's device
        new = len(model.blocks) - 1
        df = R.contributions(model, x)
        rows = df[df.layer == new]
        assert (rows.rel_norm == 0.0).all() and (rows.cosine == 0.0).all()
        assert (df[df.layer < new].rel_norm > 0).all()
        skip = R.skip_effects(model, x)
        out = skip.output.set_index("skipped")
        assert out.loc[new, "kl"] == pytest.approx(0.0, abs=1e-7) and out.loc[new, "top1_changed"] == 0.0
        with torch.no_grad():
            torch.testing.assert_close(model(x), before)


def test_lens_at_the_last_layer_is_the_model_output(device):
    model, x = _transformer("pre").to(device), _tokens().to(device)
    lens = R.logit_lens(model, x)
    assert list(lens.layer) == list(range(len(model.blocks) + 1))
    last = lens.iloc[-1]
    assert last.kl_to_final == pytest.approx(0.0, abs=1e-7) and last.top1_agree == 1.0
    with torch.no_grad():
        logits = model(x)
    y = R.next_token_targets(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert last.loss == pytest.approx(expected.item(), rel=1e-5)
    # every layer l, by hand: run the blocks, unembed the residual entering block l with the final norm and
    # the readout, and compare with the model's output distribution (no hooks, no record)
    y_flat = y.reshape(-1)
    with torch.no_grad():
        final = logits.log_softmax(-1)
        h = model.tok_embed(x) + model.pos_embed.weight[:x.shape[1]]
        for l in range(len(model.blocks) + 1):
            manual = model.readout(model.final_norm(h)).log_softmax(-1)            # (B, T, V)
            row = lens.loc[l]
            kl = (final.exp() * (final - manual)).sum(-1).mean()
            agree = (manual.argmax(-1) == logits.argmax(-1)).float().mean()
            loss = F.nll_loss(manual.reshape(-1, manual.shape[-1]), y_flat, ignore_index=-100)
            assert row.kl_to_final == pytest.approx(kl.item(), rel=1e-4, abs=1e-7), l
            assert row.top1_agree == pytest.approx(agree.item()), l
            assert row.loss == pytest.approx(loss.item(), rel=1e-5), l
            if l < len(model.blocks):
                h = model.blocks[l](h)
    assert (lens.kl_to_final.iloc[:-1] > 1e-4).all()             # earlier layers are not the output yet
    per_pos = R.logit_lens(model, x, per_position=True)
    assert per_pos.loss[(per_pos.position == x.shape[1] - 1)].isna().all()  # no next token there


def test_skip_effects_match_a_manual_forward_without_the_layer(device):
    model, x = _transformer("pre", n_layers=4).to(device), _tokens().to(device)
    res = R.skip_effects(model, x)
    assert set(zip(res.heatmap.skipped, res.heatmap.affected)) == {(s, a) for s in range(4) for a in range(s + 1, 4)}

    def run(skip=None):
        h, d = model.embed(x), []
        for i, b in enumerate(model.blocks):
            out = h if i == skip else b(h)
            d.append(out - h)
            h = out
        return d, model.unembed(h)

    with torch.no_grad():
        d, logits = run()
        d1, logits1 = run(skip=1)
    expect = (torch.linalg.vector_norm(d[3] - d1[3], dim=-1) / torch.linalg.vector_norm(d[3], dim=-1)).mean()
    got = res.heatmap.set_index(["skipped", "affected"]).loc[(1, 3), "effect"]
    assert got == pytest.approx(expect.item(), rel=1e-5)
    p, q = logits.log_softmax(-1), logits1.log_softmax(-1)
    assert res.output.set_index("skipped").loc[1, "kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(),
                                                                         rel=1e-4)
    assert res.matrix().shape == (4, 4)
    assert _all_hooks(model) == 0


def test_record_subsets_and_unknown_names(device):
    model, x = _transformer().to(device), _tokens().to(device)
    with wb.hooks.record(model, names=["blocks.*.resid_post", "embed_out"], layers=[0, 2]) as cache:
        model(x)
    assert set(cache) == {"embed_out", "blocks.0.resid_post", "blocks.2.resid_post"}
    assert not cache["embed_out"].requires_grad and cache["blocks.2.resid_post"].device == x.device
    assert cache.stack("resid_post").shape == (2, *x.shape, 32)
    with wb.hooks.record(model) as cache:
        model(x)
    assert set(cache) == set(wb.hooks.sites(model))
    with pytest.raises(ValueError, match="no hook site"):
        with wb.hooks.record(model, names="blocks.*.nonsense"):
            pass
    assert _all_hooks(model) == 0


def test_hooks_are_removed_after_an_exception_inside_record():
    model, x = _transformer(), _tokens()
    with pytest.raises(RuntimeError, match="boom"):
        with wb.hooks.record(model) as cache:
            model(x)
            assert _all_hooks(model) > 0
            raise RuntimeError("boom")
    assert _all_hooks(model) == 0
    assert len(cache) > 0
    with pytest.raises(ValueError, match="context"):  # an error inside the forward itself
        with wb.hooks.record(model):
            model(torch.full((1, 100), 0))  # longer than the context
    assert _all_hooks(model) == 0


def test_functions_restore_training_mode_and_refuse_foreign_models():
    model, x = _transformer(), _tokens()
    model.train()
    R.contributions(model, x)
    assert model.training
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        R.contributions(torch.nn.Linear(3, 3), torch.randn(2, 3))


# ---------------------------------------------------------------------------- logit mixtures


def _mixture(gated=False, mode="logits", n=2):
    members = [_transformer("pre", n_layers=2 + (k % 2), seed=k) for k in range(n)]
    for m in members[1:]:  # one substrate: the same token embedding table
        m.tok_embed.weight.data.copy_(members[0].tok_embed.weight.data)
    mix = wb.compose.LogitMixture(members, weights=[0.3, 0.7][:n] if n == 2 else None, mode=mode).eval()
    if gated:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # per-token weights, without training a gate
            torch.manual_seed(0)
            mix.gate = torch.nn.Linear(32 * n, n)
            torch.nn.init.normal_(mix.gate.weight, std=0.05)
    return mix


@pytest.mark.parametrize("gated", [False, True])
def test_mixture_attribution_sums_to_the_mixtures_logit(gated):
    mix, x = _mixture(gated), _tokens()
    with torch.no_grad():
        logits = mix(x)                                       # the mixture's own forward
    for target in (None, 4):
        df = R.logit_attribution(mix, x, target=target)
        assert list(df.columns) == ["batch", "position", "member", "component", "layer", "kind", "head", "target",
                                    "weight", "attribution"]
        assert set(df.member) == {0, 1} and df[df.member == 1].component.str.startswith("m1 ").all()
        tgt = logits.argmax(-1) if target is None else torch.full(x.shape, target)
        assert (df.groupby(["batch", "position"]).target.first().to_numpy().reshape(x.shape) == tgt.numpy()).all()
        total = df.groupby(["batch", "position"]).attribution.sum().to_numpy().reshape(x.shape)
        torch.testing.assert_close(torch.tensor(total, dtype=torch.float32), logits.gather(-1, tgt[..., None])[..., 0],
                                   atol=1e-4, rtol=1e-4)
        # each member's share is its weight times its own attribution (its own logit for that target)
        w = mix.mixture_weights(x)
        ml = mix.member_logits(x)
        share = df[df.member == 1].groupby(["batch", "position"]).attribution.sum().to_numpy().reshape(x.shape)
        torch.testing.assert_close(torch.tensor(share, dtype=torch.float32),
                                   w[..., 1] * ml[1].gather(-1, tgt[..., None])[..., 0], atol=1e-4, rtol=1e-4)
    w = mix.mixture_weights(x)                                 # (B, T, K): varies per token when gated
    assert (w.std(dim=(0, 1)) > 1e-3).all() if gated else (w == mix.weights).all()
    assert (df.weight.to_numpy() == w.numpy()[df.batch, df.position, df.member]).all()


def test_mixture_of_one_model_is_that_model():
    model, x = _transformer("pre"), _tokens()
    mix = wb.compose.LogitMixture([model]).eval()
    single, mixed = R.logit_attribution(model, x, per_head=True), R.logit_attribution(mix, x, per_head=True)
    assert (mixed.member == 0).all() and (mixed.weight == 1.0).all()
    assert list(mixed.component) == ["m0 " + c for c in single.component]
    assert (mixed.attribution.to_numpy() == single.attribution.to_numpy()).all()
    assert (mixed.target.to_numpy() == single.target.to_numpy()).all()
    for per_position in (False, True):
        lens = R.logit_lens(mix, x, per_position=per_position)
        assert (lens.member == 0).all()
        pd_testing.assert_frame_equal(lens.drop(columns="member"), R.logit_lens(model, x, per_position=per_position))
    pd_testing.assert_frame_equal(R.contributions(mix, x).drop(columns="member"), R.contributions(model, x))
    skip, skip1 = R.skip_effects(mix, x), R.skip_effects(model, x)
    pd_testing.assert_frame_equal(skip.member(0).heatmap, skip1.heatmap)
    pd_testing.assert_frame_equal(skip.member(0).output, skip1.output)
    assert (skip.matrix(member=0)[~np.isnan(skip1.matrix())] == skip1.matrix()[~np.isnan(skip1.matrix())]).all()


def test_mixture_lens_compares_each_members_layers_with_the_mixtures_output():
    mix, x = _mixture(), _tokens()
    lens = R.logit_lens(mix, x)
    assert list(lens.columns) == ["member", "layer", "kl_to_final", "top1_agree", "top5_overlap", "loss"]
    assert list(zip(lens.member, lens.layer)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    with torch.no_grad():
        p = mix(x).log_softmax(-1)
        q = mix.members[1](x).log_softmax(-1)                 # member 1's own output: its last lens layer
    kl = (p.exp() * (p - q)).sum(-1).mean()
    last = lens[(lens.member == 1) & (lens.layer == 3)].iloc[0]
    assert last.kl_to_final == pytest.approx(kl.item(), rel=1e-4)
    assert last.top1_agree == pytest.approx((q.argmax(-1) == p.argmax(-1)).float().mean().item())
    assert _all_hooks(mix) == 0


def test_mixture_contributions_and_skip_effects_are_per_member():
    mix, x = _mixture(), _tokens()
    df = R.contributions(mix, x)
    assert list(df.columns[:3]) == ["member", "layer", "sublayer"]
    pd_testing.assert_frame_equal(df[df.member == 1].drop(columns="member").reset_index(drop=True),
                                  R.contributions(mix.members[1], x))
    res = R.skip_effects(mix, x)
    assert res.member_layers == [2, 3] and res.n_layers == 3 and list(res.output.columns[:2]) == ["member", "skipped"]
    with pytest.raises(ValueError, match="member=k"):
        res.matrix()
    # the output change is the mixture's: skip member 1's layer 2 by hand
    a, b = mix.members
    with torch.no_grad():
        h = b.embed(x)
        for i, blk in enumerate(b.blocks):
            h = h if i == 2 else blk(h)
        skipped = 0.3 * a(x) + 0.7 * b.unembed(h)
        p, q = mix(x).log_softmax(-1), skipped.log_softmax(-1)
    got = res.output.set_index(["member", "skipped"]).loc[(1, 2), "kl"]
    assert got == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4)
    assert _all_hooks(mix) == 0


def test_probability_mixture_refuses_attribution_and_lens():
    mix, x = _mixture(mode="probs"), _tokens()
    for fn in (R.logit_attribution, R.logit_lens):
        with pytest.raises(ValueError, match="mode='logits'.*not linear in the members' logits"):
            fn(mix, x)
    assert set(R.contributions(mix, x).member) == {0, 1}      # a member's residual stream does not depend on mode
    assert len(R.skip_effects(mix, x).output) == 5
    with pytest.raises(TypeError, match="one of its .members"):
        R.decompose(mix, x)
