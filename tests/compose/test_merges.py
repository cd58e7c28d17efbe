"""DARE, SLERP, Model Stock and sequential (OPCM) merging, against hand computations.

References: task arithmetic (DARE at density 1), the mean over seeds (DARE's expected value),
L1 norms, closed-form angles (SLERP, Model Stock's ratio on offsets at a chosen angle), an
independent numpy SVD (the OPCM projection) and norms (its rescale).
"""
import copy
import math

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import compose
from helpers.perturb import perturbed


@pytest.fixture(scope="module", params=["transformer", "mlp"])
def trio(request):
    if request.param == "transformer":
        cfg = wb.models.TransformerConfig(vocab_size=11, context=8, d_model=16, n_layers=2, n_heads=2, d_mlp=32,
                                          embedding="frozen-random")
    else:
        cfg = wb.models.MLPConfig(d_in=6, n_classes=4, d_model=12, n_layers=2, d_hidden=16)
    base = wb.models.build(cfg).eval()
    return base, perturbed(base, 1), perturbed(base, 2)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ DARE


def test_dare_at_density_one_is_task_arithmetic_exactly(trio):
    base, a, b = trio
    for method in ("dare",):
        merged = compose.merge(method, base, [a, b], density=1.0, scale=0.7, seed=3)
        assert _equal(merged, compose.task_arithmetic(base, [a, b], scale=0.7))


def test_dare_is_seeded_and_unbiased(trio):
    base, a, b = trio
    one = compose.dare(base, [a, b], density=0.3, seed=5)
    assert _equal(one, compose.dare(base, [a, b], density=0.3, seed=5))
    assert not _equal(one, compose.dare(base, [a, b], density=0.3, seed=6))
    taus = compose.task_vectors(base, [a, b])
    ta = {k: taus[0][k] + taus[1][k] for k in taus[0]}
    # kept entries are the task vector's divided by density; about a density fraction is kept
    dropped = compose.merges._dare_vectors(taus, 0.3, "density", 0)
    kept = torch.cat([(d[k] != 0).flatten().float() for d in dropped for k in d])
    assert abs(float(kept.mean()) - 0.3) < 0.03
    for d, t in zip(dropped, taus):
        for k in d:
            nz = d[k] != 0
            assert torch.allclose(d[k][nz], t[k][nz] / 0.3)
    # the mean over many seeds approaches task arithmetic (standard error shrinks as 1/sqrt(seeds))
    n = 200
    mean = {k: torch.zeros_like(v) for k, v in ta.items()}
    for s in range(n):
        for d in compose.merges._dare_vectors(taus, 0.3, "density", s):
            for k in d:
                mean[k] += d[k] / n
    err = torch.cat([(mean[k] - ta[k]).flatten() for k in ta])
    spread = torch.cat([torch.sqrt((taus[0][k] ** 2 + taus[1][k] ** 2) * (1 / 0.3 - 1) / n).flatten() for k in ta])
    assert float((err.abs() / spread.clamp_min(1e-12)).mean()) < 1.0   # |error| ~ 0.8 sigma on average
    flat_ta = torch.cat([v.flatten() for v in ta.values()])
    one = compose.merges._dare_vectors(taus, 0.3, "density", 0)
    one = torch.cat([(one[0][k] + one[1][k]).flatten() for k in ta])
    # relative error: about sqrt((1/density - 1) / n) = 0.11 for the mean, about 1.5 for one draw
    assert float(err.norm() / flat_ta.norm()) < 0.16 < 1.0 < float((one - flat_ta).norm() / flat_ta.norm())


def test_dare_l1_rescale_keeps_each_tensors_l1_norm(trio):
    base, a, b = trio
    taus = compose.task_vectors(base, [a, b])
    dropped = compose.merges._dare_vectors(taus, 0.4, "l1", 1)
    for d, t in zip(dropped, taus):
        for k in t:
            assert math.isclose(float(d[k].abs().sum()), float(t[k].abs().sum()), rel_tol=1e-5)
    kept = torch.cat([(d[k] != 0).flatten().float() for d in dropped for k in d])
    assert 0.3 < float(kept.mean()) < 0.5
    for d, t in zip(compose.merges._dare_vectors(taus, 0.4, "none", 1), taus):
        for k in t:
            nz = d[k] != 0
            assert torch.equal(d[k][nz], t[k][nz])


