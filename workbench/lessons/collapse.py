"""Lesson "collapse": neural collapse of the last-layer features as training goes past zero error.

Build: the learner computes NC1 (Papyan, Han and Donoho 2020; ``docs/definitions.md#nc1``):
``Tr(Sigma_W Sigma_B^+) / C`` with ``Sigma_W`` the within-class covariance over all samples, ``Sigma_B``
the covariance of the class means around their mean, ``+`` the pseudo-inverse; checked against
:func:`workbench.collapse.metrics`. Measure: NC1 of the trained model's features, with the learner's
function (the engine's in CI).
"""
from __future__ import annotations

import torch

from ..collapse import metrics
from .framework import Case, Exercise, LearnerError, Lesson, Question, fmt, number_result, register


def nc1(features, labels):
    """NC1 of ``features (N, d)`` with integer ``labels (N,)``: one number."""
    h = features.double()
    classes = labels.unique()
    means = torch.stack([h[labels == c].mean(0) for c in classes])      # (C, d)
    centred = means - means.mean(0)                                     # around the mean of the class means
    within = h - means[torch.searchsorted(classes, labels)]             # each sample minus its class mean
    sigma_w = within.T @ within / len(h)
    sigma_b = centred.T @ centred / len(classes)
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)) / len(classes))


# (samples per class, dims, spread within, class labels skipped)
_SHAPES = [((20, 20, 20), 8, 0.5), ((30, 12, 18, 25, 9), 6, 1.0), ((15, 40, 22, 30), 3, 0.3),
           ((25, 25, 10, 40, 12, 18), 16, 2.0)]


def _cases() -> list[Case]:
    out = []
    for i, (counts, d, spread) in enumerate(_SHAPES):
        what = (f"{sum(counts)} features in {d} dimensions, {len(counts)} classes of {', '.join(map(str, counts))} "
                f"samples")
        out.append(Case(what, data=dict(counts=counts, d=d, spread=spread, seed=20 + i)))
    return out


def _data(case: Case):
    c = case.data
    gen = torch.Generator().manual_seed(c["seed"])
    centres = torch.randn(len(c["counts"]), c["d"], generator=gen) * 2.0
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(c["counts"])])
    labels = labels[torch.randperm(len(labels), generator=gen)]
    features = centres[labels] + c["spread"] * torch.randn(len(labels), c["d"], generator=gen)
    return features.float(), labels


def _judge(fn, case: Case) -> str | None:
    features, labels = _data(case)
    C, d = len(case.data["counts"]), case.data["d"]
    try:
        raw = fn(features.clone(), labels.clone())
    except LearnerError as e:
        if "LinAlgError" in type(e.error).__name__ or "singular" in str(e.error).lower():
            return (f"your function raised {type(e.error).__name__} (a singular matrix): Sigma_B has rank at most "
                    f"C - 1 = {C - 1} here, so it has no inverse; use the pseudo-inverse (torch.linalg.pinv)")
        raise
    got, err = number_result(raw)
    if err:
        return err
    want = metrics(features, labels)["nc1"]
    if abs(got - want) <= 1e-4 * abs(want) + 1e-9:
        return None
    hints = [
        (metrics(features, labels, divide_by_classes=False)["nc1"],
         f"your NC1 is C = {C} times the engine's: divide the trace by the number of classes"),
        (metrics(features, labels, global_mean="samples")["nc1"],
         "you centred the class means on the mean of all samples: NC1 (Papyan et al.) centres them on the mean "
         "of the class means, which differs when the classes have different sizes"),
        (metrics(features, labels, within="classes")["nc1"],
         "you averaged the per-class covariances: Sigma_W is the covariance of every sample around its class mean, "
         "divided by the number of samples N"),
        (want * len(features) / (len(features) - 1),
         "you divided Sigma_W by N - 1: NC1 uses the population covariance, divided by N"),
    ]
    for value, hint in hints:
        if abs(got - value) <= 1e-4 * abs(value) + 1e-9:
            return hint
    if d > C - 1 and abs(got) > 1e3 * abs(want):
        return (f"your NC1 is {fmt(got)}, the engine's {fmt(want)}: Sigma_B ({d} x {d}) has rank C - 1 = {C - 1}, so "
                f"its inverse blows up; use the pseudo-inverse (torch.linalg.pinv)")
    return f"your NC1 is {fmt(got)}, the engine's {fmt(want)} (ratio {fmt(got / want) if want else 'undefined'})"


NC1 = Exercise(name="collapse.nc1", title="NC1, within-class variability against between-class spread",
               params=("features", "labels"), reference=nc1, cases=_cases, judge=_judge)

NC1_END = Question(
    name="collapse.nc1_end",
    prompt=("The setup cell printed NC1 of the untrained network's last-layer features. The network then trains "
            "until it fits every training example and beyond. What is NC1 at the end?"),
    low=0.0, high=20.0, ci_answer=1.0, digits=3)

LESSON = register(Lesson(
    name="collapse", title="Neural collapse: features that pile up on their class means", notebook="04_collapse.ipynb",
    questions=(NC1_END,), exercises=(NC1,), measured="collapse.nc1_end",
    papers=("Papyan, Han and Donoho 2020, Prevalence of neural collapse during the terminal phase of deep learning",
            "Galanti, György and Hutter 2022, On the role of neural collapse in transfer learning (CDNV)",
            "Fang et al. 2021, Exploring deep neural networks via layer-peeled model: minority collapse")))
