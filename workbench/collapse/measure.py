"""Neural-collapse measures as pure functions of features, labels and a classifier: class statistics,
NC1-NC4, the CDNV, Gram matrices and minority collapse (Papyan et al. 2020; Galanti et al. 2022;
Fang et al. 2021).

Definitions: ``docs/definitions.md#nc1``, ``#nc2``, ``#etf-error``, ``#nc3``, ``#nc4``, ``#cdnv``, ``#minority-collapse``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core import checks

# Metric names returned by :func:`metrics`, in display order.
NC_METRICS = ["nc1", "nc2_equinorm", "nc2_equiangular", "nc2_equinorm_w", "nc2_equiangular_w", "etf_error",
              "nc3", "nc4", "ncc_error", "cdnv"]


# ----------------------------------------------------------------------------- metrics


MAX_CLASSES = 100_000
MAX_ETF_ENTRIES = 1 << 26   # simplex_etf: n_classes * dim float64 entries (512 MB)


def _features_f64(features, name: str = "features") -> torch.Tensor:
    h = checks.check_features(name, checks.as_tensor(name, features))
    if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (samples, dims) with at least one of each, "
                         f"got shape {tuple(h.shape)}")
    return h.detach().to(torch.float64)


def _labels(name: str, labels, n: int, device, n_classes: int | None = None) -> torch.Tensor:
    """Integer class indices ``(n,)`` in ``[0, n_classes)``: float, bool, complex or negative labels are refused."""
    y = checks.as_tensor(name, labels)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integers (class indices), got dtype {y.dtype}")
    try:
        checks.check_labels(name, y, n_classes)
    except ValueError as e:
        raise ValueError(f"{e}" + (f" (n_classes = {n_classes})" if n_classes is not None else "")) from None
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-D with one entry per sample ({n}), got shape {tuple(y.shape)}")
    return y.to(device).long()


def _check_n_classes(n_classes) -> None:
    if n_classes is not None:
        checks.check_int("n_classes", n_classes, 2, MAX_CLASSES)


def _classes(labels: torch.Tensor, n_classes: int | None, min_count: int | None):
    """Present classes, each sample's class index, and the sample mask kept."""
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if n_classes is not None:
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
        missing = sorted(set(range(n_classes)) - set(classes.tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no samples; neural-collapse metrics need every class "
                             f"(pass n_classes=None to use only the classes present)")
    small = counts < (min_count or 2)
    if small.any():
        if min_count is None:
            few = {int(c): int(n) for c, n in zip(classes[small], counts[small])}
            raise ValueError(f"classes with fewer than 2 samples have no within-class spread: {few} "
                             f"(pass min_count=2 to drop them)")
        keep_cls = ~small
        keep = keep_cls[inverse]
        return _classes(labels[keep], None, None)[:2] + (keep,)
    return classes, inverse, torch.ones_like(labels, dtype=torch.bool)


def _classifier(classifier, device):
    """``(W (K, d) float64, b (K,) or None)`` from a Linear, a weight, or a ``(weight, bias)`` pair."""
    if classifier is None:
        return None, None
    if isinstance(classifier, nn.Linear):
        w, b = classifier.weight, classifier.bias
    elif isinstance(classifier, (tuple, list)):
        w, b = classifier
    else:
        w, b = classifier, None
    w = checks.check_features("classifier weight", checks.as_tensor("classifier weight", w))
    if w.ndim != 2 or w.shape[0] < 1:
        raise ValueError(f"classifier weight must be 2-D (classes, dims), got shape {tuple(w.shape)}")
    if b is not None:
        b = checks.check_features("classifier bias", checks.as_tensor("classifier bias", b))
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"classifier bias must have one entry per classifier row ({w.shape[0]}), "
                             f"got shape {tuple(b.shape)}")
        b = b.detach().to(device=device, dtype=torch.float64)
    return w.detach().to(device=device, dtype=torch.float64), b


def _cos_offdiag(vectors: torch.Tensor) -> torch.Tensor:
    """Off-diagonal cosines of the rows (C*(C-1),)."""
    cos = gram(vectors)
    return cos[~torch.eye(len(cos), dtype=torch.bool, device=cos.device)]


def _cov(x: torch.Tensor) -> float:
    """Coefficient of variation std/mean (ddof=1)."""
    return float(x.std() / x.mean()) if len(x) > 1 and x.mean() > 0 else float("nan")