def test_dare_ties_hand_example():
    # with density 1 nothing is dropped: dare_ties is TIES without trimming (sign election, disjoint mean)
    taus = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}, {"w": torch.tensor([3.0, 1.0, -1.0, -0.25])}]
    dropped = compose.merges._dare_vectors(taus, 1.0, "density", 0)
    out = compose.merges._ties_vector(dropped, 1.0)["w"]
    # signs of the sums: +, -, +, +  -> means over agreeing entries: 2, -2, 3, 0.5
    assert torch.allclose(out, torch.tensor([2.0, -2.0, 3.0, 0.5]))


def test_merge_options_are_validated_by_name(trio):
    base, a, b = trio
    for method, opts, field in (("dare", {"density": 0.0}, "density"), ("dare", {"density": 1.5}, "density"),
                                ("dare_ties", {"rescale": "l2"}, "rescale"), ("dare", {"seed": -1}, "seed"),
                                ("slerp", {"t": 1.5}, "t"), ("slerp", {"t": True}, "t"),
                                ("model_stock", {"per_row": 1}, "per_row"), ("opcm", {"alpha": -0.1}, "alpha")):
        with pytest.raises(ValueError, match=field):
            compose.merge(method, base, [a, b], **opts)
    with pytest.raises(ValueError, match="exactly 2"):
        compose.merge("slerp", base, [a, b, a])
    with pytest.raises(ValueError, match="at least 2"):
        compose.merge("model_stock", base, [a])
    with pytest.raises(ValueError, match="method"):
        compose.sequential(base, [a, b], method="ties")


# ------------------------------------------------------------------ SLERP


def test_slerp_endpoints_norm_and_parallel_fallback(trio):
    base, a, b = trio
    assert _equal(compose.slerp(base, [a, b], t=0.0), a)
    assert _equal(compose.slerp(base, [a, b], t=1.0), b)
    # equal-norm vectors at a known angle: the midpoint has their norm and bisects the angle
    x = torch.tensor([1.0, 0.0, 0.0])
    y = torch.tensor([math.cos(1.0), math.sin(1.0), 0.0])
    mid = compose.slerp_tensor(2 * x, 2 * y, 0.5)
    assert math.isclose(float(mid.norm()), 2.0, rel_tol=1e-6)
    assert torch.allclose(mid, 2 * torch.tensor([math.cos(0.5), math.sin(0.5), 0.0]), atol=1e-6)
    q = compose.slerp_tensor(2 * x, 2 * y, 0.25)   # a quarter of the way: angle 0.25 rad
    assert torch.allclose(q, 2 * torch.tensor([math.cos(0.25), math.sin(0.25), 0.0]), atol=1e-6)
    # nearly parallel (cos > 0.9995): linear interpolation
    z = torch.tensor([1.0, 0.01, 0.0])
    assert torch.allclose(compose.slerp_tensor(x, 3 * z, 0.5), 0.5 * x + 1.5 * z, atol=1e-7)
    # equal tensors (the frozen substrate) stay equal to both
    merged = compose.slerp(base, [a, b], t=0.5)
    compose.check_substrate([merged, a, b])


# ------------------------------------------------------------------ Model Stock


def test_model_stock_ratio_and_merge_on_offsets_at_a_known_angle():
    cfg = wb.models.MLPConfig(d_in=3, n_classes=2, d_model=4, n_layers=1, d_hidden=4)
    base = wb.models.build(cfg).eval()
    angle = math.radians(60)   # cos = 0.5 -> t = 2 * 0.5 / (1 + 0.5) = 2/3
    ms = []
    for sign in (1, -1):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                d = torch.zeros(p.numel())
                d[0], d[-1] = math.cos(angle / 2), sign * math.sin(angle / 2)
                if p.numel() == 1:
                    d[0] = 1.0
                p.add_(0.1 * d.view_as(p))
        ms.append(m)
    merged = compose.model_stock(base, ms)
    sb, s0, s1, sm = (x.state_dict() for x in (base, *ms, merged))
    for k in sb:
        if sb[k].numel() > 1:
            t = 2 / 3
            assert torch.allclose(sm[k], t * (s0[k] + s1[k]) / 2 + (1 - t) * sb[k], atol=1e-6), k
    assert math.isclose(float(compose.model_stock_ratio(0.5, 2)), 2 / 3)
    assert math.isclose(float(compose.model_stock_ratio(0.2, 5)), 5 * 0.2 / (1 + 4 * 0.2))
    assert float(compose.model_stock_ratio(1.0, 3)) == 1.0 and float(compose.model_stock_ratio(-0.3, 3)) == 0.0


