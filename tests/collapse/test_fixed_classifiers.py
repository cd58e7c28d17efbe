"""Fixed classifier heads (simplex ETF, EBV) and the mixup geometry of workbench.collapse (issue 15 C).

References: the simplex ETF Gram written out by hand; EBV against its own definition (unit rows,
pairwise |cos| below the threshold) and, for C = d + 1 at threshold 1/(C-1), against the simplex's
lines (the only solutions, up to row signs); the mixup geometry on a construction with a known
answer (identity features, ETF head: every mix's coordinates and margin computed by hand).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import collapse as co
from workbench.core.models import MLPConfig, build


def _hand_etf_gram(C: int) -> np.ndarray:
    return C / (C - 1) * np.eye(C) - 1.0 / (C - 1) * np.ones((C, C))


@pytest.mark.parametrize("C,d", [(3, 3), (5, 9)])
def test_etf_head_gram_is_the_hand_simplex(C, d):
    w = co.simplex_etf(C, d, seed=2)
    np.testing.assert_allclose((w @ w.T).numpy(), _hand_etf_gram(C), atol=1e-12)
    m = build(MLPConfig(d_in=4, n_classes=C, d_model=d, n_layers=1, d_hidden=8, classifier="etf", seed=2))
    np.testing.assert_allclose(m.readout.weight.double().numpy(), w.numpy(), atol=1e-7)   # same construction
    hg = co.head_gram(m)
    assert hg["kind"] == "etf" and hg["error"] < 1e-6
    np.testing.assert_allclose(hg["target"], _hand_etf_gram(C))
    assert not any(p.requires_grad for p in m.readout.parameters())
    assert m.readout.bias.abs().max() == 0


def test_ebv_rows_unit_and_below_threshold():
    w = co.ebv(20, 8, threshold=0.45, seed=1)
    np.testing.assert_allclose(w.norm(dim=1).numpy(), 1.0, atol=1e-12)
    cos = (w @ w.T).fill_diagonal_(0).abs()
    assert float(cos.max()) <= 0.45
    # a random start does not satisfy it (the descent did the work)
    g = torch.Generator().manual_seed(1)
    r = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=1)
    assert float((r @ r.T).fill_diagonal_(0).abs().max()) > 0.45
    assert torch.equal(w, co.ebv(20, 8, threshold=0.45, seed=1))          # seeded
    assert not torch.equal(w, co.ebv(20, 8, threshold=0.45, seed=2))


def test_ebv_tight_threshold_approaches_the_simplex_lines():
    C, d = 7, 6                                  # C = d + 1, threshold 1/(C-1): only the simplex's lines
    w = co.ebv(C, d, threshold=1.0 / (C - 1), seed=0)
    g = (w @ w.T).numpy()
    assert np.abs(g - np.eye(C)).max() <= 1.0 / (C - 1) + 1e-6
    # flip rows by the sign of the Gram's null vector: the result is the simplex ETF's Gram
    s = np.sign(np.linalg.eigh(g)[1][:, 0])
    target = np.eye(C) - (1 - np.eye(C)) / (C - 1)                         # unit simplex: cos -1/(C-1)
    np.testing.assert_allclose(s[:, None] * g * s[None, :], target, atol=2e-3)


def test_ebv_and_etf_refused_where_impossible():
    with pytest.raises(ValueError, match="threshold must be in"):
        co.ebv(30, 10, threshold=0.1)            # below the Welch bound 0.2626
    with pytest.raises(ValueError, match="ebv_threshold must be at least the Welch bound"):
        MLPConfig(d_in=4, n_classes=30, d_model=10, classifier="ebv", ebv_threshold=0.1).validate()
    with pytest.raises(ValueError, match="needs d_model >= 10"):
        MLPConfig(d_in=4, n_classes=10, d_model=8, classifier="etf").validate()
    with pytest.raises(ValueError, match="classifier"):
        MLPConfig(d_in=4, n_classes=3, classifier="fixed").validate()
    with pytest.raises(ValueError, match="ebv_tau"):
        MLPConfig(d_in=4, n_classes=3, classifier="ebv", ebv_tau=0.0).validate()


def test_ebv_logits_are_cosines_over_tau():
    m = build(MLPConfig(d_in=5, n_classes=4, d_model=16, n_layers=1, d_hidden=8, classifier="ebv", ebv_tau=0.25))
    w = m.readout.weight.detach().double()
    hg = co.head_gram(m)
    assert hg["kind"] == "ebv" and hg["max_abs_cos"] <= 0.05
    np.testing.assert_allclose(w.norm(dim=1).numpy(), 1.0, atol=1e-6)
    f = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    hand = (f.double() / f.double().norm(dim=1, keepdim=True)) @ w.T / 0.25
    np.testing.assert_allclose(m.readout(f).double().numpy(), hand.numpy(), atol=1e-5)


def test_fixed_heads_do_not_train_and_ebv_run_round_trips(store):
    ds = wb.data.load("digits")
    cfg = MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=16, n_layers=1, d_hidden=16,
                    classifier="ebv", ebv_tau=0.2, seed=3)
    model = build(cfg)
    before = {k: v.clone() for k, v in model.readout.state_dict().items()}
    run = wb.train(model, ds, wb.TrainConfig(steps=4, batch_size=32, eval_every=4, seed=0))
    for k, v in model.readout.state_dict().items():
        assert torch.equal(v, before[k])                                     # bitwise unchanged by AdamW
    assert not torch.equal(model.stem.weight, build(cfg).stem.weight)        # the rest trained
    assert model.readout.weight in [p for p in model.substrate_parameters()]  # growth.unfreeze keeps it frozen
    rid = store.save(run)
    back = store.load(rid)
    assert back.model.config.classifier == "ebv" and back.model.config.ebv_tau == 0.2
    assert isinstance(back.model.readout, wb.models.FixedReadout) and back.model.readout.normalize
    assert torch.equal(back.model.readout.weight, run.model.readout.weight)
    assert not any(p.requires_grad for p in back.model.readout.parameters())
    x = ds.x_val[:20]
    run.model.eval(), back.model.eval()
    assert torch.equal(back.model(x), run.model(x))


def test_recipe_classifier_option():
    model, _, _ = co.recipe("digits", classifier="ebv", ebv_threshold=0.1, epochs=1, d_model=32)
    assert model.config.classifier == "ebv" and co.head_gram(model)["max_abs_cos"] <= 0.1
    model, _, _ = co.recipe("digits", etf_classifier=True, epochs=1, d_model=32)
    assert model.config.classifier == "etf"
    with pytest.raises(ValueError, match="apply to classifier='ebv'"):
        co.recipe("digits", classifier="etf", ebv_tau=0.1)
    with pytest.raises(ValueError, match="classifier"):
        co.recipe("digits", classifier="svm")


def _identity_etf_model(C: int = 3, d: int = 6, seed: int = 0):
    """Features = inputs (no blocks, no norm, identity stem); the head a simplex ETF (bias 0)."""
    m = build(MLPConfig(d_in=d, n_classes=C, d_model=d, n_layers=0, norm="none", classifier="etf", seed=seed))
    with torch.no_grad():
        m.stem.weight.copy_(torch.eye(d))
        m.stem.bias.zero_()
    return m


def test_mixup_geometry_on_a_construction():
    m = _identity_etf_model()
    w = m.readout.weight.detach()
    x, y = w.repeat(4, 1), torch.arange(3).repeat(4)          # every example of class c is its row w_c
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    t = co.mixup_geometry(m, x, y, classes=(0, 1, 2), lambdas=lams, n_pairs=3, seed=0)
    assert set(t["pair_kind"]) == {"same", "cross", "classifier"}
    rows = t[t.pair_kind == "classifier"].set_index("class_a")[["x", "y"]].to_numpy()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)     # rows lie in the plane
    np.testing.assert_allclose(rows @ rows.T, _hand_etf_gram(3), atol=1e-6)
    same = t[t.pair_kind == "same"]
    assert len(same) == 3 * 3 * len(lams)
    np.testing.assert_allclose(same["cos"], 1.0, atol=1e-6)                      # aligned whatever lambda
    np.testing.assert_allclose(same["margin"], 1.5, atol=1e-6)                   # 1 - (-1/2)
    cross = t[t.pair_kind == "cross"]
    for (a, b), grp in cross.groupby(["class_a", "class_b"]):
        lam = grp["lam"].to_numpy()
        hand = lam[:, None] * rows[a] + (1 - lam[:, None]) * rows[b]             # along the segment
        np.testing.assert_allclose(grp[["x", "y"]].to_numpy(), hand, atol=1e-6)
        np.testing.assert_allclose(grp["margin"], 1.5 * (2 * lam - 1), atol=1e-6)  # boundary at lambda 1/2
    s = co.mixup_summary(t)
    assert set(s.columns) >= {"pair_kind", "class_a", "class_b", "lam", "x", "y", "cos", "margin", "wins_a"}
    assert len(s) == 6 * len(lams)


def test_mixup_geometry_refuses_bad_arguments():
    m = _identity_etf_model()
    x, y = torch.randn(12, 6), torch.arange(3).repeat(4)
    with pytest.raises(ValueError, match="classes must be 3 distinct"):
        co.mixup_geometry(m, x, y, classes=(0, 0, 1))
    with pytest.raises(ValueError, match=r"lambdas must be 1 to 1001 numbers in \[0, 1\]"):
        co.mixup_geometry(m, x, y, lambdas=[0.5, 1.5])
    with pytest.raises(ValueError, match="n_pairs must be an integer"):
        co.mixup_geometry(m, x, y, n_pairs=0)
    with pytest.raises(ValueError, match="class 2 needs at least 2 examples"):
        co.mixup_geometry(m, x[:5], torch.tensor([0, 1, 0, 1, 2]))
