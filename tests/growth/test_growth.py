"""Growth operators: function preservation, G_stack, freezing, optimizer state across growth."""
import copy
import dataclasses
import math

import pytest
import torch

import workbench as wb
from workbench import growth, recipes
from workbench.core.models import MLPConfig, TransformerConfig, build
from helpers.perturb import perturb_


def _mlp(norm="pre", n_layers=2, seed=0):
    return perturb_(build(MLPConfig(d_in=10, n_classes=5, d_model=16, d_hidden=24, n_layers=n_layers, norm=norm,
                                    seed=seed)))


def _tf(norm="pre", n_layers=2, seed=0, **kw):
    cfg = TransformerConfig(vocab_size=11, context=8, d_model=16, n_heads=2, d_mlp=32, n_layers=n_layers,
                            norm=norm, seed=seed, **kw)
    return perturb_(build(cfg))


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


# ----------------------------------------------------------------------------- FLOPs


def _counted_flops(model, x):
    """Independent count: torch's FlopCounterMode over one forward + backward (math attention kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family,norm", FAMILIES)
@pytest.mark.parametrize("frozen", [None, 0, 1, 2, "middle", "embed-only"])
def test_flop_count_matches_flop_counter(family, norm, frozen):
    from workbench import flops

    model = _model(family, norm, n_layers=3)
    if frozen == "middle":
        growth.freeze(model, layers=[1])
    elif frozen == "embed-only":
        for m in growth.operators._embedding_modules(model):
            m.requires_grad_(False)
    elif frozen is not None:
        growth.freeze(model, below=frozen)
    x = _inputs(model, n=5)
    expected = _counted_flops(model, x)
    seq = None if family == "mlp" else model.config.context
    got = flops.step_flops(model, batch_size=5, seq_len=seq)
    assert got["total"] == expected
    assert got["forward"] * 3 >= got["total"]


def test_flops_shrink_with_freezing_and_grow_with_depth():
    from workbench import flops

    model = _tf(n_layers=2)
    full = flops.flops_per_example(model)
    growth.freeze(model, below=2)
    assert flops.flops_per_example(model) < full
    growth.unfreeze(model)
    growth.add_layer(model)
    assert flops.flops_per_example(model) > full


def test_examples_seen_matches_the_trainer():
    from workbench import flops

    ds = wb.data.load("digits")  # 1437 training examples: epochs end with a short batch
    seen = []

    class Count(wb.Callback):
        def on_step(self, state):
            pass

    model = build(MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=0))
    orig = model.forward

    def spy(x):
        if torch.is_grad_enabled() and model.training:
            seen.append(len(x))
        return orig(x)

    model.forward = spy
    wb.train(model, ds, wb.TrainConfig(steps=30, batch_size=100, eval_every=1000))
    for k in (0, 1, 14, 15, 16, 30):
        assert flops.examples_seen(k, len(ds.x_train), 100) == sum(seen[:k])
    assert flops.steps_for_budget(sum(seen[:16]) * 7, 7, len(ds.x_train), 100) == 16


# ----------------------------------------------------------------------------- grow


def _tiny_digits():
    return wb.data.load("digits")


def _tiny_mlp(n_layers=1):
    return build(MLPConfig(d_in=64, n_classes=10, d_model=32, d_hidden=32, n_layers=n_layers))


def test_grow_layerwise_records_stages_flops_and_freezing(store):
    from workbench import flops

    ds = _tiny_digits()
    model = _tiny_mlp(1)
    schedule = growth.preset("layerwise", steps=20, start_layers=1, final_layers=3)
    assert [s.op for s in schedule] == ["train", "add_layer", "add_layer"]
    run = growth.grow(model, ds, schedule, wb.TrainConfig(eval_every=10, batch_size=50), store=store, group="g1")
    m = run.metrics
    assert {"stage", "op", "n_layers", "trainable_params", "flops"} <= set(m.columns)
    assert m["flops"].notna().all() and m["flops"].is_monotonic_increasing
    assert sorted(m["stage"].unique()) == [0, 1, 2]
    assert m.groupby("stage")["n_layers"].first().tolist() == [1, 2, 3]
    assert int(m["step"].max()) == 60
    assert model.config.n_layers == 3 and growth.frozen_layers(model) == [True, True, False]
    # trainable params: stage 2 trains one block + final norm + readout only
    tp = m.groupby("stage")["trainable_params"].first().tolist()
    assert tp[2] < tp[0] + sum(p.numel() for p in model.blocks[2].parameters()) + 1
    # FLOPs: per stage, per-example cost x examples, at that stage's depth and freezing
    probe = _tiny_mlp(1)
    f0 = flops.flops_per_example(probe) * flops.examples_seen(20, len(ds.x_train), 50)
    assert m[m["step"] == 20]["flops"].iloc[0] == pytest.approx(f0)
    # function preservation is visible on the curve: the eval right after growth equals the one before
    val = m[(m["split"] == "val") & (m["metric"] == "loss")]
    at20 = val[val["step"] == 20].sort_values("stage")["value"].tolist()
    assert len(at20) == 2 and at20[0] == pytest.approx(at20[1], abs=1e-6)
    # one store entry per stage, chained by parent
    listing = store.list().sort_values("stage")
    assert listing["stage"].tolist() == [0, 1, 2] and set(listing["group_name"]) == {"g1"}
    ids = run.meta["stage_run_ids"]
    assert run.run_id == ids[-1]
    docs = [store.read_json(i)["meta"] for i in ids]
    assert [d["parent"] for d in docs] == [None, ids[0], ids[1]]
    loaded = store.load(ids[1])
    assert loaded.model.config.n_layers == 2
    assert set(loaded.metrics["stage"]) == {0, 1}


def test_grow_keeps_optimizer_state_across_stages():
    ds = _tiny_digits()
    model = _tiny_mlp(1)
    w = model.readout.weight
    states = []
    schedule = [growth.Stage("train", 5), growth.Stage("add_layer", 4, init="random")]

    def on_stage(run):
        states.append(float(run.optimizer.state[w]["step"]))

    growth.grow(model, ds, schedule, wb.TrainConfig(eval_every=100), on_stage=on_stage)
    assert states == [5.0, 9.0]


def test_grow_stack_and_lr_per_stage():
    ds = _tiny_digits()
    model = _tiny_mlp(2)
    run = growth.grow(model, ds, [growth.Stage("train", 5), growth.Stage("stack", 5, lr=1e-4, freeze=2)],
                      wb.TrainConfig(eval_every=100))
    assert model.config.n_layers == 4 and growth.frozen_layers(model) == [True, True, False, False]
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_grow_a_model_loaded_from_the_store(store):
    ds = _tiny_digits()
    base = wb.train(_tiny_mlp(1), ds, wb.TrainConfig(steps=30, eval_every=100))
    run_id = store.save(base)
    loaded = store.load(run_id).model
    x = ds.x_val[:50]
    with torch.no_grad():
        before = loaded(x)
    run = growth.grow(loaded, ds, [growth.Stage("add_layer", 10, freeze="old")], wb.TrainConfig(eval_every=5))
    first = run.metrics[(run.metrics["split"] == "val") & (run.metrics["metric"] == "loss")]["value"].iloc[0]
    assert first == pytest.approx(base.final("loss"), abs=1e-6)  # zero init: same function after growth
    assert loaded.config.n_layers == 2 and growth.frozen_layers(loaded) == [True, False]
    assert before.shape == (50, 10)


@pytest.mark.parametrize("schedule,match", [
    ([growth.Stage("train", 0)], r"stage 0 .*steps must be an integer in \[1, 10000000\], got 0"),
    ([{"op": "add_layer", "steps": 5}, {"op": "shrink", "steps": 5}], "stage 1: unknown operation 'shrink'"),
    ([{"op": "add_layer", "steps": 5, "freeze": 4}], r"stage 0 .*freeze must be .*\[0, 2\]"),
    ([{"op": "train", "steps": 5, "colour": 1}], "unknown field"),
    ([], "empty"),
    ([{"op": "add_layer", "steps": 5, "init": "ones"}], "init must be one of"),
    ([{"op": "train", "steps": 5, "lr": -1.0}], "lr must be"),
])
def test_bad_schedules_raise_clear_errors(schedule, match):
    with pytest.raises(ValueError, match=match):
        growth.grow(_tiny_mlp(1), _tiny_digits(), schedule)


def test_grow_control_adds_a_layer_between_steps_and_stops():
    ds = _tiny_digits()
    model = _tiny_mlp(1)
    control = growth.GrowControl()

    class Press(wb.Callback):
        def on_step(self, state):
            if state.step == 3:
                control.request_layer("zero")
            if state.step == 12:
                control.stop()

    run = growth.grow(model, ds, [growth.Stage("train", 8, freeze="old")], wb.TrainConfig(eval_every=100),
                      control=control, callbacks=[Press()])
    # the requested layer came after step 3; the stage's remaining 5 steps followed, then nothing more
    assert model.config.n_layers == 2
    stages = run.meta["stages"]
    assert [s["steps_done"] for s in stages] == [3, 5]
    assert stages[0]["interrupted"] == "add_layer"
    assert run.status == "completed"
    control2 = growth.GrowControl()
    control2.stop()
    run2 = growth.grow(_tiny_mlp(1), ds, [growth.Stage("train", 8)], control=control2)
    assert run2.status == "cancelled"
    stopped = wb.monitor.Monitor()            # the one stop: the monitor's
    stopped.stop()
    run3 = growth.grow(_tiny_mlp(1), ds, [growth.Stage("train", 8), growth.Stage("add_layer", 8)], monitor=stopped)
    assert run3.status == "cancelled" and [s["interrupted"] for s in run3.meta["stages"]] == ["stop"]


def test_compare_equal_budgets_and_flops_to_target():
    ds = _tiny_digits()
    cmp = growth.compare([growth.Stage("train", 30), growth.Stage("add_layer", 30, freeze="old")], ds,
                         dict(d_model=32, d_hidden=32, n_layers=1), wb.TrainConfig(eval_every=10, batch_size=32))
    s = cmp.summary.set_index("method")
    assert s.loc["grown", "n_layers"] == s.loc["scratch", "n_layers"] == 2
    # the scratch run gets the grown run's budget (to within one step)
    assert s.loc["scratch", "flops"] >= s.loc["grown", "flops"]
    from workbench import flops
    one_step = flops.flops_per_example(cmp.runs["scratch"].model) * 32
    assert s.loc["scratch", "flops"] - s.loc["grown", "flops"] <= one_step
    assert cmp.target_loss == pytest.approx(s.loc["scratch", "val_loss"])
    assert cmp.flops_to_target["scratch"] <= s.loc["scratch", "flops"]
    assert set(cmp.metrics["method"]) == {"grown", "scratch"}
    if not math.isnan(cmp.ratio):
        assert cmp.ratio == pytest.approx(cmp.flops_to_target["grown"] / cmp.flops_to_target["scratch"])


def test_flops_to_reach_interpolates():
    import pandas as pd

    m = pd.DataFrame({"step": [0, 1, 2], "split": "val", "metric": "loss", "value": [3.0, 2.0, 1.0],
                      "flops": [0.0, 10.0, 20.0]})
    assert growth.flops_to_reach(m, 1.5) == pytest.approx(15.0)
    assert growth.flops_to_reach(m, 3.0) == 0.0
    assert math.isnan(growth.flops_to_reach(m, 0.5))


def test_depth_sweep_table():
    ds = _tiny_digits()
    df = growth.depth_sweep({"digits": ds}, [0, 1], dict(d_model=16, d_hidden=16), wb.TrainConfig(steps=10))
    assert set(df.columns) >= {"task", "depth", "seed", "split", "metric", "value", "flops"}
    assert len(df) == 2 * 2 * 2
    f = df.groupby("depth")["flops"].first()
    assert f[1] > f[0]
    with pytest.raises(ValueError, match="depths"):
        growth.depth_sweep(ds, [])


@pytest.mark.parametrize("embedding", ["glyph", "frozen-random"])
def test_growth_over_a_frozen_substrate(embedding):
    ds = wb.data.load("khop", hops=1, nodes=4, n_train=200, n_val=50)
    cfg = TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, vocab=list(ds.vocab), d_model=16,
                            n_heads=2, d_mlp=16, n_layers=1, embedding=embedding)
    model = build(cfg)
    substrate = model.tok_embed.weight.detach().clone()
    schedule = [growth.Stage("train", 3), growth.Stage("add_layer", 3), growth.Stage("stack", 3, freeze="old")]
    run = growth.grow(model, ds, schedule, wb.TrainConfig(eval_every=100, batch_size=16))
    assert model.config.n_layers == 4 and run.status == "completed"
    assert torch.equal(model.tok_embed.weight, substrate) and not model.tok_embed.weight.requires_grad
    growth.unfreeze(model)
    assert not model.tok_embed.weight.requires_grad  # the substrate stays frozen


def test_khop_recipe_uses_the_table_layout_and_spans_the_needed_depth():
    r = recipes.KHOP
    ds = r.load_data(n_train=20, n_val=20)
    assert ds.options["layout"] == "table" and ds.options["queries"] > 1
    assert ds.seq_len == r.data_options["nodes"] + 1 + r.data_options["queries"]
    assert r.final_layers >= r.data_options["hops"]  # the grown/scratch depth can solve the task
    assert min(r.sweep_depths) < max(r.sweep_hops) <= max(r.sweep_depths)  # too shallow and deep enough


def test_khop_baseline_follows_one_pointer_by_hand():
    from collections import Counter

    ds = wb.data.load("khop", hops=2, nodes=5, queries=4, layout="table", n_train=10, n_val=40)
    vocab, right, total = ds.vocab, 0, 0
    for x, y in zip(ds.x_val.tolist(), ds.y_val.tolist()):
        f = x[:5]
        counts = Counter(f)
        mode = min(v for v in counts if counts[v] == max(counts.values()))  # ties: smallest node id
        for q, target in zip(x[6:], y[6:]):
            guess = q if f[q] == q else mode
            right += guess == target
            total += 1
    assert vocab[5] == "|" and total == 40 * 4
    assert growth.khop_baseline(ds) == pytest.approx(right / total)
    one_hop = wb.data.load("khop", hops=1, nodes=5, queries=4, layout="table", n_train=10, n_val=40)
    assert growth.khop_baseline(one_hop) == 1.0  # one look-up answers one hop
    with pytest.raises(ValueError, match="layout='table'"):
        growth.khop_baseline(wb.data.load("khop", hops=1, nodes=4, n_train=10, n_val=10))


def test_text_recipe_builds_a_char_lm_a_model_and_a_gstack_schedule():
    r = recipes.TEXT
    ds = r.load_data()
    assert ds.name == "text" and ds.kind == "sequence" and ds.seq_len == r.data_options["context"]
    assert len(ds.x_train) > 0 and len(ds.x_val) > 0
    config = r.train_config()
    steps, final = r.steps_per_stage, r.final_layers
    schedule = growth.preset("gstack", steps, start_layers=1, final_layers=final, total_steps=final * steps,
                             stack_at=steps)
    assert growth.schedule_depths(schedule, 1) == [1, final]
    model = wb.models.build(r.model_config(ds, n_layers=1))
    growth.stack(model, factor=final)
    with torch.no_grad():
        logits = model(ds.x_val[:config.batch_size])
    assert model.config.n_layers == final
    assert logits.shape == (min(config.batch_size, len(ds.x_val)), ds.seq_len, ds.vocab_size)
    # a few steps through grow run end to end (cheap: 2 + 2 steps)
    run = growth.grow(wb.models.build(r.model_config(ds, n_layers=1)), ds,
                      growth.preset("gstack", 2, start_layers=1, final_layers=final, total_steps=4, stack_at=2),
                      dataclasses.replace(config, eval_every=2))
    assert run.model.config.n_layers == final and run.meta["flops"] > 0
