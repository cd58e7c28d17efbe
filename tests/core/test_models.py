"""Models: shapes, causality, agreement with torch's own attention, glyphs, configs."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench.core.models import MLPConfig, TransformerConfig


def tcfg(**kw):
    base = dict(vocab_size=11, context=16, d_model=32, n_layers=2, n_heads=4, d_mlp=64)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("norm", ["pre", "peri", "none"])
def test_mlp_shapes_and_hook_points(norm):
    m = wb.models.build(MLPConfig(d_in=64, n_classes=10, n_layers=3, norm=norm))
    assert m(torch.randn(5, 64)).shape == (5, 10)
    names = {n for n, mod in m.named_modules() if isinstance(mod, wb.models.HookPoint)}
    assert {"embed_out", "features", "blocks.2.resid_pre", "blocks.2.block_out", "blocks.2.resid_post"} <= names


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_transformer_is_causal(norm):
    m = wb.models.build(tcfg(norm=norm))
    x = torch.randint(0, 11, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 11
    with torch.no_grad():
        a, b = m(x), m(y)
    assert a.shape == (2, 12, 11)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_matches_torch_multihead_attention():
    """Independent reference: nn.MultiheadAttention with a causal mask and the same weights."""
    m = wb.models.build(tcfg())
    attn = m.blocks[0].attn
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(3, 10, 32)
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)
        heads = attn.head_outputs(x)
        assert torch.allclose(heads.sum(2) + attn.proj.bias, expected, atol=1e-5)


def test_pre_ln_block_by_hand():
    m = wb.models.build(tcfg(n_layers=1))
    blk = m.blocks[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x + blk.attn(nn.functional.layer_norm(x, (32,), blk.ln1.weight, blk.ln1.bias))
        ln2 = nn.functional.layer_norm(h, (32,), blk.ln2.weight, blk.ln2.bias)
        mlp = blk.mlp.proj(nn.functional.gelu(blk.mlp.fc(ln2), approximate="tanh"))
        assert torch.allclose(blk(x), h + mlp, atol=1e-6)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = wb.models.build(tcfg(seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    b = wb.models.build(tcfg(seed=5))
    c = wb.models.build(tcfg(seed=6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_tied_and_frozen_embeddings():
    m = wb.models.build(tcfg(tie_embeddings=True, embedding="frozen-random"))
    assert m.readout.weight is m.tok_embed.weight
    assert not m.tok_embed.weight.requires_grad
    n_untied = wb.models.count_params(wb.models.build(tcfg()))
    assert n_untied - wb.models.count_params(m) == 11 * 32


def test_glyph_embedding_rows_are_unit_distinct_and_missing_glyphs_reported():
    vocab = list("abcXYZ019+=") + ["\n", " ", "ab"]
    images, report = wb.models.glyph_images(vocab)
    assert images.shape == (len(vocab), 32, 32) and set(images.ravel().tolist()) <= {0.0, 1.0}
    assert "\n" in report["fallback"] and " " in report["fallback"] and "a" not in report["fallback"]
    table, _ = wb.models.glyph_embedding(vocab, d_model=8)
    assert torch.allclose(table.norm(dim=1), torch.ones(len(vocab)), atol=1e-5)
    flat = images.reshape(len(vocab), -1)
    assert len({row.tobytes() for row in flat}) == len(vocab), "no two tokens share a bitmap"
    m = wb.models.build(tcfg(vocab_size=len(vocab), embedding="glyph", vocab=vocab, d_model=8, n_heads=2))
    assert torch.equal(m.tok_embed.weight.detach(), table)


def test_config_round_trip_and_validation_messages():
    cfg = tcfg(embedding="glyph", vocab=[str(i) for i in range(11)])
    assert wb.models.config_from_dict(wb.models.config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"d_model must be an integer in \[1, 16384\], got 0"):
        wb.models.build(tcfg(d_model=0))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        wb.models.build(tcfg(n_heads=5))
    with pytest.raises(ValueError, match="norm must be one of"):
        wb.models.build(MLPConfig(d_in=4, n_classes=2, norm="post"))
    with pytest.raises(ValueError, match="unknown mlp config fields"):
        wb.models.config_from_dict({"family": "mlp", "d_in": 4, "n_classes": 2, "width": 3})
    with pytest.raises(ValueError, match="exceeds the model's context"):
        wb.models.build(tcfg())(torch.zeros(1, 17, dtype=torch.long))


def test_every_plain_field_declares_its_bound_and_choices_come_from_them():
    """Bounds are declared next to the fields (read by sweeps, growth, the widgets and the property tests);
    only fields whose check depends on other fields are checked by hand in validate()."""
    from workbench.core.checks import OneOf, constraints

    by_hand = {"layer_widths", "vocab", "glyph_font"}
    for cls in (MLPConfig, TransformerConfig, wb.TrainConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - set(constraints(cls)) <= by_hand, cls
        assert dict(cls.CHOICES) == {k: c.values for k, c in constraints(cls).items() if isinstance(c, OneOf)}
    assert str(constraints(MLPConfig)["d_model"]) == "an integer in [1, 8192]"
    assert str(constraints(wb.TrainConfig)["lr"]) == "a finite number in (0, 10]"
    with pytest.raises(ValueError, match=r"^layer_widths\[1\] must be an integer in \[1, 65536\], got 0$"):
        MLPConfig(d_in=4, n_classes=2, layer_widths=[3, 0]).validate()
    with pytest.raises(ValueError, match=r"^tie_embeddings must be True or False, got 1$"):
        tcfg(tie_embeddings=1).validate()


def test_config_for_fits_the_dataset():
    ds = wb.data.load("khop", n_train=20, n_val=20)
    cfg = wb.models.config_for(ds, d_model=16, n_heads=2)
    assert cfg.vocab_size == ds.vocab_size and cfg.context == ds.seq_len and cfg.vocab == ds.vocab
    assert dataclasses.replace(cfg, d_model=16) == cfg


def test_builds_in_threads_at_once_give_the_seeded_model():
    """The global RNG is shared by threads: concurrent builds must not interleave their draws."""
    import threading

    cfg = MLPConfig(d_in=64, n_classes=10, d_model=256, n_layers=4, d_hidden=512, seed=7)
    reference = wb.models.build(cfg).state_dict()
    out, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(3):
            out.append(wb.models.build(cfg).state_dict())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 12
    for sd in out:
        assert all(torch.equal(sd[k], reference[k]) for k in reference)
