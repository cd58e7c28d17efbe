"""Neural collapse: NC1..NC4 of the last-layer features, across layers and over training.

Conventions (Papyan, Han and Donoho 2020), written out with their options and sources in
``docs/definitions.md#neural-collapse``; each item below names its anchor there:

- Features ``h`` (``#nc-features``) are the input of the readout: the ``features`` hook of our models
  (final-norm output), computed in eval mode on the training set. For sequence data only
  the scored positions (target != ``IGNORE``) count, the label being the target token.
- ``mu_c`` class means; ``mu_G`` the global mean. By default ``mu_G`` is the **mean of the
  class means** (``global_mean="classes"``); under class imbalance it differs from the
  sample mean (``global_mean="samples"``, what some public code uses).
- ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (``within="samples"``), or the
  average of the per-class covariances (``within="classes"``); the two agree on balanced data.
- ``Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T`` has rank at most ``C - 1``: its
  pseudo-inverse keeps the top ``min(C - 1, d)`` eigenvalues (and drops numerically zero ones).
- ``NC1 = Tr(Sigma_W Sigma_B^+) / C`` (``#nc1``); ``divide_by_classes=False`` omits the ``/C`` as some
  public code does, which is He and Su's (2022) separation fuzziness ``D = Tr(SS_w SS_b^+)``.
- NC2 (``#nc2``): ``equinorm`` = std / mean of ``||mu_c - mu_G||`` (std with ddof=1, as Papyan's code);
  ``equiangular`` = mean over ``c != c'`` of ``|cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1)|``;
  the ``_w`` variants use the classifier rows instead. ``etf_error`` (``#etf-error``) =
  ``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F`` for the Gram matrix ``G`` of the centred,
  normalised means.
- NC3 (self-duality, ``#nc3``) = ``|| W^T/||W||_F - M/||M||_F ||_F^2`` with ``M`` the centred means (d x C).
- NC4 (``#nc4``) = share of samples whose nearest class mean differs from the network's argmax.
  ``ncc_error`` = share whose nearest class mean differs from the label.
- CDNV (Galanti et al. 2022, ``#cdnv``) = mean over class pairs of ``(V_c + V_c') / (2 ||mu_c - mu_c'||^2)``,
  ``V_c`` the mean squared distance of class c's features to ``mu_c``.

Everything is accumulated in float64 on the features' device, once per call: :func:`class_stats`
gives the :class:`ClassStats` (counts, means, global mean, ``Sigma_B``'s eigenpairs, the within-class
variance along them, per-class spreads, nearest centres) and each metric is one short function of it.
Nothing here imports Panel or plotly; figures live in :mod:`workbench.figures.collapse`. The training
presets of :func:`recipe` are :data:`workbench.recipes.COLLAPSE` (names: :data:`RECIPE_NAMES`).

>>> import workbench as wb
>>> model, cfg, ds = wb.collapse.recipe("digits")
>>> tracker = wb.collapse.track(every=10)
>>> run = wb.train(model, ds, cfg, callbacks=[tracker])
>>> tracker.table          # step, epoch, layer, site, metric, value
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks, hooks, recipes
from .data import IGNORE, Dataset
from .models import FAMILIES, FixedReadout, HookPoint, build, ebv_rows, simplex_etf_rows, welch_bound
from .training import Callback, TrainConfig, TrainState

__all__ = [
    "metrics", "ClassStats", "class_stats", "layer_metrics", "collect", "sites", "track", "CollapseTracker", "class_means",
    "simplex_etf", "simplex_view", "gram", "geometry", "set_etf_classifier", "subsample", "imbalanced_counts",
    "minority_collapse", "MixupLoss", "ebv", "head_gram", "mixup_geometry", "mixup_summary", "recipe", "train_collapse", "NC_METRICS", "RECIPE_NAMES",
]

# Metric names returned by :func:`metrics`, in display order.
NC_METRICS = ["nc1", "nc2_equinorm", "nc2_equiangular", "nc2_equinorm_w", "nc2_equiangular_w", "etf_error",
              "nc3", "nc4", "ncc_error", "cdnv"]


# ----------------------------------------------------------------------------- metrics


MAX_CLASSES = 100_000
MAX_ETF_ENTRIES = 1 << 26   # simplex_etf: n_classes * dim float64 entries (512 MB)


def _tensor(name: str, value) -> torch.Tensor:
    """``value`` as a tensor with its own dtype (numpy arrays and lists keep theirs: nothing is cast)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"{name} must be a tensor or an array of numbers, got {type(value).__name__}")


