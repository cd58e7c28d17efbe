"""Compose: logit mixtures, weight-space merges, the evaluation table, sampling.

References are hand computations (a mean of logits, a mean of softmaxes, the TIES steps on a
four-entry example, depth scales of LiNeS) rather than the code's own earlier output.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import compose, sampling
from workbench.compose import LogitMixture, SubstrateError
from helpers.perturb import perturbed


def _cfg(**kw):
    base = dict(vocab_size=11, context=24, d_model=16, n_layers=3, n_heads=2, d_mlp=32, embedding="frozen-random")
    return wb.models.TransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trio():
    base = wb.models.build(_cfg()).eval()
    return base, perturbed(base, 1), perturbed(base, 2)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ logit mixture


def test_mixture_of_one_model_equals_that_model(trio, tokens):
    _, a, _ = trio
    with torch.no_grad():
        ref = a(tokens)
        assert torch.allclose(LogitMixture([a])(tokens), ref, atol=1e-6)
        assert torch.allclose(LogitMixture([a], mode="probs")(tokens), F.log_softmax(ref, -1), atol=1e-5)


def test_mixture_matches_hand_computed_means(trio, tokens):
    _, a, b = trio
    with torch.no_grad():
        la, lb = a(tokens), b(tokens)
        mix = LogitMixture([a, b], weights=[3, 1])
        assert torch.allclose(mix(tokens), 0.75 * la + 0.25 * lb, atol=1e-5)
        probs = LogitMixture([a, b], weights=[3, 1], mode="probs")(tokens).exp()
        assert torch.allclose(probs, 0.75 * la.softmax(-1) + 0.25 * lb.softmax(-1), atol=1e-5)
        assert mix.member_logits(tokens).shape == (2, 3, 16, 11)
        assert torch.allclose(mix.mixture_weights(tokens)[..., 0], torch.full((3, 16), 0.75))


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_mixture_log_probabilities_normalise(trio, tokens, mode):
    _, a, b = trio
    with torch.no_grad():
        logp = F.log_softmax(LogitMixture([a, b], mode=mode)(tokens), dim=-1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 16), atol=1e-5)
    if mode == "probs":  # the output itself already is a log-probability
        out = LogitMixture([a, b], mode=mode)(tokens).detach()
        assert torch.allclose(out.exp().sum(-1), torch.ones(3, 16), atol=1e-5)


def test_mixture_works_with_evaluate_and_sampling(trio):
    _, a, b = trio
    ds = wb.data.load("khop", nodes=4, hops=1, n_train=64, n_val=32)
    m1, m2 = (wb.models.build(_cfg(vocab_size=ds.vocab_size, seed=s)) for s in (0, 0))
    mix = LogitMixture([m1, m2])
    assert wb.evaluate(mix, ds)["loss"] == pytest.approx(wb.evaluate(m1, ds)["loss"], rel=1e-5)
    text = sampling.sample_text(mix, ds.vocab, prompt="ab", n_chars=10, seed=3)
    assert text.startswith("ab") and len(text) == 12


def test_gate_fits_per_token_weights_and_stays_causal():
    torch.manual_seed(0)
    domains = compose.shared_text(["grammar", "arithmetic"], context=16, corpus_chars=4000)
    cfg = wb.models.config_for(domains["grammar"], d_model=32, n_layers=1, n_heads=2, d_mlp=64,
                               embedding="frozen-random")
    base = wb.models.build(cfg)
    runs = compose.train_specialists(base, domains, wb.TrainConfig(steps=40, batch_size=32, lr=3e-3, eval_every=40,
                                                                   eval_max=64))
    specs = [r.model for r in runs.values()]
    fixed = LogitMixture(specs)
    gated = LogitMixture(specs).fit_gate(domains, steps=60)
    calib = compose.concat(domains)
    assert wb.evaluate(gated, calib, "train")["loss"] < wb.evaluate(fixed, calib, "train")["loss"]
    x = domains["arithmetic"].x_val[:2]
    w = gated.mixture_weights(x)
    assert w.shape == (2, 16, 2) and torch.allclose(w.sum(-1), torch.ones(2, 16), atol=1e-5)
    y = x.clone()
    y[:, 8:] = 0  # changing later tokens leaves earlier outputs alone
    with torch.no_grad():
        assert torch.allclose(gated(x)[:, :8], gated(y)[:, :8], atol=1e-5)
    assert all(r.meta["role"] == "specialist" for r in runs.values())


# ------------------------------------------------------------------ substrate checks


def test_members_with_different_vocabularies_raise(trio):
    _, a, _ = trio
    other = wb.models.build(_cfg(vocab_size=12))
    with pytest.raises(SubstrateError, match="different vocabularies"):
        LogitMixture([a, other])
    v1, v2 = list("abcdefghijk"), list("abcdefghijz")
    g1, g2 = (wb.models.build(_cfg(embedding="trainable", vocab=v)) for v in (v1, v2))
    with pytest.raises(SubstrateError, match="token 10"):
        LogitMixture([g1, g2])


def test_members_with_different_substrates_raise(trio):
    _, a, _ = trio
    reseeded = wb.models.build(_cfg(seed=5))  # another frozen-random table
    with pytest.raises(SubstrateError, match="different substrates.*frozen-random embedding"):
        LogitMixture([a, reseeded])
    with pytest.raises(SubstrateError, match="embedding kinds"):
        LogitMixture([a, wb.models.build(_cfg(embedding="trainable"))])
    with pytest.raises(SubstrateError, match="one architecture"):
        compose.ties(a, [wb.models.build(_cfg(n_heads=4))])


# ------------------------------------------------------------------ weight-space merges


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_task_vectors_leave_out_the_frozen_substrate(trio):
    base, a, b = trio
    taus = compose.task_vectors(base, [a, b])
    assert "tok_embed.weight" not in taus[0]
    sd_a, sd_base = a.state_dict(), base.state_dict()
    assert torch.allclose(taus[0]["blocks.0.attn.qkv.weight"],
                          sd_a["blocks.0.attn.qkv.weight"] - sd_base["blocks.0.attn.qkv.weight"])


def test_ties_of_identical_task_vectors_equals_them(trio):
    base, a, _ = trio
    merged = compose.ties(base, [a, copy.deepcopy(a), copy.deepcopy(a)], density=1.0)
    for k, v in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-6), k
    # with trimming, identical vectors give the trimmed vector: 30% largest entries of tau kept
    tau = compose.task_vectors(base, [a])[0]
    flat = torch.cat([t.flatten() for t in tau.values()]).abs()
    cut = flat.sort(descending=True).values[round(0.3 * len(flat)) - 1]
    trimmed = compose.ties(base, [a, copy.deepcopy(a)], density=0.3)
    for k, t in tau.items():
        expect = base.state_dict()[k] + torch.where(t.abs() >= cut, t, torch.zeros_like(t))
        assert torch.allclose(trimmed.state_dict()[k], expect, atol=1e-6), k


def test_ties_steps_on_a_hand_example():
    t1 = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0])}
    t2 = {"w": torch.tensor([-2.0, -1.0, 0.1, 4.0, -0.2])}
    # elected signs from summed mass: [+, -, +, +, -]; mean of the agreeing, non-zero entries
    out = compose.merges._ties_vector([t1, t2], density=1.0)["w"]
    assert torch.allclose(out, torch.tensor([3.0, -1.0, 0.3, 3.0, -0.2]))
    # density 0.4 keeps the 2 largest of each: t1 -> [3, 0, 0, 2, 0], t2 -> [-2, 0, 0, 4, 0]
    out = compose.merges._ties_vector([t1, t2], density=0.4)["w"]
    assert torch.allclose(out, torch.tensor([3.0, 0.0, 0.0, 3.0, 0.0]))


def test_lines_with_scale_one_everywhere_equals_task_arithmetic(trio):
    base, a, b = trio
    ta = compose.task_arithmetic(base, [a, b], scale=1.0)
    ln = compose.lines(base, [a, b], alpha=1.0, beta=0.0)
    for k, v in ta.state_dict().items():
        assert torch.allclose(ln.state_dict()[k], v, atol=1e-6), k


def test_lines_scales_task_vector_by_depth(trio):
    base, a, b = trio
    merged = compose.lines(base, [a, b], alpha=0.2, beta=0.6)
    taus = compose.task_vectors(base, [a, b])
    sd, sd0 = merged.state_dict(), base.state_dict()
    for key, lam in [("blocks.0.mlp.fc.weight", 0.2), ("blocks.1.mlp.fc.weight", 0.5),
                     ("blocks.2.mlp.fc.weight", 0.8), ("readout.weight", 0.2), ("pos_embed.weight", 0.2)]:
        expect = sd0[key] + lam * (taus[0][key] + taus[1][key])
        assert torch.allclose(sd[key], expect, atol=1e-6), key
    # default alpha for task arithmetic is 1/K
    default = compose.lines(base, [a, b], beta=0.0)
    half = compose.task_arithmetic(base, [a, b], scale=0.5)
    assert torch.allclose(default.state_dict()["readout.weight"], half.state_dict()["readout.weight"], atol=1e-6)


def test_linear_average_is_task_arithmetic_over_k(trio):
    base, a, b = trio
    avg = compose.linear([a, b], base=base)
    ta = compose.merge("task_arithmetic", base, [a, b], scale=0.5)
    for k, v in ta.state_dict().items():
        assert torch.allclose(avg.state_dict()[k], v, atol=1e-6), k
    assert torch.equal(avg.tok_embed.weight, base.tok_embed.weight)  # the substrate stays frozen and shared
    with pytest.raises(ValueError, match="method must be one of"):
        compose.merge("soup", base, [a, b])


# ------------------------------------------------------------------ evaluation table


def test_evaluate_table_and_summary(trio):
    base, a, b = trio
    ds = wb.data.load("khop", nodes=9, hops=1, n_train=64, n_val=64)
    assert ds.vocab_size == 11
    table = compose.evaluate({"a": a, "b": b}, {"mix": LogitMixture([a, b])}, {"khop": ds, "again": ds},
                             references={"base": base})
    assert list(table.columns) == ["model", "role", "domain", "metric", "value"]
    assert len(table) == 4 * 2 * 2
    row = table[(table.model == "a") & (table.domain == "khop") & (table.metric == "loss")]
    assert row["value"].item() == pytest.approx(wb.evaluate(a, ds)["loss"])
    summ = compose.summary(table).set_index("model")
    assert summ.loc["a", "role"] == "specialist" and summ.loc["base", "role"] == "reference"
    best = min(summ.loc["a", "mean_loss"], summ.loc["b", "mean_loss"])
    assert summ.loc["mix", "beats_parts"] == (summ.loc["mix", "mean_loss"] < best)
    assert min(summ.loc["a", "worst_gap"], summ.loc["b", "worst_gap"]) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ data and sampling


def test_shared_text_gives_one_vocabulary_and_concat():
    domains = compose.shared_text(["grammar", "code"], context=16, corpus_chars=3000)
    g, c = domains["grammar"], domains["code"]
    assert g.vocab == c.vocab and "(" in g.vocab and "T" in c.vocab
    assert g.decode(g.x_train[0]).startswith(wb.data.grammar_corpus(100)[:16])
    both = compose.concat(domains)
    assert len(both.x_train) == len(g.x_train) + len(c.x_train) and both.vocab == g.vocab
    for option, value in (("vocab", "abc"), ("path", "/etc/passwd"), ("text", "my own text"), ("corpus", "code")):
        with pytest.raises(ValueError, match=rf"shared_text options must not include path, text, vocab, corpus: "
                                             rf".*; got {option} \(for a text of your own"):
            compose.shared_text(["grammar"], **{option: value})
    with pytest.raises(ValueError, match="got path, text"):
        compose.shared_text(["grammar"], text="abc", path="x.txt")


def test_sampling_is_seeded_and_greedy_is_argmax(trio):
    _, a, _ = trio
    prompt = torch.tensor([1, 2, 3])
    s1 = sampling.generate(a, prompt, 20, temperature=1.0, seed=7)
    assert torch.equal(s1, sampling.generate(a, prompt, 20, temperature=1.0, seed=7))
    assert not torch.equal(s1, sampling.generate(a, prompt, 20, temperature=1.0, seed=8))
    assert torch.equal(s1[:3], prompt) and len(s1) == 23
    greedy = sampling.generate(a, prompt, 5, temperature=0)
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(5):  # reference: argmax of the model's last-position logits, one step at a time
            seq = torch.cat([seq, a(seq[None])[0, -1].argmax()[None]])
    assert torch.equal(greedy, seq)
    top1 = sampling.generate(a, prompt, 5, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(top1, greedy)
    long = sampling.generate(a, prompt, 40, seed=0)  # longer than the context: the window slides
    assert len(long) == 43
    with pytest.raises(ValueError, match="not in the vocabulary"):
        sampling.sample_text(a, list("abcdefghijk"), prompt="xyz!")


def test_gate_table_and_figures(trio, tokens):
    from workbench.figures.compose import domain_heatmap, gate_weights

    base, a, b = trio
    mix = LogitMixture([a, b], weights=[1, 3])
    gt = compose.gate_table(mix, tokens[0], vocab=list("abcdefghijk"), names=["A", "B"])
    assert list(gt.columns) == ["position", "token", "member", "weight"] and len(gt) == 16 * 2
    assert gt.groupby("position")["weight"].sum().round(6).eq(1.0).all()
    assert gt[gt.member == "B"]["weight"].round(6).eq(0.75).all()
    assert len(gate_weights(gt).data) == 2
    ds = wb.data.load("khop", nodes=9, hops=1, n_train=16, n_val=16)
    table = compose.evaluate({"a": a}, {"mix": mix}, {"khop": ds}, references={"base": base})
    heat = domain_heatmap(table, "acc").data[0]
    assert list(heat.y) == ["a (specialist)", "mix (merge)", "base (reference)"] and list(heat.x) == ["khop"]
    assert heat.z[1][0] == pytest.approx(table.query("model == 'mix' and metric == 'acc'")["value"].item())