def class_means(features, labels, n_classes: int | None = None):
    """``(classes, means (C, d) float64, counts (C,))`` of the classes present."""
    _check_n_classes(n_classes)
    h = _features_f64(features)
    y = _labels("labels", labels, len(h), h.device, n_classes)
    classes, inverse, _ = _classes(y, n_classes, min_count=1)
    counts = torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
    means = torch.zeros(len(classes), h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, inverse, h)
    return classes, means / counts[:, None], counts


@dataclass(frozen=True)
class ClassStats:
    """What every neural-collapse metric needs, accumulated once from the features (float64).

    Definitions in ``docs/definitions.md#nc-features``. ``C`` classes present, ``N`` samples, ``d`` dims,
    ``r <= min(C - 1, d)`` kept eigenpairs of ``Sigma_B``. Built by :func:`class_stats` (or inside
    :func:`metrics`); each metric is then a short function of these fields.
    """

    classes: torch.Tensor          # (C,) labels of the classes present
    counts: torch.Tensor           # (C,) samples per class
    means: torch.Tensor            # (C, d) class means mu_c
    global_mean: torch.Tensor      # (d,) mu_G: mean of the class means, or of the samples
    class_var: torch.Tensor        # (C,) V_c = mean ||h - mu_c||^2 over class c (trace of its covariance)
    between_eigvals: torch.Tensor  # (r,) nonzero eigenvalues of Sigma_B
    between_eigvecs: torch.Tensor  # (r, d) their unit eigenvectors v_k
    within_proj: torch.Tensor      # (r,) v_k^T Sigma_W v_k: within-class variance along each v_k
    labels: torch.Tensor           # (N,) each sample's label
    nearest: torch.Tensor          # (N,) label of each sample's nearest class mean
    logits: torch.Tensor | None    # (N, K) h W^T + b of the classifier, when one was given

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_samples(self) -> int:
        return len(self.labels)

    @property
    def centred(self) -> torch.Tensor:
        """``M = [mu_c - mu_G]_c`` ``(C, d)``."""
        return self.means - self.global_mean


def _inputs(features, labels, classifier, predictions, n_classes, global_mean, within, min_count):
    """Validated float64 features, labels, classifier and predictions, with too-small classes dropped:
    ``(h, y, w, b, predictions, classes, inverse)``."""
    checks.check_choice("global_mean", global_mean, ("classes", "samples"))
    checks.check_choice("within", within, ("samples", "classes"))
    _check_n_classes(n_classes)
    if min_count is not None:   # a class needs 2 samples for a within-class spread (1 would fake perfect collapse)
        checks.check_int("min_count", min_count, 2)
    h = _features_f64(features)
    y = _labels("labels", labels, len(h), h.device, n_classes)
    w, b = _classifier(classifier, h.device)
    if w is not None:
        if w.shape[1] != h.shape[1]:
            raise ValueError(f"classifier has {w.shape[1]} input dims, features have {h.shape[1]}")
        top = int(y.max())
        if top >= len(w):
            raise ValueError(f"classifier has {len(w)} rows but labels go up to {top}")
    if predictions is not None:
        bound = len(w) if w is not None else n_classes
        predictions = _labels("predictions", predictions, len(h), h.device, bound)
    classes, inverse, keep = _classes(y, n_classes, min_count)
    if not keep.all():
        h, y = h[keep], y[keep]
        predictions = None if predictions is None else predictions[keep]
    if len(classes) < 2:
        dropped = f" with at least min_count = {min_count} samples" if min_count is not None else ""
        raise ValueError(f"neural-collapse metrics need at least 2 classes{dropped}, got {len(classes)}")
    return h, y, w, b, predictions, classes, inverse


