"""Trainer: learns digits, respects frozen parameters, stops on NaN and on request, schedules by hand."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.core.data import IGNORE
from workbench.core.training import _lr_factor, loss_and_correct


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


def test_learns_digits_to_90_percent(digits):
    model = wb.models.build(wb.models.config_for(digits))
    run = wb.train(model, digits, wb.TrainConfig(steps=300, lr=3e-3, eval_every=100))
    assert run.status == "completed"
    assert run.final("acc", "val") >= 0.90
    m = run.metrics
    assert list(m.columns[:4]) == ["step", "split", "metric", "value"]
    assert set(m["split"]) == {"batch", "train", "val"}
    assert m[m.split == "batch"]["step"].tolist() == list(range(1, 301))


def test_evaluate_matches_a_direct_computation(digits):
    model = wb.models.build(wb.models.config_for(digits))
    res = wb.evaluate(model, digits, "val", batch_size=7)
    with torch.no_grad():
        logits = model(digits.x_val)
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, digits.y_val).item(), rel=1e-5)
    assert res["acc"] == pytest.approx((logits.argmax(1) == digits.y_val).float().mean().item())


def test_loss_and_correct_ignores_unscored_positions():
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([[IGNORE, IGNORE, 1], [IGNORE, 4, 2]])
    loss, correct, n = loss_and_correct(logits, y)
    picked = [(0, 2, 1), (1, 1, 4), (1, 2, 2)]
    manual = -sum(torch.log_softmax(logits[b, t], -1)[c] for b, t, c in picked) / 3
    assert n == 3 and loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert correct == sum(int(logits[b, t].argmax() == c) for b, t, c in picked)


def test_frozen_parameters_are_bitwise_unchanged_and_not_in_the_optimizer(digits):
    model = wb.models.build(wb.models.config_for(digits, n_layers=2))
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.blocks[0].state_dict().items()}
    run = wb.train(model, digits, wb.TrainConfig(steps=20, eval_every=20, weight_decay=0.1))
    after = model.blocks[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    in_opt = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.blocks[0].parameters())


def test_nan_loss_marks_the_run_diverged(digits):
    bad = wb.data.load("digits")
    bad.x_train[:] = float("nan")
    run = wb.train(wb.models.build(wb.models.config_for(bad)), bad, wb.TrainConfig(steps=50))
    assert run.status == "diverged"
    assert run.metrics[run.metrics.split == "batch"]["step"].max() == 1


def test_stop_event_cancels(digits):
    event = threading.Event()
    event.set()
    run = wb.train(wb.models.build(wb.models.config_for(digits)), digits, wb.TrainConfig(steps=100),
                   callbacks=[wb.StopOnEvent(event)])
    assert run.status == "cancelled"
    assert run.metrics["step"].max() == 1


def test_same_seeds_reproduce_and_data_seed_changes_order(digits):
    def go(seed):
        model = wb.models.build(wb.models.config_for(digits))
        wb.train(model, digits, wb.TrainConfig(steps=15, eval_every=15, seed=seed))
        return model.readout.weight.detach().clone()

    assert torch.equal(go(0), go(0))
    assert not torch.equal(go(0), go(1))


def test_cosine_schedule_with_warmup_by_hand():
    cfg = wb.TrainConfig(steps=110, warmup=10, schedule="cosine")
    assert _lr_factor(0, cfg) == pytest.approx(0.1)
    assert _lr_factor(9, cfg) == pytest.approx(1.0)
    assert _lr_factor(10, cfg) == pytest.approx(1.0)
    assert _lr_factor(60, cfg) == pytest.approx(0.5)
    assert _lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(35, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


@pytest.mark.parametrize("field, value, fragment", [
    ("steps", 0, "steps must be an integer in [1,"),
    ("lr", -1.0, "lr must be a finite number in (0, 10], got -1.0"),
    ("schedule", "linear", "schedule must be one of"),
])
def test_bad_train_config(field, value, fragment):
    with pytest.raises(ValueError) as e:
        wb.TrainConfig(**{field: value}).validate()
    assert fragment in str(e.value)


def test_transformer_trains_on_modadd_and_vocab_mismatch_raises():
    ds = wb.data.load("modadd", p=11, train_fraction=0.8)
    model = wb.models.build(wb.models.config_for(ds, d_model=32, n_heads=2, d_mlp=64))
    run = wb.train(model, ds, wb.TrainConfig(steps=30, eval_every=30))
    assert run.final("loss", "batch") < math.log(ds.vocab_size) + 0.5
    other = wb.data.load("modadd", p=13)
    with pytest.raises(ValueError, match="vocab_size"):
        wb.train(model, other, wb.TrainConfig(steps=1))


def test_custom_loss_fn_replaces_the_minibatch_loss(digits):
    """A loss with zero gradient leaves AdamW (no weight decay) nothing to do: weights stay bitwise."""
    model = wb.models.build(wb.models.config_for(digits, d_model=16, d_hidden=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def zero_loss(m, x, y):
        seen.append(len(x))
        return 0.0 * m(x).sum() + 3.0

    run = wb.train(model, digits, wb.TrainConfig(steps=5, batch_size=32, eval_every=5), loss_fn=zero_loss)
    assert seen == [32] * 5
    assert run.metrics.query("split == 'batch'")["value"].tolist() == [3.0] * 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
