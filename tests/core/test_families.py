"""Model families: the FAMILIES registry, what each family knows about itself, and checkpoints of every growth
state (fade-in gates and frozen flags survive save/load exactly; old checkpoints without the gate buffers load)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import growth
from workbench.core.models import FAMILIES, MLPConfig, TransformerConfig, build

FAMILY_NORMS = [("mlp", "pre"), ("mlp", "peri"), ("mlp", "none"), ("transformer", "pre"), ("transformer", "peri")]
GATES = ("residual_scale", "fade_done", "fade_steps")


@pytest.fixture(scope="module")
def digits():
    return wb.data.load("digits")


@pytest.fixture(scope="module")
def khop():
    return wb.data.load("khop", hops=1, nodes=4, queries=2, layout="table", n_train=64, n_val=32)


def _model(family, norm, ds, n_layers=2, seed=0):
    if family == "mlp":
        cfg = MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=16, d_hidden=24, n_layers=n_layers, norm=norm,
                        seed=seed)
    else:
        cfg = TransformerConfig(vocab_size=ds.vocab_size, context=ds.seq_len, d_model=16, n_heads=2, d_mlp=24,
                                n_layers=n_layers, norm=norm, seed=seed)
    return build(cfg)


# ----------------------------------------------------------------------------- the registry


def test_registry_drives_build_config_from_dict_and_config_for(digits, khop):
    assert set(FAMILIES) == {"mlp", "transformer"}
    assert FAMILIES["mlp"].config is MLPConfig and FAMILIES["mlp"].model is wb.models.ResidualMLP
    assert FAMILIES["transformer"].data_kind == "sequence" and FAMILIES["mlp"].data_kind == "vector"
    cfg_cls, model_cls = FAMILIES["transformer"]            # a Family unpacks like the (config, model) pair
    assert (cfg_cls, model_cls) == (TransformerConfig, wb.models.Transformer)
    for ds, want in ((digits, MLPConfig), (khop, TransformerConfig)):
        cfg = wb.models.config_for(ds, d_model=16, **({"n_heads": 2} if want is TransformerConfig else {}))
        assert type(cfg) is want and wb.models.family_of(ds) is FAMILIES[cfg.family]
        model = build(wb.models.config_to_dict(cfg))
        assert type(model) is FAMILIES[cfg.family].model and wb.models.family_of(model).name == cfg.family
    kcfg = wb.models.config_for(khop, d_model=16, n_heads=2)
    assert (kcfg.vocab_size, kcfg.context, kcfg.vocab) == (len(khop.vocab), khop.seq_len, khop.vocab)
    dcfg = wb.models.config_for(digits)
    assert (dcfg.d_in, dcfg.n_classes) == (64, 10)
    with pytest.raises(ValueError, match=r"families: \['mlp', 'transformer'\]"):
        wb.models.family_of("cnn")
    with pytest.raises(ValueError, match="model family must be one of"):
        wb.models.config_from_dict({"family": "cnn"})


def test_embedding_modules_substrate_and_repair_sites_by_name(digits, khop):
    mlp = _model("mlp", "pre", digits)
    assert mlp.embedding_modules() == [mlp.stem] and mlp.substrate_parameters() == []
    assert mlp.repair_sites() == [mlp.blocks[0].fc, mlp.blocks[1].fc]
    tf = _model("transformer", "pre", khop)
    assert tf.embedding_modules() == [tf.tok_embed, tf.pos_embed] and tf.substrate_parameters() == []
    assert tf.repair_sites() == [tf.blocks[0].mlp.fc, tf.blocks[1].mlp.fc]
    frozen = build(dataclasses.replace(tf.config, embedding="frozen-random"))
    assert frozen.substrate_parameters() == [frozen.tok_embed.weight]


@pytest.mark.parametrize("family,norm", FAMILY_NORMS)
def test_perm_axes_cover_every_weight_with_the_right_sizes(family, norm, digits, khop):
    """Every parameter (a fused qkv as its q, k, v thirds) is listed, each permuted axis has its permutation's size."""
    from workbench import permute

    model = _model(family, norm, digits if family == "mlp" else khop)
    spec = permute.perm_spec(model)
    view = permute._view(model)
    params = {n for n, _ in model.named_parameters()}
    expected = set()
    for n in params:
        if ".attn.qkv." in n:
            prefix, kind = n.split(".attn.qkv.")
            expected |= {f"{prefix}.attn.{t}.{kind}" for t in "qkv"}
        else:
            expected.add(n)
    assert set(spec.axes) == expected
    for name, axes in spec.axes.items():
        for axis, p in enumerate(axes):
            if p is not None:
                assert view[name].shape[axis] == spec.sizes[p], (name, axis, p)
    sites = model.perm_sites()
    assert set(sites) == set(spec.sizes)