def _accumulate(h, y, classes, inverse, w, b, global_mean: str, within: str) -> ClassStats:
    """Few passes over the ``(N, d)`` features: class sums, squared norms, and one matmul with
    ``[Sigma_B eigenvectors; class means; classifier rows]``. Within-class residuals are only formed in
    the ``r``-dimensional eigenbasis of ``Sigma_B`` (no ``d x d`` matrix is formed)."""
    C, (N, d) = len(classes), h.shape
    f64 = dict(dtype=torch.float64, device=h.device)
    counts = torch.bincount(inverse, minlength=C).to(torch.float64)                       # (C,)
    means = torch.zeros(C, d, **f64).index_add_(0, inverse, h) / counts[:, None]          # (C, d)
    sqnorm = torch.linalg.vector_norm(h, dim=1) ** 2                                      # (N,)
    if not (torch.isfinite(means).all() and torch.isfinite(sqnorm).all()):
        raise ValueError("features contain NaN or infinite values")
    mu_g = means.mean(0) if global_mean == "classes" else h.mean(0)                      # (d,)
    # Sigma_B = M^T M / C: eigenpairs from the SVD of M, top min(C - 1, d), numerically zero ones dropped
    _, s, vh = torch.linalg.svd(means - mu_g, full_matrices=False)
    lam = s ** 2 / C
    tol = lam[0] * max(C, d) * torch.finfo(torch.float64).eps
    lam, vh = lam[:min(C - 1, d)], vh[:min(C - 1, d)]
    lam, vh = lam[lam > tol], vh[lam > tol]                                               # (r,), (r, d)
    r = len(lam)
    prod = h @ torch.cat([vh, means] + ([w] if w is not None else [])).T                  # (N, r + C [+ K])
    proj, hm = prod[:, :r], prod[:, r:r + C]
    sq = (proj - (means @ vh.T)[inverse]) ** 2                                            # (N, r) projected residuals
    if within == "samples":
        within_proj = sq.sum(0) / N
    else:
        within_proj = (torch.zeros(C, r, **f64).index_add_(0, inverse, sq) / counts[:, None]).mean(0)
    # V_c = mean ||h||^2 - ||mu_c||^2 over the class; nearest centre: argmin_c ||mu_c||^2 - 2 h.mu_c
    mean_sq = (means ** 2).sum(1)                                                         # (C,)
    var = (torch.zeros(C, **f64).index_add_(0, inverse, sqnorm) / counts - mean_sq).clamp_min(0.0)
    nearest = classes[(mean_sq - 2 * hm).argmin(1)]
    logits = None if w is None else prod[:, r + C:] + (b if b is not None else 0.0)      # (N, K)
    return ClassStats(classes, counts, means, mu_g, var, lam, vh, within_proj, y, nearest, logits)


def class_stats(features, labels, classifier=None, *, n_classes: int | None = None, global_mean: str = "classes",
                within: str = "samples", min_count: int | None = None) -> ClassStats:
    """The :class:`ClassStats` of ``features (N, d)`` with integer ``labels (N,)``: what :func:`metrics`
    measures from. Arguments and their checks as in :func:`metrics`."""
    h, y, w, b, _, classes, inverse = _inputs(features, labels, classifier, None, n_classes, global_mean,
                                              within, min_count)
    return _accumulate(h, y, classes, inverse, w, b, global_mean, within)


# One short function per metric, each a function of ClassStats (docs/definitions.md, anchor per metric).


def _nc1(s: ClassStats, divide_by_classes: bool = True) -> float:
    """``Tr(Sigma_W Sigma_B^+) [/ C] = sum_k v_k^T Sigma_W v_k / lambda_k`` (#nc1); ``inf`` with no eigenvalue."""
    nc1 = float((s.within_proj / s.between_eigvals).sum()) if len(s.between_eigvals) else float("inf")
    return nc1 / s.n_classes if divide_by_classes else nc1


def _equinorm(vectors: torch.Tensor) -> float:
    """std / mean (ddof=1) of the row lengths (#nc2)."""
    return _cov(vectors.norm(dim=1))


def _equiangular(vectors: torch.Tensor) -> float:
    """Mean over ordered pairs of ``|cos + 1/(C-1)|`` of the rows (#nc2)."""
    return float((_cos_offdiag(vectors) + 1.0 / (len(vectors) - 1)).abs().mean())


def _etf_error(s: ClassStats) -> float:
    """``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F`` for the cosines ``G`` of the centred means (#etf-error)."""
    C = s.n_classes
    g = gram(s.centred)
    etf = (torch.eye(C, dtype=torch.float64, device=g.device) - 1.0 / C) / math.sqrt(C - 1)
    return float((g / g.norm() - etf).norm())


def _nc3(s: ClassStats, w: torch.Tensor) -> float:
    """``|| W_c/||W_c||_F - M/||M||_F ||_F^2`` with ``W_c`` the present classes' rows (#nc3)."""
    wc, m = w[s.classes], s.centred
    return float((wc / wc.norm() - m / m.norm()).norm() ** 2)


