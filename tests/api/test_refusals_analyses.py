"""Issue 10 (items 6, 11, 14) for the analysis modules: every example of the issue reproduced.

Each bad call must raise ValueError whose message names the argument (and its range); each
good call next to it must still give the known answer, so a check that refuses everything
would fail here too.
"""
import dataclasses

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import collapse, compose, flops, growth, lmc, permute, residual, sampling


@pytest.fixture(scope="module")
def digits():
    ds = wb.data.load("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:200], y_train=ds.y_train[:200],
                               x_val=ds.x_val[:60], y_val=ds.y_val[:60])


@pytest.fixture(scope="module")
def khop():
    return wb.data.load("khop", n_train=40, n_val=20)


def _mlp(seed=0, **kw):
    cfg = dict(d_in=64, n_classes=10, d_model=16, n_layers=2, d_hidden=16, seed=seed)
    return wb.models.build(wb.models.MLPConfig(**{**cfg, **kw})).eval()


def _transformer(seed=0, vocab=19, context=12, **kw):
    cfg = dict(vocab_size=vocab, context=context, d_model=16, n_layers=2, n_heads=2, d_mlp=32, seed=seed)
    return wb.models.build(wb.models.TransformerConfig(**{**cfg, **kw})).eval()


def _tokens(B=4, T=12, V=19, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- residual (item 11)


@pytest.mark.parametrize("fn", [residual.contributions, residual.logit_lens, residual.skip_effects])
@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "2"])
def test_residual_batch_size_is_refused_not_reinterpreted(fn, bad):
    model, x = _transformer(), _tokens()
    _raises(r"batch_size must be an integer >= 1, got", fn, model, x, batch_size=bad)


def test_residual_batch_size_one_equals_unbatched():
    # the known answer: chunking is an implementation detail, every chunk size gives the same table
    model, x = _transformer(), _tokens()
    for fn, cols in ((residual.contributions, ["rel_norm", "cosine"]),
                     (residual.logit_lens, ["kl_to_final", "top1_agree", "loss"])):
        whole = fn(model, x, batch_size=None)[cols].to_numpy()
        ones = fn(model, x, batch_size=1)[cols].to_numpy()
        np.testing.assert_allclose(ones, whole, rtol=1e-5, atol=1e-6)


def test_residual_refuses_float_complex_and_out_of_vocabulary_tokens():
    model, x = _transformer(), _tokens()
    _raises(r"x must hold integer token ids.*float32", residual.contributions, model, x.float())
    _raises(r"x must hold integer token ids.*complex", residual.logit_lens, model, x.to(torch.complex64))
    _raises(r"x must be token ids in \[0, 18\], got 19", residual.contributions, model, x.clamp(max=18) + 1)
    _raises(r"x must be token ids in \[0, 18\], got -1", residual.decompose, model, x - 1)
    _raises(r"context of 12", residual.contributions, model, torch.zeros(1, 13, dtype=torch.long))
    # a vector batch meant for an MLP, given to a Transformer
    _raises(r"x must hold integer token ids for a Transformer", residual.contributions, model, torch.randn(4, 12))


def test_residual_refuses_token_ids_and_wrong_widths_for_an_mlp():
    model = _mlp()
    _raises(r"x must be real floating-point vectors for an MLP", residual.contributions, model,
            torch.zeros(3, 64, dtype=torch.long))
    _raises(r"x must be vectors \(B, 64\)", residual.contributions, model, torch.randn(3, 10))
    _raises(r"x must be finite", residual.contributions, model, torch.full((2, 64), float("nan")))
    _raises(r"x must be real floating-point vectors for an MLP.*complex64", residual.contributions, model,
            torch.randn(2, 64, dtype=torch.complex64))