# ----------------------------------------------------------------------------- zero output per norm placement


@pytest.mark.parametrize("family,norm", FAMILY_NORMS)
def test_zero_output_adds_exactly_zero_to_the_stream(family, norm, digits, khop):
    ds = digits if family == "mlp" else khop
    block = _model(family, norm, ds).new_block()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.5)   # away from the init (LayerNorm gains 1, biases 0)
    block.zero_output_()
    x = torch.randn(3, 16) if family == "mlp" else torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.equal(block(x), x)


# ----------------------------------------------------------------------------- gate buffers


def test_gate_is_a_buffer_a_number_assigns_and_bad_values_are_refused(digits):
    model = _model("mlp", "pre", digits)
    block = model.blocks[0]
    assert {f"blocks.0.{g}" for g in GATES} <= set(model.state_dict())
    assert float(block.residual_scale) == 1.0 and block.fade is None
    block.residual_scale = 0.5
    assert isinstance(block.residual_scale, torch.Tensor) and float(block.residual_scale) == 0.5
    assert "residual_scale" in dict(block.named_buffers())
    with pytest.raises(ValueError, match="residual_scale must be a finite number"):
        block.residual_scale = "half"
    with pytest.raises(ValueError, match="fade_done must be an integer"):
        block.fade_done = 1.5
    x = digits.x_val[:8]
    with torch.no_grad():
        h = model.embed(x)
        out = block.proj(block.act(block.fc(block.pre_norm(h))))
        torch.testing.assert_close(block(h), h + 0.5 * out, rtol=0, atol=0)


def test_a_state_dict_without_gate_buffers_loads_fully_faded_in(digits):
    model = _model("mlp", "pre", digits)
    growth.add_layer(model, init="fade", fade_steps=10)
    growth.advance_fades(model, 3)
    old = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in GATES}
    other = _model("mlp", "pre", digits, n_layers=3)
    other.blocks[1].residual_scale = 0.25
    other.load_state_dict(old)   # strict: the gate keys are optional
    assert all(float(b.residual_scale) == 1.0 and b.fade is None for b in other.blocks)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in old.items() if k != "readout.weight"})


# ----------------------------------------------------------------------------- checkpoints of every growth state


def _grow_into(state, model, fade_steps=100):
    """Bring ``model`` into a growth state; returns the number of training steps to run afterwards."""
    if state in ("zero", "copy", "random"):
        growth.add_layer(model, init=state, position=1)
        return 5
    if state == "fade":                       # just inserted: gate 0.03 after 3 steps
        growth.add_layer(model, init="fade", fade_steps=fade_steps)
        return 3
    if state == "mid-fade":                   # the issue's repro: 20 of 100 steps
        growth.add_layer(model, init="fade", fade_steps=fade_steps)
        return 20
    if state == "faded":                      # the ramp ended: gate 1, no ramp left
        growth.add_layer(model, init="fade", fade_steps=4)
        return 6
    if state == "stack":                      # G_stack of a stack with a fading block: the copies fade too
        growth.add_layer(model, init="fade", fade_steps=fade_steps)
        growth.stack(model, 2)
        return 4
    if state == "frozen":                     # frozen old blocks and embedding, a fading new one
        growth.add_layer(model, init="fade", fade_steps=fade_steps)
        growth.freeze(model, below=2)
        return 5
    raise AssertionError(state)


STATES = ["zero", "copy", "random", "fade", "mid-fade", "faded", "stack", "frozen"]


def _gates(model):
    return [(float(b.residual_scale), b.fade) for b in model.blocks]


