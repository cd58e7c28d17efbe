"""The TLEG learngene checked against constructions with known answers: a model whose blocks are exactly
linear in depth (r2 = 1, expand(L) reproduces it), numpy's polyfit for the per-element least squares, and
a distillation loss against an identical teacher (KL = 0)."""
import copy

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import learngene, models

FAST = dict(eval_every=1000, eval_max=128)


def _mlp(n_layers=4, seed=0):
    return models.build(models.MLPConfig(d_in=6, n_classes=3, d_model=8, n_layers=n_layers, d_hidden=10, seed=seed))


def _linear_in_depth(model, gen):
    """Set every block parameter to A + (l/L) B; returns {name: (A, B)}."""
    L = len(model.blocks)
    truth = {}
    with torch.no_grad():
        for name, p in model.blocks[0].named_parameters():
            A, B = torch.randn(p.shape, generator=gen), torch.randn(p.shape, generator=gen)
            truth[name] = (A, B)
            for l, blk in enumerate(model.blocks):
                dict(blk.named_parameters())[name].copy_(A + (l / L) * B)
    return truth


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_linear_in_depth_model_is_fitted_exactly_and_reproduced(family):
    if family == "mlp":
        model, x = _mlp(4), torch.randn(5, 6)
    else:
        model = models.build(models.TransformerConfig(vocab_size=9, context=4, d_model=8, n_layers=3, n_heads=2,
                                                      d_mlp=12))
        x = torch.randint(0, 9, (2, 4))
    truth = _linear_in_depth(model, torch.Generator().manual_seed(0))
    gene = learngene.fit(model)
    assert gene.n_layers == len(model.blocks)
    table = gene.table()
    assert list(table["param"]) == learngene.block_parameter_names(model)
    assert np.allclose(table["r2"], 1.0, atol=1e-9)
    for name, (A, B) in truth.items():
        torch.testing.assert_close(gene.base[name], A, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gene.slope[name], B, rtol=1e-5, atol=1e-5)
    again = gene.expand(len(model.blocks))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
    deeper = gene.expand(6)
    assert len(deeper.blocks) == 6 and deeper.config.n_layers == 6
    name, (A, B) = next(iter(truth.items()))
    torch.testing.assert_close(dict(deeper.blocks[5].named_parameters())[name], A + (5 / 6) * B, rtol=1e-5, atol=1e-5)


def test_fit_matches_numpy_polyfit_and_its_r2():
    model = _mlp(5, seed=3)   # random init: not linear in depth
    gene = learngene.fit(model)
    L = 5
    t = np.arange(L) / L
    W = np.stack([blk.fc.weight.detach().double().numpy().ravel() for blk in model.blocks])   # (L, n)
    slope, base = np.polyfit(t, W, 1)
    np.testing.assert_allclose(gene.slope["fc.weight"].numpy().ravel(), slope, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gene.base["fc.weight"].numpy().ravel(), base, rtol=1e-4, atol=1e-6)
    ss_res = ((W - (base + np.outer(t, slope))) ** 2).sum()
    ss_tot = ((W - W.mean(0)) ** 2).sum()
    r2 = gene.table().set_index("param").loc["fc.weight", "r2"]
    assert r2 == pytest.approx(1 - ss_res / ss_tot, rel=1e-9)
    assert r2 < 0.9                                       # independent random blocks are far from linear


def test_constrained_model_is_its_learngene_and_distillation_from_an_identical_teacher():
    ds = wb.data.load("digits")
    cfg = models.config_for(ds, d_model=16, d_hidden=16, n_layers=3)
    gene, run = learngene.train(ds, cfg, wb.TrainConfig(steps=15, **FAST))
    assert run.meta["learngene"]["aux_layers"] == 3 and run.status == "completed"
    assert np.isfinite(run.final("loss"))
    aux = learngene.LearngeneModel(cfg)
    assert models.count_params(aux, trainable_only=True) < models.count_params(models.build(cfg))
    x, y = ds.x_val[:32], ds.y_val[:32]
    with torch.no_grad():
        for p in aux.slope.values():
            p.normal_(0, 0.1)
        torch.testing.assert_close(aux.learngene().expand(3)(x), aux(x), rtol=1e-5, atol=1e-5)
    assert np.allclose(learngene.fit(aux.learngene().expand(3)).table()["r2"], 1.0, atol=1e-6)
    teacher = copy.deepcopy(aux)
    loss = learngene._Distill(teacher, alpha=0.5, temperature=2.0)(aux, x, y)
    ce = torch.nn.functional.cross_entropy(aux(x), y)
    torch.testing.assert_close(loss, 0.5 * ce, rtol=1e-5, atol=1e-6)   # KL to an identical teacher is 0


