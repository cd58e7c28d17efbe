"""Hugging Face decoder families read by the workbench adapters, against the transformers model alone.

Per family (gpt2, gpt_neox parallel and sequential, llama, mistral, qwen2, qwen3, gemma, phi) a
tiny random-init model is built from its config (no download). The references never go through
an adapter: forward hooks on the model's own decoder layers, final norm, attention output
projection and unembedding (named per family in ``FAMILIES``), and a deep copy of the model with
one decoder layer replaced by a pass-through module for skipping. Norm weights and biases are
randomised so that a wrong norm (e.g. Gemma's ``1 + w``) or a missing bias would show.

``load_hf``: a ``save_pretrained`` directory round trip, the refusals (pickle only, unsupported
model_type, memory budget before the weights are read, bad dtype/device, unknown Hub name offline).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import workbench as wb  # noqa: E402
from workbench import hooks, interop  # noqa: E402

from helpers.hf_models import B_, COMMON, FAMILIES, FAMS, T_, V_, build, tokens  # noqa: E402,F401


class Passthrough(nn.Module):
    """A decoder layer that returns its input (the reference for skipping)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


_REFS: dict = {}


def setup(family: str):
    """``(model, x, reference)`` of ``family``, built once per session (the tests only read them)."""
    if family not in _REFS:
        model = build(family)
        x = tokens(FAMS.index(family))
        _REFS[family] = (model, x, reference(family, model, x))
    return _REFS[family]


def reference(family: str, model, x):
    """From the transformers model alone: layer inputs/outputs, final-norm output, logits, o_proj inputs."""
    layers, norm, head, o_proj = FAMILIES[family][2](model)
    ins, outs, z, feats = {}, {}, {}, []
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())))
        handles.append(o_proj(layer).register_forward_pre_hook(lambda m, a, i=i: z.__setitem__(i, a[0].detach())))
    handles.append(norm.register_forward_hook(lambda m, a, o: feats.append(o.detach())))
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    L = len(layers)
    return dict(ins=[ins[i] for i in range(L)], outs=[outs[i] for i in range(L)], z=[z[i] for i in range(L)],
                features=feats[-1], logits=logits, norm=norm, head=head, layers=layers, o_proj=o_proj)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)



@pytest.mark.parametrize("family", FAMS)
def test_sites_match_the_model(family):
    model, x, ref = setup(family)
    ad = hooks.adapter(model)
    assert ad.parallel is FAMILIES[family][3]
    L = ad.n_layers
    assert L == 3
    with hooks.record(model) as cache, torch.no_grad():
        out = ad.forward(x)
    close(out, ref["logits"], 0)
    close(cache["features"], ref["features"], 0)
    for l in range(L):
        close(cache[f"blocks.{l}.resid_pre"], ref["ins"][l], 0)
        close(cache[f"blocks.{l}.resid_post"], ref["outs"][l], 0)
        pre, a, m = (cache[f"blocks.{l}.{s}"] for s in ("resid_pre", "attn_out", "mlp_out"))
        if ad.parallel:
            assert f"blocks.{l}.resid_mid" not in ad.site_names()
            close(pre + a + m, ref["outs"][l])
        else:
            close(cache[f"blocks.{l}.resid_mid"], pre + a)
            close(cache[f"blocks.{l}.resid_mid"] + m, ref["outs"][l])
        assert cache[f"blocks.{l}.attn.z"].shape[-2] == model.config.num_attention_heads
    embed = cache["embed_out"] + (cache["pos_embed_out"] if "pos_embed_out" in cache else 0)
    close(embed, ref["ins"][0])          # Gemma: the scaled embedding, what layer 0 reads


def test_gemma_embedding_is_scaled():
    model = build("gemma")
    x = tokens()
    with hooks.record(model, names=["embed_out"]) as cache, torch.no_grad():
        hooks.adapter(model).forward(x)
    raw = model.model.embed_tokens.weight[x]
    close(cache["embed_out"], raw * math.sqrt(model.config.hidden_size))


@pytest.mark.parametrize("family", FAMS)
def test_contributions_whole_layer(family):
    model, x, ref = setup(family)
    df = wb.residual.contributions(model, x)
    got = df[df.sublayer == "layer"].sort_values("layer").rel_norm.to_numpy()
    want = [float(((o - i).norm(dim=-1) / i.norm(dim=-1)).mean()) for i, o in zip(ref["ins"], ref["outs"])]
    assert got == pytest.approx(want, rel=1e-5)


def _per_head_reference(family, model, ref, l):
    """Per-head writes of layer ``l`` from the o_proj input and weight: ``(H, B, T, C)`` and the bias."""
    proj = ref["o_proj"](ref["layers"][l])
    H = model.config.num_attention_heads
    z = ref["z"][l]
    D = z.shape[-1] // H
    W = proj.weight if family == "gpt2" else proj.weight.t()       # (H*D, C); Conv1D stores (in, out)
    heads = torch.stack([z[..., h * D:(h + 1) * D] @ W[h * D:(h + 1) * D] for h in range(H)])
    return heads, proj.bias