def _features_f64(features, name: str = "features") -> torch.Tensor:
    h = checks.check_features(name, _tensor(name, features))
    if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (samples, dims) with at least one of each, "
                         f"got shape {tuple(h.shape)}")
    return h.detach().to(torch.float64)


def _labels(name: str, labels, n: int, device, n_classes: int | None = None) -> torch.Tensor:
    """Integer class indices ``(n,)`` in ``[0, n_classes)``: float, bool, complex or negative labels are refused."""
    y = _tensor(name, labels)
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
    w = checks.check_features("classifier weight", _tensor("classifier weight", w))
    if w.ndim != 2 or w.shape[0] < 1:
        raise ValueError(f"classifier weight must be 2-D (classes, dims), got shape {tuple(w.shape)}")
    if b is not None:
        b = checks.check_features("classifier bias", _tensor("classifier bias", b))
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


# ----------------------------------------------------------------------------- features per layer


def sites(model: nn.Module) -> list[tuple[int, str]]:
    """``(layer, hook name)`` pairs where collapse is measured, shallow to deep.

    Layer 0 is the residual stream entering the first block (``blocks.0.resid_pre``),
    layer ``l`` the output of block ``l`` (``blocks.{l-1}.resid_post``), and layer
    ``L + 1`` the readout input ``features`` (after the final norm).
    """
    n = len(model.blocks)
    out = [(0, "blocks.0.resid_pre")] if n else []
    out += [(i + 1, f"blocks.{i}.resid_post") for i in range(n)]
    return out + [(n + 1, "features")]


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[str]):
    """Each named hook site's output appended to a list per name while the block runs (via
    :func:`workbench.hooks.record`, which removes the hooks on exit)."""
    store = {name: [] for name in names}
    with hooks.record(model, names=names, fn=lambda name, t: store[name].append(t)):
        yield store


def _check_sites(model: nn.Module, site_names) -> list[str]:
    if site_names is None:
        return ["features"]
    if isinstance(site_names, (str, bytes)) or not isinstance(site_names, (list, tuple)) or not site_names:
        raise ValueError(f"site_names must be a non-empty list of hook names (see sites()), got {site_names!r}")
    known = {name for name, m in model.named_modules() if isinstance(m, HookPoint)}
    bad = [n for n in site_names if n not in known]
    if bad:
        raise ValueError(f"site_names: no hook site {bad[:5]} in this model; sites are e.g. "
                         f"{[s for _, s in sites(model)][:6]}")
    return list(site_names)


