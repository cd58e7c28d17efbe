"""Neural-collapse metrics against exact constructions and a direct numpy transcription of the formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ortho_group

import workbench as wb
from workbench import collapse

# ----------------------------------------------------------------------------- references


def reference(h, y, W=None, b=None, global_mean="classes", within="samples"):
    """Papyan et al. (2020) written out with d x d matrices, as a reader would from the paper."""
    h = np.asarray(h, dtype=np.float64)
    classes = np.unique(y)
    C, N = len(classes), len(h)
    M = np.stack([h[y == c].mean(0) for c in classes])                        # (C, d)
    mu_g = M.mean(0) if global_mean == "classes" else h.mean(0)
    if within == "samples":
        Sw = sum((h[y == c] - M[i]).T @ (h[y == c] - M[i]) for i, c in enumerate(classes)) / N
    else:
        Sw = sum(np.cov((h[y == c]).T, bias=True) for c in classes) / C
    Mc = M - mu_g
    Sb = Mc.T @ Mc / C
    evals, evecs = np.linalg.eigh(Sb)
    top = np.argsort(evals)[::-1][:C - 1]
    Sb_pinv = evecs[:, top] @ np.diag(1 / evals[top]) @ evecs[:, top].T    # rank C-1 pseudo-inverse
    out = {"nc1": np.trace(Sw @ Sb_pinv) / C}
    norms = np.linalg.norm(Mc, axis=1)
    out["nc2_equinorm"] = norms.std(ddof=1) / norms.mean()
    cos = (Mc / norms[:, None]) @ (Mc / norms[:, None]).T
    off = ~np.eye(C, dtype=bool)
    out["nc2_equiangular"] = np.abs(cos[off] + 1 / (C - 1)).mean()
    out["etf_error"] = np.linalg.norm(cos / np.linalg.norm(cos) - (np.eye(C) - 1 / C) / np.sqrt(C - 1))
    V = np.array([((h[y == c] - M[i]) ** 2).sum(1).mean() for i, c in enumerate(classes)])
    pairs = [(V[i] + V[j]) / (2 * np.sum((M[i] - M[j]) ** 2)) for i in range(C) for j in range(i + 1, C)]
    out["cdnv"] = np.mean(pairs)
    dist = ((h[:, None, :] - M[None]) ** 2).sum(-1)
    ncc = classes[dist.argmin(1)]
    out["ncc_error"] = np.mean(ncc != y)
    if W is not None:
        Wc = np.asarray(W, dtype=np.float64)[classes]
        wn = np.linalg.norm(Wc, axis=1)
        out["nc2_equinorm_w"] = wn.std(ddof=1) / wn.mean()
        wcos = (Wc / wn[:, None]) @ (Wc / wn[:, None]).T
        out["nc2_equiangular_w"] = np.abs(wcos[off] + 1 / (C - 1)).mean()
        out["nc3"] = np.linalg.norm(Wc.T / np.linalg.norm(Wc) - Mc.T / np.linalg.norm(Mc)) ** 2
        logits = h @ np.asarray(W, dtype=np.float64).T + (0 if b is None else np.asarray(b))
        out["nc4"] = np.mean(ncc != logits.argmax(1))
    return out


def etf_features(C=10, d=32, per_class=20, scale=3.0, seed=0):
    """Features sitting exactly on a simplex ETF (no within-class spread), and the ETF itself."""
    etf = collapse.simplex_etf(C, d, seed=seed).double() * scale               # (C, d)
    y = torch.arange(C).repeat_interleave(per_class)
    return etf[y], y, etf


def noisy(C=5, d=12, n=200, seed=0, imbalance=None):
    rng = np.random.default_rng(seed)
    counts = imbalance or [n // C] * C
    y = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
    centres = rng.normal(size=(C, d)) * 2
    h = centres[y] + rng.normal(size=(len(y), d)) * rng.uniform(0.3, 1.5, size=(len(y), 1))
    W = rng.normal(size=(C, d))
    b = rng.normal(size=C)
    return h, y, W, b


# ----------------------------------------------------------------------------- exact constructions


def test_perfect_simplex_etf_gives_zero_collapse_metrics():
    h, y, etf = etf_features()
    m = collapse.metrics(h, y, classifier=etf)
    for key in ["nc1", "nc2_equinorm", "nc2_equiangular", "nc2_equinorm_w", "nc2_equiangular_w", "etf_error",
                "nc3", "nc4", "ncc_error", "cdnv"]:
        assert abs(m[key]) < 1e-10, (key, m[key])
    assert m["n_classes"] == 10 and m["n_samples"] == 200


def test_simplex_etf_geometry():
    E = collapse.simplex_etf(7, 16, seed=3).double()
    G = E @ E.T
    assert torch.allclose(torch.diag(G), torch.ones(7, dtype=torch.float64), atol=1e-6)
    off = G[~torch.eye(7, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 6), atol=1e-6)
    with pytest.raises(ValueError, match="dim >= 7"):
        collapse.simplex_etf(7, 5)


def test_no_collapse_is_far_from_zero():
    h, y, W, _ = noisy()
    m = collapse.metrics(h, y, classifier=W)
    assert m["nc1"] > 0.05 and m["nc3"] > 0.1 and m["etf_error"] > 0.1


def test_nc1_is_trace_ratio_for_two_classes():
    """Two classes in 1-D: Sigma_B = (delta/2)^2 and NC1 = within variance / Sigma_B / 2 (by hand)."""
    h = np.array([[0.0], [2.0], [10.0], [12.0]])
    y = np.array([0, 0, 1, 1])
    # means 1 and 11, mu_G = 6, Sigma_B = 25, Sigma_W = 1, NC1 = (1/25)/2
    assert collapse.metrics(h, y)["nc1"] == pytest.approx(0.02)


# ----------------------------------------------------------------------------- invariances


def test_invariant_to_rotation_and_scale():
    h, y, W, _ = noisy(d=12)
    Q = ortho_group.rvs(12, random_state=1)
    base = collapse.metrics(h, y, classifier=W)
    moved = collapse.metrics(7.5 * h @ Q, y, classifier=W @ Q * 0.3)
    for key in collapse.NC_METRICS:
        assert moved[key] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key


# ----------------------------------------------------------------------------- against the numpy transcription


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("global_mean", ["classes", "samples"])
@pytest.mark.parametrize("within", ["samples", "classes"])
def test_agrees_with_numpy_transcription(seed, global_mean, within):
    h, y, W, b = noisy(seed=seed, imbalance=[60, 40, 25, 10, 5] if seed == 2 else None)
    ref = reference(h, y, W, b, global_mean=global_mean, within=within)
    got = collapse.metrics(torch.tensor(h, dtype=torch.float32), torch.tensor(y), classifier=(W, b),
                           global_mean=global_mean, within=within)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("within", ["samples", "classes"])
def test_class_stats_against_numpy_covariances(within):
    """The accumulated statistics, each against its d x d textbook form: Sigma_B's spectrum, the
    within-class variance along its eigenvectors, per-class spreads, nearest centres."""
    h, y, W, b = noisy(C=4, d=7, seed=5, imbalance=[30, 20, 12, 6])
    s = collapse.class_stats(h, y, (W, b), within=within)
    classes = np.unique(y)
    M = np.stack([h[y == c].mean(0) for c in classes])
    Mc = M - M.mean(0)
    Sb = Mc.T @ Mc / len(classes)
    if within == "samples":
        Sw = sum((h[y == c] - M[i]).T @ (h[y == c] - M[i]) for i, c in enumerate(classes)) / len(h)
    else:
        Sw = sum(np.cov(h[y == c].T, bias=True) for c in classes) / len(classes)
    evals, evecs = np.linalg.eigh(Sb)
    top = np.argsort(evals)[::-1][:len(classes) - 1]
    np.testing.assert_allclose(s.between_eigvals.numpy(), evals[top], rtol=1e-10)
    # eigenvectors up to sign: compare v^T Sigma_W v, which does not see the sign
    np.testing.assert_allclose(s.within_proj.numpy(), np.einsum("dk,de,ek->k", evecs[:, top], Sw, evecs[:, top]),
                               rtol=1e-9)
    np.testing.assert_allclose(s.counts.numpy(), [30, 20, 12, 6])
    np.testing.assert_allclose(s.means.numpy(), M, rtol=1e-12)
    np.testing.assert_allclose(s.centred.numpy(), Mc, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.class_var.numpy(),
                               [((h[y == c] - M[i]) ** 2).sum(1).mean() for i, c in enumerate(classes)], rtol=1e-9)
    nearest = classes[((h[:, None] - M[None]) ** 2).sum(-1).argmin(1)]
    assert np.array_equal(s.nearest.numpy(), nearest)
    np.testing.assert_allclose(s.logits.numpy(), h @ W.T + b, rtol=1e-10)
    assert (s.n_classes, s.n_samples) == (4, 68)
    with pytest.raises(ValueError, match="within must be one of"):
        collapse.class_stats(h, y, within="nope")


def test_divide_by_classes_option_and_d_smaller_than_classes():
    h, y, W, _ = noisy(C=6, d=3, n=300, seed=4)       # d < C - 1: Sigma_B has rank d
    m = collapse.metrics(h, y)
    raw = collapse.metrics(h, y, divide_by_classes=False)
    assert raw["nc1"] == pytest.approx(6 * m["nc1"])
    assert np.isfinite(m["nc1"])


def test_imbalanced_means_convention():
    """Under imbalance the two global-mean conventions differ; balanced they agree."""
    h, y, _, _ = noisy(imbalance=[100, 50, 20, 10, 5], seed=3)
    a = collapse.metrics(h, y, global_mean="classes")["nc2_equinorm"]
    b = collapse.metrics(h, y, global_mean="samples")["nc2_equinorm"]
    assert a != pytest.approx(b)
    h, y, _, _ = noisy(seed=3)
    assert collapse.metrics(h, y, global_mean="classes")["nc1"] == pytest.approx(
        collapse.metrics(h, y, global_mean="samples")["nc1"])


def test_nc4_uses_given_predictions():
    h, y, etf = etf_features(C=4, d=8, per_class=5)
    wrong = (y + 1) % 4
    assert collapse.metrics(h, y, predictions=wrong)["nc4"] == 1.0
    assert math.isnan(collapse.metrics(h, y)["nc4"])


# ----------------------------------------------------------------------------- errors


def test_class_with_one_sample_raises_clear_error():
    h, y, _, _ = noisy()
    y = y.copy()
    y[0] = 7  # a class with a single sample
    with pytest.raises(ValueError, match=r"fewer than 2 samples.*\{7: 1\}"):
        collapse.metrics(h, y)
    assert collapse.metrics(h, y, min_count=2)["n_classes"] == 5   # opt-in: drop it


def test_missing_class_raises_clear_error():
    h, y, _, _ = noisy()
    keep = y != 2
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        collapse.metrics(h[keep], y[keep], n_classes=5)
    assert collapse.metrics(h[keep], y[keep])["n_classes"] == 4   # classes present only


@pytest.mark.parametrize("bad, match", [
    (lambda h, y: (h[:, 0], y), "2-D"),
    (lambda h, y: (h, y[:-1]), "one entry per sample"),
    (lambda h, y: (h, y.astype(float)), "integers"),
    (lambda h, y: (np.where(np.arange(len(h))[:, None] == 3, np.nan, h), y), "NaN"),
    (lambda h, y: (h, np.zeros_like(y)), "at least 2 classes"),
])
def test_bad_inputs_raise(bad, match):
    h, y, _, _ = noisy()
    with pytest.raises(ValueError, match=match):
        collapse.metrics(*bad(h, y))


def test_classifier_shape_mismatch_raises():
    h, y, W, _ = noisy()
    with pytest.raises(ValueError, match="input dims"):
        collapse.metrics(h, y, classifier=W[:, :3])


# ----------------------------------------------------------------------------- geometry helpers


def test_simplex_view_overlays_a_perfect_simplex():
    _, _, etf = etf_features(C=6, d=20)
    view = collapse.simplex_view(etf.numpy() + 5.0)            # offset: the view centres the means
    means = view[view.kind == "means"][["pc1", "pc2", "pc3"]].to_numpy()
    ideal = view[view.kind == "simplex"][["pc1", "pc2", "pc3"]].to_numpy()
    assert np.allclose(means, ideal, atol=1e-8)
    assert list(view.columns) == ["kind", "class", "pc1", "pc2", "pc3"]


def test_simplex_view_of_random_means_is_not_the_simplex():
    rng = np.random.default_rng(0)
    view = collapse.simplex_view(rng.normal(size=(6, 20)))
    a = view[view.kind == "means"][["pc1", "pc2", "pc3"]].to_numpy()
    b = view[view.kind == "simplex"][["pc1", "pc2", "pc3"]].to_numpy()
    assert np.abs(a - b).max() > 0.1


def test_minority_collapse_of_etf_and_of_parallel_rows():
    E = collapse.simplex_etf(5, 8)
    assert collapse.minority_collapse(E, [3, 4]) == pytest.approx(-0.25, abs=1e-6)
    W = E.clone()
    W[4] = W[3] * 2
    assert collapse.minority_collapse(W, [3, 4]) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- models, layers, tracking


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


def test_layer_metrics_one_row_per_layer_and_metric(digits):
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=32, n_layers=2, d_hidden=32))
    df = collapse.layer_metrics(model, digits.x_train, digits.y_train, n_classes=10)
    assert set(df.columns) == {"layer", "site", "metric", "value"}
    assert list(df.drop_duplicates("layer")["site"]) == ["blocks.0.resid_pre", "blocks.0.resid_post",
                                                         "blocks.1.resid_post", "features"]
    nc3 = df[df.metric == "nc3"].set_index("site")["value"]
    assert np.isnan(nc3["blocks.1.resid_post"]) and np.isfinite(nc3["features"])
    # the features site equals metrics() on the hooked readout input
    with torch.no_grad():
        model.eval()
        feats = model.final_norm(model.blocks[1](model.blocks[0](model.embed(digits.x_train))))
    direct = collapse.metrics(feats, digits.y_train, model.readout)
    got = df[df.site == "features"].set_index("metric")["value"]
    assert got["nc1"] == pytest.approx(direct["nc1"], rel=1e-6)
    assert got["nc4"] == pytest.approx(direct["nc4"])


def test_collect_uses_scored_positions_of_sequences():
    ds = wb.data.load("modadd", p=7, train_fraction=0.9)
    model = wb.models.build(wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=4, d_model=16,
                                                        n_layers=1, n_heads=2, d_mlp=32))
    feats, labels, preds = collapse.collect(model, ds.x_train, ds.y_train, ["features", "blocks.0.resid_post"])
    assert feats["features"].shape == (len(ds.x_train), 16)      # one scored position per sequence
    assert torch.equal(labels, ds.y_train[:, -1])
    with torch.no_grad():
        logits = model(ds.x_train)
    assert torch.equal(preds, logits[:, -1].argmax(-1))
    df = collapse.layer_metrics(model, ds.x_train, ds.y_train)
    assert df[df.metric == "n_classes"]["value"].iloc[0] == 7


def test_track_records_every_epoch_and_layer(digits):
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=32, n_layers=2, d_hidden=32))
    tracker = collapse.track(every=1, max_samples=300)
    steps_per_epoch = math.ceil(len(digits.x_train) / 256)
    run = wb.train(model, digits, wb.TrainConfig(steps=3 * steps_per_epoch, batch_size=256, eval_every=1000),
                   callbacks=[tracker])
    t = tracker.table
    assert sorted(t["epoch"].unique()) == [0.0, 1.0, 2.0, 3.0]
    assert set(t["layer"].unique()) == {0, 1, 2, 3}
    assert set(collapse.NC_METRICS) <= set(t["metric"])
    # the rows also land in the run's metrics (and so in the store)
    nc = run.metrics[run.metrics["metric"] == "nc1"]
    assert len(nc) == 4 * 4
    assert tracker.latest["means"].shape == (10, 32)
    assert model.training is False  # train() leaves eval mode; the tracker restores what it found


def test_track_leaves_training_mode_and_gradients_alone(digits):
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, n_layers=1, d_hidden=16))
    tracker = collapse.track()
    state = wb.training.TrainState(model, digits, wb.TrainConfig(), wb.training.make_optimizer(model, wb.TrainConfig()))
    model.train()
    tracker.on_start(state)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_subsample_and_imbalanced_counts(digits):
    per_class = torch.bincount(digits.y_train).tolist()
    counts = collapse.imbalanced_counts(per_class, 0.1, n_minority=5)
    assert counts[:5] == per_class[:5] and counts[5:] == [round(c * 0.1) for c in per_class[5:]]
    small = collapse.subsample(digits, counts, seed=0)
    assert torch.bincount(small.y_train).tolist() == counts
    assert torch.equal(small.x_val, digits.x_val)
    assert small.options["class_counts"] == counts
    with pytest.raises(ValueError, match=r"counts\[0\]"):
        collapse.subsample(digits, [10_000] + counts[1:])
    with pytest.raises(ValueError, match="minority_ratio"):
        collapse.imbalanced_counts(per_class, 0.0, 5)


def test_etf_classifier_is_fixed_during_training(digits):
    model, cfg, ds = collapse.recipe("digits", etf_classifier=True, epochs=2, d_model=16, n_layers=1)
    before = model.readout.weight.detach().clone()
    wb.train(model, ds, cfg)
    assert torch.equal(model.readout.weight, before)
    assert torch.all(model.readout.bias == 0)
    G = before @ before.T
    assert torch.allclose(G[~torch.eye(10, dtype=bool)], torch.full((90,), -1 / 9), atol=1e-5)


def test_mixup_loss_is_cross_entropy_against_mixed_targets():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    seen = []
    value = collapse.MixupLoss(alpha=0.4, seed=5)(lambda inp: seen.append(inp) or model(inp), x, y)
    lam, perm = collapse.MixupLoss(alpha=0.4, seed=5).draw(len(x))          # same seed: same draw
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(seen[0], lam * x + (1 - lam) * x[perm])
    soft = lam * F.one_hot(y, 3) + (1 - lam) * F.one_hot(y[perm], 3)        # torch's soft-target CE as reference
    expected = F.cross_entropy(model(seen[0]), soft.float())
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        collapse.MixupLoss(alpha=0)


def test_train_collapse_with_mixup_trains():
    run = collapse.train_collapse("digits", mixup=0.2, epochs=2, every=1, d_model=16, n_layers=1)
    assert run.status == "completed" and (run.metrics["metric"] == "nc1").any()


def test_mixup_lambda_follows_beta():
    loss = collapse.MixupLoss(alpha=0.4, seed=0)
    lams = np.array([loss.draw(2)[0] for _ in range(4000)])
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / (4 * (2 * 0.4 + 1)), rel=0.1)   # Beta(a, a) variance


def test_recipe_takes_its_defaults_from_recipes_collapse(digits):
    assert collapse.RECIPE_NAMES == ("digits", "mnist1d") and not hasattr(collapse, "_RECIPES")
    model, cfg, ds = collapse.recipe("digits", epochs=3, d_model=16, seed=2, eval_every_epochs=1)
    per_epoch = math.ceil(len(ds.x_train) / 64)           # the digits preset: batches of 64
    assert (model.config.d_model, model.config.n_layers, model.config.d_hidden, model.config.seed) == (16, 3, 256, 2)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.eval_every, cfg.seed) == (
        3 * per_epoch, 64, 1e-3, 5e-2, "constant", per_epoch, 2)
    preset = wb.recipes.COLLAPSE["digits"]
    assert cfg == preset.__class__(**{**vars(preset), "epochs": 3}).train_config(len(ds.x_train), 1, 2)
    with pytest.raises(ValueError, match=r"dataset_name: recipes exist for \['digits', 'mnist1d'\], got 'cifar'"):
        collapse.recipe("cifar")


def test_collect_leaves_no_hooks(digits):
    model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, n_layers=1, d_hidden=16))
    collapse.collect(model, digits.x_train[:8], digits.y_train[:8], ["features", "blocks.0.resid_post"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_recipe_reaches_terminal_phase_on_digits():
    tracker = collapse.track(every=5, layers=False)
    model, cfg, ds = collapse.recipe("digits", epochs=20)
    wb.train(model, ds, cfg, callbacks=[tracker])
    t = tracker.table
    acc = t[t.metric == "train_acc"].set_index("epoch")["value"]
    nc1 = t[t.metric == "nc1"].set_index("epoch")["value"]
    assert (acc.loc[10:] == 1.0).all()                          # zero training error, then more training
    assert nc1.loc[20] < nc1.loc[10] < nc1.loc[0] / 5           # NC1 keeps falling in the terminal phase