def test_model_stock_per_row_uses_each_rows_cosine():
    cfg = wb.models.MLPConfig(d_in=2, n_classes=2, d_model=2, n_layers=1, d_hidden=2)
    base = wb.models.build(cfg).eval()
    key = "readout.weight"
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        a.state_dict()[key].add_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        b.state_dict()[key].add_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))   # row 0 parallel, row 1 orthogonal
    merged = compose.model_stock(base, [a, b], per_row=True).state_dict()[key] - base.state_dict()[key]
    assert torch.allclose(merged, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    whole = compose.model_stock(base, [a, b]).state_dict()[key] - base.state_dict()[key]
    cos = 1 / (math.sqrt(2) * math.sqrt(2))   # flattened offsets (1,0,1,0) and (1,0,0,1)
    t = 2 * cos / (1 + cos)
    assert torch.allclose(whole, t * torch.tensor([[1.0, 0.0], [0.5, 0.5]]), atol=1e-6)


# ------------------------------------------------------------------ OPCM


def test_opcm_projection_is_orthogonal_to_the_top_singular_directions():
    g = torch.Generator().manual_seed(0)
    merged = torch.randn(7, 5, generator=g, dtype=torch.float64)
    tau = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u, s, vh = np.linalg.svd(merged.numpy())   # an independent SVD
    alpha = 0.5
    r = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
    assert r >= 1
    out = compose.opcm_project(tau, merged, alpha).numpy()
    p = u.T @ out @ vh.T
    assert np.allclose(p[:r, :r], 0, atol=1e-10) and np.allclose(np.diag(p), 0, atol=1e-10)
    # the rest of tau is untouched: what was removed and what remains are orthogonal parts of tau
    full = u.T @ tau.numpy() @ vh.T
    keep = np.ones_like(full, dtype=bool)
    keep[:r, :r] = False
    keep[np.arange(5), np.arange(5)] = False
    assert np.allclose(p[keep], full[keep])
    assert math.isclose(np.linalg.norm(tau.numpy()) ** 2, np.linalg.norm(out) ** 2 + (full[~keep] ** 2).sum())


def test_sequential_opcm_rescales_to_the_mean_norm_and_matches_a_hand_step(trio):
    base, a, b = trio
    c = perturbed(base, 3, scale=0.1)
    merged, table = compose.sequential(base, [a, b, c], "opcm", alpha=0.5)
    assert len(merged) == 3 and table.empty
    taus = compose.task_vectors(base, [a, b, c])
    norms = [compose.online._norm(t) for t in taus]
    for n, m in enumerate(merged, 1):
        tv = {k: m.state_dict()[k].float() - base.state_dict()[k].float() for k in taus[0]}
        assert math.isclose(compose.online._norm(tv), sum(norms[:n]) / n, rel_tol=1e-4)
    # step 2 by hand: tau_1 + projected tau_2 (2-D tensors) or tau_2 (others), rescaled
    acc = {k: taus[0][k] + (compose.opcm_project(taus[1][k], taus[0][k], 0.5) if taus[1][k].dim() == 2
                            else taus[1][k]) for k in taus[0]}
    f = (norms[0] + norms[1]) / 2 / compose.online._norm(acc)
    for k in acc:
        assert torch.allclose(merged[1].state_dict()[k], base.state_dict()[k] + f * acc[k], atol=1e-6)
    assert _equal(compose.merge("opcm", base, [a, b, c]), merged[-1])


def test_sequential_average_and_task_arithmetic_with_a_table():
    g = torch.Generator().manual_seed(0)
    ds = wb.data.Dataset("toy", "vector", torch.randn(200, 6, generator=g), torch.arange(200) % 10,
                         torch.randn(100, 6, generator=g), torch.arange(100) % 10, 10, "toy vectors")
    tasks = compose.class_tasks(ds, [[0, 1], [2, 3]])
    assert set(tasks["classes 0,1"].y_val.tolist()) == {0, 1} and tasks["classes 2,3"].n_classes == 10
    base = wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=1, d_hidden=16)).eval()
    ms = {k: perturbed(base, i) for i, k in enumerate(tasks)}
    merged, table = compose.sequential(base, ms, "average", datasets=tasks, max_examples=64)
    assert _equal(merged[0], ms["classes 0,1"]) or all(
        torch.allclose(x, y, atol=1e-6) for x, y in zip(merged[0].state_dict().values(), ms["classes 0,1"].state_dict().values()))
    assert _equal(merged[1], compose.linear(list(ms.values()), base=base)) or all(
        torch.allclose(x, y, atol=1e-6) for x, y in zip(merged[1].state_dict().values(),
                                                         compose.linear(list(ms.values())).state_dict().values()))
    assert table[["n_tasks", "task"]].drop_duplicates().values.tolist() == [
        [1, "classes 0,1"], [2, "classes 0,1"], [2, "classes 2,3"]]
    acc = table[(table.metric == "acc") & (table.n_tasks == 1)]["value"].iloc[0]
    assert math.isclose(acc, wb.evaluate(merged[0], tasks["classes 0,1"], "val", 64)["acc"])
    ta, _ = compose.sequential(base, list(ms.values()), "task_arithmetic", scale=0.5)
    assert _equal(ta[1], compose.task_arithmetic(base, list(ms.values()), scale=0.5))
    with pytest.raises(ValueError, match="datasets"):
        compose.sequential(base, ms, "opcm", datasets=[tasks["classes 0,1"]])


