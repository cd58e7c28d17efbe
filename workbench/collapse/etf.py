"""Target geometries and what a trained model has: the simplex ETF, equiangular basis vectors, the head's
Gram matrix, the class means seen in the simplex's plane, and a classifier fixed to the ETF.

Definitions: ``docs/definitions.md#simplex-etf``, ``#ebv``, ``#fixed-heads``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core.models import ebv_rows, simplex_etf_rows, welch_bound
from .measure import MAX_CLASSES, MAX_ETF_ENTRIES, _classifier, _features_f64, gram

# ----------------------------------------------------------------------------- geometry


def simplex_etf(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A simplex ETF ``(C, d)`` in float64: unit rows with pairwise cosine ``-1/(C-1)``, in a random subspace.

    ``sqrt(C/(C-1)) (I - 11^T/C) U^T`` for a random partial orthogonal ``U (d, C)``; needs ``d >= C - 1``
    (``d >= C`` here, for the orthonormal basis).
    """
    C = checks.check_int("n_classes", n_classes, 2, MAX_CLASSES)
    if not isinstance(dim, bool) and isinstance(dim, int) and dim < C:
        raise ValueError(f"a simplex ETF of {C} classes built this way needs dim >= {C}, got {dim}")
    checks.check_int("dim", dim, C, max(C, MAX_ETF_ENTRIES // C))
    seed = checks.check_seed("seed", seed)
    return simplex_etf_rows(C, dim, seed)                                                # (C, d) float64


def ebv(n_classes: int, dim: int, threshold: float | None = None, seed: int = 0, max_steps: int = 2000) -> torch.Tensor:
    """Equiangular Basis Vectors (Shen et al. 2023): ``(C, d)`` float64 unit rows whose pairwise ``|cos|``
    is pushed below ``threshold`` by seeded projected gradient descent (``docs/definitions.md#ebv``).

    ``threshold`` defaults to ``max(0.05, 1.02 x`` the Welch bound ``)``; below the Welch bound
    ``sqrt((C-d)/(d(C-1)))`` no set of ``C`` unit vectors exists, so it is refused. With ``C = d + 1`` and
    ``threshold = 1/(C-1)`` the only solutions are the simplex ETF's lines (rows up to sign); the
    descent approaches them. Stops after ``max_steps`` when the threshold is not reached: check
    ``gram(W)`` (the head of a model records what it reached in :func:`head_gram`).
    """
    C = checks.check_int("n_classes", n_classes, 2, MAX_CLASSES)
    d = checks.check_int("dim", dim, 1, max(1, MAX_ETF_ENTRIES // C))
    bound = welch_bound(C, d)
    if threshold is None:
        threshold = max(0.05, 1.02 * bound)
    checks.check_float("threshold", threshold, 0.0, 1.0, hi_open=True)
    if threshold < bound:
        raise ValueError(f"threshold must be in [{bound:.4g}, 1) (the Welch bound of {C} unit vectors in {d} dims), "
                         f"got {threshold}")
    checks.check_int("max_steps", max_steps, 0, 1_000_000)
    return ebv_rows(C, d, float(threshold), checks.check_seed("seed", seed), max_steps)


def head_gram(model: nn.Module) -> dict:
    """The readout's row cosines next to the Gram matrix its kind aims at (``docs/definitions.md#fixed-heads``).

    ``kind``: the config's ``classifier`` (``"learned"``, ``"etf"``, ``"ebv"``); ``gram``: cosines of
    the rows ``(C, C)``; ``target``: the simplex ETF's ``C/(C-1) I - 1/(C-1) 11^T`` for learned and ETF
    heads (neural collapse drives a learned head there), the identity for EBV (``|cos| <= threshold``);
    ``error``: ``||gram - target||_F``; ``max_abs_cos``: the largest off-diagonal ``|cos|``;
    ``threshold``: EBV's (else None).
    """
    readout = getattr(model, "readout", None)
    if not isinstance(readout, nn.Linear):
        raise ValueError(f"model must be a workbench model with a linear readout, got {type(model).__name__}")
    kind = getattr(getattr(model, "config", None), "classifier", "learned")
    w = readout.weight.detach().to("cpu", torch.float64)
    C = len(w)
    g = gram(w)
    target = torch.eye(C, dtype=torch.float64) if kind == "ebv" else \
        torch.eye(C, dtype=torch.float64) * C / (C - 1) - 1.0 / (C - 1)
    off = g[~torch.eye(C, dtype=torch.bool)]
    return {"kind": kind, "gram": g.numpy(), "target": target.numpy(), "error": float((g - target).norm()),
            "max_abs_cos": float(off.abs().max()), "threshold": model.config.ebv_threshold if kind == "ebv" else None}


def simplex_view(means, n_components: int = 3) -> pd.DataFrame:
    """Class means in their top principal components next to the ideal simplex aligned to them.

    The means are centred (mean of class means) and projected on their first
    ``n_components`` principal axes. The ideal simplex (the centred standard basis,
    scaled to the means' Frobenius norm) is rotated onto the means by orthogonal
    Procrustes (``scipy.linalg.orthogonal_procrustes``) in the means' own ``C``-dimensional
    coordinates, then shown on the same axes, so the two overlay when collapse is complete.
    Returns a tidy DataFrame ``kind ("means" or "simplex"), class, pc1, pc2, pc3``.
    """
    from scipy.linalg import orthogonal_procrustes

    m = _features_f64(means, "means").cpu().numpy()
    C = len(m)
    if C < 2:
        raise ValueError(f"means must hold at least 2 class means, got {C}")
    checks.check_int("n_components", n_components, 1, C)
    centred = m - m.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = u * s                                                                        # (C, r) PCA coordinates
    r = coords.shape[1]
    if r < C:
        coords = np.pad(coords, ((0, 0), (0, C - r)))
    ideal = np.eye(C) - 1.0 / C
    ideal *= np.linalg.norm(centred) / np.linalg.norm(ideal)
    rot, _ = orthogonal_procrustes(ideal, coords)
    aligned = ideal @ rot
    k = n_components
    cols = [f"pc{i + 1}" for i in range(k)]
    frames = []
    for kind, xyz in (("means", coords), ("simplex", aligned)):
        df = pd.DataFrame(xyz[:, :k], columns=cols)
        df.insert(0, "class", np.arange(C))
        df.insert(0, "kind", kind)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def geometry(means, classifier=None) -> dict:
    """What the geometry plots show, from class means ``(C, d)`` (e.g. ``CollapseTracker.latest``).

    ``view``: :func:`simplex_view`; ``gram``: cosines of the centred means (``C x C``);
    ``ideal``: the simplex ETF's (1 on the diagonal, ``-1/(C-1)`` elsewhere);
    ``classifier_cos``: cosines of the classifier rows, when given (minority collapse shows
    as a block of cosines near 1).
    """
    m = _features_f64(means, "means").cpu()
    C = len(m)
    if C < 2:
        raise ValueError(f"means must hold at least 2 class means, got {C}")
    out = {"view": simplex_view(m.numpy()), "gram": gram(m - m.mean(0)).numpy(),
           "ideal": (np.eye(C) - 1.0 / C) * C / (C - 1), "classifier_cos": None}
    if classifier is not None:
        w, _ = _classifier(classifier, "cpu")
        out["classifier_cos"] = gram(w).numpy()
    return out


def set_etf_classifier(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fix the readout to a simplex ETF (unit rows) and freeze it, with a zero, frozen bias.

    The model then learns features only (fixed equiangular classifier; cf. Equiangular
    Basis Vectors and Fang et al. 2021). Returns the model.
    """
    seed = checks.check_seed("seed", seed)
    readout = getattr(model, "readout", None)
    if not isinstance(readout, nn.Linear):
        raise ValueError(f"model must be a workbench model with a linear readout, got {type(model).__name__}")
    C, d = readout.weight.shape
    if d < C:
        raise ValueError(f"model: a simplex ETF classifier of {C} classes needs d_model >= {C}, got {d}")
    with torch.no_grad():
        readout.weight.copy_(simplex_etf(C, d, seed).to(readout.weight))
        if readout.bias is not None:
            readout.bias.zero_()
            readout.bias.requires_grad_(False)
    readout.weight.requires_grad_(False)
    return model
