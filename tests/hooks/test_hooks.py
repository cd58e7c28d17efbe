"""workbench.hooks: recording matches a hand-run forward, hooks always come off, the registry dispatches."""
import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench import hooks


@pytest.fixture(scope="module")
def tiny():
    cfg = wb.models.TransformerConfig(vocab_size=11, context=6, d_model=16, n_heads=2, d_mlp=32, n_layers=2, seed=3)
    return wb.models.build(cfg).eval()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_record_matches_running_the_blocks_by_hand(tiny):
    x = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), hooks.record(tiny, ["blocks.*.resid_pre", "blocks.*.resid_post", "features"]) as cache:
        logits = tiny(x)
        # by hand: embedding + positions, then each block, then the final norm
        h = tiny.tok_embed(x) + tiny.pos_embed.weight[:6]
        for i, block in enumerate(tiny.blocks):
            torch.testing.assert_close(cache[f"blocks.{i}.resid_pre"], h)
            h = block(h)
            torch.testing.assert_close(cache[f"blocks.{i}.resid_post"], h)
        torch.testing.assert_close(cache["features"], tiny.final_norm(h))
    torch.testing.assert_close(logits, tiny.readout(tiny.final_norm(h)))
    assert cache.stack("resid_post").shape == (2, 3, 6, 16)


def test_hooks_are_removed_on_error(tiny):
    before = _hook_count(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.record(tiny):
            assert _hook_count(tiny) > before
            raise RuntimeError("boom")
    assert _hook_count(tiny) == before
    with pytest.raises(RuntimeError):
        with hooks.watch({"fc": tiny.blocks[0].mlp.fc}, lambda k, t: None):
            raise RuntimeError
    assert _hook_count(tiny) == before


def test_record_streams_to_a_function_and_watch_sees_module_outputs(tiny):
    x = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    seen = {}
    with torch.no_grad(), hooks.record(tiny, "blocks.0.mlp_out", fn=lambda n, t: seen.setdefault(n, t)) as cache:
        tiny(x)
    assert not cache and set(seen) == {"blocks.0.mlp_out"}
    outs = {}
    fc = tiny.blocks[1].mlp.fc
    with torch.no_grad(), hooks.watch({"fc": fc}, lambda k, t: outs.setdefault(k, t)), \
            hooks.watch({"fc": fc}, lambda k, t: outs.setdefault("in", t), inputs=True):
        tiny(x)
    torch.testing.assert_close(outs["fc"], fc(outs["in"]))


def test_select_sites_messages(tiny):
    with pytest.raises(ValueError, match=r"no hook site matches \['blocks.9.nothing'\]"):
        with hooks.record(tiny, "blocks.9.nothing"):
            pass
    with pytest.raises(ValueError, match=r"layers\[\] must be an integer >= 0, got -1"):
        with hooks.record(tiny, layers=[-1]):
            pass
    with pytest.raises(ValueError, match=r"names\[\] must be a string"):
        with hooks.record(tiny, names=[3]):
            pass
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 1\], got 2"):
        with hooks.adapter(tiny).skip(2):
            pass


def test_registry_dispatch_and_unknown_model():
    assert type(hooks.adapter(wb.models.build(wb.models.MLPConfig(d_in=4, n_classes=3)))).__name__ == "NativeAdapter"
    with pytest.raises(TypeError, match="supported: .*workbench Transformer / ResidualMLP.*gpt2"):
        hooks.adapter(nn.Linear(2, 2))

    class Toy(nn.Module):
        pass

    class ToyAdapter(hooks.Adapter):
        family, n_layers = "mlp", 0

        def __init__(self, model):
            self.model = model

    hooks.register_adapter(Toy, ToyAdapter, name="toy")
    try:
        assert isinstance(hooks.adapter(Toy()), ToyAdapter) and hooks.supported()[0] == "toy"
    finally:
        hooks._REGISTRY.pop(0)
    with pytest.raises(ValueError, match="predicate_or_type must be"):
        hooks.register_adapter(5, ToyAdapter)


def test_hf_gpt2_adapter_is_found_by_model_type():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ad = hooks.adapter(model)
    assert type(ad).__name__ == "GPT2Adapter" and ad.n_layers == 2
    x = torch.randint(0, 20, (1, 8))
    with torch.no_grad(), hooks.record(model, "blocks.1.resid_post") as cache:
        out = model(input_ids=x, output_hidden_states=True)
    # transformers' own hidden states: index l+1 is block l's output (the last one after ln_f)
    torch.testing.assert_close(model.transformer.ln_f(cache["blocks.1.resid_post"]), out.hidden_states[2])
