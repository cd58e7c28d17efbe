"""Width growth (widen, MixtureGrowth) and growth by the natural expansion score (Mitchell et al. 2023)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench import growth
from workbench.core.flops import flops_per_example
from workbench.core.models import MLPConfig, TransformerConfig, build
from helpers.perturb import perturb_


def _mlp(norm="pre", n_layers=2, d_hidden=6, d_model=16):
    return perturb_(build(MLPConfig(d_in=10, n_classes=5, d_model=d_model, d_hidden=d_hidden, n_layers=n_layers,
                                    norm=norm)))


def _tf(norm="pre", n_layers=2):
    return perturb_(build(TransformerConfig(vocab_size=11, context=8, d_model=16, n_heads=2, d_mlp=12,
                                            n_layers=n_layers, norm=norm)))


def _inputs(model, n=6):
    g = torch.Generator().manual_seed(3)
    if model.config.family == "mlp":
        return torch.randn(n, model.config.d_in, generator=g)
    return torch.randint(0, model.config.vocab_size, (n, model.config.context), generator=g)


@pytest.mark.parametrize("make", [lambda: _mlp("pre"), lambda: _mlp("peri"), lambda: _mlp("none"),
                                  lambda: _tf("pre"), lambda: _tf("peri")],
                         ids=["mlp-pre", "mlp-peri", "mlp-none", "tf-pre", "tf-peri"])
def test_widen_preserves_the_function(make):
    original = make()
    x = _inputs(original)
    with torch.no_grad():
        before = original(x)
    for init in growth.WIDEN_INITS:
        model = copy.deepcopy(original)
        block = growth.widen(model, 0, 2, init=init)
        growth.widen(model, -1, 1.5, init=init)
        with torch.no_grad():
            after = model(x)
        assert torch.allclose(after, before, atol=1e-6, rtol=0), (init, (after - before).abs().max())
        fc = block.mlp_in
        base = 6 if model.config.family == "mlp" else 12
        assert fc.out_features == 2 * base and model.config.layer_widths == [2 * base, round(1.5 * base)]
        assert all(p.requires_grad for p in block.parameters())
    # the widened config is valid and rebuilds the same shapes
    rebuilt = build(model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), after)


def test_copy_splits_outgoing_weights_by_hand():
    model = build(MLPConfig(d_in=2, n_classes=2, d_model=2, d_hidden=2, n_layers=1, norm="none"))
    blk = model.blocks[0]
    with torch.no_grad():
        blk.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        blk.fc.bias.copy_(torch.tensor([0.5, -0.5]))
        blk.proj.weight.copy_(torch.tensor([[10.0, 20.0], [30.0, 40.0]]))
        blk.proj.bias.copy_(torch.tensor([1.0, 2.0]))
    wide = copy.deepcopy(model)
    growth.widen(wide, 0, 2, init="copy")  # 2 -> 4 units: units 2, 3 copy units 0, 1; every unit has 2 copies
    b = wide.blocks[0]
    assert b.fc.weight.tolist() == [[1, 2], [3, 4], [1, 2], [3, 4]]
    assert b.fc.bias.tolist() == [0.5, -0.5, 0.5, -0.5]
    assert b.proj.weight.tolist() == [[5, 10, 5, 10], [15, 20, 15, 20]]
    assert b.proj.bias.tolist() == [1, 2]
    odd = copy.deepcopy(model)
    growth.widen(odd, 0, 1.5, init="copy")  # 2 -> 3 units: unit 2 copies unit 0 (2 copies), unit 1 alone
    assert odd.blocks[0].fc.weight.tolist() == [[1, 2], [3, 4], [1, 2]]
    assert odd.blocks[0].proj.weight.tolist() == [[5, 20, 5], [15, 40, 15]]
    x = torch.tensor([[0.3, -1.0], [2.0, 0.1]])
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-6) and torch.allclose(odd(x), model(x), atol=1e-6)


def test_orthogonal_and_zero_new_units():
    model = _mlp(d_hidden=4, d_model=16)
    old = model.blocks[0].fc.weight.detach().clone()
    growth.widen(model, 0, 3, init="orthogonal", seed=5)  # 4 -> 12 units, 4 + 8 <= d_model = 16
    fc, proj = model.blocks[0].fc, model.blocks[0].proj
    new = fc.weight[4:].detach()
    assert torch.allclose(new @ old.T, torch.zeros(8, 4), atol=1e-5)          # orthogonal to the old rows
    assert torch.allclose(new @ new.T / (new.norm(dim=1)[:, None] * new.norm(dim=1)), torch.eye(8), atol=1e-5)
    assert torch.allclose(new.norm(dim=1), old.norm(dim=1).mean().expand(8), rtol=1e-5)
    assert proj.weight[:, 4:].abs().max() == 0 and fc.bias[4:].abs().max() == 0
    z = _mlp()
    growth.widen(z, 1, 2, init="zero")
    assert z.blocks[1].proj.weight[:, 6:].abs().max() == 0 and z.blocks[1].fc.weight[6:].abs().min() > 0


def test_widen_refuses_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match=r"layer must be an integer in \[-2, 1\]"):
        growth.widen(model, 2)
    with pytest.raises(ValueError, match="factor must be"):
        growth.widen(model, 0, 1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        growth.widen(model, 0, 2, init="fade")
    with pytest.raises(ValueError, match="adds no unit"):
        growth.widen(model, 0, 1.01)
    with pytest.raises(ValueError, match="layer_widths must be None or a list of n_layers=2"):
        MLPConfig(d_in=3, n_classes=2, layer_widths=[4]).validate()
    assert model.config.layer_widths is None  # nothing changed


def test_widened_model_grows_saves_and_counts_flops(store):
    model = _mlp()
    f0 = flops_per_example(model)
    growth.widen(model, 0, 2)
    d = model.config.d_model
    assert flops_per_example(model) - f0 == 3 * 2 * (2 * d * 6)    # fc + proj, 6 more units, 3x forward
    growth.add_layer(model, position=1)
    assert model.config.layer_widths == [12, 6, 6]
    growth.stack(model)
    assert model.config.layer_widths == [12, 6, 6] * 2
    assert growth.width_table(model)["width"].tolist() == [12, 6, 6] * 2
    ds = wb.data.load("digits")
    model = build(MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=4, n_layers=1))
    run = growth.grow(model, ds, [growth.Stage("train", 2), growth.Stage("widen", 2, layer=0, factor=2, init="copy")],
                      wb.TrainConfig(batch_size=16, eval_every=2, eval_max=64), store=store)
    assert run.model.config.layer_widths == [8] and run.model.config.d_hidden == 4
    assert run.model.blocks[0].fc.out_features == 8
    back = store.load(run.run_id)
    x = ds.x_val[:5]
    with torch.no_grad():
        assert torch.equal(back.model(x), run.model(x))
    assert growth.timeline_table(run)["width"].tolist() == [4, 8]
    with pytest.raises(ValueError, match=r"stage 1 \(widen\): layer must be an integer in \[-1, 0\]"):
        growth.check_schedule([growth.Stage("train", 1), growth.Stage("widen", 1, layer=3)], 1)


def test_single_block_widening_records_widths():
    model = build(MLPConfig(d_in=3, n_classes=2, d_model=4, d_hidden=4, n_layers=2))
    growth.widen(model, 1, 2)
    cfg = wb.models.config_from_dict(wb.models.config_to_dict(model.config))
    assert cfg.layer_widths == [4, 8] and cfg.param_count() == wb.models.count_params(model)


# ----------------------------------------------------------------------------- MixtureGrowth


def test_mixture_grow_zero_reproduces_the_members():
    members = [perturb_(growth.MixtureMLP(6, 3, width=5, n_layers=2, n_templates=2, seed=s), seed=s + 10)
               for s in (0, 1)]
    grown = growth.mixture_grow(members, init="zero")
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = [m.hidden(x) for m in members]
        for got, a, b in zip(grown.hidden(x), *hs):
            assert torch.allclose(got, torch.cat([a, b], 1), atol=1e-6)
        assert torch.allclose(grown(x), (members[0](x) + members[1](x)) / 2, atol=1e-6)
    # layer weights are combinations of the templates: the diagonal blocks are the members' own
    w = grown.layers[1].weight
    assert torch.allclose(w[:5, :5], members[0].layers[1].weight, atol=1e-6)
    assert torch.allclose(w[5:, 5:], members[1].layers[1].weight, atol=1e-6) and w[:5, 5:].abs().max() == 0


def test_mixture_grow_orthogonal_coefficients():
    members = [growth.MixtureMLP(6, 3, width=4, n_layers=2, n_templates=3, seed=s) for s in (0, 1)]
    grown = growth.mixture_grow(members, seed=2)
    C = grown.block_coeff.detach()                      # (layers, 2, 2, 6 pooled templates)
    for l in range(2):
        old = torch.stack([C[l, 0, 0], C[l, 1, 1]])
        new = torch.stack([C[l, 0, 1], C[l, 1, 0]])
        assert torch.allclose(new @ old.T, torch.zeros(2, 2), atol=1e-5)
        assert abs(float(new[0] @ new[1])) < 1e-5     # the second new vector is orthogonal to the first too
        assert torch.allclose(new.norm(dim=1), old.norm(dim=1).mean().expand(2), rtol=1e-5)
    assert torch.allclose(C[:, 0, 0, :3], torch.stack([l.coeff for l in members[0].layers]).detach())
    g = torch.Generator().manual_seed(0)                 # seeded data: the fit's outcome does not hang on test order
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    losses = growth.fit_mixture(grown, x, y, steps=30, lr=1e-2, seed=0)
    assert losses[-1] < losses[0]
    assert grown.templates.grad is not None and grown.block_coeff.grad is not None
    with pytest.raises(ValueError, match="at least 2 MixtureMLP"):
        growth.mixture_grow(members[:1])


# ----------------------------------------------------------------------------- natural expansion score


def test_natural_score_matches_a_hand_computation():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.2, -0.5, 1.0], [0.7, 0.1, -0.3]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.0, -1.5, 1.0], [2.0, 1.0, -1.0]])
    y = torch.tensor([0, 1, 1, 0])
    damping = 1e-3
    W, b, X = lin.weight.detach().numpy().astype(float), lin.bias.detach().numpy().astype(float), x.numpy()
    per = []
    for xi, yi in zip(X, y.numpy()):
        z = W @ xi + b
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        d = p - np.eye(2)[yi]                       # dCE/dz
        per.append(np.concatenate([np.outer(d, xi).ravel(), d]))
    G = np.array(per)
    g, F = G.mean(0), (G ** 2).mean(0) + damping
    expected = float((g ** 2 / F).sum())
    assert growth.natural_score(lin, x, y, damping=damping) == pytest.approx(expected, rel=1e-6)
    assert growth.natural_score(lin, x, y, damping=damping, params=[lin.bias]) == \
        pytest.approx(float((g[6:] ** 2 / F[6:]).sum()), rel=1e-6)
    with pytest.raises(ValueError, match="damping must be"):
        growth.natural_score(lin, x, y, damping=0)


def test_candidates_add_the_new_parameters_score():
    ds = wb.data.load("digits")
    model = perturb_(build(MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=4, n_layers=1)))
    x, y = ds.x_train[:24], ds.y_train[:24]
    eta, rows = growth.score_candidates(model, x, y)
    assert [r["candidate"] for r in rows] == ["add_layer@0", "add_layer@1", "widen@0"]
    for r in rows:
        trial = copy.deepcopy(model)
        old = {id(p) for p in trial.parameters()}
        growth.natural._apply_candidate(trial, r)
        new = [p for p in trial.parameters() if id(p) not in old]
        if r["op"] == "widen":  # widen replaces fc/proj: their old entries are unchanged, the new ones count
            new = None
        assert r["eta_new"] >= eta and r["eta_ratio"] == pytest.approx(r["eta_new"] / eta)
        if new is not None:
            extra = growth.natural_score(trial, x, y, params=new)
            assert r["eta_new"] == pytest.approx(eta + extra, rel=1e-6)


def test_grow_by_the_natural_criterion():
    ds = wb.data.load("digits")
    cfg = wb.TrainConfig(steps=9, batch_size=16, eval_every=3, eval_max=64)
    mc = MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=4, n_layers=1)
    run = growth.grow(build(mc), ds, config=cfg, criterion="natural", tau=1.0, check_every=3, score_examples=12)
    trace = growth.trace_table(run)
    assert {"step", "candidate", "eta", "eta_ratio", "accepted"} <= set(trace.columns)
    assert sorted(trace["step"].unique().tolist()) == [3, 6]
    acc = trace[trace["accepted"]]
    assert len(acc) == 2 and (acc["eta_ratio"] > 1.0).all()
    for step, g in trace.groupby("step"):             # the accepted one is the best of its check
        assert g.loc[g["eta_ratio"].idxmax(), "accepted"] and g["accepted"].sum() == 1
    tl = growth.timeline_table(run)
    assert len(tl) == 3 and int(run.metrics["step"].max()) == 9
    grown = [(o, r) for o, r in zip(tl["op"], tl.itertuples()) if o != "train"]
    assert [o for o, _ in grown] == acc["op"].tolist()
    never = growth.grow(build(mc), ds, config=cfg, criterion="natural", tau=1e9, check_every=3, score_examples=8)
    assert not growth.trace_table(never)["accepted"].any() and never.model.config.n_layers == 1
    cool = growth.grow(build(mc), ds, config=cfg, criterion="natural", tau=1.0, check_every=3, score_examples=8,
                       cooldown=1)                  # the check after a growth is skipped
    assert growth.trace_table(cool)["step"].unique().tolist() == [3]
    with pytest.raises(ValueError, match="not both"):
        growth.grow(build(mc), ds, [growth.Stage("train", 1)], cfg, criterion="natural")
    with pytest.raises(ValueError, match="tau must be"):
        growth.grow(build(mc), ds, config=cfg, criterion="natural", tau=0.5)
    with pytest.raises(ValueError, match="criterion must be one of"):
        growth.grow(build(mc), ds, config=cfg, criterion="gradmax")
