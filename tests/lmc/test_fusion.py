"""OT fusion, layer-wise LMC (single and cumulative, base A or B) and the first-order barrier estimate."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import lmc, permute

MLP = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=24, n_layers=2, activation="gelu")


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


@pytest.fixture(scope="module")
def khop():
    return wb.data.load("khop", hops=1, nodes=6, n_train=64, n_val=48)


@pytest.fixture(scope="module")
def mlp_pair():
    return wb.models.build(MLP).eval(), wb.models.build(dataclasses.replace(MLP, seed=1)).eval()


@pytest.fixture(scope="module")
def tf_model(khop):
    cfg = wb.models.TransformerConfig(vocab_size=khop.vocab_size, context=khop.seq_len, d_model=16, n_heads=2,
                                      d_mlp=24, n_layers=2)
    return wb.models.build(cfg).eval()


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("family,ground,qk", [("mlp", "activations", "joint"), ("mlp", "weights", "joint"),
                                              ("transformer", "activations", "joint"),
                                              ("transformer", "activations", "separate"),
                                              ("transformer", "weights", "separate")])
def test_emd_fusion_with_a_permuted_copy_computes_the_model(family, ground, qk, mlp_pair, tf_model, digits, khop):
    a, ds = (mlp_pair[0], digits) if family == "mlp" else (tf_model, khop)
    b = permute.permute(a, permute.random_permutation(a, seed=3))
    x = ds.x_val[:64]
    fused = lmc.fuse(a, b, "emd", data=ds, ground=ground, qk=qk)
    torch.testing.assert_close(fused(x), a(x), atol=1e-5, rtol=1e-5)
    vanilla = lmc.fuse(a, b, "vanilla")
    assert (vanilla(x) - a(x)).abs().max() > 1e-2 * a(x).abs().max()   # plain averaging breaks the function


def test_emd_maps_are_the_inverse_permutation(mlp_pair, digits):
    a = mlp_pair[0]
    perm = permute.random_permutation(a, seed=7)
    maps = lmc.transport_maps(a, permute.permute(a, perm), "emd", data=digits)
    for p, t in maps.items():
        n = len(t)
        np.testing.assert_allclose(t.sum(), 1.0, atol=1e-12)
        # B's unit j is A's unit perm[j]: A's unit i goes to the j with perm[j] = i
        np.testing.assert_array_equal(t.argmax(1), torch.argsort(perm[p]).numpy())
        np.testing.assert_allclose(np.sort(t.ravel())[-n:], 1.0 / n)


def test_vanilla_is_the_midpoint_and_sinkhorn_softens_with_reg(mlp_pair, digits):
    a, b = mlp_pair
    v = lmc.fuse(a, b, "vanilla")
    mid = lmc.interpolate(a, b, 0.5)
    for (k, p), q in zip(v.named_parameters(), mid.parameters()):
        torch.testing.assert_close(p, q, msg=k)

    def entropy(t):
        t = t[t > 0]
        return float(-(t * np.log(t)).sum())

    ent = []
    for method, reg in (("emd", 0.08), ("sinkhorn", 0.02), ("sinkhorn", 1.0)):
        t = lmc.transport_maps(a, b, method, reg=reg, data=digits, max_examples=128)["hidden.0"]
        np.testing.assert_allclose(t.sum(0), 1 / len(t), rtol=1e-4)
        np.testing.assert_allclose(t.sum(1), 1 / len(t), rtol=1e-4)
        ent.append(entropy(t))
    assert ent[0] < ent[1] < ent[2] <= np.log(len(t) ** 2) + 1e-9


def test_fusion_refuses_bad_input(mlp_pair, digits):
    a, b = mlp_pair
    with pytest.raises(ValueError, match="method must be one of"):
        lmc.fuse(a, b, "average")
    with pytest.raises(ValueError, match=r"reg must be .*0\.0001"):
        lmc.fuse(a, b, "sinkhorn", reg=0.0, data=digits)
    with pytest.raises(ValueError, match="data must be"):
        lmc.fuse(a, b, "emd")
    with pytest.raises(ValueError, match="ground must be one of"):
        lmc.fuse(a, b, "emd", data=digits, ground="gradients")
    with pytest.raises(ValueError, match="n_layers"):
        lmc.fuse(a, wb.models.build(dataclasses.replace(MLP, n_layers=3)), "vanilla")


# ----------------------------------------------------------------------------- layer-wise


def test_layerwise_endpoints_and_cumulative_equal_the_full_curve(mlp_pair, digits):
    a, b = mlp_pair
    full = lmc.curve(a, b, digits, n_alphas=3, splits=("val",), max_examples=256).set_index("alpha")["loss"]
    single = lmc.layerwise_curves(a, b, digits, n_alphas=3, base="a", max_examples=256)
    assert set(single["base"]) == {"A"} and set(single["direction"]) == {"single"}
    at0 = single[single.alpha == 0.0]["loss"]
    np.testing.assert_allclose(at0, full[0.0], rtol=1e-6)     # alpha 0 with base A is A, whatever the layer
    lb = lmc.layerwise_curves(a, b, digits, n_alphas=3, base="b", max_examples=256)
    np.testing.assert_allclose(lb[lb.alpha == 0.0]["loss"], full[1.0], rtol=1e-6)
    cum = lmc.layerwise_curves(a, b, digits, n_alphas=3, mode="cumulative", base="a", max_examples=256)
    groups = list(lmc.layer_groups(a))
    for direction, whole in (("from input", groups[-1]), ("from output", groups[0])):
        c = cum[(cum.direction == direction) & (cum.group == whole)].set_index("alpha")["loss"]
        np.testing.assert_allclose(c.to_numpy(), full.to_numpy(), rtol=1e-5)
    lw = lmc.layerwise(a, b, digits, n_alphas=3, mode="cumulative", base="b", max_examples=256)
    assert list(lw.columns)[:3] == ["direction", "group", "base"] and set(lw["base"]) == {"B"}
    assert len(lw) == 2 * len(groups) * 4
    with pytest.raises(ValueError, match="mode must be one of"):
        lmc.layerwise(a, b, digits, mode="pairs")
    with pytest.raises(ValueError, match="base must be one of"):
        lmc.layerwise(a, b, digits, base="c")


# ----------------------------------------------------------------------------- barrier estimate


def test_barrier_estimate_on_a_quadratic_is_twice_the_midpoint_excess(mlp_pair):
    a, b = mlp_pair
    g = torch.Generator().manual_seed(0)
    params = dict(a.named_parameters())
    h = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}     # diagonal Hessian, signed
    c = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}

    def quadratic(p):
        return sum((0.5 * h[k].double() * (p[k].double() - c[k].double()) ** 2).sum() for k in p)

    est = lmc.barrier_estimate(a, b, None, loss_fn=quadratic, n_alphas=5).set_index("group")
    groups = {**lmc.layer_groups(a), "all": list(params)}
    for gname, names in groups.items():
        d = {k: (dict(b.named_parameters())[k] - params[k]).detach().double() for k in names}
        dhd = sum(float((h[k].double() * d[k] ** 2).sum()) for k in names)
        assert est.loc[gname, "midpoint"] == pytest.approx(-dhd / 8, rel=1e-4, abs=1e-6)  # by hand
        assert est.loc[gname, "estimate"] == pytest.approx(-dhd / 4, rel=1e-4, abs=1e-6)
        assert est.loc[gname, "estimate"] == pytest.approx(2 * est.loc[gname, "midpoint"], rel=1e-4, abs=1e-6)


def test_barrier_estimate_uses_the_cross_entropy_gradients(mlp_pair, digits):
    a, b = mlp_pair
    est = lmc.barrier_estimate(a, b, digits, max_examples=256, n_alphas=3).set_index("group")
    x, y = digits.x_train[:256], digits.y_train[:256]
    grads = []
    for m in (a, b):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
        m.zero_grad()
    pb = dict(b.named_parameters())
    for gname, names in {**lmc.layer_groups(a), "all": [k for k, _ in a.named_parameters()]}.items():
        ref = sum(float(((grads[0][k] - grads[1][k]) * (pb[k] - p).detach()).sum())
                  for k, p in a.named_parameters() if k in names) / 4
        assert est.loc[gname, "estimate"] == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert (est["barrier"] >= 0).all()


def test_fusion_curve_rows_and_parents(mlp_pair, digits):
    a, b = mlp_pair
    table, maps = lmc.fusion_curve(a, b, digits, regs=[0.05, 1.0], max_examples=128, fit_examples=64)
    assert list(table["method"]) == ["A", "B", "vanilla", "emd", "sinkhorn", "sinkhorn"]
    assert set(maps) == {("vanilla", None), ("emd", None), ("sinkhorn", 0.05), ("sinkhorn", 1.0)}
    assert table.loc[0, "loss"] == pytest.approx(wb.evaluate(a, digits, "val", max_examples=128)["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="regs"):
        lmc.fusion_curve(a, b, digits, regs=[])
