"""Lenses (tuned, Jacobian, commitment) against independent references.

References: the logit lens of ``residual.logit_lens`` (an untrained tuned lens must equal it exactly);
central finite differences through the model's own blocks (native) or hand hooks on the transformers
decoder layers (Hugging Face), in float64, for the Jacobian lens; a model whose later blocks add exactly 0,
where the Jacobian is the identity; hand computations (numpy, scipy.stats.kurtosis) of the lens logits for
the diagnostics, the commitment layer and the top tokens. The slow tests train a char LM and a k-hop model
and compare the lenses on held-out tokens.
"""
import copy
import json
import warnings

import numpy as np
import pandas.testing as pd_testing
import pytest
import scipy.stats
import torch

import workbench as wb
from workbench import lenses as LZ
from workbench import residual as R
from workbench.core.monitor import Context

transformers = pytest.importorskip("transformers")
from helpers.hf_models import FAMS, build as hf_build, tokens as hf_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _transformer(norm="pre", n_layers=2, d_model=16, vocab=13, context=8, seed=0, scale=0.5):
    cfg = wb.models.TransformerConfig(vocab_size=vocab, context=context, d_model=d_model, n_layers=n_layers, n_heads=2,
                                      d_mlp=32, norm=norm, seed=seed)
    model = wb.models.build(cfg).eval()
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():   # every weight random (norm gains and biases too), so no mistake hides behind an init
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def _mlp(n_layers=2):
    model = wb.models.build(wb.models.MLPConfig(d_in=6, n_classes=5, d_model=12, n_layers=n_layers, d_hidden=16)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _tokens(B=3, T=8, V=13, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf(family):
    return hf_build(family), hf_tokens(FAMS.index(family))


CASES = ["pre", "peri", "none", "mlp"] + [f"hf-{f}" for f in FAMS]


def _case(name):
    if name == "mlp":
        return _mlp(), torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    if name.startswith("hf-"):
        return _hf(name[3:])
    return _transformer(name), _tokens()


# ============================================================================ tuned lens


@pytest.mark.parametrize("case", CASES)
def test_an_untrained_tuned_lens_is_exactly_the_logit_lens(case, device):
    model, x = _case(case)
    model, x = copy.deepcopy(model).to(device), x.to(device)     # the HF models are shared: a copy moves
    df = LZ.compare(model, x, tuned=LZ.TunedLens(model))
    want = R.logit_lens(model, x)
    for lens in ("logit", "tuned"):
        got = df[df.lens == lens].drop(columns=["lens", "perplexity"]).reset_index(drop=True)
        pd_testing.assert_frame_equal(got, want, check_exact=True)
    assert want.kl_to_final.iloc[0] > 1e-3                  # not a vacuous comparison
    assert np.allclose(df.perplexity, np.exp(df.loss), equal_nan=True)


def test_per_position_rows_and_a_layer_subset():
    model, x = _transformer(), _tokens()
    df = LZ.compare(model, x, tuned=LZ.TunedLens(model), per_position=True, layers=[0, 2])
    want = R.logit_lens(model, x, per_position=True)
    want = want[want.layer.isin([0, 2])].reset_index(drop=True)
    got = df[df.lens == "tuned"].drop(columns=["lens", "perplexity"]).reset_index(drop=True)
    pd_testing.assert_frame_equal(got, want, check_exact=True)
    assert set(df.layer) == {0, 2}


def _train_lowers_kl(model, x, steps=40):
    fit = LZ.train_tuned_lens(model, x, steps=steps, batch_size=len(x), max_passes=steps, seed=0)
    before = R.logit_lens(model, x).set_index("layer").kl_to_final
    after = LZ.compare(model, x, tuned=fit.lens).query("lens == 'tuned'").set_index("layer").kl_to_final
    L = len(before) - 1
    assert (after[:L] < before[:L]).all(), (before, after)
    return fit


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_kl_at_every_layer(case, device):
    model, x = _case(case)
    model, x = copy.deepcopy(model).to(device), x.to(device)
    fit = _train_lowers_kl(model, x)
    assert fit.steps_done == 40 and not fit.short and not fit.stopped
    assert list(fit.frame().columns) == ["step", "layer", "kl"] and len(fit.frame()) == 40 * (len(fit.lens.translators))
    assert not any(p.grad is not None for p in model.parameters())     # the model is never trained


def test_training_is_seeded_and_reports_progress():
    model, x = _transformer(), _tokens(B=6)
    a = LZ.train_tuned_lens(model, x, steps=6, batch_size=2, max_passes=2, seed=3).lens
    b = LZ.train_tuned_lens(model, x, steps=6, batch_size=2, max_passes=2, seed=3).lens
    c = LZ.train_tuned_lens(model, x, steps=6, batch_size=2, max_passes=2, seed=4).lens
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))

    class Recorder(Context):
        def __init__(self):
            super().__init__(report_interval=0)
            self.seen = []

        def _send(self, progress, message, payload):
            self.seen.append((progress, message))
    mon = Recorder()
    LZ.train_tuned_lens(model, x, steps=3, batch_size=2, monitor=mon)
    assert [p for p, _ in mon.seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and "step 3/3" in mon.seen[-1][1]


def test_stop_and_running_out_of_data_are_never_silent():
    model, x = _transformer(), _tokens(B=4)

    class StopAfter(Context):
        def __init__(self, n):
            super().__init__(report_interval=0)
            self.n, self.reports = n, 0

        @property
        def stopped(self):
            return self.reports >= self.n

        def _send(self, progress, message, payload):
            self.reports += 1
    with pytest.warns(UserWarning, match=r"trained on 16 of the 80 tokens asked \(2 of 10 steps\): stopped"):
        fit = LZ.train_tuned_lens(model, x, steps=10, batch_size=1, max_passes=3, monitor=StopAfter(2))
    assert fit.stopped and fit.short and fit.steps_done == 2 and fit.tokens_seen == 16 and fit.tokens_asked == 80
    assert fit.lens.info["stopped"] and fit.lens.info["short"]
    with pytest.warns(UserWarning, match=r"trained on 64 of the 160 tokens asked \(4 of 10 steps\): the data ran out "
                                         r"\(4 sequences x 2 passes\)"):
        fit = LZ.train_tuned_lens(model, x, steps=10, batch_size=2, max_passes=2)
    assert fit.short and not fit.stopped and fit.lens.info["tokens_seen"] == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not LZ.train_tuned_lens(model, x, steps=2, batch_size=2).short


# ============================================================================ storage


def _trained_lens(model, x, steps=5):
    return LZ.train_tuned_lens(model, x, steps=steps, batch_size=len(x), max_passes=steps).lens


def test_save_and_load_reproduce_the_lens_exactly(tmp_path):
    model, x = _transformer(), _tokens()
    lens = _trained_lens(model, x)
    folder = lens.save(tmp_path / "lens")
    assert sorted(p.name for p in folder.iterdir()) == ["lens.json", "lens.safetensors"]
    back = LZ.TunedLens.load(folder, model)
    for (ka, a), (kb, b) in zip(lens.state_dict().items(), back.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    assert back.info == json.loads(json.dumps(lens.info))
    pd_testing.assert_frame_equal(LZ.compare(model, x, tuned=back), LZ.compare(model, x, tuned=lens), check_exact=True)
    J = LZ.fit_jacobian_lens(model, x)
    Jb = LZ.JacobianLens.load(J.save(tmp_path / "j"), model)
    assert torch.equal(Jb.jacobians, J.jacobians) and Jb.n_prompts == 3


@pytest.mark.parametrize("other, why", [
    (lambda: _transformer(d_model=8), "d_model"),
    (lambda: _transformer(n_layers=3), "layers 2, this model has 3"),
    (lambda: _transformer(vocab=14), "vocabulary size"),
    (lambda: _transformer(seed=5), "final norm and unembedding weights differ"),
])
def test_a_stale_lens_is_refused_on_load_and_use(tmp_path, other, why):
    model, x = _transformer(), _tokens()
    folder = _trained_lens(model, x).save(tmp_path / "lens")
    with pytest.raises(ValueError, match=f"stale tuned lens in .*{why}"):
        LZ.TunedLens.load(folder, other())
    with pytest.raises(ValueError, match=f"stale tuned lens.*{why}"):
        LZ.compare(other(), _tokens(V=13), tuned=LZ.TunedLens.load(folder, model))


def test_a_retrained_unembedding_makes_the_lens_stale(tmp_path):
    model, x = _transformer(), _tokens()
    folder = _trained_lens(model, x).save(tmp_path / "lens")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.readout.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="stale tuned lens.*unembedding"):
        LZ.TunedLens.load(folder, changed)
    with torch.no_grad():
        changed.readout.weight[0, 0] -= 1e-3
        changed.final_norm.weight[1] += 1e-3
    with pytest.raises(ValueError, match="stale tuned lens.*final norm"):
        LZ.TunedLens.load(folder, changed)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    model, x = _transformer(), _tokens()
    folder = _trained_lens(model, x).save(tmp_path / "lens")
    with pytest.raises(ValueError, match="this is a 'tuned' lens, not a 'jacobian' lens"):
        LZ.JacobianLens.load(folder, model)
    raw = bytearray((folder / "lens.safetensors").read_bytes())
    raw[-1] ^= 1
    (folder / "lens.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match lens.json"):
        LZ.TunedLens.load(folder, model)
    (folder / "lens.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        LZ.TunedLens.load(folder, model)
    with pytest.raises(ValueError, match="path: no saved lens"):
        LZ.TunedLens.load(tmp_path / "nothing", model)


def test_a_lens_is_stored_with_its_run(store):
    ds = wb.data.load("khop", hops=1, nodes=4, n_train=64, n_val=16)
    run = wb.train(wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=2, n_heads=2, d_mlp=32)), ds,
                   wb.TrainConfig(steps=3, batch_size=8, eval_every=3))
    run_id = store.save(run)
    model = store.load(run_id).model
    lens = _trained_lens(model, ds.x_val)
    folder = lens.save_to_run(store, run_id)
    assert folder == store.runs_dir / run_id / "lenses" / "tuned"
    back = LZ.TunedLens.from_run(store, run_id)                      # the run's own model
    for a, b in zip(lens.parameters(), back.parameters()):
        assert torch.equal(a, b)
    LZ.fit_jacobian_lens(model, ds.x_val[:2]).save_to_run(store, run_id)
    assert LZ.JacobianLens.from_run(store, run_id, model).n_prompts == 2
    other = _transformer(vocab=ds.vocab_size, context=ds.seq_len)
    with pytest.raises(ValueError, match=f"stale tuned lens for run '{run_id}'"):
        LZ.TunedLens(other).save_to_run(store, run_id)
    with pytest.raises(ValueError, match="name: run .* has no stored lens 'other'"):
        LZ.TunedLens.from_run(store, run_id, name="other")
    with pytest.raises(ValueError, match="name must be"):
        lens.save_to_run(store, run_id, name="../up")
    store.delete(run_id)
    assert not folder.exists()


