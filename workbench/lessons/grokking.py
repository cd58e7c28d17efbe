"""Lesson "grokking": modular addition that generalises long after it is memorised, and the progress
measures that see it coming.

Build: the learner writes the Fourier norms of the number-token embedding (Nanda et al. 2023;
``docs/definitions.md#grok-measures``): for each frequency ``k = 1..(p-1)/2`` the norm of the embedding's
projection on the unit ``cos(2 pi k x / p)`` and ``sin(2 pi k x / p)`` vectors; checked against
:func:`workbench.grokking.fourier_norms`. Measure: the step at which validation accuracy reaches 99%
(:func:`workbench.grokking.phases`).
"""
from __future__ import annotations

import math

import torch

from ..studies.grokking import fourier_norms as engine_norms
from .framework import Case, Exercise, LearnerError, Lesson, Question, fmt, register, tensor_result


def fourier_norms(W_E, p):
    """Norm of each frequency k = 1..(p-1)/2 of the embedding of the numbers ``W_E[:p]`` (``(p, d)``)."""
    W = W_E[:p].detach().double()
    x = torch.arange(p, dtype=torch.float64)
    norms = []
    for k in range(1, (p - 1) // 2 + 1):
        c, s = torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)
        c, s = c / c.norm(), s / s.norm()
        norms.append(((c @ W) ** 2 + (s @ W) ** 2).sum().sqrt())
    return torch.stack(norms)


# (p, d, planted frequency or None)
_SHAPES = [(7, 8, 2), (5, 4, None), (11, 3, None), (13, 16, 5), (17, 6, 1)]


def _cases() -> list[Case]:
    out = []
    for i, (p, d, k) in enumerate(_SHAPES):
        what = (f"p = {p}, a {p + 2} x {d} embedding (the {p} numbers, then '+' and '=')"
                + (f", numbers on frequency {k}" if k else ", random"))
        out.append(Case(what, data=dict(p=p, d=d, k=k, seed=30 + i)))
    return out


def _embedding(case: Case) -> torch.Tensor:
    c = case.data
    gen = torch.Generator().manual_seed(c["seed"])
    W = torch.randn(c["p"] + 2, c["d"], generator=gen)
    if c["k"]:
        x = torch.arange(c["p"], dtype=torch.float32)[:, None]
        a, b = torch.randn(1, c["d"], generator=gen), torch.randn(1, c["d"], generator=gen)
        W[:c["p"]] = 3 * (torch.cos(2 * math.pi * c["k"] * x / c["p"]) * a + torch.sin(2 * math.pi * c["k"] * x / c["p"]) * b) \
            + 0.05 * W[:c["p"]]
    return W


def _judge(fn, case: Case) -> str | None:
    p, k = case.data["p"], case.data["k"]
    W = _embedding(case)
    n = (p - 1) // 2
    try:
        raw = fn(W.clone(), p)
    except LearnerError as e:
        text = str(e.error)
        if isinstance(e.error, RuntimeError) and ("size" in text or "shape" in text):
            return (f"{e.describe()}. The embedding has p + 2 = {p + 2} rows (the numbers, then '+' and '='): "
                    f"use its first p rows, W_E[:p]")
        raise
    if hasattr(raw, "shape") and tuple(raw.shape) in ((p - 1,), ((p + 1) // 2,)):
        if tuple(raw.shape) == (p - 1,):
            return (f"you returned p - 1 = {p - 1} values: combine the cos and sin of each frequency into one norm, "
                    f"sqrt(||c_k^T W||^2 + ||s_k^T W||^2), for k = 1..{n}")
        return (f"you returned (p + 1) / 2 = {(p + 1) // 2} values: leave out the constant term (k = 0); "
                f"frequencies run k = 1..{n}")
    got, err = tensor_result(raw, (n,))
    if err:
        return err + f" (one norm per frequency k = 1..{n})"
    want = torch.as_tensor(engine_norms(W, p), dtype=torch.float64)
    if torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        return None
    if torch.allclose(got, want ** 2, rtol=1e-4, atol=1e-6):
        return "you returned squared norms: take the square root of ||c_k^T W||^2 + ||s_k^T W||^2"
    scale = math.sqrt(p / 2)
    if torch.allclose(got, want * scale, rtol=1e-4, atol=1e-6):
        return (f"your norms are sqrt(p / 2) = {scale:.3g} times the engine's: normalise each cos and sin vector to "
                f"unit length before projecting")
    if k and int(got.argmax()) != k - 1:
        return (f"your largest norm is at entry {int(got.argmax())} (frequency {int(got.argmax()) + 1}), but the numbers "
                f"lie on frequency {k}: entry 0 must be k = 1 (cos(2 pi x / p)), entry k - 1 frequency k")
    i = int((got - want).abs().argmax())
    return f"for frequency k = {i + 1} your norm is {fmt(got[i])}, the engine's {fmt(want[i])}"


FOURIER = Exercise(name="grokking.fourier_norms", title="The embedding's Fourier norms",
                   params=("W_E", "p"), reference=fourier_norms, cases=_cases, judge=_judge)

GROK_STEP = Question(
    name="grokking.grok_step",
    prompt=("Modular addition mod 23 on 60% of the pairs, full batch, strong weight decay: the model fits every "
            "training pair within about 100 steps. At which step does its validation accuracy reach 99%? "
            "(the run is 600 steps; answer 600 or more if you think it never does)"),
    low=0, high=2000, ci_answer=300, unit="steps", digits=0)

LESSON = register(Lesson(
    name="grokking", title="Grokking: memorise first, generalise later", notebook="05_grokking.ipynb",
    questions=(GROK_STEP,), exercises=(FOURIER,), measured="grokking.grok_step",
    papers=("Power et al. 2022, Grokking: generalization beyond overfitting on small algorithmic datasets",
            "Nanda et al. 2023, Progress measures for grokking via mechanistic interpretability",
            "Tian 2025, Provable scaling laws of feature emergence from learning dynamics of grokking")))