@pytest.mark.parametrize("family", FAMS)
def test_decompose_per_head(family):
    model, x, ref = setup(family)
    L = model.config.num_hidden_layers
    dec = wb.residual.decompose(model, x)
    close(dec.final, ref["outs"][-1])
    close(dec.total(), ref["outs"][-1], 1e-4)
    dh = wb.residual.decompose(model, x, per_head=True)
    close(dh.total(), ref["outs"][-1], 1e-4)
    H = model.config.num_attention_heads
    for l in range(L):
        heads, bias = _per_head_reference(family, model, ref, l)
        idx = [k for k, (lay, kind) in enumerate(zip(dh.layers, dh.kinds)) if lay == l and kind == "head"]
        assert [dh.heads[k] for k in idx] == list(range(H))          # one term per query head (GQA too)
        close(dh.components[idx], heads, 1e-4)
        kb = next(k for k, (lay, kind) in enumerate(zip(dh.layers, dh.kinds)) if lay == l and kind == "attn_bias")
        close(dh.components[kb], (bias if bias is not None else torch.zeros(())).expand_as(heads[0]))


@pytest.mark.parametrize("family", FAMS)
def test_logit_lens_kl(family):
    model, x, ref = setup(family)
    df = wb.residual.logit_lens(model, x).sort_values("layer")
    logp_final = ref["logits"].log_softmax(-1)
    want = []
    with torch.no_grad():
        for r in ref["ins"] + [ref["outs"][-1]]:
            logp = ref["head"](ref["norm"](r)).log_softmax(-1)
            want.append(float((logp_final.exp() * (logp_final - logp)).sum(-1).mean()))
    assert df.kl_to_final.to_numpy() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert want[0] > 1e-3                                   # not a vacuous comparison