# ============================================================================ Jacobian lens


def _fd_native(model, x, skip_first, eps=1e-5):
    """Central differences of sum_{t' in P} h_final,t' w.r.t. h_l,t, through the model's blocks called by hand."""
    blocks = model.blocks
    L, T = len(blocks), x.shape[1]
    P = list(range(skip_first, T))
    total = 0
    for i in range(len(x)):
        with torch.no_grad():
            hs = [model.embed(x[i:i + 1])]
            for b in blocks:
                hs.append(b(hs[-1]))
            C = hs[0].shape[-1]
            J = torch.zeros(L, C, C, dtype=torch.float64, device=hs[0].device)
            for l in range(L):
                def run(h, l=l):
                    for b in blocks[l:]:
                        h = b(h)
                    return h
                for t in P:
                    for j in range(C):
                        hp, hm = hs[l].clone(), hs[l].clone()
                        hp[0, t, j] += eps
                        hm[0, t, j] -= eps
                        J[l, :, j] += ((run(hp) - run(hm)) / (2 * eps))[0, P].sum(0)
            total = total + J / len(P)
    return total / len(x)


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_jacobian_lens_matches_finite_differences(norm, device):
    model = _transformer(norm, n_layers=2).double().to(device)
    x = _tokens(B=2, T=5).to(device)
    J = LZ.fit_jacobian_lens(model, x, skip_first=1, dim_batch=5)       # 4 backward passes per prompt
    ref = _fd_native(model, x, skip_first=1)
    torch.testing.assert_close(J.jacobians.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)
    assert (ref.cpu() - torch.eye(16)).abs().max() > 0.1                       # far from the logit lens' identity
    assert J.n_prompts == 2 and J.info["skip_first"] == 1