def test_residual_targets_masks_and_flags():
    model, x = _transformer(), _tokens()
    y = residual.next_token_targets(x)
    ok = residual.logit_lens(model, x, y=y)
    np.testing.assert_allclose(ok.to_numpy(), residual.logit_lens(model, x).to_numpy())  # the default targets
    _raises(r"y must hold integer labels", residual.logit_lens, model, x, y=y.float())
    _raises(r"y must be class indices in \[0, 18\], got -3", residual.logit_lens, model, x, y=y.masked_fill(y == y, -3))
    _raises(r"y must have one target per token", residual.logit_lens, model, x, y=y[:, :5])
    _raises(r"mask must be a bool tensor", residual.contributions, model, x, mask=torch.ones_like(x))
    _raises(r"mask must have shape \(4, 12\)", residual.contributions, model, x,
            mask=torch.ones(4, 3, dtype=torch.bool))
    _raises(r"per_position must be True or False, got 'no'", residual.contributions, model, x, per_position="no")
    _raises(r"per_head must be True or False", residual.decompose, model, x, per_head=1)
    _raises(r"target must be an integer in \[0, 18\], got 19", residual.logit_attribution, model, x, target=19)
    _raises(r"target must be an integer in \[0, 18\], got -1", residual.logit_attribution, model, x, target=-1)
    _raises(r"target must hold integer token ids", residual.logit_attribution, model, x,
            target=torch.zeros(4, 12))
    _raises(r"layers\[\] must be an integer >= 0, got 1.0", wb.hooks.record(model, layers=[1.0]).__enter__)
    _raises(r"layer must be an integer in \[0, 1\], got 2", wb.hooks.adapter(model).skip(2).__enter__)
    # a valid integer target attributes exactly the logits of that token
    df = residual.logit_attribution(model, x, target=3)
    with torch.no_grad():
        logits = model(x)[..., 3]
    sums = df.groupby(["batch", "position"])["attribution"].sum().to_numpy().reshape(logits.shape)
    np.testing.assert_allclose(sums, logits.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- lmc (items 6, 11, 14)


def test_lmc_max_examples_negative_is_refused(digits):
    a, b = _mlp(0), _mlp(1)
    _raises(r"max_examples must be an integer >= 0, got -300", lmc.curve, a, b, digits, n_alphas=3,
            max_examples=-300)
    # the known answer for max_examples=k: the loss of the first k examples only
    c = lmc.curve(a, b, digits, n_alphas=2, splits=("val",), max_examples=7)
    ref = wb.evaluate(a, dataclasses.replace(digits, x_val=digits.x_val[:7], y_val=digits.y_val[:7]), "val")
    assert c.loc[c.alpha == 0, "loss"].item() == pytest.approx(ref["loss"], rel=1e-5)


@pytest.mark.parametrize("bad", [-3, 0, 1, 1002, 10**9, 5.0, True, "25", None])
def test_lmc_n_alphas_bounded(digits, bad):
    a, b = _mlp(0), _mlp(1)
    _raises(r"n_alphas must be an integer in \[2, 1001\]", lmc.curve, a, b, digits, n_alphas=bad)
    _raises(r"n_alphas must be an integer in \[2, 1001\]", lmc.layerwise, a, b, digits, n_alphas=bad)
    _raises(r"n_alphas must be an integer in \[2, 1001\]", lmc.compare, a, b, digits, n_alphas=bad)


def test_lmc_plane_resolution_and_margin_bounded(digits):
    a, b, c = _mlp(0), _mlp(1), _mlp(2)
    for bad in (1, 102, 1000, 3.0):
        _raises(r"resolution must be an integer in \[2, 101\]", lmc.plane, a, b, c, digits, resolution=bad)
    _raises(r"margin must be a finite number in \[0.0, 10.0\]", lmc.plane, a, b, c, digits, margin=float("inf"))
    p = lmc.plane(a, b, c, digits, resolution=2, margin=0.0, max_examples=16)
    assert len(p.grid) == 4


def test_lmc_other_arguments(digits):
    a, b = _mlp(0), _mlp(1)
    _raises(r"splits\[\] must be one of \['train', 'val'\], got 'test'", lmc.curve, a, b, digits, splits=("test",))
    _raises(r"splits must be a non-empty list", lmc.curve, a, b, digits, splits="val")
    _raises(r"alphas\[\] must be a finite number, got nan", lmc.curve, a, b, digits, alphas=[0.0, float("nan")])
    _raises(r"alphas must be a list of 1 to 1001 numbers", lmc.curve, a, b, digits, alphas=list(range(2000)))
    _raises(r"method must be one of \['weights', 'activations'\], got 'bogus'", lmc.align, a, b, method="bogus")
    _raises(r"seed must be an integer in \[0, 4294967295\], got 4294967296", lmc.align, a, b, seed=2**32)
    _raises(r"methods\[\] must be one of", lmc.compare, a, b, digits, methods=("none", "magic"))
    _raises(r"alpha must be a finite number in \[0.0, 1.0\], got 1.5", lmc.repair, a, b, 1.5, digits)
    _raises(r"alpha must be a finite number, got True", lmc.interpolate, a, b, True)
    _raises(r"child_seeds must be a list of two seeds", lmc.instability, a.config, digits, [0],
            wb.TrainConfig(steps=2), child_seeds=(1, 2, 3))
    _raises(r"spawn_steps\[\] must be an integer in \[0, 1\], got 0.5", lmc.instability, a.config, digits, [0.5],
            wb.TrainConfig(steps=2))


def test_lmc_pairing_checked_up_front(digits, khop):
    a = _mlp(0)
    _raises(r"different configs", lmc.curve, a, _mlp(1, d_model=8), digits)
    _raises(r"different configs", lmc.curve, a, _transformer(), digits)
    # a 10-class MLP on k-hop sequences: refused before any forward pass
    _raises(r"sequence", lmc.curve, a, _mlp(1), khop)
    _raises(r"5 classes", lmc.curve, _mlp(0, n_classes=5), _mlp(1, n_classes=5), digits)
    t = _transformer(vocab=khop.vocab_size, context=khop.seq_len)
    _raises(r"vector", lmc.curve, t, _transformer(1, vocab=khop.vocab_size, context=khop.seq_len), digits)
    _raises(r"data must be token ids in \[0, 13\]", lmc.align, t, t, method="activations",
            data=torch.full((2, 5), 20))
    _raises(r"data must be a Dataset or an input tensor", permute.match_activations, t, t, [1, 2])


# ----------------------------------------------------------------------------- collapse (items 11, 14)


def _two_blobs(n=10, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    h = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0 * y[:, None]
    return h, y


def test_collapse_min_count_cannot_fake_perfect_collapse():
    h, y = _two_blobs()
    for bad in (-1, 0, 1, 2.0, True):
        _raises(r"min_count must be an integer >= 2", collapse.metrics, h[:2], y[:2], min_count=bad)
    # two one-sample classes: no within-class spread exists, so no metrics (not nc1 = 0)
    _raises(r"fewer than 2 samples", collapse.metrics, h[:2], y[:2])
    _raises(r"at least 2 classes with at least min_count = 2 samples", collapse.metrics, h[:2], y[:2], min_count=2)
    # min_count drops small classes: equal to the metrics of the data without them
    y3 = y.clone()
    y3[0] = 2
    dropped = collapse.metrics(h, y3, min_count=2)
    keep = y3 != 2
    ref = collapse.metrics(h[keep], y3[keep])
    assert dropped["n_classes"] == 2 and dropped["nc1"] == pytest.approx(ref["nc1"])


def test_collapse_refuses_negative_float_and_complex_inputs():
    h, y = _two_blobs()
    W = torch.randn(2, 6, dtype=torch.float64)
    neg = y.clone()
    neg[0] = -1
    _raises(r"labels must be class indices in \[0\], got -1|labels must be class indices", collapse.metrics, h, neg,
            classifier=W)
    _raises(r"labels must be integers", collapse.metrics, h, y.double())
    _raises(r"features must be a real floating-point tensor, got dtype torch.complex128", collapse.metrics,
            h.to(torch.complex128), y)
    _raises(r"features must be a real floating-point tensor", collapse.metrics, h.long(), y)
    _raises(r"classifier weight must be a real floating-point tensor", collapse.metrics, h, y,
            classifier=W.to(torch.complex128))
    _raises(r"predictions must be integers", collapse.metrics, h, y, predictions=y.double())
    _raises(r"global_mean must be one of", collapse.metrics, h, y, global_mean="median")
    _raises(r"divide_by_classes must be True or False", collapse.metrics, h, y, divide_by_classes="no")


def test_collapse_pairing_of_features_labels_and_classifier():
    h, y = _two_blobs()
    _raises(r"labels must be 1-D with one entry per sample \(10\)", collapse.metrics, h, y[:-1])
    _raises(r"classifier has 3 input dims, features have 6", collapse.metrics, h, y,
            classifier=torch.randn(2, 3, dtype=torch.float64))
    _raises(r"classifier has 1 rows but labels go up to 1", collapse.metrics, h, y,
            classifier=torch.randn(1, 6, dtype=torch.float64))
    _raises(r"classifier bias must have one entry per classifier row", collapse.metrics, h, y,
            classifier=(torch.randn(2, 6, dtype=torch.float64), torch.zeros(3)))
    _raises(r"n_classes must be an integer in \[2, 100000\]", collapse.metrics, h, y, n_classes=1)


def test_collapse_collect_checks_the_model(digits):
    model = _mlp()
    _raises(r"x must be vectors \(N, 64\)", collapse.collect, model, torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    _raises(r"y must be class indices in \[0, 9\], got 10", collapse.collect, model, digits.x_train[:3],
            torch.tensor([1, 2, 10]))
    _raises(r"site_names: no hook site", collapse.collect, model, digits.x_train[:3], digits.y_train[:3], ["nope"])
    _raises(r"batch_size must be an integer >= 1", collapse.collect, model, digits.x_train[:3], digits.y_train[:3],
            batch_size=0)
    _raises(r"n_classes must be an integer in \[2, 100000\], got 0", collapse.simplex_etf, 0, 4)
    _raises(r"dim must be an integer in \[3, ", collapse.simplex_etf, 3, 10**9)
    _raises(r"every must be an integer in \[1, 1000000\], got 0.5", collapse.track, every=0.5)
    _raises(r"minority_ratio must be a finite number in \(0.0, 1.0\]", collapse.imbalanced_counts, [5, 5], 0.0, 1)
    _raises(r"n_per_class\[\] must be an integer >= 1, got 2.5", collapse.imbalanced_counts, [5, 2.5], 0.5, 1)


# ----------------------------------------------------------------------------- sweep sizes (item 6)


def test_growth_sizes_bounded(digits):
    _raises(r"depth_sweep: datasets x seeds x depths = 1 x 16 x 17 = 272 runs; at most 256",
            growth.depth_sweep, digits, list(range(17)), seeds=list(range(16)))
    _raises(r"depths must be a non-empty list of integers in \[0, 256\]", growth.depth_sweep, digits, [257])
    _raises(r"seeds must be a list of 1 to 16 seeds", growth.depth_sweep, digits, [1], seeds=[])
    model = _mlp(n_layers=2)
    _raises(r"factor must be an integer in \[1, 128\], got 129", growth.stack, model, 129)
    _raises(r"stage 0 \(add_layer\): n must be an integer in \[1, 254\]", growth.check_schedule,
            [{"op": "add_layer", "n": 255}], 2)
    _raises(r"stage 0 \(stack\): factor must be an integer in \[1, 128\]", growth.check_schedule,
            [{"op": "stack", "factor": 1000}], 2)
    _raises(r"fade_steps must be an integer in \[1, 10000000\], got -5", growth.add_layer, model, "zero",
            fade_steps=-5)
    _raises(r"preset must be one of", growth.preset, "tallest")
    _raises(r"target must be a finite number, got nan", growth.flops_to_reach,
            __import__("pandas").DataFrame(columns=["step", "split", "metric", "value", "flops"]), float("nan"))
    assert len(model.blocks) == 2   # nothing was grown by the refused calls


def test_grow_checks_the_pairing_before_training(khop):
    model = _mlp()
    _raises(r"sequence", growth.grow, model, khop, [growth.Stage("train", 1)])
    assert len(model.blocks) == 2


# ----------------------------------------------------------------------------- compose, sampling, flops


def test_compose_sampling_flops_arguments(digits, khop):
    t = _transformer(vocab=khop.vocab_size, context=khop.seq_len)
    u = _transformer(1, vocab=khop.vocab_size, context=khop.seq_len)
    _raises(r"weights\[\] must be a finite number, got True", compose.LogitMixture, [t, u], weights=[True, 1.0])
    _raises(r"weights must be 2 numbers", compose.LogitMixture, [t, u], weights=[1.0])
    _raises(r"density must be a finite number in \(0.0, 1.0\], got 0", compose.ties, t, [u], density=0)
    _raises(r"scale must be a finite number", compose.task_arithmetic, t, [u], scale=float("inf"))
    _raises(r"merged must be one of", compose.lines, t, [u], merged="mean")
    _raises(r"method must be one of", compose.merge, "soup", t, [u])
    _raises(r"sequence|vector", compose.evaluate, {"t": t}, datasets={"digits": digits})
    _raises(r"split must be one of", compose.evaluate, {"t": t}, datasets={"k": khop}, split="test")
    prompt = torch.tensor([1, 2])
    _raises(r"prompt must hold integer token ids", sampling.generate, t, prompt.float(), 3)
    _raises(r"prompt must be token ids in \[0, 13\], got 99", sampling.generate, t, torch.tensor([99]), 3)
    _raises(r"max_new_tokens must be an integer in \[0, 100000\], got 2.0", sampling.generate, t, prompt, 2.0)
    _raises(r"top_k must be an integer in \[1, 14\], got 0", sampling.generate, t, prompt, 3, top_k=0)
    _raises(r"temperature must be a finite number", sampling.generate, t, prompt, 3, temperature=float("nan"))
    _raises(r"per_example must be a finite number in \(0.0, ", flops.steps_for_budget, 100.0, 0.0, 10, 2)
    _raises(r"batch_size must be an integer in \[1, ", flops.step_flops, t, 0)
    _raises(r"steps must be an integer >= 0, got -1", flops.examples_seen, -1, 10, 2)
    assert flops.examples_seen(3, 10, 4) == 10   # 4 + 4 + 2 (the short last batch of an epoch)