@pytest.mark.parametrize("family,norm", FAMILY_NORMS)
@pytest.mark.parametrize("state", STATES)
def test_every_growth_state_reloads_with_the_same_function(store, digits, khop, family, norm, state):
    ds = digits if family == "mlp" else khop
    model = _model(family, norm, ds)
    steps = _grow_into(state, model)
    run = wb.train(model, ds, wb.TrainConfig(steps=steps, batch_size=32, eval_every=100),
                   callbacks=[growth.FadeIn()])
    if state in ("fade", "mid-fade", "stack", "frozen"):
        assert any(b.fade is not None and 0 < float(b.residual_scale) < 1 for b in model.blocks)
    back = store.load(store.save(run)).model
    x = ds.x_val[:32]
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert _gates(back) == _gates(model)
    assert [(n, p.requires_grad) for n, p in back.named_parameters()] == \
        [(n, p.requires_grad) for n, p in model.named_parameters()]
    assert growth.frozen_layers(back) == growth.frozen_layers(model)
    # the ramp goes on from where it was: both reach the same gates and the same function
    growth.advance_fades(model, 7), growth.advance_fades(back, 7)
    assert _gates(back) == _gates(model)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_the_issue_repro_digits_fade_20_steps(store, digits):
    model = build(wb.models.config_for(digits))
    growth.add_layer(model, init="fade", fade_steps=100)
    run = wb.train(model, digits, wb.TrainConfig(steps=20, eval_every=100), callbacks=[growth.FadeIn()])
    assert float(model.blocks[-1].residual_scale) == pytest.approx(0.2)
    back = store.load(store.save(run)).model
    with torch.no_grad():
        assert (back(digits.x_val) - model.eval()(digits.x_val)).abs().max().item() == 0.0


def test_an_old_checkpoint_without_gates_or_frozen_list_loads_fully_faded_in(store, digits):
    from safetensors.torch import load_file, save_file

    model = _model("mlp", "peri", digits)
    run = wb.train(model, digits, wb.TrainConfig(steps=3, eval_every=100))
    rid = store.save(run)
    d = store.runs_dir / rid
    tensors = load_file(str(d / "model.safetensors"))
    assert {"blocks.1.residual_scale", "blocks.1.fade_done", "blocks.1.fade_steps"} <= set(tensors)
    save_file({k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in GATES}, str(d / "model.safetensors"))
    doc = json.loads((d / "run.json").read_text())
    assert doc.pop("frozen") == []
    (d / "run.json").write_text(json.dumps(doc))
    back = store.load(rid).model
    assert _gates(back) == [(1.0, None), (1.0, None)]
    with torch.no_grad():
        assert torch.equal(back(digits.x_val), model.eval()(digits.x_val))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"blocks.0.residual_scale": torch.tensor(1.5)}), r"blocks.0.residual_scale must be in \[0, 1\]"),
    (lambda t: t.update({"blocks.0.fade_done": torch.tensor(7), "blocks.0.fade_steps": torch.tensor(3)}),
     "fade_done must be in"),
])
def test_gate_buffers_out_of_range_are_refused(store, digits, edit, match):
    from safetensors.torch import load_file, save_file

    rid = store.save(wb.train(_model("mlp", "pre", digits), digits, wb.TrainConfig(steps=2, eval_every=100)))
    path = store.runs_dir / rid / "model.safetensors"
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))
    with pytest.raises(wb.store.StoreError, match=match):
        store.load(rid)


def test_a_frozen_list_naming_no_parameter_is_refused(store, digits):
    rid = store.save(wb.train(_model("mlp", "pre", digits), digits, wb.TrainConfig(steps=2, eval_every=100)))
    p = store.runs_dir / rid / "run.json"
    doc = json.loads(p.read_text())
    for bad, match in ((["stem.weight", "nope.weight"], r"not parameters of the model: \['nope.weight'\]"),
                       ("stem.weight", "'frozen'")):
        doc["frozen"] = bad
        p.write_text(json.dumps(doc))
        with pytest.raises(wb.store.StoreError, match=match):
            store.load(rid)


# ----------------------------------------------------------------------------- growth within the memory budget


def test_growth_past_the_memory_budget_is_refused_before_the_model_changes(digits, monkeypatch):
    model = build(MLPConfig(d_in=64, n_classes=10, d_model=512, d_hidden=1024, n_layers=2))
    need = wb.models.estimate_memory(model.config)["total_bytes"] / 2**20
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", f"{need * 1.3:.3f}")   # 2 blocks fit, 3 do not (each ~1/2.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for grow in (lambda: growth.add_layer(model), lambda: growth.stack(model)):
        with pytest.raises(ValueError, match=r"model: (add_layer|stack \(factor 2\)) would grow it to [34] blocks, "
                                             r"which is refused: the mlp model is too large.*WORKBENCH_MAX_MODEL_MB"):
            grow()
        assert len(model.blocks) == 2 and model.config.n_layers == 2
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="the schedule would grow it to 3 blocks"):
        growth.grow(model, digits, [growth.Stage("train", 1), growth.Stage("add_layer", 1)])
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", f"{need * 2:.3f}")
    growth.add_layer(model)
    assert model.config.n_layers == 3


