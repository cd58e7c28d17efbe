"""Fixed (frozen) classifier heads: the simplex ETF (Papyan et al. 2020) and Equiangular Basis Vectors
(Shen et al. 2023), with the Welch bound that limits how equiangular ``C`` vectors in ``d`` dims can be.

Definitions: ``docs/definitions.md#simplex-etf``, ``#fixed-heads``, ``#ebv``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- fixed classifier heads


def simplex_etf_rows(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``sqrt(C/(C-1)) (I - 11^T/C) U^T`` ``(C, d)`` float64, ``U (d, C)`` a seeded random partial orthogonal
    matrix (needs ``d >= C``): unit rows with pairwise cosine ``-1/(C-1)`` (``docs/definitions.md#simplex-etf``).
    Unchecked core of :func:`workbench.collapse.simplex_etf`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, n_classes, generator=g, dtype=torch.float64))      # (d, C)
    centre = torch.eye(n_classes, dtype=torch.float64) - 1.0 / n_classes
    return math.sqrt(n_classes / (n_classes - 1)) * centre @ u.T


def welch_bound(n_classes: int, dim: int) -> float:
    """The least possible max pairwise ``|cos|`` of ``C`` unit vectors in ``d`` dims: ``sqrt((C-d)/(d(C-1)))``
    for ``C > d``, else 0 (Welch 1974)."""
    return math.sqrt((n_classes - dim) / (dim * (n_classes - 1))) if n_classes > dim else 0.0


def ebv_rows(n_classes: int, dim: int, threshold: float, seed: int = 0, max_steps: int = 2000,
             lr: float = 0.5) -> torch.Tensor:
    """Equiangular Basis Vectors (Shen et al. 2023) ``(C, d)`` float64: seeded Gaussian rows on the sphere,
    then projected gradient steps on ``1/2 sum_{i != j} relu(|cos_ij| - 0.98 threshold)^2`` (rows
    renormalised after each step) until every pairwise ``|cos| <= threshold`` or ``max_steps``.
    Unchecked core of :func:`workbench.collapse.ebv` (``docs/definitions.md#ebv``)."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=1)
    diag = torch.eye(n_classes, dtype=torch.bool)
    for _ in range(max_steps):
        cos = (u @ u.T).masked_fill_(diag, 0.0)
        if float(cos.abs().max()) <= threshold:
            break
        push = torch.sign(cos) * (cos.abs() - 0.98 * threshold).clamp_min(0.0)   # d loss / d cos_ij
        u = F.normalize(u - lr * (push @ u), dim=1)
    return u


def _check_fixed_head(kind: str, n_classes: int, dim: int, threshold: float) -> None:
    if kind == "etf" and dim < n_classes:
        raise ValueError(f"classifier='etf' of {n_classes} classes needs d_model >= {n_classes}, got {dim}")
    if kind == "ebv" and threshold < welch_bound(n_classes, dim):
        raise ValueError(f"ebv_threshold must be at least the Welch bound {welch_bound(n_classes, dim):.4g} for "
                         f"{n_classes} unit vectors in d_model={dim} dims, got {threshold}")


class FixedReadout(nn.Linear):
    """A fixed (frozen) classifier head: weight and zero bias with ``requires_grad=False`` (a substrate).

    ``"etf"``: logits ``f W^T`` with ``W`` a simplex ETF (:func:`simplex_etf_rows`); ``"ebv"``:
    ``normalize(f) W^T / tau`` with ``W`` equiangular basis vectors (:func:`ebv_rows`). Built from the
    config seed, so the config rebuilds it; the state dict (hence a stored run) holds it too.
    """

    def __init__(self, d_model: int, n_classes: int, normalize: bool = False, tau: float = 1.0):
        super().__init__(d_model, n_classes)
        self.normalize, self.tau = bool(normalize), float(tau)
        self.requires_grad_(False)

    @classmethod
    def of(cls, cfg) -> "FixedReadout":
        head = cls(cfg.d_model, cfg.n_classes, normalize=cfg.classifier == "ebv",
                   tau=cfg.ebv_tau if cfg.classifier == "ebv" else 1.0)
        w = (simplex_etf_rows(cfg.n_classes, cfg.d_model, cfg.seed) if cfg.classifier == "etf"
             else ebv_rows(cfg.n_classes, cfg.d_model, cfg.ebv_threshold, cfg.seed))
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.zero_()
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            return F.linear(F.normalize(x, dim=-1), self.weight, self.bias) / self.tau
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}, tau={self.tau:g}"