def test_task_cosines_and_sweep(trio):
    base, a, b = trio
    cos = compose.task_cosines(base, [a, b], names=["a", "b"])
    taus = compose.task_vectors(base, [a, b])
    fa, fb = (torch.cat([t[k].flatten() for k in t]) for t in taus)
    ref = float(fa @ fb / (fa.norm() * fb.norm()))
    got = cos.set_index(["a", "b"])["cosine"]
    assert math.isclose(got["a", "b"], ref, rel_tol=1e-5) and math.isclose(got["a", "a"], 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="names"):
        compose.task_cosines(base, [a, b], names=["a"])


def test_figures_draw_the_tables():
    import pandas as pd

    from workbench.figures.compose import cosine_matrix, knob_curve, sequential_curve

    cos = pd.DataFrame({"a": ["x", "x", "y", "y"], "b": ["x", "y", "x", "y"], "cosine": [1.0, 0.25, 0.25, 1.0]})
    heat = cosine_matrix(cos).data[0]
    assert list(heat.x) == ["x", "y"] and [list(r) for r in heat.z] == [[1.0, 0.25], [0.25, 1.0]]
    sweep = pd.DataFrame({"method": "slerp", "knob": "t", "x": [0.0, 0.0, 1.0, 1.0], "domain": ["p", "q", "p", "q"],
                          "metric": "acc", "value": [0.9, 0.1, 0.3, 0.7]})
    fig = knob_curve(sweep)
    assert [t.name for t in fig.data] == ["p", "q", "mean"] and list(fig.data[2].y) == pytest.approx([0.5, 0.5])
    assert fig.layout.xaxis.title.text == "t"
    seq = pd.DataFrame({"method": ["opcm"] * 3 + ["average"] * 3, "n_tasks": [1, 2, 2] * 2,
                        "task": ["a", "a", "b"] * 2, "metric": "acc", "value": [1.0, 0.5, 0.7, 1.0, 0.8, 0.8]})
    fig = sequential_curve(seq)
    assert [t.name for t in fig.data] == ["opcm", "average"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == pytest.approx([1.0, 0.6])
    for f in (cosine_matrix, knob_curve, sequential_curve):
        assert f(None).data == ()