# ----------------------------------------------------------------------------- grow = a loop of grow_stage


def test_grow_is_the_loop_of_grow_stage(digits):
    schedule = [growth.Stage("train", 6), growth.Stage("add_layer", 5, init="fade", fade_steps=3, freeze="old"),
                growth.Stage("stack", 4, lr=5e-4)]
    config = wb.TrainConfig(eval_every=4, batch_size=32, seed=3)
    a = build(MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=16, n_layers=1))
    b = build(MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=16, n_layers=1))
    run = growth.grow(a, digits, schedule, config)
    step, flops, opt, frames = 0, 0.0, None, []
    for k, s in enumerate(schedule):
        res = growth.grow_stage(b, digits, s, config, index=k, step=step, flops=flops, optimizer=opt)
        assert res.status == "completed" and res.steps_done == s.steps and res.index == k
        assert set(res.run.metrics["stage"]) == {k}
        step, flops, opt = res.step, res.flops, res.optimizer
        frames.append(res.run.metrics)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert step == 15 and flops == run.meta["flops"]
    import pandas as pd

    mine = pd.concat(frames, ignore_index=True).drop(columns="value")
    pd.testing.assert_frame_equal(mine, run.metrics.drop(columns="value"))
    same = run.metrics["metric"] != "seconds"
    assert (pd.concat(frames, ignore_index=True)["value"][same] == run.metrics["value"][same]).all()
    with pytest.raises(ValueError, match="stage 0 .*steps must be"):
        growth.grow_stage(b, digits, growth.Stage("train", 0))


# ----------------------------------------------------------------------------- numpy integers become Python ints


def test_numpy_numbers_are_stored_as_python_numbers():
    tc = wb.TrainConfig(steps=np.int64(5), seed=np.int64(2), lr=np.float32(0.5), batch_size=np.int32(8)).validate()
    assert [type(v) for v in (tc.steps, tc.seed, tc.lr, tc.batch_size)] == [int, int, float, int]
    torch.Generator().manual_seed(tc.seed)
    json.dumps(dataclasses.asdict(tc))
    m = MLPConfig(d_in=np.int64(4), n_classes=np.int16(3), n_layers=np.uint8(1), seed=np.int64(7),
                  norm=np.str_("peri")).validate()
    assert all(type(getattr(m, f)) is int for f in ("d_in", "n_classes", "n_layers", "seed"))
    assert type(m.norm) is str
    t = TransformerConfig(vocab_size=np.int64(5), context=np.int64(4), d_model=8, n_heads=np.int64(2), d_mlp=8,
                          vocab=tuple(np.array(list("abcde"))), seed=np.uint32(3)).validate()
    assert type(t.vocab_size) is int and type(t.seed) is int and t.vocab == list("abcde")
    assert all(type(c) is str for c in t.vocab)
    json.dumps(wb.models.config_to_dict(t))
    build(t)   # the seed reaches torch.manual_seed
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\], got True"):
        wb.TrainConfig(seed=True).validate()


# ----------------------------------------------------------------------------- dataset specs


def test_check_spec_bounds_nesting_and_the_store_names_the_part(digits):
    part = {"name": "digits", **wb.data.check_options("digits")}
    spec = part
    for _ in range(4):
        spec = {"name": "mix", "parts": [spec]}
    wb.data.check_spec(spec)
    with pytest.raises(ValueError, match="nested at most 4 deep"):
        wb.data.check_spec({"name": "mix", "parts": [spec]})
    with pytest.raises(ValueError, match="nested at most 4 deep"):
        wb.data.from_spec({"name": "mix", "parts": [spec]})
    from workbench.io.store import document as store_doc

    assert store_doc._spec_field({"name": "m", "parts": [part, {"name": 3}]}, "dataset") == "dataset.parts[1].name"
    assert store_doc._spec_field({"name": "digits", "seed": -1}, "dataset") == "dataset"


def test_family_methods_check_inputs(digits, khop):
    mlp, tf = _model("mlp", "pre", digits), _model("transformer", "pre", khop)
    with pytest.raises(ValueError, match=r"data must be vectors \(N, 64\), got shape \(2, 3\)"):
        mlp.config.check_inputs("data", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="context"):
        tf.config.check_inputs("data", torch.zeros(2, khop.seq_len + 1, dtype=torch.long))
    assert tf.config.check_inputs("x", khop.x_val) is khop.x_val
