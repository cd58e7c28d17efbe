"""The fast paths of workbench.residual against naive hand-run references on tiny models.

Skip effects and integrated gradients replay the recorded outputs of the blocks before the layer they
change (only the blocks after it run) and compare the outputs a few rows at a time; integrated
gradients read out only the last position. The references here run every block of the model, by hand
or through the model's own forward with a block swapped for a pass-through module, and compute every
statistic from its definition (docs/definitions.md#skip-effects, #local-skip, #integrated-gradients).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench import residual as R

transformers = pytest.importorskip("transformers")

V, T = 40, 7


def _native(n_layers=3, seed=0):
    cfg = wb.models.TransformerConfig(vocab_size=V, context=8, d_model=16, n_layers=n_layers, n_heads=2, d_mlp=32,
                                      seed=seed)
    return wb.models.build(cfg).eval()


def _gpt2(n_layers=3):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=n_layers, n_head=4,
                                  initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _x(B=3, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class Passthrough(nn.Module):
    """A block that returns its input (positional or ``hidden_states``)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.blocks


def _naive_run(model, x, skip=None, keep_before=None):
    """``(block inputs, block outputs, logits)`` of the model's own forward, block ``skip`` replaced by a
    pass-through (at positions ``>= keep_before`` only, when given), read by hooks on the blocks."""
    blocks = _blocks(model)
    ins, outs, handles = {}, {}, []
    for l, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(
            lambda m, a, k, l=l: ins.__setitem__(l, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        handles.append(b.register_forward_hook(
            lambda m, a, o, l=l: outs.__setitem__(l, (o[0] if isinstance(o, tuple) else o).clone())))
    original = blocks[skip] if skip is not None else None
    if skip is not None and keep_before is None:
        blocks[skip] = Passthrough()
        handles.append(blocks[skip].register_forward_pre_hook(
            lambda m, a, k: ins.__setitem__(skip, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        handles.append(blocks[skip].register_forward_hook(lambda m, a, o: outs.__setitem__(skip, o.clone())))
    elif skip is not None:
        def partial(m, a, k, o):
            h = a[0] if a else k["hidden_states"]
            first = (o[0] if isinstance(o, tuple) else o).clone()
            first[:, keep_before:] = h[:, keep_before:]
            return (first,) + tuple(o[1:]) if isinstance(o, tuple) else first
        handles.insert(0, original.register_forward_hook(partial, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=x) if hasattr(model, "transformer") else model(x)
    finally:
        for h in handles:
            h.remove()
        if skip is not None:
            blocks[skip] = original
    return ins, outs, getattr(out, "logits", out)


def _reference(model, x, reduce="mean", from_position=None):
    """Heat-map ``{(s, l): effect}`` and output rows ``{s: {stat: value}}`` from the definitions."""
    L = len(_blocks(model))
    ins, outs, logits = _naive_run(model, x)
    p = logits.log_softmax(-1)
    y = R.next_token_targets(x)
    keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if from_position is not None:
        keep[:, :from_position] = False

    def red(v, mask=keep):
        v = v[mask & ~torch.isnan(v)]
        return float(v.double().mean() if reduce == "mean" else v.double().max())

    def nll(lp):
        loss = torch.nn.functional.nll_loss(lp.reshape(-1, V), y.reshape(-1), ignore_index=-100,
                                            reduction="none").reshape(y.shape)
        return torch.where(y == -100, torch.full_like(loss, float("nan")), loss)
    heat, rows = {}, {}
    for s in range(L):
        ins_s, outs_s, logits_s = _naive_run(model, x, skip=s, keep_before=from_position)
        for l in range(s + 1, L):
            d, ds = outs[l] - ins[l], outs_s[l] - ins_s[l]
            heat[(s, l)] = red((d - ds).norm(dim=-1) / d.norm(dim=-1))
        q = logits_s.log_softmax(-1)
        loss = nll(q)
        rows[s] = {"kl": red((p.exp() * (p - q)).sum(-1)), "l2": red((p.exp() - q.exp()).norm(dim=-1)),
                   "top1_changed": red((q.argmax(-1) != p.argmax(-1)).float()), "loss": red(loss),
                   "loss_change": red(loss) - red(nll(p))}
    return heat, rows


def _assert_matches(res, heat, rows):
    got = res.heatmap.set_index(["skipped", "affected"])["effect"]
    assert set(got.index) == set(heat)
    for key, want in heat.items():
        assert got.loc[key] == pytest.approx(want, rel=1e-4, abs=1e-7), key
    out = res.output.set_index("skipped")
    for s, stats in rows.items():
        for stat, want in stats.items():
            assert out.loc[s, stat] == pytest.approx(want, rel=1e-4, abs=1e-6), (s, stat)
    assert max(heat.values()) > 1e-3 and max(r["kl"] for r in rows.values()) > 1e-4   # not vacuous


@pytest.mark.parametrize("kind", ["native", "gpt2"])
@pytest.mark.parametrize("reduce,from_position,batch_size", [("mean", None, 256), ("max", None, 2), ("mean", 3, 1)])
def test_skip_effects_equal_the_model_run_with_the_block_removed(kind, reduce, from_position, batch_size, device):
    model = (_native() if kind == "native" else _gpt2()).to(device)
    x = _x().to(device)
    res = R.skip_effects(model, x, reduce=reduce, from_position=from_position, batch_size=batch_size)
    _assert_matches(res, *_reference(model, x, reduce, from_position))
    blocks = _blocks(model)
    assert all("forward" not in b.__dict__ and not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_local_skip_every_pair_by_hand(device):
    model, x = _native(n_layers=4).to(device), _x().to(device)
    res = R.skip_effects(model, x, local=True)
    ins, outs, logits = _naive_run(model, x)
    p = logits.log_softmax(-1)
    with torch.no_grad():
        for s in range(4):
            ds = outs[s] - ins[s]
            for l in range(s + 1, 4):
                d = outs[l] - ins[l]
                dl = model.blocks[l](ins[l] - ds) - (ins[l] - ds)
                want = ((d - dl).norm(dim=-1) / d.norm(dim=-1)).mean().item()
                assert res.heatmap.set_index(["skipped", "affected"]).loc[(s, l), "effect"] == pytest.approx(
                    want, rel=1e-4), (s, l)
            q = model.unembed(outs[3] - ds).log_softmax(-1)
            assert res.output.set_index("skipped").loc[s, "l2"] == pytest.approx(
                (p.exp() - q.exp()).norm(dim=-1).mean().item(), rel=1e-4), s


def _naive_ig(model, x, layer, steps):
    """IG by the definition: the whole model's forward with block ``layer``'s input replaced, every position."""
    blocks = _blocks(model)
    ins, outs, logits = _naive_run(model, x)
    L = len(blocks)
    h = ins[layer] if layer < L else outs[L - 1]
    tgt = logits[:, -1].argmax(-1)
    base = h.mean(1, keepdim=True).expand_as(h)
    total = torch.zeros(h.shape[:2], device=h.device)
    for k in range(steps):
        hi = (base + (k + 0.5) / steps * (h - base)).clone().requires_grad_(True)
        if layer < L:
            handle = blocks[layer].register_forward_pre_hook(
                lambda m, a, kw: ((hi,) + tuple(a[1:]), kw) if a else (a, {**kw, "hidden_states": hi}),
                with_kwargs=True)
            try:
                out = model(input_ids=x).logits if hasattr(model, "transformer") else model(x)
            finally:
                handle.remove()
        else:
            out = model.lm_head(model.transformer.ln_f(hi)) if hasattr(model, "transformer") else model.unembed(hi)
        f = out[:, -1].softmax(-1)[torch.arange(len(x), device=x.device), tgt].sum()
        (g,) = torch.autograd.grad(f, hi)
        total += (g * (h - base)).sum(-1)
    return (total / steps).mean(0).detach().cpu().numpy()


@pytest.mark.parametrize("kind", ["native", "gpt2"])
def test_integrated_gradients_equal_the_whole_model_run(kind, device):
    model = (_native() if kind == "native" else _gpt2()).to(device)
    x = _x(B=2).to(device)
    ig = R.integrated_gradients(model, x, steps=3)
    for layer in (0, 2, 3):
        got = ig[ig.layer == layer].sort_values("position").attribution.to_numpy()
        want = _naive_ig(model, x, layer, 3)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-8 + 1e-4 * float(np.abs(want).max())), layer
        assert np.abs(want).max() > 1e-6
    assert all("forward" not in b.__dict__ and not b._forward_hooks for b in _blocks(model))


class _CappedAdapter(wb.hooks.Adapter):
    """A native model whose forward soft-caps its logits; the adapter's unembed does not know it."""

    family = "transformer"

    def __init__(self, model):
        self.model, self.n_layers, self.n_heads = model, len(model.blocks), model.config.n_heads
        self.inner = wb.hooks.adapter(model.base)

    def site_names(self):
        return self.inner.site_names()

    def add_hook(self, name, fn):
        return self.inner.add_hook(name, fn)

    def forward(self, x):
        return self.model(x)

    def final_norm(self):
        return self.model.base.final_norm

    def readout(self):
        return self.model.base.readout.weight, self.model.base.readout.bias

    def block(self, layer):
        return self.model.blocks[layer]


class _Capped(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.config, self.blocks = base, base.config, base.blocks

    def forward(self, x):
        return 0.5 * torch.tanh(self.base(x) / 0.5)


def test_integrated_gradients_use_the_models_own_head_when_unembed_differs():
    base = _native()
    model, x = _Capped(copy.deepcopy(base)), _x(B=2)
    ad = _CappedAdapter(model)
    ig = R.integrated_gradients(ad, x, steps=2, layers=[1])
    want = _naive_ig(model, x, 1, 2)
    assert ig.attribution.to_numpy() == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert not np.allclose(want, R.integrated_gradients(base, x, steps=2, layers=[1]).attribution.to_numpy())


def test_estimate_counts_the_models_matrix_products_and_the_reports_own_steps():
    model = _native(n_layers=2)                       # C = 16, d_mlp = 32, V = 40, context 8
    C, d_mlp, n, T = 16, 32, 24, 8
    per_block = 4 * C * C + 2 * C * d_mlp           # q, k, v, output projection; MLP in and out
    want = 2 * per_block * n * 2 + 4 * T * C * n * 2 + 2 * C * V * n    # attention: scores and values, T x T
    got = R.estimate(model, n, "forward")
    assert got["flops"] == pytest.approx(want) and got["seconds"] > 0
    assert R.estimate(model, n, "report") == R.estimate(model, n, "report", steps=16)   # the report's default
    assert R.estimate(model, n, "integrated_gradients") == R.estimate(model, n, "integrated_gradients", steps=32)
    assert R.estimate(model, n, "report", steps=2)["flops"] < R.estimate(model, n, "report")["flops"]
    skip = R.estimate(model, n, "skip_effects")
    assert want < skip["flops"] < 3 * want and skip["forwards"] == 3     # fewer block passes than 3 forwards
