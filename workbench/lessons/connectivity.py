"""Lesson "connectivity": linear mode connectivity and permutation symmetry.

Build: the learner writes weight matching for one hidden layer (Ainsworth et al. 2023, Git Re-Basin;
``docs/definitions.md#weight-matching``): the permutation of B's hidden units that maximises the summed
similarity of incoming weights, biases and outgoing weights with A's, one linear assignment
(``scipy.optimize.linear_sum_assignment``), as one step of :func:`workbench.permute.match_weights`.
Convention: ``perm[i]`` is the unit of B that matches unit ``i`` of A, so ``b["w_in"][perm]`` lines up
with ``a["w_in"]`` (as :func:`workbench.permute.permute` applies it). Measure: the share of the loss
barrier (Frankle et al. 2020; ``#barrier``) left after the learner's matching.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .framework import Case, Exercise, Lesson, Question, register


def match_layer(a, b):
    """The permutation of B's hidden units that best matches A's: an integer array ``(h,)``.

    ``a``, ``b``: dicts of tensors ``w_in (h, d_in)``, ``b_in (h,)``, ``w_out (d_out, h)``.
    """
    similarity = a["w_in"] @ b["w_in"].T + torch.outer(a["b_in"], b["b_in"]) + a["w_out"].T @ b["w_out"]
    _, perm = linear_sum_assignment(similarity.detach().numpy(), maximize=True)
    return perm


def _similarity(a, b, outgoing: bool = True) -> np.ndarray:
    s = a["w_in"] @ b["w_in"].T + torch.outer(a["b_in"], b["b_in"])
    if outgoing:
        s = s + a["w_out"].T @ b["w_out"]
    return s.double().numpy()


def _layer(gen: torch.Generator, h: int, d_in: int, d_out: int) -> dict:
    return {"w_in": torch.randn(h, d_in, generator=gen), "b_in": torch.randn(h, generator=gen) * 0.5,
            "w_out": torch.randn(d_out, h, generator=gen)}


def _make(h: int, d_in: int, d_out: int, noise: float, seed: int, twins: bool = False):
    """A, and B = A's units shuffled plus noise. ``twins``: two units of A that only their outgoing weights
    tell apart (their incoming weights, seen through the noise, point to each other's partner)."""
    gen = torch.Generator().manual_seed(seed)
    a = _layer(gen, h, d_in, d_out)
    if twins:
        u, v = torch.randn(d_in, generator=gen), torch.randn(d_in, generator=gen)
        a["w_in"][0], a["w_in"][1] = u + 0.05 * v, u - 0.05 * v
        a["b_in"][0] = a["b_in"][1] = 0.3
    order = torch.randperm(h, generator=gen)         # B's unit j is A's unit order[j]
    b = {"w_in": a["w_in"][order] + noise * torch.randn(h, d_in, generator=gen),
         "b_in": a["b_in"][order] + noise * torch.randn(h, generator=gen),
         "w_out": a["w_out"][:, order] + noise * torch.randn(d_out, h, generator=gen)}
    if twins:   # B's copies of the twins: incoming weights swapped, outgoing weights kept
        j0, j1 = int((order == 0).nonzero()), int((order == 1).nonzero())
        b["w_in"][j0], b["w_in"][j1] = u - 0.05 * v, u + 0.05 * v
        b["b_in"][j0] = b["b_in"][j1] = 0.3
    return a, b


# (hidden units, d_in, d_out, noise, twins)
_SHAPES = [(6, 5, 4, 0.05, False), (12, 8, 6, 0.3, False), (24, 10, 8, 1.2, False), (8, 6, 10, 0.05, True),
           (16, 7, 5, 0.6, False)]


def _cases() -> list[Case]:
    out = []
    for i, (h, d_in, d_out, noise, twins) in enumerate(_SHAPES):
        what = (f"{h} hidden units, {d_in} inputs, {d_out} outputs, B = A shuffled plus noise {noise:g}"
                + (", two units of A that only their outgoing weights tell apart" if twins else ""))
        out.append(Case(what, data=dict(h=h, d_in=d_in, d_out=d_out, noise=noise, twins=twins, seed=10 + i)))
    return out


def _as_perm(value, h: int):
    """``value`` as an integer array of a permutation of range(h), or a message."""
    if value is None:
        return None, "your function returned None: did you forget the return statement? (expected a permutation)"
    if isinstance(value, tuple) and len(value) == 2:
        return None, ("your function returned a pair (linear_sum_assignment's rows and columns?): return only the "
                      "columns, perm[i] = the unit of B matched to unit i of A")
    try:
        arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
    except Exception:
        return None, f"your function returned a {type(value).__name__}, expected an integer array of {h} units"
    if arr.shape != (h,):
        return None, f"your function returned shape {arr.shape}, expected ({h},): one unit of B for each unit of A"
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            return None, "your function returned fractions: a permutation holds whole unit indices"
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        return None, f"your function returned {arr.dtype} values, expected integer unit indices"
    counts = np.bincount(arr[(arr >= 0) & (arr < h)], minlength=h)
    if arr.min() < 0 or arr.max() >= h or (counts != 1).any():
        twice = [int(u) for u in np.flatnonzero(counts > 1)]
        never = [int(u) for u in np.flatnonzero(counts == 0)]
        detail = f": unit {twice[0]} of B is used {counts[twice[0]]} times and unit {never[0]} never" if twice else ""
        return None, (f"your result is not a permutation of range({h}){detail}. Picking each unit's most similar "
                      f"partner greedily can pick one twice: solve the assignment with "
                      f"scipy.optimize.linear_sum_assignment")
    return arr, None


def _judge(fn, case: Case) -> str | None:
    c = case.data
    a, b = _make(c["h"], c["d_in"], c["d_out"], c["noise"], c["seed"], c["twins"])
    perm, err = _as_perm(fn({k: v.clone() for k, v in a.items()}, {k: v.clone() for k, v in b.items()}), c["h"])
    if err:
        return err
    s = _similarity(a, b)
    rows = np.arange(c["h"])
    best_cols = linear_sum_assignment(s, maximize=True)[1]
    best, got = s[rows, best_cols].sum(), s[rows, perm].sum()
    if got >= best - 1e-6 * max(1.0, abs(best)):
        return None
    if np.array_equal(perm, np.argsort(best_cols)) and not np.array_equal(best_cols, np.argsort(best_cols)):
        return ("your result is the inverse permutation: perm[i] must be the unit of B that matches unit i of A, so "
                "that b['w_in'][perm] lines up with a['w_in'] (rows of your similarity: A's units; columns: B's)")
    if np.array_equal(perm, linear_sum_assignment(s, maximize=False)[1]):
        return ("you found the least similar matching: linear_sum_assignment minimises by default; "
                "pass maximize=True (or negate the similarity)")
    if np.array_equal(perm, linear_sum_assignment(_similarity(a, b, outgoing=False), maximize=True)[1]):
        return ("your matching uses the incoming weights only: here two units of A are told apart by their outgoing "
                "weights alone. Add the outgoing weights' similarity (a['w_out'].T @ b['w_out']) to the incoming one")
    wrong = int(np.flatnonzero(perm != best_cols)[0])
    return (f"your matching's total similarity is {got:.4g}, the best matching's {best:.4g}: for instance unit {wrong} "
            f"of A is matched to unit {int(perm[wrong])} of B, the best matching picks unit {int(best_cols[wrong])}")


MATCH_LAYER = Exercise(
    name="connectivity.match_layer", title="Weight matching for one layer", params=("a", "b"),
    reference=match_layer, cases=_cases, judge=_judge)

BARRIER_LEFT = Question(
    name="connectivity.barrier_left",
    prompt=("Two MLPs trained from different seeds have a loss barrier B on the straight line between them. "
            "After matching B's units to A's (the residual stream by the engine, the hidden layer by your "
            "function), what fraction of B is left? (1: no change; 0: gone)"),
    low=0.0, high=1.5, ci_answer=0.5, digits=2)

LESSON = register(Lesson(
    name="connectivity", title="Permutation symmetry and the barrier between two networks",
    notebook="03_connectivity.ipynb", questions=(BARRIER_LEFT,), exercises=(MATCH_LAYER,),
    measured="connectivity.barrier_left",
    papers=("Frankle et al. 2020, Linear mode connectivity and the lottery ticket hypothesis",
            "Entezari et al. 2022, The role of permutation invariance in linear mode connectivity",
            "Ainsworth, Hayase and Srinivasa 2023, Git Re-Basin",
            "Jordan et al. 2023, REPAIR")))
