"""The bench's hand-written weight-matching reference (bench/reference_matching.py) and weight matching against it.

The reference shares no code with workbench.permute: its spec is written from the state_dict
key names and its costs are explicit numpy products. The tests tie its pieces to facts that do
not depend on either implementation (a permutation is a symmetry: the function is unchanged;
the objective is linear in each permutation with the others fixed) and then compare ours with it.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import permute as P

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ sits beside the package, not installed
from bench import reference_matching as R  # noqa: E402

M = wb.models

CONFIGS = [M.MLPConfig(d_in=6, n_classes=4, d_model=12, d_hidden=20, n_layers=2, norm=n) for n in ("pre", "peri", "none")]
CONFIGS += [M.TransformerConfig(vocab_size=11, context=7, d_model=16, n_heads=4, d_mlp=24, n_layers=2, norm=n,
                                tie_embeddings=t) for n, t in (("pre", False), ("peri", False), ("pre", True))]
IDS = [f"{c.family}-{c.norm}{'-tied' if getattr(c, 'tie_embeddings', False) else ''}" for c in CONFIGS]


def _model(cfg, seed=0):
    """A model whose every parameter (LayerNorm gains and biases too) is random, so no axis hides a mistake."""
    model = M.build(type(cfg)(**{**cfg.__dict__, "seed": seed}))
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(cfg):
    g = torch.Generator().manual_seed(7)
    if cfg.family == "mlp":
        return torch.randn(5, cfg.d_in, generator=g)
    return torch.randint(0, cfg.vocab_size, (5, cfg.context), generator=g)


def _heads(cfg):
    return getattr(cfg, "n_heads", None)


def _identity(state):
    return {p: torch.arange(n) for p, n in R.sizes(state).items()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_hand_permutation_is_a_symmetry(cfg):
    a = _model(cfg)
    state = a.state_dict()
    b = R.permute_model(a, R.random_perm(state, _heads(cfg) or 1, seed=3))
    moved = {k for k, v in state.items() if not torch.equal(b.state_dict()[k], v)}
    assert {k for k in state if k.endswith(".weight")} <= moved  # every weight has a permuted axis
    with torch.no_grad():
        x = _inputs(cfg)
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    # and a permutation that breaks a head apart is not a symmetry (the spec is not vacuous)
    if cfg.family == "transformer":
        bad = _identity(state)
        bad["qk.0"] = torch.roll(bad["qk.0"], 1)  # moves one dimension across a head boundary, q and k alike
        with torch.no_grad():
            assert (R.permute_model(a, bad)(x) - a(x)).abs().max() > 1e-3


def test_hand_spec_refuses_an_unknown_key():
    state = dict(_model(CONFIGS[0]).state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="does not cover"):
        R.state_axes(state)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reference_costs_are_the_objective_slopes(cfg):
    """With the other permutations fixed the objective is linear in each one: obj(sigma) - obj(id) must equal
    sum_i C[i, sigma(i)] - trace(C) for the reference's cost C (written independently of the objective)."""
    a, b = _model(cfg, 0), _model(cfg, 1)
    A, B = R._numpy_state(a), R._numpy_state(b)
    L = R._n_blocks(A)
    cost = R._cost_transformer if cfg.family == "transformer" else R._cost_mlp
    base = {p: v.numpy() for p, v in R.random_perm(A, _heads(cfg) or 1, seed=5).items()}
    rng = np.random.default_rng(0)
    for p, n in R.sizes(A).items():
        C = cost(A, B, base, p, L)
        sigma = rng.permutation(n)
        moved = {**base, p: sigma}
        lhs = R.objective(a, b, moved) - R.objective(a, b, base)
        rhs = R._gain(C, sigma) - R._gain(C, base[p])
        assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9), p


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_ours_recovers_a_hand_permuted_copy_exactly(cfg):
    a = _model(cfg)
    state = a.state_dict()
    b = R.permute_model(a, R.random_perm(state, _heads(cfg) or 1, seed=11))
    perm, info = P.match_weights(a, b)
    back = P.permute(b, perm).state_dict()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    best = R.objective(a, a, _identity(state))  # <A, A>: the largest value any permutation can reach
    assert info["objective"] == pytest.approx(best, rel=1e-9)
    assert R.objective(a, b, perm) == pytest.approx(best, rel=1e-9)
    ref = R.weight_matching(a, b, n_heads=_heads(cfg))
    assert R.objective(a, b, ref) <= best * (1 + 1e-9)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_reference_reaches_our_objective_on_a_random_pair(cfg):
    a, b = _model(cfg, 0), _model(cfg, 1)
    ref = R.weight_matching(a, b, n_heads=_heads(cfg), seed=2)
    perm, info = P.match_weights(a, b, seed=2, init="identity")  # the reference's start and sweep order
    ref_obj = R.objective(a, b, ref)
    assert ref_obj > R.objective(a, b, _identity(a.state_dict())) + 1e-6  # the descent did something
    assert info["objective"] == pytest.approx(ref_obj, rel=1e-9)
    assert R.objective(a, b, perm) == pytest.approx(ref_obj, rel=1e-9)
    assert all(torch.equal(perm[p], ref[p]) for p in ref) and set(perm) == set(ref)


def test_reference_imports_nothing_from_workbench():
    """Independence is checked, not promised: the reference module imports no workbench code at all."""
    import ast

    tree = ast.parse(Path(R.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "workbench" or m.startswith(".")]
