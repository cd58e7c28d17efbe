"""Logit mixtures inside the residual analyses: one residual stream per member, read inside the mixture.
"""
from __future__ import annotations

import pandas as pd
import torch

from ..hooks import Adapter, is_mixture
from .batch import _as_batch

__all__ = ["is_mixture"]   # a mixture is any class registered with hooks.register_mixture (compose's LogitMixture)

# ============================================================================ mixtures


def _require_logits(mixture, what: str) -> None:
    if mixture.mode != "logits":
        raise ValueError(f"{what} of a LogitMixture needs mode='logits'; this one has mode={mixture.mode!r}: a "
                         "probability mixture log(sum_k w_k softmax(logits_k)) is not linear in the members' "
                         "logits, so its output does not split into per-member terms")


def _mixture_parts(mixture, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of the mixture: ``(output (B, T, V), member logits (K, B, T, V), weights (B, T, K))``.

    The same computation as ``mixture(x)`` (the members' hook points fire); vector models get
    ``T = 1``. ``weights`` are the fixed weights broadcast, or the gate's per-token weights.
    """
    out, logits, w = mixture.forward_parts(x)              # (..., V), (..., K, V), (..., K)
    if out.dim() == 2:                                     # vector models: (B, V) -> (B, 1, V)
        out, logits, w = out[:, None], logits[:, None], w[:, None]
    return out, logits.movedim(-2, 0), w


def _mixture_batch(ads: list[Adapter], x) -> torch.Tensor:
    """The input validated against every member (each has its own context)."""
    batches = [_as_batch(ad, x) for ad in ads]
    return batches[0]


def _with_member(df: pd.DataFrame, k: int) -> pd.DataFrame:
    return df.assign(member=k)[["member", *df.columns]]
