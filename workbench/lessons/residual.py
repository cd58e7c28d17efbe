"""Lesson "residual": what each layer writes into the residual stream, read with the logit lens and the
tuned lens, and what skipping a layer does.

Build: the learner writes the logit lens's KL per layer (nostalgebraist 2020; ``docs/definitions.md#logit-lens``):
the residual entering each block read out through the final norm and unembedding, ``KL(p_final || p_lens)``
averaged over tokens, the last row the output itself. Checked against :func:`workbench.residual.logit_lens`.
Measure: which block's skip changes the output most (:func:`workbench.residual.skip_effects`, Csordás et al.
2025; ``#skip-effects``).
"""
from __future__ import annotations

import torch

from ..core import models
from ..hooks import record
from ..residual import logit_lens
from .framework import Case, Exercise, Lesson, Question, fmt, register, tensor_result


def lens_kl(model, x):
    """KL(final || logit lens) at each layer 0..L, mean over the tokens of ``x`` (B, T): a tensor (L + 1,)."""
    with torch.no_grad():
        with record(model, names=["blocks.*.resid_pre"]) as cache:
            final = model(x).log_softmax(-1)
        kls = []
        for l in range(len(model.blocks)):
            lens = model.unembed(cache[f"blocks.{l}.resid_pre"]).log_softmax(-1)
            kls.append((final.exp() * (final - lens)).sum(-1).mean())
        kls.append(torch.tensor(0.0))    # the final residual read out is the output itself
        return torch.stack(kls)


# (d_model, n_layers, n_heads, vocab, batch, tokens)
_SHAPES = [(16, 1, 2, 11, 2, 6), (24, 2, 4, 17, 3, 8), (32, 3, 4, 13, 2, 12), (16, 4, 2, 19, 4, 5)]


def _cases() -> list[Case]:
    return [Case(f"a {n}-block Transformer, d_model {d}, vocabulary {v}, a batch of {b} x {t} tokens",
                 data=dict(d_model=d, n_layers=n, n_heads=h, vocab=v, batch=b, tokens=t, seed=i))
            for i, (d, n, h, v, b, t) in enumerate(_SHAPES)]


def _model(case: Case):
    c = case.data
    cfg = models.TransformerConfig(vocab_size=c["vocab"], context=16, d_model=c["d_model"], n_layers=c["n_layers"],
                                   n_heads=c["n_heads"], d_mlp=2 * c["d_model"], seed=c["seed"])
    model = models.build(cfg).eval()
    with torch.no_grad():   # stronger weights than GPT-2's init, so the layers differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    x = torch.randint(0, c["vocab"], (c["batch"], c["tokens"]), generator=torch.Generator().manual_seed(50 + c["seed"]))
    return model, x


def _variants(model, x) -> dict[str, torch.Tensor]:
    """What common slips compute: KL the other way, no final norm, the residual after each block, a sum."""
    out = {k: [] for k in ("reversed", "no_norm", "after", "sum")}
    with torch.no_grad():
        with record(model, names=["blocks.*.resid_pre", "blocks.*.resid_post"]) as cache:
            final = model(x).log_softmax(-1)
        for l in range(len(model.blocks)):
            h = cache[f"blocks.{l}.resid_pre"]
            lens = model.unembed(h).log_softmax(-1)
            out["reversed"].append((lens.exp() * (lens - final)).sum(-1).mean())
            raw = model.readout(h).log_softmax(-1)
            out["no_norm"].append((final.exp() * (final - raw)).sum(-1).mean())
            post = model.unembed(cache[f"blocks.{l}.resid_post"]).log_softmax(-1)
            out["after"].append((final.exp() * (final - post)).sum(-1).mean())
            out["sum"].append((final.exp() * (final - lens)).sum(-1).sum())
    zero = torch.tensor(0.0)
    return {k: torch.stack(v + [zero]).double() for k, v in out.items()}


def _judge(fn, case: Case) -> str | None:
    model, x = _model(case)
    L = len(model.blocks)
    table = logit_lens(model, x)
    want = torch.tensor(table.sort_values("layer")["kl_to_final"].to_numpy(), dtype=torch.float64)
    raw = fn(model, x)
    if isinstance(raw, torch.Tensor) and tuple(raw.shape) == (L,):
        return (f"you returned {L} value{'s' * (L > 1)}, expected L + 1 = {L + 1}: rows 0..{L - 1} read the residual "
                f"entering each block, and row {L} the final residual (the model's own output: KL 0)")
    got, err = tensor_result(raw, (L + 1,))
    if err:
        return err + f" (one KL per layer 0..{L}, averaged over the batch and the tokens)"
    if torch.allclose(got, want, rtol=1e-3, atol=1e-5):
        return None
    hints = {
        "reversed": "you computed KL(lens || final): the logit lens measures KL(p_final || p_lens), "
                    "the final distribution first (sum of p_final * (log p_final - log p_lens))",
        "no_norm": "you read the residual through the unembedding alone: apply the final norm first "
                   "(model.unembed(h) does both)",
        "after": "you read the residual after each block (resid_post): layer l is the residual entering block l "
                 "(resid_pre), layer 0 the embeddings",
        "sum": "you summed over the tokens: average over the batch and the positions",
    }
    for name, values in _variants(model, x).items():
        if torch.allclose(got, values, rtol=1e-3, atol=1e-5):
            return hints[name]
    l = int((got - want).abs().argmax())
    return (f"at layer {l} your KL is {fmt(got[l])} where the logit lens gives {fmt(want[l])} "
            f"(largest difference of the {L + 1} layers)")


LENS_KL = Exercise(
    name="residual.lens_kl", title="The logit lens, layer by layer", params=("model", "x"),
    reference=lens_kl, cases=_cases, judge=_judge)

SKIP_MOST = Question(
    name="residual.skip_most",
    prompt=("A 3-block character model is trained. Skip one block at a time (replace it by the identity): "
            "skipping which block changes the output distribution most?"),
    choices=(0, 1, 2), ci_answer=1)

LESSON = register(Lesson(
    name="residual", title="What each layer writes: lenses and skips", notebook="02_residual_stream.ipynb",
    questions=(SKIP_MOST,), exercises=(LENS_KL,), measured="residual.skip_most",
    papers=("nostalgebraist 2020, interpreting GPT: the logit lens",
            "Belrose et al. 2023, Eliciting latent predictions with the tuned lens",
            "Csordás et al. 2025, Do language models use their depth efficiently?")))