def _check_xy(model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets that ``model`` can score: tokens in its vocabulary or vectors of its d_in; labels
    (``IGNORE`` allowed for sequences) below its number of outputs, one per example (or per token)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "family", None) not in FAMILIES:
        raise ValueError(f"model must be a workbench model (ResidualMLP or Transformer), got {type(model).__name__}")
    x, y = _tensor("x", x), _tensor("y", y)
    cfg.check_inputs("x", x)  # the family's input check: token ids in the vocabulary, or real vectors of d_in
    sequence = cfg.data_kind == "sequence"
    if sequence:
        checks.check_labels("y", y, cfg.vocab_size, ignore=IGNORE)
    else:
        checks.check_labels("y", y, cfg.n_classes)
    if tuple(y.shape) != (tuple(x.shape) if sequence else (len(x),)):
        raise ValueError(f"y must have one label per {'token' if sequence else 'example'} of x, "
                         f"got shapes x {tuple(x.shape)}, y {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("x must hold at least one example")
    return x, y


@torch.no_grad()
def collect(model: nn.Module, x: torch.Tensor, y: torch.Tensor, site_names: list[str] | None = None,
            batch_size: int = 1024) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward pass in eval mode recording several hook sites.

    Returns ``(features, labels, predictions)``: ``features[name]`` is ``(n, d)`` with one row
    per scored sample (every vector example; every position whose target is not ``IGNORE``
    for sequences), ``labels`` and the network's argmax ``predictions`` are ``(n,)``.
    """
    checks.check_int("batch_size", batch_size, 1)
    names = _check_sites(model, site_names)
    x, y = _check_xy(model, x, y)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats = {n: [] for n in names}
    labels, preds = [], []
    try:
        with _capture(model, names) as store:
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                logits = model(xb)
                mask = yb != IGNORE                                   # (B,) or (B, T)
                labels.append(yb[mask])
                preds.append(logits.argmax(-1)[mask])
                for n in names:
                    feats[n].append(store[n].pop()[mask])             # (n_scored, d)
    finally:
        model.train(was_training)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels), torch.cat(preds)


def layer_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                  n_classes: int | None = None, min_count: int | None = None, **options) -> pd.DataFrame:
    """Collapse at every layer (:func:`sites`) from one forward pass: tidy ``layer, site, metric, value``.

    The readout is the classifier at the ``features`` site (NC2 of ``W``, NC3); NC4 compares
    each layer's nearest class mean with the network's final prediction (progressive
    collapse, He and Su 2022; their ``D_l`` is ``n_classes * nc1``).
    """
    _check_n_classes(n_classes)
    if min_count is not None:
        checks.check_int("min_count", min_count, 2)
    pairs = sites(model)
    feats, labels, preds = collect(model, x, y, [s for _, s in pairs], batch_size)
    rows = []
    for layer, site in pairs:
        clf = model.readout if site == "features" else None
        m = metrics(feats[site], labels, clf, preds, n_classes=n_classes, min_count=min_count, **options)
        rows += [{"layer": layer, "site": site, "metric": k, "value": v} for k, v in m.items()]
    return pd.DataFrame(rows, columns=["layer", "site", "metric", "value"])


# ----------------------------------------------------------------------------- tracking during training


class CollapseTracker(Callback):
    """Records collapse metrics on a fixed subsample of the training set every ``every`` epochs.

    One forward pass in eval mode with hooks at every layer (:func:`sites`) per record; the
    subsample (``max_samples`` examples, stratified by class, drawn once from ``seed``)
    keeps the cost bounded. Rows go to ``self.rows`` and into the run's metrics
    (``split="train"``, with ``epoch``, ``layer`` and ``site`` columns, metric names as in
    :data:`NC_METRICS` plus ``train_acc``, and ``minority_cos`` on imbalanced data). The last
    record's class means, classifier and counts are kept in ``self.latest`` for live plots;
    ``on_record(tracker)``, if given, is called after each record (the dashboard streams from it).
    ``self.seconds`` is the time spent recording (``self.record_seconds`` per record).
    """

    def __init__(self, every: int = 1, layers: bool = True, max_samples: int = 512, seed: int = 0,
                 batch_size: int = 2048, on_record=None):
        checks.check_int("every", every, 1, 1_000_000)
        checks.check_bool("layers", layers)
        checks.check_int("max_samples", max_samples, 2, 1_000_000)
        seed = checks.check_seed("seed", seed)
        checks.check_int("batch_size", batch_size, 1)
        if on_record is not None and not callable(on_record):
            raise ValueError(f"on_record must be a callable or None, got {on_record!r}")
        self.every, self.layers, self.max_samples, self.seed = every, layers, max_samples, seed
        self.batch_size, self.on_record = batch_size, on_record
        self.rows: list[dict] = []
        self.latest: dict | None = None
        self.seconds, self.record_seconds = 0.0, []
        self._last_step = None

    @property
    def table(self) -> pd.DataFrame:
        """Recorded rows so far: ``step, epoch, split, metric, value, layer, site`` (+ run extras)."""
        return pd.DataFrame(list(self.rows), columns=None if self.rows else
                            ["step", "epoch", "split", "metric", "value", "layer", "site"])

    def on_start(self, state: TrainState) -> None:
        ds: Dataset = state.dataset
        if ds.kind == "vector" and len(state.model.readout.weight) < ds.n_classes:
            raise ValueError(f"dataset {ds.name!r} has {ds.n_classes} classes; the model's readout has only "
                             f"{len(state.model.readout.weight)} rows")
        n = len(ds.x_train)
        self.steps_per_epoch = max(1, math.ceil(n / min(state.config.batch_size, n)))
        self._start = state.step
        idx = _stratified(ds.y_train, self.max_samples, self.seed, sequence=ds.kind == "sequence")
        self._x, self._y = ds.x_train[idx], ds.y_train[idx]
        self._sequence = ds.kind == "sequence"
        labels = ds.y_train[ds.y_train != IGNORE]
        counts = torch.bincount(labels, minlength=ds.n_classes)
        self.minority = ([int(c) for c in torch.nonzero((counts > 0) & (counts < counts.max())).flatten()]
                         if not self._sequence else [])  # classes with fewer examples than the largest
        self.record(state)

    def on_step(self, state: TrainState) -> None:
        if (state.step - self._start) % (self.every * self.steps_per_epoch) == 0:
            self.record(state)

    def on_end(self, state: TrainState) -> None:
        if self._last_step != state.step:
            self.record(state)

    def record(self, state: TrainState) -> None:
        t0 = time.perf_counter()
        model = state.model
        pairs = sites(model) if self.layers else [(len(model.blocks) + 1, "features")]
        feats, labels, preds = collect(model, self._x, self._y, [s for _, s in pairs], self.batch_size)
        # sequence data: the subsample need not contain every token at least twice
        opts = {"min_count": 2} if self._sequence else {"n_classes": state.dataset.n_classes}
        epoch = (state.step - self._start) / self.steps_per_epoch
        base = {"step": state.step, "epoch": epoch, "split": "train", **state.extra}
        rows = []
        for layer, site in pairs:
            clf = model.readout if site == "features" else None
            m = metrics(feats[site], labels, clf, preds, **opts)
            rows += [{**base, "metric": k, "value": m[k], "layer": layer, "site": site} for k in NC_METRICS]
        top = {**base, "layer": pairs[-1][0], "site": "features"}
        rows.append({**top, "metric": "train_acc", "value": float((preds == labels).double().mean())})
        if len(self.minority) >= 2:
            rows.append({**top, "metric": "minority_cos", "value": minority_collapse(model.readout, self.minority)})
        classes, means, counts = class_means(feats["features"], labels)
        self.latest = {"step": state.step, "epoch": epoch, "classes": classes.cpu().numpy(),
                       "means": means.cpu().numpy(), "counts": counts.cpu().numpy(),
                       "classifier": model.readout.weight.detach().double().cpu().numpy()}
        self.rows.extend(rows)
        state.rows.extend(rows)
        self._last_step = state.step
        self.record_seconds.append(time.perf_counter() - t0)
        self.seconds += self.record_seconds[-1]
        if self.on_record is not None:
            self.on_record(self)


def track(every: int = 1, layers: bool = True, max_samples: int = 512, seed: int = 0,
          on_record=None) -> CollapseTracker:
    """A training callback recording collapse metrics every ``every`` epochs (see :class:`CollapseTracker`)."""
    return CollapseTracker(every=every, layers=layers, max_samples=max_samples, seed=seed, on_record=on_record)


def _stratified(y: torch.Tensor, n: int, seed: int, sequence: bool = False) -> torch.Tensor:
    """Indices of at most ``n`` examples, each class kept in proportion (at least 2 where it has them)."""
    g = torch.Generator().manual_seed(seed)
    if sequence or len(y) <= n:
        return torch.randperm(len(y), generator=g)[:n].sort().values
    out = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        k = min(len(idx), max(2, round(n * len(idx) / len(y))))
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).sort().values


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


# ----------------------------------------------------------------------------- recipes


def imbalanced_counts(n_per_class: list[int] | torch.Tensor, minority_ratio: float, n_minority: int) -> list[int]:
    """Step imbalance: the last ``n_minority`` classes keep ``minority_ratio`` of their samples."""
    if isinstance(n_per_class, torch.Tensor):
        n_per_class = n_per_class.tolist()
    if isinstance(n_per_class, (str, bytes)) or not isinstance(n_per_class, (list, tuple)) or len(n_per_class) < 2:
        raise ValueError(f"n_per_class must be a list of at least 2 per-class counts, got {n_per_class!r}")
    counts = [checks.check_int("n_per_class[]", c, 1) for c in n_per_class]
    checks.check_float("minority_ratio", minority_ratio, 0.0, 1.0, lo_open=True)
    checks.check_int("n_minority", n_minority, 0, len(counts) - 1)
    C = len(counts)
    return [c if i < C - n_minority else max(2, round(c * minority_ratio)) for i, c in enumerate(counts)]


def subsample(dataset: Dataset, counts: list[int], seed: int = 0) -> Dataset:
    """The dataset with its training set cut to ``counts[c]`` examples of class ``c`` (validation kept).

    Vector datasets only. Raises ``ValueError`` if a count exceeds what the class has.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a workbench Dataset, got {type(dataset).__name__}")
    seed = checks.check_seed("seed", seed)
    if dataset.kind != "vector":
        raise ValueError("class imbalance applies to vector (classification) datasets")
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    if isinstance(counts, (str, bytes)) or not hasattr(counts, "__len__"):
        raise ValueError(f"counts must be a list of per-class numbers, got {counts!r}")
    if len(counts) != dataset.n_classes:
        raise ValueError(f"counts must list {dataset.n_classes} per-class numbers, got {len(counts)}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c, k in enumerate(counts):
        idx = torch.nonzero(dataset.y_train == c).flatten()
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(idx):
            raise ValueError(f"counts[{c}] must be an integer in [1, {len(idx)}], got {k!r}")
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    idx = torch.cat(keep).sort().values
    options = {**dataset.options, "class_counts": [int(k) for k in counts]}
    return replace(dataset, x_train=dataset.x_train[idx], y_train=dataset.y_train[idx], options=options,
                   description=f"{dataset.description}; train subsampled per class to {list(map(int, counts))}")


class MixupLoss:
    """Mixup (Zhang et al. 2018) as a loss: ``loss_fn(model, x, y) -> loss``.

    Mixes each batch with a shuffled copy, ``x~ = lam x + (1 - lam) x[perm]``,
    ``lam ~ Beta(alpha, alpha)``, and returns ``lam CE(f(x~), y) + (1 - lam) CE(f(x~), y[perm])``.
    Deterministic for a seed (its own ``torch.Generator``).
    """

    def __init__(self, alpha: float = 0.2, seed: int = 0):
        checks.check_float("alpha", alpha, 0.0, 100.0, lo_open=True)
        seed = checks.check_seed("seed", seed)
        self.alpha = float(alpha)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> tuple[float, torch.Tensor]:
        """The next ``(lam, perm)`` for a batch of ``n``: ``lam ~ Beta(alpha, alpha)`` (inverse CDF of a uniform)."""
        from scipy.stats import beta

        lam = float(beta.ppf(float(torch.rand(1, generator=self.generator)), self.alpha, self.alpha))
        return lam, torch.randperm(n, generator=self.generator)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam, perm = self.draw(len(x))
        perm = perm.to(x.device)
        logits = model(lam * x + (1 - lam) * x[perm])
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])