@pytest.mark.parametrize("family", ["gpt2", "neox_parallel", "llama", "qwen3", "gemma", "phi"])  # each layout once
def test_skip_equals_identity_layer(family):
    model, x, ref = setup(family)
    ad = hooks.adapter(model)
    base = ref["logits"]
    se = wb.residual.skip_effects(model, x)
    logp0 = base.log_softmax(-1)
    layers = ref["layers"]
    for l in range(ad.n_layers):
        with torch.no_grad():
            with ad.skip(l):
                got = ad.forward(x)
            original = layers[l]
            layers[l] = Passthrough()          # the reference: the model with layer l replaced, by hand
            try:
                want = model(input_ids=x).logits
            finally:
                layers[l] = original
        close(got, want)
        assert (got - base).abs().max() > 1e-4
        logp = want.log_softmax(-1)
        kl = float((logp0.exp() * (logp0 - logp)).sum(-1).mean())
        assert float(se.output.set_index("skipped").loc[l, "kl"]) == pytest.approx(kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", FAMS)
def test_logit_attribution_sums_to_logit(family):
    model, x, ref = setup(family)
    df = wb.residual.logit_attribution(model, x, per_head=True)
    total = df.groupby(["batch", "position"]).attribution.sum()
    tgt = ref["logits"].argmax(-1)
    want = ref["logits"].gather(-1, tgt[..., None])[..., 0]
    got = torch.tensor([total.loc[(b, t)] for b in range(B_) for t in range(T_)]).view(B_, T_)
    close(got, want, 1e-4)


@pytest.mark.parametrize("family", FAMS)
def test_frozen_norm_exact_and_linear(family):
    model, x, ref = setup(family)
    ad = hooks.adapter(model)
    final = ref["outs"][-1]
    f, b = ad.frozen_norm(final)
    close(f(final) + b, ref["features"])                   # exact at the frozen point (Gemma: 1 + w)
    g = torch.Generator().manual_seed(7)
    r1, r2 = torch.randn(final.shape, generator=g), torch.randn(final.shape, generator=g)
    close(f(r1 + 2 * r2), f(r1) + 2 * f(r2))
    close(f(torch.stack([r1, r2])), torch.stack([f(r1), f(r2)]))


def test_frozen_norm_refuses_unknown_norm():
    class Odd(nn.Module):
        def forward(self, x):
            return x.tanh()

    class OddAdapter(hooks.Adapter):
        def final_norm(self):
            return Odd()
    with pytest.raises(TypeError, match="Odd cannot be linearised.*LayerNorm.*RMSNorm"):
        OddAdapter().frozen_norm(torch.zeros(1, 2, 4))


def test_unsupported_model_lists_model_types():
    cfg = transformers.OPTConfig(vocab_size=V_, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                 max_position_embeddings=16, word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(cfg)
    with pytest.raises(TypeError, match="model_type 'opt'.*gemma, gpt2, gpt_neox, llama, mistral, phi, qwen2, qwen3"):
        hooks.adapter(model)
    assert hooks.hf_model_types() == ["gemma", "gpt2", "gpt_neox", "llama", "mistral", "phi", "qwen2", "qwen3"]


# ============================================================================ load_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = build("llama")
    model.save_pretrained(d)
    interop.gpt2._save_char_tokenizer([chr(65 + i) for i in range(V_)], d)
    return d


def test_load_hf_directory_round_trip(llama_dir):
    model, tok = interop.load_hf(llama_dir)
    x = tokens(8)
    with torch.no_grad():     # loaded with the default (sdpa) attention, built with eager: float tolerance
        close(model(input_ids=x).logits, build("llama")(input_ids=x).logits)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok is not None and tok("ABC")["input_ids"] == [0, 1, 2]
    half, _ = interop.load_hf(str(llama_dir), dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert isinstance(hooks.adapter(half), hooks.Adapter)


def test_load_hf_no_tokenizer_files(tmp_path):
    build("phi").save_pretrained(tmp_path)
    model, tok = interop.load_hf(tmp_path)
    assert tok is None and model.config.model_type == "phi"


def test_load_hf_refuses_pickle_only(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="no safetensors weights.*does not read pickle"):
        interop.load_hf(tmp_path)


def test_load_hf_refuses_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported.*gemma, gpt2, gpt_neox, llama"):
        interop.load_hf(tmp_path)


def test_load_hf_memory_budget_before_weights(tmp_path, llama_dir, monkeypatch):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"garbage: never read when the budget refuses first")
    n = sum(p.numel() for p in build("llama").parameters())
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", str(4 * n / 2**20 * 0.99))
    with pytest.raises(ValueError, match=f"{n:,} parameters in float32.*WORKBENCH_MAX_MODEL_MB"):
        interop.load_hf(tmp_path)
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", str(4 * n / 2**20 * 1.01))
    with pytest.raises(ValueError, match="cannot read the safetensors weights"):   # the budget passed; then read
        interop.load_hf(tmp_path)
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", str(2 * n / 2**20 * 0.99))
    with pytest.raises(ValueError, match="parameters in bfloat16"):
        interop.load_hf(tmp_path, dtype="bfloat16")


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(dtype=torch.float16), "dtype must be one of"),
    (dict(device="quantum"), "device must be"),
    (dict(device=3), "device must be"),
])
def test_load_hf_validates_dtype_and_device(llama_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        interop.load_hf(llama_dir, **kw)


@pytest.mark.parametrize("src, match", [
    ("/no/such/dir", "no such model directory"),
    ("./missing", "no such model directory"),
    ("bad name!", "Hub name"),
    (42, "name_or_directory must be a string"),
])
def test_load_hf_bad_source(src, match):
    with pytest.raises(ValueError, match=match):
        interop.load_hf(src)


def test_load_hf_unknown_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the Hugging Face cache while the Hub is offline"):
        interop.load_hf("depth-workbench-tests/no-such-model-3f9c")


@pytest.mark.parametrize("family, site", [("gpt2", "attn_out"), ("neox_parallel", "mlp_out"), ("llama", "mlp_out"),
                                          ("phi", "attn_out")])
def test_patching_a_sublayer_output_matches_a_hand_hook_on_the_transformers_module(family, site):
    """``patch(site=attn_out|mlp_out)`` against the corrupt run with that module's output at one position set
    to its clean value by a plain forward hook on the transformers module (the reference)."""
    model, x, ref = setup(family)
    clean, corrupt = x[:1], x[1:2]
    layer, pos = 1, T_ - 2
    with torch.no_grad():
        lc, lk = model(input_ids=clean).logits[0, -1], model(input_ids=corrupt).logits[0, -1]
    a, b = int(lc.argmax()), int(lk.argmax())
    if a == b:   # the two runs agree on the top token: compare against the clean run's runner-up
        b = int(lc.topk(2).indices[1])
    block = ref["layers"][layer]
    module = {"gpt2": {"attn_out": "attn", "mlp_out": "mlp"}}.get(family, {"attn_out": "self_attn", "mlp_out": "mlp"})
    module = getattr(block, module[site])
    saved = {}
    h = module.register_forward_hook(lambda m, i, o: saved.__setitem__("v", (o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(input_ids=clean)
    h.remove()

    def put(m, i, o):
        out = (o[0] if isinstance(o, tuple) else o).clone()
        out[:, pos] = saved["v"][:, pos]
        return (out,) + tuple(o[1:]) if isinstance(o, tuple) else out
    h = module.register_forward_hook(put)
    with torch.no_grad():
        lp = model(input_ids=corrupt).logits[0, -1]
    h.remove()

    def m(logits):
        return float(logits[a] - logits[b])
    table = wb.residual.patch(model, clean, corrupt, answer=(a, b), site=site)
    got = table.query("layer == @layer and position == @pos")["recovery"].item()
    assert got == pytest.approx((m(lp) - m(lk)) / (m(lc) - m(lk)), rel=1e-4, abs=1e-6)
    with pytest.raises(KeyError, match="cannot be replaced"):
        hooks.adapter(model).replace_hook(f"blocks.{layer}.resid_post", lambda t: t)