def _disagreement(s: ClassStats, other: torch.Tensor) -> float:
    """Share of samples whose nearest class mean differs from ``other`` (#nc4): the network's
    predictions give NC4, the labels the nearest-class-centre error."""
    return float((s.nearest != other).double().mean())


def _cdnv(s: ClassStats) -> float:
    """Mean over class pairs of ``(V_c + V_c') / (2 ||mu_c - mu_c'||^2)`` (#cdnv)."""
    means = s.means
    mean_sq = (means ** 2).sum(1)
    dist2 = (mean_sq[:, None] + mean_sq[None, :] - 2 * means @ means.T).clamp_min(0.0)
    i, j = torch.triu_indices(s.n_classes, s.n_classes, 1, device=means.device)
    return float(((s.class_var[i] + s.class_var[j]) / (2 * dist2[i, j].clamp_min(1e-300))).mean())


def metrics(features, labels, classifier=None, predictions=None, *, n_classes: int | None = None,
            global_mean: str = "classes", within: str = "samples", divide_by_classes: bool = True,
            min_count: int | None = None) -> dict[str, float]:
    """Neural-collapse metrics of ``features (N, d)`` with integer ``labels (N,)``.

    ``classifier``: the readout (an ``nn.Linear``, a weight ``(K, d)``, or ``(weight, bias)``);
    rows are indexed by label. Without it the ``_w`` metrics and NC3 are NaN. ``predictions``:
    the network's predicted labels ``(N,)`` for NC4; by default ``argmax(h W^T + b)``, NaN
    without a classifier. ``n_classes``: when given, every class in ``range(n_classes)`` must
    have samples. Classes with fewer than 2 samples raise ``ValueError`` unless
    ``min_count`` is given, which drops the classes with fewer samples than that.
    Conventions and options are described in the module docstring. Returns a dict of floats
    with the keys of :data:`NC_METRICS` plus ``n_classes`` and ``n_samples``.

    The class statistics are accumulated once (:class:`ClassStats`, as :func:`class_stats` returns
    them); each metric is then one short function of them.
    """
    checks.check_choice("global_mean", global_mean, ("classes", "samples"))   # in the order they always were
    checks.check_choice("within", within, ("samples", "classes"))
    checks.check_bool("divide_by_classes", divide_by_classes)
    h, y, w, b, predictions, classes, inverse = _inputs(features, labels, classifier, predictions, n_classes,
                                                        global_mean, within, min_count)
    s = _accumulate(h, y, classes, inverse, w, b, global_mean, within)
    nan = float("nan")
    out = {"nc1": _nc1(s, divide_by_classes), "nc2_equinorm": _equinorm(s.centred),
           "nc2_equiangular": _equiangular(s.centred), "nc2_equinorm_w": nan, "nc2_equiangular_w": nan,
           "etf_error": _etf_error(s), "nc3": nan, "nc4": nan, "ncc_error": _disagreement(s, s.labels),
           "cdnv": _cdnv(s)}
    if w is not None:
        out["nc2_equinorm_w"] = _equinorm(w[s.classes])
        out["nc2_equiangular_w"] = _equiangular(w[s.classes])
        out["nc3"] = _nc3(s, w)
        if predictions is None:
            predictions = s.logits.argmax(1)
    if predictions is not None:
        out["nc4"] = _disagreement(s, predictions)
    out["n_classes"], out["n_samples"] = s.n_classes, s.n_samples
    return out


def gram(vectors) -> torch.Tensor:
    """Cosines ``(C, C)`` of the rows (e.g. the centred class means, or the classifier rows), float64."""
    m = _features_f64(vectors, "vectors")
    n = m / m.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return n @ n.T


def minority_collapse(classifier, minority) -> float:
    """Mean pairwise cosine of the minority classes' classifier rows (Fang et al. 2021).

    Tends to 1 when the minority classifiers collapse onto one direction; for a simplex
    ETF it is ``-1/(C-1)``. NaN with fewer than two minority classes.
    """
    w, _ = _classifier(classifier, "cpu")
    if w is None:
        raise ValueError("classifier must be given (an nn.Linear, a weight (K, d) or (weight, bias))")
    if isinstance(minority, (str, bytes)) or not hasattr(minority, "__iter__"):
        raise ValueError(f"minority must be a list of class indices, got {minority!r}")
    idx = sorted({checks.check_int("minority[]", c, 0, len(w) - 1) for c in minority})
    if len(idx) < 2:
        return float("nan")
    return float(_cos_offdiag(w[idx].cpu()).mean())