MAX_MIX_ROWS = 1_000_000   # mixup_geometry: pairs x lambdas x pair kinds


@torch.no_grad()
def mixup_geometry(model: nn.Module, x, y, classes=(0, 1, 2), lambdas=None, n_pairs: int = 30,
                   seed: int = 0, batch_size: int = 4096) -> pd.DataFrame:
    """Last-layer features of mixed examples projected on the plane of three classifier rows (Fisher, Meng
    and Papyan 2024; ``docs/definitions.md#mixup-geometry``).

    For the three ``classes`` ``(a, b, c)``: ``n_pairs`` seeded pairs of examples of each same-class kind
    ``(a, a)``, ``(b, b)``, ``(c, c)`` and each cross-class kind ``(a, b)``, ``(a, c)``, ``(b, c)``; for each
    ``lam`` of ``lambdas`` (default 11 points on [0, 1]) the mix ``lam x_i + (1 - lam) x_j`` goes through the
    model (eval mode) and its ``features`` ``h`` (``normalize(h)`` for an EBV head, as its logits use) are
    projected on an orthonormal basis ``(e1, e2)`` of the span of the three rows centred on their mean
    (the plane where the three-way decision is made: ``w_a - w_b`` lies in it).

    Tidy DataFrame, one row per mix: ``pair_kind`` (``"same"``/``"cross"``), ``class_a``, ``class_b``,
    ``pair``, ``lam``, ``x``, ``y`` (coordinates), ``margin`` = ``z_a - z_b`` of the logits (cross pairs; for
    same pairs ``z_a`` minus the best other of the three), ``cos`` = cosine of ``(x, y)`` with the projected
    row of ``class_a``; plus one row per class with ``pair_kind="classifier"`` holding the projected rows.
    """
    x, y = _check_xy(model, x, y)
    cfg = model.config
    if cfg.data_kind != "vector":
        raise ValueError("mixup_geometry mixes vector inputs (an MLP on digits or MNIST-1D)")
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)) or len(classes) != 3:
        raise ValueError(f"classes must be 3 distinct class indices, got {classes!r}")
    cls = [checks.check_int("classes[]", c, 0, cfg.n_classes - 1) for c in classes]
    if len(set(cls)) != 3:
        raise ValueError(f"classes must be 3 distinct class indices, got {classes!r}")
    lams = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(lambdas, dtype=float).ravel()
    if lams.size < 1 or lams.size > 1001 or not np.all(np.isfinite(lams)) or lams.min() < 0 or lams.max() > 1:
        raise ValueError(f"lambdas must be 1 to 1001 numbers in [0, 1], got {lambdas!r:.80}")
    checks.check_int("n_pairs", n_pairs, 1, 100_000)
    checks.check_int("batch_size", batch_size, 1)
    if 6 * n_pairs * lams.size > MAX_MIX_ROWS:
        raise ValueError(f"n_pairs x len(lambdas) must be at most {MAX_MIX_ROWS // 6}, got {n_pairs * lams.size}")
    g = torch.Generator().manual_seed(checks.check_seed("seed", seed))
    idx = {c: torch.nonzero(y == c).flatten() for c in cls}
    for c, i in idx.items():
        if len(i) < 2:
            raise ValueError(f"class {c} needs at least 2 examples in x, got {len(i)}")
    kinds = [("same", a, a) for a in cls] + [("cross", cls[i], cls[j]) for i in range(3) for j in range(i + 1, 3)]
    device = next(model.parameters()).device
    w = model.readout.weight.detach().to(device, torch.float64)
    bias = model.readout.bias
    b = torch.zeros(len(w), dtype=torch.float64, device=device) if bias is None else bias.detach().to(device, torch.float64)
    w3 = w[cls]                                                                           # (3, d)
    basis = torch.linalg.svd(w3 - w3.mean(0), full_matrices=False)[2][:2]                 # (2, d) orthonormal
    rows_xy = (w3 @ basis.T).cpu().numpy()                                                # (3, 2)
    lam_t = torch.as_tensor(lams, dtype=torch.float64)
    frames = []
    was_training = model.training
    model.eval()
    try:
        for kind, a, c in kinds:
            ia = idx[a][torch.randint(len(idx[a]), (n_pairs,), generator=g)]
            if kind == "same":   # two different examples of the class
                off = torch.randint(1, len(idx[a]), (n_pairs,), generator=g)
                pos = (torch.searchsorted(idx[a], ia) + off) % len(idx[a])
                ib = idx[a][pos]
            else:
                ib = idx[c][torch.randint(len(idx[c]), (n_pairs,), generator=g)]
            xa, xb = x[ia].to(torch.float64), x[ib].to(torch.float64)                     # (P, d_in)
            mixed = (lam_t[:, None, None] * xa + (1 - lam_t[:, None, None]) * xb).reshape(-1, x.shape[1])
            feats = []
            with _capture(model, ["features"]) as store:
                for i in range(0, len(mixed), batch_size):
                    model(mixed[i:i + batch_size].to(device=device, dtype=x.dtype))
                    feats.append(store["features"].pop())
            h = torch.cat(feats).to(torch.float64)                                         # (L*P, d)
            if isinstance(model.readout, FixedReadout) and model.readout.normalize:
                h = F.normalize(h, dim=1)
            z = h @ w3.T + b[cls]                                                         # (L*P, 3) logits
            ka = cls.index(a)
            if kind == "same":
                margin = z[:, ka] - torch.cat([z[:, :ka], z[:, ka + 1:]], 1).max(1).values
            else:
                margin = z[:, ka] - z[:, cls.index(c)]
            xy = h @ basis.T                                                              # (L*P, 2)
            ra = torch.as_tensor(rows_xy[ka], dtype=torch.float64, device=device)
            cos = (xy @ ra) / (xy.norm(dim=1) * ra.norm()).clamp_min(1e-300)
            frames.append(pd.DataFrame({
                "pair_kind": kind, "class_a": a, "class_b": c,
                "pair": np.tile(np.arange(n_pairs), len(lams)), "lam": np.repeat(lams, n_pairs),
                "x": xy[:, 0].cpu().numpy(), "y": xy[:, 1].cpu().numpy(),
                "margin": margin.cpu().numpy(), "cos": cos.cpu().numpy()}))
    finally:
        model.train(was_training)
    frames.append(pd.DataFrame({"pair_kind": "classifier", "class_a": cls, "class_b": cls, "pair": -1,
                                "lam": np.nan, "x": rows_xy[:, 0], "y": rows_xy[:, 1], "margin": np.nan,
                                "cos": 1.0}))
    return pd.concat(frames, ignore_index=True)


