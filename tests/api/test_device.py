"""The engine on the device of ``--device`` (default cpu), each part against a reference with a known answer.

``pytest -m device --device cuda`` (bench/device_check.py) runs these and the other tests that take the
``device`` fixture on a GPU; by default they run on the CPU and mean the same there. References: a plain
AdamW loop on the full batch (training), transformers' own hidden states (recording), a model against a
randomly permuted copy of itself (weight matching and OT fusion recover its function), function-preserving
growth (outputs unchanged), the interpolation curve's end points (the two models' own losses).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import workbench as wb


def _mlp(seed=0, d_in=64, n_classes=10):
    return wb.models.build(wb.models.MLPConfig(d_in=d_in, n_classes=n_classes, d_model=32, n_layers=2, d_hidden=48,
                                               seed=seed))


def _transformer(seed=0, vocab=23):
    cfg = wb.models.TransformerConfig(vocab_size=vocab, context=12, d_model=32, n_layers=2, n_heads=4, d_mlp=64,
                                      seed=seed)
    return wb.models.build(cfg)


@pytest.fixture(scope="module")
def digits():
    ds = wb.data.load("digits")
    return ds


def test_training_on_the_device_is_adamw_on_the_full_batch(device, digits):
    """Full batch, constant rate, no clipping: train() is AdamW on the mean cross-entropy of every example."""
    model = _mlp().to(device)
    ref = copy.deepcopy(model)
    cfg = wb.TrainConfig(steps=4, batch_size=len(digits.x_train), lr=3e-3, grad_clip=0.0, eval_every=4, eval_max=64)
    run = wb.train(model, digits, cfg)
    assert run.status == "completed" and {p.device for p in model.parameters()} == {torch.device(device)}
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.0)
    x, y = digits.x_train.to(device), digits.y_train.to(device)
    ref.train()
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    batch = run.metrics[(run.metrics.split == "batch") & (run.metrics.metric == "loss")].value.to_numpy()
    assert batch == pytest.approx(losses, rel=1e-4) and losses[-1] < losses[0]


def test_recording_on_the_device_equals_transformers_hidden_states(device):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(device)
    x = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), wb.hooks.record(model, names=["blocks.*.resid_pre"]) as cache:
        out = model(input_ids=x, output_hidden_states=True)
    for l in range(2):
        got = cache[f"blocks.{l}.resid_pre"]
        assert got.device == x.device
        torch.testing.assert_close(got, out.hidden_states[l])


def test_weight_matching_on_the_device_recovers_a_permuted_copy(device):
    permute = wb.permute
    for model in (_mlp(), _transformer()):
        model = model.to(device).eval()
        shuffled = permute.permute(model, permute.random_permutation(model, seed=3))
        perm, info = permute.match_weights(model, shuffled)
        back = permute.permute(shuffled, perm)
        for (name, p), q in zip(model.state_dict().items(), back.state_dict().values()):
            assert q.device == p.device
            torch.testing.assert_close(q, p, msg=name)


def test_ot_fusion_on_the_device_of_a_model_and_its_permuted_copy_is_the_model(device, digits):
    pytest.importorskip("ot")
    model = _mlp().to(device).eval()
    shuffled = wb.permute.permute(model, wb.permute.random_permutation(model, seed=5))
    x = digits.x_val[:128].to(device)
    fused = wb.lmc.fuse(model, shuffled, method="emd", ground="weights").eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert {p.device for p in fused.parameters()} == {torch.device(device)}


def test_growth_on_the_device_preserves_the_function(device):
    growth = wb.growth
    model = _transformer().to(device).eval()
    x = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        before = model(x)
    growth.add_layer(model, init="zero")
    growth.widen(model, 0, factor=1.5, init="copy")
    model.eval()
    assert {p.device for p in model.parameters()} == {x.device}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_interpolation_curve_on_the_device_ends_at_the_models_losses(device, digits):
    a, b = _mlp(seed=1).to(device).eval(), _mlp(seed=2).to(device).eval()
    df = wb.lmc.curve(a, b, digits, n_alphas=3, splits=("val",), max_examples=256)
    x, y = digits.x_val[:256].to(device), digits.y_val[:256].to(device)
    with torch.no_grad():
        la, lb = float(F.cross_entropy(a(x), y)), float(F.cross_entropy(b(x), y))
    assert df.loss.iloc[0] == pytest.approx(la, rel=1e-4) and df.loss.iloc[-1] == pytest.approx(lb, rel=1e-4)


# Device placement without a GPU: on PyTorch's meta device a CPU tensor meeting a model's tensor raises as
# it would on CUDA, so these catch a tensor left on the CPU.

def test_a_mixture_of_models_on_a_device_keeps_its_weights_there():
    a, b = _transformer(seed=0).to("meta"), _transformer(seed=1).to("meta")
    mix = wb.compose.LogitMixture([a, b], weights=[0.25, 0.75])
    x = torch.zeros(2, 12, dtype=torch.long, device="meta")
    assert mix.device == torch.device("meta") and mix(x).shape == (2, 12, 23) and mix(x).device.type == "meta"


def test_dare_drops_entries_on_the_task_vectors_device():
    from workbench.compose import merges
    taus = [{"w": torch.ones(4, 5, device="meta")}, {"w": torch.ones(4, 5, device="meta")}]
    out = merges._dare_vectors(taus, 0.5, "density", seed=0)
    assert [t["w"].device.type for t in out] == ["meta", "meta"]
    cpu = merges._dare_vectors([{"w": torch.ones(400)}], 0.5, "none", seed=0)[0]["w"]
    assert 0.4 < float(cpu.mean()) < 0.6 and set(cpu.unique().tolist()) == {0.0, 1.0}   # dropped with p = 0.5


def test_mixture_growth_builds_the_grown_network_on_the_members_device():
    from workbench.growth.mixture import MixtureMLP, mixture_grow
    members = [MixtureMLP(6, 3, 8, 2, 2, seed=s).to("meta") for s in (0, 1)]
    grown = mixture_grow(members, init="zero")
    assert {p.device.type for p in grown.parameters()} == {"meta"}
    assert grown(torch.zeros(4, 6, device="meta")).shape == (4, 3)
