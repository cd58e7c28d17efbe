"""Permutation symmetries: applying a permutation keeps the function; matching recovers a permuted copy."""
import itertools

import pytest
import torch

import workbench as wb
from workbench import permute as P

MLP_CONFIGS = [wb.models.MLPConfig(d_in=12, n_classes=5, d_model=16, d_hidden=24, n_layers=2, norm=n)
               for n in ("pre", "peri", "none")]
TF_CONFIGS = [wb.models.TransformerConfig(vocab_size=11, context=9, d_model=16, n_heads=4, d_mlp=24, n_layers=2,
                                          norm=n, tie_embeddings=t) for n in ("pre", "peri") for t in (False, True)]
CONFIGS = MLP_CONFIGS + TF_CONFIGS
IDS = [f"{c.family}-{c.norm}" + ("-tied" if getattr(c, "tie_embeddings", False) else "") for c in CONFIGS]


def _inputs(cfg, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if cfg.family == "mlp":
        return torch.randn(n, cfg.d_in, generator=g)
    return torch.randint(0, cfg.vocab_size, (n, cfg.context), generator=g)


def _same_weights(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_random_permutation_keeps_function(cfg):
    model = wb.models.build(cfg).eval()
    permuted = P.permute(model, P.random_permutation(model, seed=1))
    x = _inputs(cfg)
    assert not _same_weights(model, permuted)
    torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_permuted_copy_is_recovered_exactly(cfg, method):
    model = wb.models.build(cfg).eval()
    permuted = P.permute(model, P.random_permutation(model, seed=2))
    if method == "weights":
        perm, info = P.match_weights(model, permuted, seed=0)
        assert info["sweeps"] <= 3
    else:
        perm, _ = P.match_activations(model, permuted, _inputs(cfg, 256))
    assert _same_weights(P.permute(permuted, perm), model)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_alignment_preserves_function_of_an_independent_model(cfg, method):
    import dataclasses

    a = wb.models.build(cfg).eval()
    b = wb.models.build(dataclasses.replace(cfg, seed=7)).eval()
    x = _inputs(cfg)
    aligned = wb.lmc.align(a, b, method=method, data=x)
    assert not _same_weights(aligned, b)
    assert (aligned(x) - b(x)).abs().max().item() <= 1e-5


def test_heads_move_as_whole_heads():
    cfg = TF_CONFIGS[0]
    a, b = wb.models.build(cfg), wb.models.build(wb.models.TransformerConfig(**{**cfg.__dict__, "seed": 3}))
    perm, _ = P.match_weights(a, b)
    D = cfg.d_model // cfg.n_heads
    for i in range(cfg.n_layers):
        for p in (f"qk.{i}", f"vo.{i}"):
            heads = (perm[p] // D).view(cfg.n_heads, D)
            assert (heads == heads[:, :1]).all(), "a head's dimensions must stay together"
        # q/k and v/o share the head assignment
        assert torch.equal(perm[f"qk.{i}"].view(cfg.n_heads, D)[:, 0] // D, perm[f"vo.{i}"].view(cfg.n_heads, D)[:, 0] // D)


def _objective(a, b, perm):
    spec = P.perm_spec(a)
    va, vb = P._view(a), P._view(b)
    return sum(float((va[k].double() * P._permuted(vb[k].double(), spec.axes[k], perm)).sum()) for k in spec.axes)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_weight_matching_ends_at_a_coordinatewise_optimum_checked_by_brute_force(seed):
    """Reference: enumerate every permutation of one unit (4! each) with the others held at the answer.

    Weight matching is coordinate descent, so what it guarantees is that no single
    permutation can be improved alone; the brute force checks that without the LSA solver.
    """
    cfg = wb.models.MLPConfig(d_in=3, n_classes=2, d_model=4, d_hidden=4, n_layers=2, norm="none")
    a, b = wb.models.build(cfg), wb.models.build(wb.models.MLPConfig(**{**cfg.__dict__, "seed": seed}))
    perm, info = P.match_weights(a, b)
    found = _objective(a, b, perm)
    assert info["objective"] == pytest.approx(found, rel=1e-9)
    assert found >= _objective(a, b, P.identity_permutation(a)) - 1e-12
    for unit in perm:
        best = max(_objective(a, b, {**perm, unit: torch.tensor(q)}) for q in itertools.permutations(range(4)))
        assert found == pytest.approx(best, rel=1e-9), unit


def test_identity_start_is_available_and_never_worse_than_identity():
    a = wb.models.build(MLP_CONFIGS[0])
    b = wb.models.build(wb.models.MLPConfig(**{**MLP_CONFIGS[0].__dict__, "seed": 4}))
    perm, _ = P.match_weights(a, b, init="identity")
    assert _objective(a, b, perm) >= _objective(a, b, P.identity_permutation(a))
    with pytest.raises(ValueError, match="init"):
        P.match_weights(a, b, init="bogus")


def test_mismatched_configs_raise():
    a = wb.models.build(MLP_CONFIGS[0])
    wider = wb.models.build(wb.models.MLPConfig(**{**MLP_CONFIGS[0].__dict__, "d_hidden": 32}))
    with pytest.raises(ValueError, match="d_hidden"):
        P.match_weights(a, wider)
    with pytest.raises(ValueError, match="family"):
        P.match_activations(a, wb.models.build(TF_CONFIGS[0]), _inputs(MLP_CONFIGS[0]))
