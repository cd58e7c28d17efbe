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

from .measure import metrics, ClassStats, class_stats, class_means, gram, minority_collapse, NC_METRICS
from .layers import layer_metrics, collect, sites
from .tracking import track, CollapseTracker
from .etf import simplex_etf, simplex_view, geometry, set_etf_classifier, ebv, head_gram
from .mixup import subsample, imbalanced_counts, MixupLoss, mixup_geometry, mixup_summary
from .recipes import recipe, train_collapse, RECIPE_NAMES

__all__ = [
    "metrics", "ClassStats", "class_stats", "layer_metrics", "collect", "sites", "track", "CollapseTracker",
    "class_means", "simplex_etf", "simplex_view", "gram", "geometry", "set_etf_classifier", "subsample",
    "imbalanced_counts", "minority_collapse", "MixupLoss", "ebv", "head_gram", "mixup_geometry",
    "mixup_summary", "recipe", "train_collapse", "NC_METRICS", "RECIPE_NAMES",
]