def test_expansion_table_shape_and_init_losses():
    ds = wb.data.load("digits")
    cfg = models.config_for(ds, d_model=16, d_hidden=16, n_layers=2)
    gene = learngene.fit(_trained := models.build(cfg))
    table = learngene.expansion(ds, gene, depths=[2, 3], train_config=wb.TrainConfig(steps=3, **FAST))
    assert len(table) == 2 * 2 * 3
    assert set(table["init"]) == {"learngene", "random"} and set(table["depth"]) == {2, 3}
    at_init = table.query("init == 'learngene' and depth == 2 and metric == 'loss_at_init'")["value"].item()
    assert at_init == pytest.approx(wb.training.evaluate(_trained, ds, max_examples=128)["loss"], rel=1e-5)


def test_slope_starts_at_an_independent_block_and_biases_at_zero():
    cfg = models.MLPConfig(d_in=6, n_classes=3, d_model=8, n_layers=3, d_hidden=10, seed=4)
    aux = learngene.LearngeneModel(cfg)
    ref = models.build(cfg)                                # the same seed: the template's blocks
    torch.testing.assert_close(aux.base["fc__weight"].detach(), ref.blocks[0].fc.weight.detach())
    torch.testing.assert_close(aux.slope["fc__weight"].detach(), ref.blocks[1].fc.weight.detach())
    assert torch.count_nonzero(aux.slope["fc__bias"]) == 0 and torch.count_nonzero(aux.slope["pre_norm__weight"]) == 0


def test_budget_curve_is_the_shorter_run_and_the_experiment_protocol():
    ds = wb.data.load("digits")
    cfg = models.config_for(ds, d_model=8, d_hidden=8, n_layers=2)
    gene = learngene.fit(models.build(cfg))
    tc = dict(lr=3e-3, **FAST)
    long = learngene.expansion(ds, gene, depths=[3], train_config=wb.TrainConfig(steps=6, **tc), budgets=(3,))
    short = learngene.expansion(ds, gene, depths=[3], train_config=wb.TrainConfig(steps=3, **tc))
    for init in ("learngene", "random"):
        a = long.query(f"init == '{init}' and metric == 'loss@3'")["value"].item()
        b = short.query(f"init == '{init}' and metric == 'loss'")["value"].item()
        assert a == pytest.approx(b, rel=1e-5)             # constant schedule: step 3 of 6 is a 3-step run
    assert long.query("metric == 'loss@3'")["value"].ne(long.query("metric == 'loss'")["value"].values).all()
    # the auxiliary model is as deep as the deepest descendant; each seed trains its own learngene
    g, table = learngene.experiment(ds, depths=[3], seeds=(0, 1), teacher="train", d_model=8, d_hidden=8,
                                    learngene_train=wb.TrainConfig(steps=4, **FAST),
                                    train_config=wb.TrainConfig(steps=2, **FAST))
    assert g.n_layers == 3 and set(table["seed"]) == {0, 1}
    init = table.query("init == 'learngene' and metric == 'loss_at_init' and depth == 3")["value"]
    assert init.nunique() == 2                             # two learngenes, not one reused
    with pytest.raises(ValueError, match="teacher must be None, a model, a Run or 'train'"):
        learngene.experiment(ds, depths=[2], teacher="yes")
    with pytest.raises(ValueError, match=r"budget must be an integer in \[1, 2\]"):
        learngene.expansion(ds, gene, depths=[2], train_config=wb.TrainConfig(steps=2, **FAST), budgets=(5,))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        learngene.fit(_mlp(1))
    gene = learngene.fit(_mlp(2))
    with pytest.raises(ValueError, match=r"n_layers must be an integer in \[1, 256\], got 0"):
        gene.expand(0)
    ds = wb.data.load("digits")
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0, 1\]"):
        learngene.train(ds, alpha=2.0, n_layers=2)
    with pytest.raises(ValueError, match="gene must be a Learngene"):
        learngene.expansion(ds, "gene")
    with pytest.raises(ValueError, match=r"^model must be a workbench model \(ResidualMLP or Transformer\), got Linear$"):
        learngene.fit(torch.nn.Linear(2, 2))
