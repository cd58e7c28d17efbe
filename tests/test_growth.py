"""Growth operators: function preservation, G_stack, freezing, optimizer state across growth."""
import copy

import pytest
import torch

import workbench as wb
from workbench import growth
from workbench.models import MLPConfig, TransformerConfig, build


def _perturb(model, seed=1, scale=0.3):
    """Move every parameter away from its init (LN gains != 1, biases != 0) so tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
    return model


def _mlp(norm="pre", n_layers=2, seed=0):
    return _perturb(build(MLPConfig(d_in=10, n_classes=5, d_model=16, d_hidden=24, n_layers=n_layers, norm=norm,
                                    seed=seed)))


def _tf(norm="pre", n_layers=2, seed=0, **kw):
    cfg = TransformerConfig(vocab_size=11, context=8, d_model=16, n_heads=2, d_mlp=32, n_layers=n_layers,
                            norm=norm, seed=seed, **kw)
    return _perturb(build(cfg))


def _inputs(model, n=6):
    g = torch.Generator().manual_seed(3)
    if model.config.family == "mlp":
        return torch.randn(n, model.config.d_in, generator=g)
    return torch.randint(0, model.config.vocab_size, (n, model.config.context), generator=g)


FAMILIES = [("mlp", "pre"), ("mlp", "peri"), ("mlp", "none"), ("transformer", "pre"), ("transformer", "peri")]


def _model(family, norm, **kw):
    return _mlp(norm, **kw) if family == "mlp" else _tf(norm, **kw)


@pytest.mark.parametrize("family,norm", FAMILIES)
@pytest.mark.parametrize("init", ["zero", "fade"])
@pytest.mark.parametrize("position", ["top", "bottom", 1])
def test_function_preserving_inits(family, norm, init, position):
    model = _model(family, norm).eval()
    x = _inputs(model)
    with torch.no_grad():
        before = model(x)
    block = growth.add_layer(model, init=init, position=position)
    assert len(model.blocks) == 3 and model.config.n_layers == 3
    idx = {"top": 2, "bottom": 0, 1: 1}[position]
    assert model.blocks[idx] is block
    assert all(p.requires_grad for p in block.parameters())
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family,norm", FAMILIES)
def test_zero_init_block_still_learns(family, norm):
    """The zero-initialised block gets a gradient at once (peri: through the norm gains, pre: the projections)."""
    model = _model(family, norm)
    block = growth.add_layer(model, init="zero")
    x = _inputs(model)
    out = model(x)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in block.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads, "no parameter of the new block receives a gradient"


@pytest.mark.parametrize("family,norm", [("mlp", "pre"), ("transformer", "peri")])
def test_random_and_copy_inits(family, norm):
    model = _model(family, norm)
    x = _inputs(model)
    with torch.no_grad():
        before = model(x)
    block = growth.add_layer(model, init="random")
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-4  # random init changes the function
    # copy duplicates the block below the insertion point into independent parameters
    copied = growth.add_layer(model, init="copy", position=1)
    ref = model.blocks[0]
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), copied.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1 is not p2
    copied_at_bottom = growth.add_layer(model, init="copy", position="bottom")
    assert torch.equal(next(copied_at_bottom.parameters()), next(model.blocks[1].parameters()))
    assert block in list(model.blocks)


def test_random_init_is_seeded():
    a, b = _tf(), _tf()
    ba, bb = growth.add_layer(a, init="random"), growth.add_layer(b, init="random")
    assert all(torch.equal(p, q) for p, q in zip(ba.parameters(), bb.parameters()))
    bc = growth.add_layer(_tf(), init="random", seed=123)
    assert not all(torch.equal(p, q) for p, q in zip(ba.parameters(), bc.parameters()))


def test_fade_gate_ramps_to_one():
    ds = wb.data.load("digits")
    model = build(MLPConfig(d_in=64, n_classes=10, d_model=32, d_hidden=32, n_layers=1))
    block = growth.add_layer(model, init="fade", fade_steps=4)
    assert block.residual_scale == 0.0 and growth.fading_blocks(model) == [block]
    seen = []

    class Spy(wb.Callback):
        def on_step(self, state):
            seen.append(block.residual_scale)

    wb.train(model, ds, wb.TrainConfig(steps=6, eval_every=100), callbacks=[growth.FadeIn(), Spy()])
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert growth.fading_blocks(model) == []


def test_add_layer_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="init must be one of"):
        growth.add_layer(model, init="identity")
    with pytest.raises(ValueError, match="position"):
        growth.add_layer(model, position=7)
    with pytest.raises(ValueError, match="fade_steps"):
        growth.add_layer(model, init="fade", fade_steps=0)
    empty = build(MLPConfig(d_in=10, n_classes=5, n_layers=0))
    with pytest.raises(ValueError, match="copy"):
        growth.add_layer(empty, init="copy")
    growth.add_layer(empty, init="zero")  # growing from zero blocks works
    assert empty.config.n_layers == 1


@pytest.mark.parametrize("family,norm", [("mlp", "pre"), ("transformer", "pre"), ("transformer", "peri")])
def test_stack_matches_running_the_stack_twice(family, norm):
    model = _model(family, norm).eval()
    ref = copy.deepcopy(model)
    x = _inputs(model)
    growth.stack(model, factor=2)
    assert len(model.blocks) == 4 and model.config.n_layers == 4
    with torch.no_grad():
        h = ref.embed(x)
        for _ in range(2):
            for block in ref.blocks:
                h = block(h)
        expected = ref.unembed(h)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the copies are independent parameters
    assert model.blocks[0].fc.weight is not model.blocks[2].fc.weight if family == "mlp" else \
        model.blocks[0].attn.qkv.weight is not model.blocks[2].attn.qkv.weight
    with pytest.raises(ValueError, match="factor"):
        growth.stack(model, factor=0)


def test_freeze_leaves_frozen_parameters_bitwise_unchanged_and_out_of_the_optimizer():
    ds = wb.data.load("digits")
    model = build(MLPConfig(d_in=64, n_classes=10, d_model=32, d_hidden=32, n_layers=3))
    growth.freeze(model, below=2)
    assert growth.frozen_layers(model) == [True, True, False]
    assert not model.stem.weight.requires_grad  # the embedding counts as below block 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = wb.train(model, ds, wb.TrainConfig(steps=20, eval_every=100, weight_decay=0.1))
    opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert id(p) not in opt_params
        else:
            assert id(p) in opt_params
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in trainable.items())
    growth.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_options_and_errors():
    model = _tf(n_layers=3)
    growth.freeze(model, below=1, embed=False)
    assert model.tok_embed.weight.requires_grad and growth.frozen_layers(model) == [True, False, False]
    growth.freeze(model, layers=[2])
    assert growth.frozen_layers(model) == [True, False, True]
    growth.freeze(model, below=3)
    assert model.readout.weight.requires_grad and not model.pos_embed.weight.requires_grad
    with pytest.raises(ValueError, match=r"below must be an integer in \[0, 3\]"):
        growth.freeze(model, below=4)
    with pytest.raises(ValueError, match="layers must be block indices"):
        growth.freeze(model, layers=[5])
    with pytest.raises(ValueError, match="exactly one"):
        growth.freeze(model)
    # a frozen substrate stays frozen after unfreeze
    glyph = build(TransformerConfig(vocab_size=4, context=4, d_model=8, n_heads=2, d_mlp=8, n_layers=1,
                                    embedding="frozen-random"))
    growth.unfreeze(glyph)
    assert not glyph.tok_embed.weight.requires_grad and glyph.pos_embed.weight.requires_grad


def test_optimizer_state_survives_growth():
    ds = wb.data.load("digits")
    model = build(MLPConfig(d_in=64, n_classes=10, d_model=32, d_hidden=32, n_layers=1))
    run = wb.train(model, ds, wb.TrainConfig(steps=10, eval_every=100))
    old = run.optimizer
    w = model.readout.weight
    m_before = old.state[w]["exp_avg"].clone()
    assert float(old.state[w]["step"]) == 10
    new_block = growth.add_layer(model, init="zero")
    growth.freeze(model, below=1)
    opt = growth.rebuild_optimizer(model, old, lr=5e-4)
    assert torch.equal(opt.state[w]["exp_avg"], m_before)
    for p in new_block.parameters():
        assert p not in opt.state or not opt.state[p]
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    assert opt.param_groups[0]["lr"] == 5e-4
    wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=100), optimizer=opt, start_step=10)
    assert float(opt.state[w]["step"]) == 13  # continued, not restarted
    assert float(opt.state[new_block.fc.weight]["step"]) == 3
