"""Every exercise's check, both ways: it accepts the reference, and it rejects planted wrong solutions with
their specific messages. Then what a check does with what is not a right function (not a function, one that
raises, hangs, has the wrong arguments or returns the wrong shape), and the references themselves against
independent computations (the engine where it is the definition, a construction with a known answer)."""
import math
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import workbench as wb
from workbench.hooks import record
from workbench.lessons import collapse as les_collapse
from workbench.lessons import connectivity as les_conn
from workbench.lessons import framework
from workbench.lessons import grokking as les_grok
from workbench.lessons import growth as les_growth
from workbench.lessons import llama as les_llama
from workbench.lessons import residual as les_resid


@pytest.fixture(autouse=True)
def _student(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_LESSONS_SOLVE", raising=False)
    monkeypatch.delenv("WORKBENCH_LESSONS_TEACHER", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_USER", "alice")
    torch.set_num_threads(1)


def _check(name, fn):
    return framework.run_check(wb.lessons.exercise(name), fn, "student")


# ============================================================================ planted wrong solutions

# growth.zero_block

def _zero_mlp_only(block):
    with torch.no_grad():
        block.mlp.proj.weight.zero_()
        block.mlp.proj.bias.zero_()


def _zero_weights_only(block):
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.mlp.proj.weight.zero_()


def _zero_everything(block):
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()


# residual.lens_kl

def _kl_per_layer(model, x, read, reverse=False, site="resid_pre"):
    with torch.no_grad(), record(model, names=[f"blocks.*.{site}"]) as cache:
        final = model(x).log_softmax(-1)
    out = []
    for l in range(len(model.blocks)):
        lens = read(model, cache[f"blocks.{l}.{site}"]).log_softmax(-1)
        p, q = (lens, final) if reverse else (final, lens)
        out.append((p.exp() * (p - q)).sum(-1).mean())
    return torch.stack(out + [torch.tensor(0.0)])


def _kl_reversed(model, x):
    return _kl_per_layer(model, x, lambda m, h: m.unembed(h), reverse=True)


def _kl_without_final_norm(model, x):
    return _kl_per_layer(model, x, lambda m, h: m.readout(h))


def _kl_after_each_block(model, x):
    return _kl_per_layer(model, x, lambda m, h: m.unembed(h), site="resid_post")


def _kl_without_output_row(model, x):
    return les_resid.lens_kl(model, x)[:-1]


# connectivity.match_layer

def _similarity(a, b):
    return a["w_in"] @ b["w_in"].T + torch.outer(a["b_in"], b["b_in"]) + a["w_out"].T @ b["w_out"]


def _match_greedy(a, b):
    return _similarity(a, b).argmax(1)


def _match_inverse(a, b):
    return np.argsort(les_conn.match_layer(a, b))


def _match_minimising(a, b):
    return linear_sum_assignment(_similarity(a, b).numpy())[1]


def _match_incoming_only(a, b):
    s = a["w_in"] @ b["w_in"].T + torch.outer(a["b_in"], b["b_in"])
    return linear_sum_assignment(s.numpy(), maximize=True)[1]


# collapse.nc1

def _nc1_parts(features, labels, centre_on_samples=False, inverse=torch.linalg.pinv, divide=True):
    h = features.double()
    classes = labels.unique()
    means = torch.stack([h[labels == c].mean(0) for c in classes])
    centred = means - (h.mean(0) if centre_on_samples else means.mean(0))
    within = h - means[torch.searchsorted(classes, labels)]
    sw, sb = within.T @ within / len(h), centred.T @ centred / len(classes)
    value = float(torch.trace(sw @ inverse(sb)))
    return value / len(classes) if divide else value


def _nc1_not_divided(features, labels):
    return _nc1_parts(features, labels, divide=False)


def _nc1_inverse(features, labels):
    return _nc1_parts(features, labels, inverse=torch.linalg.inv)


def _nc1_sample_mean(features, labels):
    return _nc1_parts(features, labels, centre_on_samples=True)


# grokking.fourier_norms

def _fourier(W_E, p, ks, unit=True, split=False):
    W = W_E[:p].double()
    x = torch.arange(p, dtype=torch.float64)
    out = []
    for k in ks:
        c, s = torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)
        if unit:
            c, s = c / c.norm(), (s / s.norm() if s.norm() > 0 else s)
        if split:
            out += [(c @ W).norm(), (s @ W).norm()]
        else:
            out.append(((c @ W) ** 2 + (s @ W) ** 2).sum().sqrt())
    return torch.stack(out)


def _fourier_not_unit(W_E, p):
    return _fourier(W_E, p, range(1, (p - 1) // 2 + 1), unit=False)


def _fourier_from_zero(W_E, p):
    return _fourier(W_E, p, range((p - 1) // 2))


def _fourier_with_constant(W_E, p):
    return _fourier(W_E, p, range((p - 1) // 2 + 1))


def _fourier_cos_sin_apart(W_E, p):
    return _fourier(W_E, p, range(1, (p - 1) // 2 + 1), split=True)


# llama.skip_layer

def _skip_with(model, x, layer, hook, probs=True):
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        handle.remove()
    return logits.softmax(-1) if probs else logits


def _skip_logits(model, x, layer):
    return _skip_with(model, x, layer, lambda m, a, o: a[0], probs=False)


def _skip_zeros(model, x, layer):
    return _skip_with(model, x, layer, lambda m, a, o: torch.zeros_like(a[0]))


def _skip_next_layer(model, x, layer):
    return les_llama.skip_layer(model, x, (layer + 1) % len(model.model.layers))


def _skip_hook_left_behind(model, x, layer):
    model.model.layers[layer].register_forward_hook(lambda m, a, o: a[0])
    with torch.no_grad():
        return model(input_ids=x).logits.softmax(-1)


PLANTED = {
    "growth.zero_block": [
        (_zero_mlp_only, ["attention output projection (attn.proj.weight) is not zero", "the output changed by",
                          "inserted at layer"]),
        (_zero_weights_only, ["output projection's bias (attn.proj.bias) is not zero"]),
        (_zero_everything, ["adds 0 but can never learn", "mlp.fc.weight", "Zero only the two output projections"]),
    ],
    "residual.lens_kl": [
        (_kl_reversed, ["KL(lens || final)"]),
        (_kl_without_final_norm, ["apply the final norm first"]),
        (_kl_after_each_block, ["after each block (resid_post)"]),
        (_kl_without_output_row, ["expected L + 1 = 2"]),
    ],
    "connectivity.match_layer": [
        (_match_greedy, ["not a permutation", "linear_sum_assignment"]),
        (_match_inverse, ["inverse permutation"]),
        (_match_minimising, ["maximize=True"]),
        (_match_incoming_only, ["incoming weights only", "outgoing weights"]),
    ],
    "collapse.nc1": [
        (_nc1_not_divided, ["C = 3 times the engine's"]),
        (_nc1_inverse, ["pseudo-inverse (torch.linalg.pinv)"]),
        (_nc1_sample_mean, ["mean of all samples", "mean of the class means"]),
    ],
    "grokking.fourier_norms": [
        (_fourier_not_unit, ["sqrt(p / 2)", "unit length"]),
        (_fourier_from_zero, ["entry 0 must be k = 1"]),
        (_fourier_with_constant, ["leave out the constant term"]),
        (_fourier_cos_sin_apart, ["combine the cos and sin"]),
    ],
    "llama.skip_layer": [
        (_skip_logits, ["do not sum to 1", "not logits"]),
        (_skip_zeros, ["replaced the layer's output by zeros"]),
        (_skip_next_layer, ["what skipping layer 1 gives, not layer 0"]),
        (_skip_hook_left_behind, ["remove your hook"]),
    ],
}


def test_every_registered_exercise_is_tested_here():
    names = {ex.name for les in wb.lessons.LESSONS.values() for ex in les.exercises}
    assert len(wb.lessons.LESSONS) >= 6
    assert names == set(PLANTED)
    assert all(len(v) >= 2 for v in PLANTED.values())


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_the_reference_passes(name):
    ex = wb.lessons.exercise(name)
    result = _check(name, ex.reference)
    assert result.passed, result.message
    assert result.cases == len(ex.cases()) >= 4
    assert str(result) == f"{name}: passed ({result.cases} cases)"


@pytest.mark.parametrize("name,index", [(n, i) for n, v in sorted(PLANTED.items()) for i in range(len(v))])
def test_a_planted_wrong_solution_gets_its_specific_message(name, index):
    fn, phrases = PLANTED[name][index]
    result = _check(name, fn)
    assert not result.passed
    for phrase in phrases:
        assert phrase in result.message, result.message
    assert result.message.startswith("on case "), result.message      # says where
    assert str(result).startswith(f"{name}: not yet. ")
    assert result.message.strip().lower() not in ("wrong", "incorrect")


def test_a_right_answer_by_another_route_passes_too():
    """Ties and types: numpy instead of torch, a list, an out-of-place block."""
    def nc1_numpy(features, labels):
        return np.float32(les_collapse.nc1(features, labels))

    def match_list(a, b):
        return [int(i) for i in les_conn.match_layer(a, b)]

    def zero_by_returning_a_copy(block):
        import copy
        new = copy.deepcopy(block)
        les_growth.zero_new_block(new)
        return new

    for name, fn in (("collapse.nc1", nc1_numpy), ("connectivity.match_layer", match_list),
                     ("growth.zero_block", zero_by_returning_a_copy)):
        assert _check(name, fn).passed, name


# ============================================================================ what is not a right function


def test_not_a_function_is_named():
    r = _check("collapse.nc1", 3)
    assert not r.passed and "got 3 (an int)" in r.message and "not check(name, f(...))" in r.message
    r = _check("collapse.nc1", None)
    assert "got None" in r.message and "def" in r.message
    r = _check("collapse.nc1", les_collapse.nc1(torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])))
    assert "(a float)" in r.message


def test_a_function_that_raises_is_named_with_its_line():
    def broken(features, labels):
        total = features.sum()
        return total / 0 if False else undefined_name  # noqa: F821

    r = _check("collapse.nc1", broken)
    assert not r.passed
    assert "your function raised NameError" in r.message and "undefined_name" in r.message
    assert "line " in r.message and "return total" in r.message


def test_an_unwritten_stub_says_so():
    def stub(features, labels):
        raise NotImplementedError

    assert "not written yet" in _check("collapse.nc1", stub).message


def test_wrong_arguments_and_wrong_shapes_are_named():
    r = _check("collapse.nc1", lambda features: 0.0)
    assert "takes (features)" in r.message and "(features, labels)" in r.message
    r = _check("collapse.nc1", lambda features, labels: torch.zeros(3))
    assert "shape (3,), expected one number" in r.message
    r = _check("residual.lens_kl", lambda model, x: torch.zeros(7))
    assert "returned shape (7,), expected (2,)" in r.message
    r = _check("residual.lens_kl", lambda model, x: None)
    assert "returned None" in r.message and "return statement" in r.message
    r = _check("grokking.fourier_norms", lambda W_E, p: "3")
    assert "returned a str" in r.message


def test_a_function_that_hangs_is_stopped_and_the_caller_goes_on():
    ex = wb.lessons.exercise("collapse.nc1")
    quick = framework.Exercise(name=ex.name, title=ex.title, params=ex.params, reference=ex.reference,
                               cases=ex.cases, judge=ex.judge, case_seconds=0.5)

    def hangs(features, labels):
        while True:
            features = features + 0

    t0 = time.perf_counter()
    r = framework.run_check(quick, hangs, "student")
    assert time.perf_counter() - t0 < 5
    assert not r.passed and "did not return within 0 s" not in r.message
    assert "did not return within" in r.message and "endless loop" in r.message
    # the stopped thread is gone (the exception reached it), and the next check runs normally
    time.sleep(0.2)
    assert not any(t.name == "workbench-lesson-check" and t.is_alive() for t in __import__("threading").enumerate())
    assert framework.run_check(quick, ex.reference, "student").passed


def test_run_limited_reports_value_error_and_timeout():
    assert framework.run_limited(lambda: 3, 1.0) == ("ok", 3)
    status, err = framework.run_limited(lambda: 1 / 0, 1.0)
    assert status == "error" and isinstance(err, ZeroDivisionError)

    def spin():
        while True:
            pass
    assert framework.run_limited(spin, 0.2) == ("timeout", True)


# ============================================================================ the references themselves


def test_zero_block_reference_matches_add_layer_zero_init():
    """The reference zeroes what the engine's function-preserving init zeroes, on a pre-LN block."""
    model = wb.models.build(wb.models.TransformerConfig(vocab_size=11, context=8, d_model=16, n_layers=1, n_heads=2,
                                                        d_mlp=32))
    engine_block = wb.growth.add_layer(model, init="zero")
    mine = model.new_block()
    les_growth.zero_new_block(mine)
    for name in ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias"):
        assert torch.count_nonzero(dict(mine.named_parameters())[name]) == 0
        assert torch.count_nonzero(dict(engine_block.named_parameters())[name]) == 0
    assert torch.count_nonzero(mine.mlp.fc.weight) > 0


def test_lens_kl_reference_is_the_logit_lens():
    model = wb.models.build(wb.models.TransformerConfig(vocab_size=13, context=8, d_model=16, n_layers=3, n_heads=2,
                                                        d_mlp=32, seed=3))
    x = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    table = wb.residual.logit_lens(model, x).sort_values("layer")
    assert torch.allclose(les_resid.lens_kl(model, x).double(), torch.tensor(table["kl_to_final"].to_numpy()),
                          atol=1e-6)


def test_match_layer_recovers_a_planted_permutation():
    gen = torch.Generator().manual_seed(0)
    a = {"w_in": torch.randn(9, 4, generator=gen), "b_in": torch.randn(9, generator=gen),
         "w_out": torch.randn(3, 9, generator=gen)}
    order = torch.randperm(9, generator=gen)
    b = {"w_in": a["w_in"][order], "b_in": a["b_in"][order], "w_out": a["w_out"][:, order]}
    perm = les_conn.match_layer(a, b)
    assert torch.equal(b["w_in"][perm], a["w_in"]) and torch.equal(b["w_out"][:, perm], a["w_out"])


def test_nc1_reference_against_a_hand_computation_and_collapsed_features():
    # two classes on a line: means -1 and +1 (mean of means 0), within spread 0.5 -> Sigma_W = 0.25,
    # Sigma_B = 1, NC1 = 0.25 / 2
    features = torch.tensor([[-1.5], [-0.5], [0.5], [1.5]])
    labels = torch.tensor([0, 0, 1, 1])
    assert les_collapse.nc1(features, labels) == pytest.approx(0.125)
    etf = wb.collapse.simplex_etf(4, 6, seed=0)
    labels = torch.arange(4).repeat_interleave(5)
    assert abs(les_collapse.nc1(etf[labels], labels)) < 1e-12


def test_fourier_norms_reference_is_the_engines_and_finds_a_planted_frequency():
    p = 11
    x = torch.arange(p, dtype=torch.float64)[:, None]
    W = torch.cat([torch.cos(2 * math.pi * 3 * x / p) * torch.ones(1, 5), torch.zeros(2, 5, dtype=torch.float64)])
    norms = les_grok.fourier_norms(W, p)
    assert torch.allclose(norms, torch.as_tensor(wb.grokking.fourier_norms(W, p)))
    assert int(norms.argmax()) == 2 and torch.count_nonzero(norms > 1e-9) == 1
    # the whole vector lies on k = 3: its norm is the embedding's (the constant part is 0)
    assert float(norms[2]) == pytest.approx(float(W[:p].norm()))


def test_skip_layer_reference_agrees_with_skip_effects():
    model = les_llama.tiny_llama(hidden=16, layers=3, heads=2, kv_heads=1, vocab=24, seed=1)
    x = torch.randint(0, 24, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = model(input_ids=x).logits.softmax(-1)
    out = wb.residual.skip_effects(model, x).output.set_index("skipped")
    for layer in range(3):
        skipped = les_llama.skip_layer(model, x, layer)
        l2 = (clean - skipped).norm(dim=-1).mean().item()
        assert l2 == pytest.approx(out.loc[layer, "l2"], rel=1e-4)
