"""Hugging Face GPT-2: the adapter agrees with GPT-2's own forward; export round trip. Nothing is downloaded."""
import json

import pytest
import torch

import workbench as wb
from workbench import interop
from workbench import residual as R

transformers = pytest.importorskip("transformers")


def _gpt2(n_layer=3, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=29, n_positions=16, n_embd=32, n_layer=n_layer, n_head=4,
                                  tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ours(norm="pre", tie=False, n_layers=3):
    cfg = wb.models.TransformerConfig(vocab_size=29, context=16, d_model=32, n_layers=n_layers, n_heads=4, d_mlp=96,
                                      norm=norm, tie_embeddings=tie, seed=3)
    model = wb.models.build(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a transposed or swapped weight shows
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2), m.bias.normal_(0.0, 0.2)
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return model


def _x(B=3, T=16):
    return torch.randint(0, 29, (B, T), generator=torch.Generator().manual_seed(7))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_adapter_sites_agree_with_gpt2_hidden_states():
    hf, x = _gpt2(), _x()
    with torch.no_grad():
        hf(input_ids=x, output_hidden_states=True)  # transformers installs its own capture hooks once
    n0 = _hooks(hf)
    with R.record(hf) as cache, torch.no_grad():
        out = hf(input_ids=x, output_hidden_states=True)
    assert _hooks(hf) == n0
    hs = out.hidden_states  # input of each block, then the final-norm output
    for i in range(3):
        torch.testing.assert_close(cache[f"blocks.{i}.resid_pre"], hs[i])
        torch.testing.assert_close(cache[f"blocks.{i}.resid_mid"], hs[i] + cache[f"blocks.{i}.attn_out"])
        torch.testing.assert_close(cache[f"blocks.{i}.resid_post"],
                                   cache[f"blocks.{i}.resid_mid"] + cache[f"blocks.{i}.mlp_out"])
    torch.testing.assert_close(cache["features"], hs[-1])
    torch.testing.assert_close(cache["embed_out"] + cache["pos_embed_out"], hs[0])
    ad = R.adapter(hf)
    torch.testing.assert_close(ad.unembed(cache["blocks.2.resid_post"]), out.logits)
    assert cache["blocks.0.attn.z"].shape == (3, 16, 4, 8)


def test_gpt2_and_its_workbench_twin_give_the_same_analyses():
    hf, x = _gpt2(tie=False), _x()
    ours = interop.from_gpt2(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    for fn in (R.contributions, R.logit_lens):
        a, b = fn(hf, x), fn(ours, x)
        assert a.columns.tolist() == b.columns.tolist()
        num = a.select_dtypes("number").columns
        assert a[num].to_numpy(dtype=float) == pytest.approx(b[num].to_numpy(dtype=float), rel=1e-4, abs=1e-6)
    sa, sb = R.skip_effects(hf, x), R.skip_effects(ours, x)
    assert sa.heatmap.effect.to_numpy() == pytest.approx(sb.heatmap.effect.to_numpy(), rel=1e-3, abs=1e-5)
    assert sa.output.kl.to_numpy() == pytest.approx(sb.output.kl.to_numpy(), rel=1e-3, abs=1e-6)
    da, db = R.decompose(hf, x, per_head=True), R.decompose(ours, x, per_head=True)
    assert da.labels == db.labels
    torch.testing.assert_close(da.components, db.components, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(da.total(), da.final, atol=1e-5, rtol=1e-5)
    la, lb = R.logit_attribution(hf, x, per_head=True), R.logit_attribution(ours, x, per_head=True)
    assert la.attribution.to_numpy() == pytest.approx(lb.attribution.to_numpy(), abs=1e-4)
    assert _hooks(hf) == 0


def test_skipping_a_gpt2_layer_equals_running_without_it():
    hf, x = _gpt2(), _x()
    res = R.skip_effects(hf, x, y=None)
    with torch.no_grad():
        full = hf(input_ids=x).logits.log_softmax(-1)
        removed = _gpt2()
        removed.transformer.h = torch.nn.ModuleList([hf.transformer.h[0], hf.transformer.h[2]])
        removed.transformer.wte, removed.transformer.wpe = hf.transformer.wte, hf.transformer.wpe
        removed.transformer.ln_f, removed.lm_head = hf.transformer.ln_f, hf.lm_head
        skipped = removed(input_ids=x).logits.log_softmax(-1)
    kl = (full.exp() * (full - skipped)).sum(-1).mean().item()
    assert res.output.set_index("skipped").loc[1, "kl"] == pytest.approx(kl, rel=1e-4)
    assert _hooks(hf) == 0


def test_record_removes_gpt2_hooks_after_an_exception():
    hf, x = _gpt2(), _x()
    with pytest.raises(KeyError):
        with R.record(hf):
            hf(input_ids=x)
            raise KeyError("boom")
    assert _hooks(hf) == 0


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip(tmp_path, tie):
    model, x = _ours(tie=tie), _x()
    model.config.vocab = [chr(ord("a") + i) for i in range(29)]
    path = interop.export_gpt2(model, tmp_path / "gpt2", dataset={"name": "text"})
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["tie_word_embeddings"] is tie and cfg["n_inner"] == 96
    hf = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-4, rtol=0)
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) is tie
    loaded, meta = interop.load_gpt2(path)
    assert meta["vocab"] == model.config.vocab and meta["model"]["n_layers"] == 3
    back = interop.from_gpt2(loaded)
    assert back.config.tie_embeddings is tie
    ours_state, back_state = model.state_dict(), back.state_dict()
    assert ours_state.keys() == back_state.keys()
    for k in ours_state:
        torch.testing.assert_close(back_state[k], ours_state[k], atol=0, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tok("cab")["input_ids"] == [2, 0, 1]


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="Peri-LN"):
        interop.to_gpt2(_ours(norm="peri"))
    with pytest.raises(ValueError, match="norm='none' model cannot be exported"):
        interop.to_gpt2(_ours(norm="none"))
    widened = _ours()
    wb.growth.widen(widened, 0, factor=2)   # in place
    with pytest.raises(ValueError, match="different MLP widths"):
        interop.to_gpt2(widened)
    with pytest.raises(ValueError, match="only workbench Transformers"):
        interop.to_gpt2(wb.models.build(wb.models.MLPConfig(d_in=4, n_classes=3)))
    model = _ours()
    model.blocks[1].residual_scale = 0.5
    with pytest.raises(ValueError, match="fading in"):
        interop.export_gpt2(model, tmp_path / "x")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        interop.load_gpt2(tmp_path / "nothing-here")


def test_exported_grown_model_matches_after_growth(tmp_path):
    growth = pytest.importorskip("workbench.growth")
    model, x = _ours(n_layers=1), _x()
    growth.add_layer(model, init="zero")
    hf = interop.to_gpt2(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-4, rtol=0)
    rows = R.contributions(hf, x)
    assert (rows[rows.layer == 1].rel_norm == 0).all()


def test_transformer_lens_loads_the_export(tmp_path):
    """The export directory boots in TransformerLens (optional: the "bench" extra installs it)."""
    tl = pytest.importorskip("transformer_lens.model_bridge")
    model, x = _ours(), _x(B=2)
    model.config.vocab = [chr(ord("a") + i) for i in range(29)]
    path = interop.export_gpt2(model, tmp_path / "gpt2")
    bridge = tl.TransformerBridge.boot_transformers(str(path), device="cpu")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(x)
        torch.testing.assert_close(logits, model(x), atol=1e-4, rtol=0)
    with R.record(model, names="blocks.1.resid_pre") as ours:
        model(x)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], ours["blocks.1.resid_pre"], atol=1e-5, rtol=1e-5)