def test_jacobian_lens_of_a_residual_mlp_matches_finite_differences():
    model = _mlp(n_layers=3)                       # vector inputs are float32; the reference runs a float64 copy
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    J = LZ.fit_jacobian_lens(model, x)
    ref_model, eps = copy.deepcopy(model).double(), 1e-6
    ref = torch.zeros(3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            hs = [ref_model.embed(x[i:i + 1].double())]
            for b in ref_model.blocks:
                hs.append(b(hs[-1]))
            for l in range(3):
                for j in range(12):
                    outs = []
                    for s in (1, -1):
                        h = hs[l].clone()
                        h[0, j] += s * eps
                        for b in ref_model.blocks[l:]:
                            h = b(h)
                        outs.append(h[0])
                    ref[l, :, j] += (outs[0] - outs[1]) / (2 * eps) / 3
    torch.testing.assert_close(J.jacobians.double(), ref, rtol=1e-4, atol=1e-5)
    assert (ref[0] - torch.eye(12)).abs().max() > 0.1


def _hf_layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        mod = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
            return mod
        except AttributeError:
            continue
    raise AssertionError("no decoder layers")


class _HandHooked:
    """``final(l, h)``: the last decoder layer's output when layer ``l``'s input is replaced by ``h``, through hand
    hooks on the transformers modules (no adapter); ``clean[l]``: the unmodified inputs."""

    def __init__(self, model, x):
        self.model, self.x, self.layers = model, x, _hf_layers(model)
        self.replace, self.clean = None, {}

    def _pre(self, l):
        def hook(m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.clean.setdefault(l, h.detach().clone())
            if self.replace is not None and self.replace[0] == l:
                h = self.replace[1]
                return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        return hook

    def _post(self, m, args, out):
        self.out = out[0] if isinstance(out, tuple) else out

    def final(self, l=None, h=None):
        self.replace = None if l is None else (l, h)
        handles = [layer.register_forward_pre_hook(self._pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(self._post))
        try:
            self.model(input_ids=self.x)
        finally:
            for hd in handles:
                hd.remove()
        return self.out


def _reference_hf(model, x, skip_first, eps=None):
    """J per layer from the hand-hooked model: by autograd (``eps=None``) or by central differences."""
    ref = _HandHooked(model, x)
    with torch.no_grad():
        ref.final()
    L, T = len(ref.layers), x.shape[1]
    P = list(range(skip_first, T))
    C = ref.clean[0].shape[-1]
    J = torch.zeros(L, C, C, dtype=torch.float64)
    for l in range(L):
        if eps is None:
            full = torch.autograd.functional.jacobian(lambda h: ref.final(l, h)[0, P].sum(0), ref.clean[l])  # (C, 1, T, C)
            J[l] = full[:, 0, P].sum(1).double() / len(P)
            continue
        with torch.no_grad():
            for t in P:
                for j in range(C):
                    hp, hm = ref.clean[l].clone(), ref.clean[l].clone()
                    hp[0, t, j] += eps
                    hm[0, t, j] -= eps
                    J[l, :, j] += ((ref.final(l, hp) - ref.final(l, hm)) / (2 * eps))[0, P].sum(0) / len(P)
    return J


@pytest.mark.parametrize("family", FAMS)
def test_jacobian_lens_matches_hand_hooked_autograd_on_hugging_face_models(family):
    model = copy.deepcopy(hf_build(family)).double()
    x = hf_tokens(1)[:1]
    J = LZ.fit_jacobian_lens(model, x, skip_first=4).jacobians.double()
    torch.testing.assert_close(J, _reference_hf(model, x, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, eps, tol", [("gpt2", 1e-4, 1e-6), ("neox_sequential", 1e-3, 1e-3), ("llama", 1e-3, 3e-3)])
def test_jacobian_lens_matches_finite_differences_on_hugging_face_models(family, eps, tol):
    """Central differences; RMSNorm and rotary embeddings of some families compute in float32 even in a float64
    model, which bounds the differences' accuracy (hence the wider tolerance there)."""
    model = copy.deepcopy(hf_build(family)).double()
    x = hf_tokens(1)[:1]
    J = LZ.fit_jacobian_lens(model, x, skip_first=5).jacobians.double()
    ref = _reference_hf(model, x, 5, eps=eps)
    assert ((J - ref).abs() / (ref.abs() + 1)).max() < tol


_OUT_PROJ = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "neox": ("attention.dense", "mlp.dense_4h_to_h"),
             "phi": ("self_attn.dense", "mlp.fc2"), "llama": ("self_attn.o_proj", "mlp.down_proj")}


def _zero_from(model, case, first):
    """Blocks ``first ..`` add exactly 0 to the stream (native: zero_output_; HF: output projections zeroed)."""
    if not case.startswith("hf-"):
        for b in model.blocks[first:]:
            b.zero_output_()
        return model
    fam = case[3:]
    key = "gpt2" if fam == "gpt2" else "neox" if fam.startswith("neox") else "phi" if fam == "phi" else "llama"
    with torch.no_grad():
        for layer in _hf_layers(model)[first:]:
            for path in _OUT_PROJ[key]:
                mod = layer
                for part in path.split("."):
                    mod = getattr(mod, part)
                mod.weight.zero_()
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
    return model


@pytest.mark.parametrize("case", ["pre", "peri", "none", "mlp"] + [f"hf-{f}" for f in FAMS])
def test_jacobian_lens_is_exactly_the_logit_lens_when_later_blocks_are_zero(case):
    model, x = _case(case)
    model = _zero_from(copy.deepcopy(model), case, 1)
    J = LZ.fit_jacobian_lens(model, x)
    L = J.n_layers
    eye = torch.eye(J.jacobians.shape[-1])
    for l in range(1, L):
        assert torch.equal(J.jacobians[l], eye)
    assert not torch.allclose(J.jacobians[0], eye, atol=1e-3)          # block 0 still acts
    df = LZ.compare(model, x, jacobian=J)
    logit = df[(df.lens == "logit") & (df.layer >= 1)].drop(columns="lens").reset_index(drop=True)
    jac = df[(df.lens == "jacobian") & (df.layer >= 1)].drop(columns="lens").reset_index(drop=True)
    pd_testing.assert_frame_equal(jac, logit, check_exact=True)


def test_jacobian_lens_stop_keeps_the_prompts_done():
    model, x = _transformer(), _tokens(B=4)

    class StopAt(Context):
        reports = 0

        @property
        def stopped(self):
            return self.reports >= 2

        def _send(self, *a):
            self.reports += 1
    J = LZ.fit_jacobian_lens(model, x, monitor=StopAt(report_interval=0))
    full = LZ.fit_jacobian_lens(model, x[:2])
    assert J.n_prompts == 2 and J.info["stopped"]
    torch.testing.assert_close(J.jacobians, full.jacobians)


# ============================================================================ diagnostics, commitment, top tokens


def _hand_lens_logits(model, x, J=None):
    """``(L+1, B, T, V)`` logit-lens (or Jacobian-lens) logits from the model's own modules, and the final logits."""
    with torch.no_grad(), wb.hooks.record(model, names=["blocks.*.resid_pre"]) as cache:
        final = model(x)
    L = len(model.blocks)
    out = []
    for l in range(L):
        h = cache[f"blocks.{l}.resid_pre"]
        if J is not None:
            h = h @ J.jacobians[l].T
        out.append(model.readout(model.final_norm(h)))
    out.append(final)
    return torch.stack(out).detach(), final


def test_diagnostics_against_a_hand_computation():
    model, x = _transformer(n_layers=3), _tokens(B=4)
    J = LZ.fit_jacobian_lens(model, x)
    df = LZ.diagnostics(model, x, jacobian=J, k=3)
    for name, lens in (("logit", None), ("jacobian", J)):
        z, final = _hand_lens_logits(model, x, lens)
        ft = final.argmax(-1).numpy()
        for l in range(4):
            row = df[(df.lens == name) & (df.layer == l)].iloc[0]
            zl = z[l].numpy()
            top3 = np.argsort(-zl, axis=-1)[..., :3]
            assert row.top1_agree == pytest.approx((top3[..., 0] == ft).mean())
            assert row.topk_agree == pytest.approx((top3 == ft[..., None]).any(-1).mean())
            assert row["kurtosis"] == pytest.approx(scipy.stats.kurtosis(zl, axis=-1, fisher=True).mean(), rel=1e-4)
            assert row["autocorr"] == pytest.approx((top3[:, 1:, 0] == top3[:, :-1, 0]).mean())
            M = np.eye(16) if name == "logit" or l == 3 else J.jacobians[l].numpy()
            s2 = np.linalg.svd(M, compute_uv=False) ** 2
            assert row.eff_dim == pytest.approx(s2.sum() ** 2 / (s2 ** 2).sum(), rel=1e-5)
    assert df.attrs["k"] == 3 and list(df.lens.unique()) == ["logit", "jacobian"]


def _hand_commitment(z, final, crit):
    L1, B, T, _ = z.shape
    ft = final.argmax(-1)
    p = z.softmax(-1)
    out = np.full((B, T), np.nan)
    for b in range(B):
        for t in range(T):
            hit = []
            for l in range(L1):
                order = torch.argsort(z[l, b, t], descending=True)
                hit.append({"top1": order[0] == ft[b, t], "top3": ft[b, t] in order[:3],
                            "p50": p[l, b, t, ft[b, t]] > 0.5}[crit])
            for l in range(L1):
                if all(bool(h) for h in hit[l:]):
                    out[b, t] = l
                    break
    return out


def test_commitment_against_a_hand_computation():
    model, x = _transformer(n_layers=3, scale=0.8), _tokens(B=3)
    J = LZ.fit_jacobian_lens(model, x)
    df = LZ.commitment(model, x, jacobian=J)
    assert set(df.criterion) == {"top1", "top3", "p50"} and set(df.lens) == {"logit", "jacobian"}
    for name, lens in (("logit", None), ("jacobian", J)):
        z, final = _hand_lens_logits(model, x, lens)
        for crit in ("top1", "top3", "p50"):
            want = _hand_commitment(z, final, crit)
            got = df[(df.lens == name) & (df.criterion == crit)].pivot(index="batch", columns="position",
                                                                        values="layer").to_numpy()
            np.testing.assert_array_equal(got, want)
        tokens = df[(df.lens == name) & (df.criterion == "top1")].pivot(index="batch", columns="position", values="token")
        np.testing.assert_array_equal(tokens.to_numpy(), final.argmax(-1).numpy())
    top1 = df[df.criterion == "top1"].layer
    assert top1.notna().all() and top1.nunique() > 1                    # always commits (at L latest), not all alike
    assert df[df.criterion == "p50"].layer.isna().any()                   # some final predictions have p <= 0.5


def test_top_tokens_against_a_hand_computation():
    model, x = _transformer(), _tokens(B=2)
    df = LZ.top_tokens(model, x, tuned=LZ.TunedLens(model))
    z, final = _hand_lens_logits(model, x)
    p, tok = z.softmax(-1).max(-1)                                        # (L+1, B, T)
    for lens in ("logit", "tuned"):
        sel = df[df.lens == lens]
        assert len(sel) == tok.numel()
        np.testing.assert_array_equal(sel.token.to_numpy(), tok.permute(1, 2, 0).reshape(-1).numpy())
        np.testing.assert_allclose(sel.prob.to_numpy(), p.permute(1, 2, 0).reshape(-1).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(sel.final_token.to_numpy(),
                                      final.argmax(-1)[..., None].expand(-1, -1, 3).reshape(-1).numpy())


# ============================================================================ bad input


def test_bad_input_is_named():
    model, x = _transformer(), _tokens()
    tuned = LZ.TunedLens(model)
    with pytest.raises(ValueError, match=r"layers\[\] must be an integer in \[0, 2\], got 3"):
        LZ.compare(model, x, layers=[0, 3])
    with pytest.raises(ValueError, match=r"layers\[\] must be an integer in \[0, 2\], got -1"):
        LZ.diagnostics(model, x, layers=[-1])
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\], got 5"):
        tuned.transform(torch.zeros(1, 16), 5)
    with pytest.raises(ValueError, match="x must have at most the model's context of 8 positions, got 9"):
        LZ.compare(model, _tokens(T=9))
    with pytest.raises(ValueError, match="prompts must have at most the model's context of 8 positions, got 9"):
        LZ.fit_jacobian_lens(model, _tokens(T=9))
    with pytest.raises(ValueError, match="x must have at most the model's context"):
        LZ.train_tuned_lens(model, _tokens(T=9), steps=1)
    with pytest.raises(ValueError, match=r"skip_first must be an integer in \[0, 7\], got 8"):
        LZ.fit_jacobian_lens(model, x, skip_first=8)
    with pytest.raises(ValueError, match=r"dim_batch must be an integer in \[1, 16\]"):
        LZ.fit_jacobian_lens(model, x, dim_batch=17)
    with pytest.raises(ValueError, match="tuned must be a TunedLens"):
        LZ.compare(model, x, tuned="lens")
    with pytest.raises(ValueError, match="jacobian must be a JacobianLens"):
        LZ.commitment(model, x, jacobian=tuned)
    with pytest.raises(ValueError, match="steps must be"):
        LZ.train_tuned_lens(model, x, steps=0)
    with pytest.raises(ValueError, match="max_passes must be"):
        LZ.train_tuned_lens(model, x, max_passes=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 13\]"):
        LZ.diagnostics(model, x, k=14)
    assert LZ.diagnostics(_transformer(vocab=3), _tokens(V=3)).attrs["k"] == 3      # default: min(5, V)
    no_blocks = _transformer(n_layers=0)
    with pytest.raises(ValueError, match="at least one block"):
        LZ.TunedLens(no_blocks)


# ============================================================================ figures


def test_figures_from_the_frames():
    FL = pytest.importorskip("workbench.figures.lenses")       # plotly: absent on an engine-only machine
    model, x = _transformer(n_layers=3, scale=0.8), _tokens(B=2)
    J = LZ.fit_jacobian_lens(model, x)
    tuned = _trained_lens(model, x)
    cmp = LZ.compare(model, x, tuned=tuned, jacobian=J)
    fig = FL.lens_comparison_figure(cmp)
    assert [t.name for t in fig.data] == ["logit", "tuned", "jacobian"] * 2
    assert list(fig.data[2].y) == list(cmp[cmp.lens == "jacobian"].kl_to_final)
    diag = FL.lens_diagnostics_figure(LZ.diagnostics(model, x, tuned=tuned, jacobian=J, k=2))
    assert len(diag.data) == 12 and "top-2" in diag.layout.annotations[0].text
    vocab = [chr(ord("a") + i) for i in range(13)]
    tops, com = LZ.top_tokens(model, x[:1], jacobian=J), LZ.commitment(model, x[:1], jacobian=J)
    heat = FL.lens_token_heatmap(tops, com, lens="jacobian", vocab=vocab, strip="under")
    grid, strip = heat.data
    sel = tops[(tops.lens == "jacobian")].pivot(index="layer", columns="position", values="token")
    assert [list(r) for r in grid.text] == [[vocab[int(t)] for t in r] for r in sel.to_numpy()]
    want = com[(com.lens == "jacobian") & (com.criterion == "top1")].sort_values("position").layer
    assert list(strip.z[0]) == list(want) and strip.y == ("commits",)
    n_final = int((sel.to_numpy() == tops[tops.lens == "jacobian"].pivot(
        index="layer", columns="position", values="final_token").to_numpy()).sum())
    assert len(heat.layout.shapes) == n_final                             # outlined: the final prediction
    over = FL.lens_token_heatmap(tops, com, lens="jacobian", strip="over")
    assert over.data[0].y == ("commits",) or over.data[1].y == ("commits",)
    assert len(FL.lens_token_heatmap(tops, None).data) == 1
    for empty in (FL.lens_comparison_figure(None), FL.lens_diagnostics_figure(None), FL.lens_token_heatmap(None)):
        assert "no data yet" in empty.layout.annotations[0].text


# ============================================================================ trained models (slow)


def _held_out_kl(model, x_train, x_val, steps=250):
    fit = LZ.train_tuned_lens(model, x_train, steps=steps, batch_size=32, max_passes=100, seed=0)
    df = LZ.compare(model, x_val, tuned=fit.lens)
    return df.pivot(index="layer", columns="lens", values="kl_to_final"), fit


def _check_tuned_beats_logit(kl, name):
    L = kl.index.max()
    print(f"\n{name}: held-out KL(final || lens) per layer\n{kl.round(4).to_string()}")
    assert (kl.tuned <= kl.logit + 1e-6).all()
    assert kl.tuned[0] <= 0.7 * kl.logit[0] and kl.tuned[L] == 0


@pytest.mark.slow
def test_on_a_trained_char_lm_the_tuned_lens_beats_the_logit_lens_at_every_layer():
    from workbench.core.recipes import TEXT
    ds = TEXT.load_data()
    run = wb.train(wb.models.build(TEXT.model_config(ds, n_layers=3)), ds, TEXT.train_config(steps=300, eval_every=300))
    kl, fit = _held_out_kl(run.model.eval(), ds.x_train, ds.x_val[:200])
    assert not fit.short
    _check_tuned_beats_logit(kl, "char LM, 3 layers")


@pytest.mark.slow
def test_on_a_trained_khop_model_the_tuned_lens_beats_the_logit_lens_at_every_layer():
    from workbench.core.recipes import KHOP
    ds = KHOP.load_data(n_train=5000)
    run = wb.train(wb.models.build(KHOP.model_config(ds, n_layers=2)), ds, KHOP.train_config(steps=400, eval_every=400))
    kl, fit = _held_out_kl(run.model.eval(), ds.x_train, ds.x_val[:200])
    _check_tuned_beats_logit(kl, "2-hop khop, 2 layers")
