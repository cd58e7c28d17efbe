"""Imbalanced subsets and mixup: the class counts of an imbalanced set, subsampling, the mixup loss and the
geometry of mixed features (Fisher et al. 2024).

Definitions: ``docs/definitions.md#mixup``, ``#mixup-geometry``.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..core.data import Dataset
from ..core.models import FixedReadout
from .layers import _capture, _check_xy

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
    checks.check_dataset("dataset", dataset, kind="vector")   # class imbalance: a classification dataset
    seed = checks.check_seed("seed", seed)
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