class _Payload:
    """Unpickling this creates ``flag``: a stand-in for a hostile pickle checkpoint."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _hf_dir(tmp_path, name, weights):
    """A GPT-2 checkpoint directory built from a config (no download) with the given weights files."""
    hf = _gpt2(n_layer=1)
    d = tmp_path / name
    hf.save_pretrained(d)
    (d / "model.safetensors").unlink()       # transformers 5 writes safetensors only; plant the rest by hand
    if "bin" in weights:
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
    if "evil" in weights:
        import pickle
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / f"{name}-pwned")))
    if "safetensors" in weights:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                  d / "model.safetensors", metadata={"format": "pt"})
    return hf, d


def test_load_gpt2_refuses_a_pickle_only_directory(tmp_path):
    hf, d = _hf_dir(tmp_path, "bin-only", ["bin"])
    # transformers itself would read this checkpoint (so the directory is a genuine one) ...
    ref = transformers.GPT2LMHeadModel.from_pretrained(d, local_files_only=True)
    assert torch.equal(ref.transformer.wte.weight, hf.transformer.wte.weight)
    # ... the workbench does not unpickle it
    with pytest.raises(ValueError, match=r"has no safetensors weights \(model.safetensors\); the workbench does not "
                                         r"read pickle checkpoints \(pytorch_model.bin\)\. Convert it with"):
        interop.load_gpt2(d)


def test_load_gpt2_never_unpickles_a_hostile_checkpoint(tmp_path):
    # reference: plain unpickling of the planted file does run its payload
    import pickle
    _, probe = _hf_dir(tmp_path, "probe", ["evil"])
    pickle.loads((probe / "pytorch_model.bin").read_bytes())
    assert (tmp_path / "probe-pwned").exists()

    _, d = _hf_dir(tmp_path, "evil-only", ["evil"])
    with pytest.raises(ValueError, match="has no safetensors weights"):
        interop.load_gpt2(d)
    hf, both = _hf_dir(tmp_path, "evil-and-safetensors", ["evil", "safetensors"])
    model, meta = interop.load_gpt2(both)        # the safetensors weights are read, the pickle is not
    x = _x(T=16)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, hf(input_ids=x).logits, atol=0, rtol=0)
    assert meta == {}
    assert not (tmp_path / "evil-only-pwned").exists() and not (tmp_path / "evil-and-safetensors-pwned").exists()


def test_load_gpt2_without_weights_and_with_a_broken_meta(tmp_path):
    _, d = _hf_dir(tmp_path, "empty", [])
    with pytest.raises(ValueError, match="has no safetensors weights"):
        interop.load_gpt2(d)
    _, d = _hf_dir(tmp_path, "meta", ["safetensors"])
    (d / interop.EXPORT_META).write_text('{"format": ')
    with pytest.raises(ValueError, match="workbench.json: not valid JSON"):
        interop.load_gpt2(d)
