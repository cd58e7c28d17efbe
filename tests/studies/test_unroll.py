"""Shallow unrolling checked against constructions with known answers: a stack with one non-zero block
(gap exactly 0), two linear blocks (the hand second-order term A_2 A_1 x), and the unrolled model's
output computed by hand."""
import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench import models, unroll


def _mlp(n_layers=3, norm="pre", seed=0, d_model=8):
    return models.build(models.MLPConfig(d_in=5, n_classes=3, d_model=d_model, n_layers=n_layers, d_hidden=12,
                                         norm=norm, seed=seed))


def _linear_blocks(model, gen):
    """Make every block F_i(x) = A_i x (no norm, identity activation, no biases); returns the A_i."""
    As = []
    with torch.no_grad():
        for blk in model.blocks:
            blk.act = nn.Identity()
            blk.fc.bias.zero_()
            blk.proj.bias.zero_()
            blk.fc.weight.copy_(torch.randn(blk.fc.weight.shape, generator=gen) * 0.3)
            blk.proj.weight.copy_(torch.randn(blk.proj.weight.shape, generator=gen) * 0.3)
            As.append((blk.proj.weight @ blk.fc.weight).double())
    return As


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_one_nonzero_block_has_gap_exactly_zero(family):
    if family == "mlp":
        model = _mlp(4)
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    else:
        model = models.build(models.TransformerConfig(vocab_size=11, context=6, d_model=16, n_layers=3, n_heads=2,
                                                      d_mlp=24))
        x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    for blk in list(model.blocks)[1:]:
        blk.zero_output_()
    table = unroll.gap(model, x, x if family == "transformer" else torch.zeros(16, dtype=torch.long))
    g = table[table["metric"] == "gap"]["value"]
    assert len(g) == len(model.blocks) and (g == 0.0).all()
    par = unroll.parallel(model)
    assert torch.equal(par(x), model(x))
    # a second non-zero block makes the gap positive
    model2 = _mlp(4)
    for blk in list(model2.blocks)[2:]:
        blk.zero_output_()
    g2 = unroll.gap(model2, torch.randn(16, 5)).query("metric == 'gap'")["value"].tolist()
    assert g2[0] == 0.0 and g2[1] > 0.0


def test_two_linear_blocks_give_the_hand_second_order_term():
    model = _mlp(2, norm="none")
    As = _linear_blocks(model, torch.Generator().manual_seed(0))
    x0 = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    steps = list(unroll.terms(model, x0))
    _, deep, par, s2 = steps[1]
    xd = x0.double()
    hand = xd @ As[0].T @ As[1].T                         # A_2 A_1 x for each row x
    torch.testing.assert_close(s2.double(), hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(par.double(), xd + xd @ As[0].T + xd @ As[1].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((deep - par).double(), hand, rtol=1e-4, atol=1e-5)   # the expansion stops there
    assert torch.count_nonzero(steps[0][3]) == 0         # one block: no second-order term
    table = unroll.gap(model, model.stem.weight.new_zeros(1, 5) + torch.randn(10, 5)).set_index(["depth", "metric"])
    assert table.loc[(2, "second_order_share"), "value"] == pytest.approx(1.0, abs=1e-4)
    # three linear blocks: a third-order term remains, so S2 explains only part of the gap
    model3 = _mlp(3, norm="none")
    _linear_blocks(model3, torch.Generator().manual_seed(0))
    t3 = unroll.gap(model3, torch.randn(10, 5)).set_index(["depth", "metric"])
    assert 0.0 < t3.loc[(3, "second_order_share"), "value"] < 1.0 - 1e-4


def test_parallel_model_is_the_hand_first_order_model_and_copies():
    model = _mlp(2, norm="none")
    As = _linear_blocks(model, torch.Generator().manual_seed(3))
    x = torch.randn(7, 5)
    par = unroll.parallel(model)
    with torch.no_grad():
        x0 = model.stem(x).double()
        y_par = x0 + x0 @ As[0].T + x0 @ As[1].T
        hand = model.readout(y_par.float())               # norm="none": the final norm is the identity
    torch.testing.assert_close(par(x), hand, rtol=1e-5, atol=1e-5)
    assert par.base is not model and unroll.parallel(model, copy_model=False).base is model
    assert models.count_params(par) == models.count_params(model)


def test_transformer_sublayers_read_x0():
    cfg = models.TransformerConfig(vocab_size=7, context=5, d_model=8, n_layers=1, n_heads=2, d_mlp=16)
    model = models.build(cfg)
    x = torch.randint(0, 7, (3, 5))
    blk = model.blocks[0]
    with torch.no_grad():
        x0 = model.embed(x)
        a = blk.attn(blk.ln1(x0))
        hand_sub = model.unembed(x0 + a + blk.mlp(blk.ln2(x0)))
        hand_block = model.unembed(x0 + a + blk.mlp(blk.ln2(x0 + a)))
    torch.testing.assert_close(unroll.parallel(model, "sublayer")(x), hand_sub, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unroll.parallel(model, "block")(x), hand_block, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unroll.parallel(model, "block")(x), model(x), rtol=1e-5, atol=1e-6)  # one block


def test_compare_and_layouts_on_digits():
    ds = wb.data.load("digits")
    model = models.build(models.config_for(ds, d_model=16, d_hidden=16, n_layers=3))
    wb.train(model, ds, wb.TrainConfig(steps=20, eval_every=100, eval_max=128))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = unroll.compare(model, ds, wb.TrainConfig(steps=10, eval_every=100, eval_max=128))
    assert list(table["model"].unique()) == ["deep", "unrolled", "unrolled + fine-tuned"]
    deep = table.query("model == 'deep' and metric == 'acc'")["value"].item()
    assert deep == wb.training.evaluate(model, ds)["acc"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # the original is untouched
    lay = unroll.compare_layouts(ds, model.config, wb.TrainConfig(steps=5, eval_every=100, eval_max=128), seeds=(0,))
    p = lay.query("metric == 'params'").set_index("layout")["value"]
    assert p["sequential"] == p["parallel"] == models.count_params(model)
    assert set(lay["metric"]) == {"loss", "acc", "params", "best_loss", "best_acc", "best_step", "train_loss"}


def test_bad_arguments_are_refused_by_name():
    model = _mlp(2)
    with pytest.raises(ValueError, match=r"unit must be one of \['block', 'sublayer'\]"):
        unroll.parallel(model, "layer")
    with pytest.raises(ValueError, match=r"^model must be a workbench model \(ResidualMLP or Transformer\), got Linear$"):
        unroll.gap(nn.Linear(2, 2), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"max_examples must be an integer in \[1, 1000000\]"):
        unroll.gap(model, torch.randn(3, 5), max_examples=0)
    with pytest.raises(ValueError, match="x must be"):
        unroll.gap(model, torch.randn(3, 4))
    with pytest.raises(ValueError, match="finetune must be a TrainConfig"):
        unroll.compare(model, wb.data.load("digits"), finetune={"steps": 3})