def mixup_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per ``pair_kind, class_a, class_b, lam`` of a :func:`mixup_geometry` table: the mean ``x, y``, ``cos``
    and ``margin`` and the share of mixes predicted as ``class_a`` among the three (``margin > 0``)."""
    t = table[table["pair_kind"] != "classifier"].assign(wins_a=lambda d: (d["margin"] > 0).astype(float))
    return (t.groupby(["pair_kind", "class_a", "class_b", "lam"], as_index=False)
             [["x", "y", "cos", "margin", "wins_a"]].mean())


# The presets live in workbench.recipes.COLLAPSE (frozen CollapseRecipe dataclasses); their names, for menus:
RECIPE_NAMES = tuple(recipes.COLLAPSE)


def recipe(dataset_name: str = "digits", *, imbalance: list[int] | float | None = None, n_minority: int = 5,
           mixup: float = 0.0, etf_classifier: bool = False, classifier: str = "learned",
           ebv_tau: float | None = None, ebv_threshold: float | None = None, weight_decay: float | None = None,
           epochs: int | None = None, n_layers: int | None = None, d_model: int | None = None,
           lr: float | None = None, batch_size: int | None = None, seed: int = 0, eval_every_epochs: int = 10,
           device: str | torch.device | None = None):
    """``(model, TrainConfig, dataset)`` that reach the terminal phase of training.

    ``dataset_name``: ``"digits"`` or ``"mnist1d"``. ``imbalance``: per-class training counts,
    or a ratio in (0, 1] applied to the last ``n_minority`` classes (step imbalance).
    ``mixup``: Mixup's Beta parameter alpha (0 = off; train with ``loss_fn=MixupLoss(alpha)``,
    which :func:`train_collapse` does). ``classifier``: the model config's head, ``"learned"``,
    ``"etf"`` (fixed simplex ETF) or ``"ebv"`` (fixed equiangular basis vectors, cosine logits over
    ``ebv_tau``, rows below ``ebv_threshold``); the config records it, so a stored run rebuilds the head.
    ``etf_classifier=True`` is ``classifier="etf"``. The remaining arguments override the recipe's defaults (:data:`workbench.recipes.COLLAPSE`).
    """
    if not isinstance(dataset_name, str) or dataset_name not in recipes.COLLAPSE:
        raise ValueError(f"dataset_name: recipes exist for {sorted(recipes.COLLAPSE)}, got {dataset_name!r}")
    checks.check_float("mixup", mixup, 0.0, 100.0)
    checks.check_bool("etf_classifier", etf_classifier)
    checks.check_choice("classifier", classifier, ("learned", "etf", "ebv"))
    if etf_classifier and classifier not in ("learned", "etf"):
        raise ValueError(f"etf_classifier=True asks for classifier='etf', got classifier={classifier!r}")
    classifier = "etf" if etf_classifier else str(classifier)
    heads = {k: v for k, v in (("ebv_tau", ebv_tau), ("ebv_threshold", ebv_threshold)) if v is not None}
    if heads and classifier != "ebv":
        raise ValueError(f"{sorted(heads)} apply to classifier='ebv', got classifier={classifier!r}")
    checks.check_int("n_minority", n_minority, 0)
    seed = checks.check_seed("seed", seed)
    checks.check_int("eval_every_epochs", eval_every_epochs, 1, 100_000)
    for name, v, lo, hi in (("epochs", epochs, 1, 100_000), ("n_layers", n_layers, 0, 256),
                            ("d_model", d_model, 1, 8192), ("batch_size", batch_size, 1, 1_000_000)):
        if v is not None:
            checks.check_int(name, v, lo, hi)
    if weight_decay is not None:
        checks.check_float("weight_decay", weight_decay, 0.0, 10.0)
    if lr is not None:
        checks.check_float("lr", lr, 0.0, 10.0, lo_open=True)
    if imbalance is not None and not isinstance(imbalance, (list, tuple, torch.Tensor)):
        checks.check_float("imbalance", imbalance, 0.0, 1.0, lo_open=True)
    from . import data

    overrides = {"weight_decay": weight_decay, "epochs": epochs, "n_layers": n_layers, "d_model": d_model,
                 "lr": lr, "batch_size": batch_size}
    r = dataclasses.replace(recipes.COLLAPSE[dataset_name], **{k: v for k, v in overrides.items() if v is not None})
    ds = data.load(r.dataset)
    if imbalance is not None:
        if not isinstance(imbalance, (list, tuple, torch.Tensor)):
            per_class = torch.bincount(ds.y_train, minlength=ds.n_classes).tolist()
            imbalance = imbalanced_counts(per_class, float(imbalance), n_minority)
        ds = subsample(ds, list(imbalance), seed)
    model = build(r.model_config(ds, seed, classifier=classifier, **heads), device=device)
    cfg = r.train_config(len(ds.x_train), eval_every_epochs, seed)
    return model, cfg, ds


def train_collapse(dataset_name: str = "digits", *, every: int = 1, layers: bool = True, max_samples: int = 512,
                   callbacks=(), on_record=None, **recipe_options):
    """Train a :func:`recipe` while tracking collapse; returns the :class:`~workbench.training.Run`.

    The run's metrics hold the collapse rows (``split="train"`` with ``epoch``, ``layer``
    and ``site`` columns) next to the usual loss and accuracy; ``run.meta["collapse"]``
    records the recipe options and the tracker's time.
    """
    from .training import train

    track(every=every, layers=layers, max_samples=max_samples)   # check the tracker's arguments before any work
    mixup = recipe_options.get("mixup", 0.0)
    seed = recipe_options.get("seed", 0)
    model, cfg, ds = recipe(dataset_name, **recipe_options)
    tracker = track(every=every, layers=layers, max_samples=max_samples, seed=seed, on_record=on_record)
    loss_fn = MixupLoss(mixup, seed) if mixup else None
    t0 = time.perf_counter()
    run = train(model, ds, cfg, callbacks=[tracker, *callbacks], name=f"collapse-{dataset_name}", loss_fn=loss_fn)
    run.meta["collapse"] = {"recipe": dataset_name, **{k: v for k, v in recipe_options.items()},
                            "track_seconds": tracker.seconds, "total_seconds": time.perf_counter() - t0}
    run.meta["collapse"]["class_counts"] = torch.bincount(ds.y_train, minlength=ds.n_classes).tolist()
    return run
