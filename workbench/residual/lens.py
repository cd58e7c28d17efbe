"""The logit lens (nostalgebraist 2020): each layer's residual read out through the final norm and
unembedding, with KL to the final distribution, top-1 agreement and loss per layer.

Definitions: ``docs/definitions.md#logit-lens``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..hooks import ActivationCache, Adapter, adapter, record
from .batch import (
    IGNORE,
    _as_batch,
    _check_batch_size,
    _chunks,
    _inference,
    _table,
    _targets,
    _tokens,
)
from .mixtures import _mixture_batch, _mixture_parts, _require_logits, is_mixture

# ============================================================================ logit lens


LENS_STATS = ["kl_to_final", "top1_agree", "top5_overlap", "loss"]
TOKEN_CHUNK = 32      # tokens per lens block: the (tokens, V) lens logits never exist for more at once


def _lens_stats(lens: torch.Tensor, logp_final: torch.Tensor, top_final: torch.Tensor,
                tgt: torch.Tensor | None, top5_final: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per token ``(B, T)``: KL(p_final || p_lens), top-1 agreement, top-5 overlap and the lens' loss on ``tgt``."""
    logp = lens.float().log_softmax(-1)
    kl = (logp_final.exp() * (logp_final - logp)).sum(-1)
    agree = (lens.argmax(-1) == top_final).float()
    k = min(5, lens.shape[-1])
    if top5_final is None:
        top5_final = logp_final.topk(k, dim=-1).indices
    top5 = lens.topk(k, dim=-1).indices
    overlap = (top5[..., :, None] == top5_final[..., None, :]).any(-1).float().sum(-1) / k
    if tgt is None:
        loss = torch.full_like(kl, float("nan"))
    else:
        loss = F.cross_entropy(logp.reshape(-1, logp.shape[-1]), tgt.reshape(-1),
                               ignore_index=IGNORE, reduction="none").reshape(kl.shape)
        loss = torch.where(tgt == IGNORE, torch.full_like(loss, float("nan")), loss)
    return {"kl_to_final": kl, "top1_agree": agree, "top5_overlap": overlap, "loss": loss}


def _lens_reduce(ad: Adapter, resid: list[torch.Tensor], final_logits: torch.Tensor, tgt, parts: dict,
                 key: tuple = (), readout: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Lens statistics of every layer, ``TOKEN_CHUNK`` positions at a time (bounded memory).

    ``readout(layer, h)``: lens logits of the residual ``h`` entering ``layer`` (default: the logit
    lens ``ad.unembed(h)``; :mod:`workbench.lenses` passes its tuned and Jacobian lenses)."""
    readout = readout or (lambda l, h: ad.unembed(h))
    L = len(resid)
    T = final_logits.shape[1]
    chunk: dict = {}
    for t0 in range(0, T, TOKEN_CHUNK):
        ts = slice(t0, min(t0 + TOKEN_CHUNK, T))
        fin = final_logits[:, ts]
        logp_final = fin.float().log_softmax(-1)
        top_final = fin.argmax(-1)
        top5_final = fin.topk(min(5, fin.shape[-1]), dim=-1).indices
        tt = None if tgt is None else tgt[:, ts]
        for l in range(L + 1):
            lens = readout(l, resid[l][:, ts]) if l < L else fin
            for stat, v in _lens_stats(lens, logp_final, top_final, tt, top5_final).items():
                chunk.setdefault(key + (l, stat), []).append(v)
            del lens
    for k, v in chunk.items():
        parts.setdefault(k, []).append(torch.cat(v, dim=1))


def logit_lens(model: nn.Module, x, y=None, per_position: bool = False, batch_size: int | None = 256,
               cache: bool = False):
    """The logit lens: final norm and unembedding applied to the residual entering each layer.

    Rows ``layer = 0 .. L``: layer ``l < L`` reads the residual entering block ``l`` (layer 0:
    the embeddings), layer ``L`` the final residual, where the lens is the model's output.
    Columns: ``kl_to_final`` = KL(p_final || p_lens) in nats, ``top1_agree`` = share of tokens
    whose lens top-1 equals the model's, ``top5_overlap`` = share of the model's top-5 tokens
    among the lens' top-5 (``|top5_lens & top5_final| / 5``, mean over tokens), ``loss`` =
    cross-entropy of the lens prediction on ``y`` (default for sequences: the next token of
    ``x``; ``IGNORE`` positions are left out, NaN when nothing is scored). Averaged over tokens,
    or per position on request. See ``docs/definitions.md#logit-lens``.

    Memory: only the residual entering each block is kept during the forward (``L x tokens x C``,
    less than the ``tokens x V`` output logits for a language model); each layer's lens logits are
    formed ``TOKEN_CHUNK`` positions at a time and reduced to the statistics at once. ``cache=True``
    records every site too and returns ``(table, ActivationCache)`` (last batch chunk). Float32 stats.

    For a :class:`~workbench.compose.LogitMixture` in mode ``"logits"``: a leading ``member``
    column; the rows of member ``k`` read *its* residual through *its* final norm and
    unembedding (layer ``L_k`` is that member's own output) and compare with the *mixture's*
    output distribution, so ``kl_to_final`` and ``top1_agree`` say how close each member's
    layers come to what the mixture predicts. Mode ``"probs"`` raises ``ValueError``.
    """
    checks.check_bool("per_position", per_position)
    checks.check_bool("cache", cache)
    _check_batch_size(batch_size)
    if is_mixture(model):
        if cache:
            raise ValueError("cache=True needs a single model; pass one of the mixture's .members")
        return _mixture_lens(model, x, y, per_position, batch_size)
    ad = adapter(model)
    parts: dict = {}
    kept = ActivationCache()
    with _inference(ad.model):
        x = _as_batch(ad, x)
        yy = _targets(ad, x, y)
        L = ad.n_layers
        for sl in _chunks(len(x), batch_size):
            resid: dict = {}

            def keep(name, t, resid=resid):
                resid[int(name.split(".")[1])] = _tokens(t)
            with record(ad, names=None if cache else (["blocks.*.resid_pre"] if L else []),
                        fn=None if cache else keep) as kept:
                final_logits = ad.forward(x[sl])
                final_logits = getattr(final_logits, "logits", final_logits)
            if cache:
                resid.update({l: _tokens(kept[f"blocks.{l}.resid_pre"]) for l in range(L)})
            final_logits = final_logits if final_logits.dim() == 3 else final_logits[:, None]
            tgt = None if yy is None else yy[sl].reshape(final_logits.shape[:2])
            _lens_reduce(ad, [resid[l] for l in range(L)], final_logits, tgt, parts)
            del resid, final_logits
    per_token = {k: torch.cat(v) for k, v in parts.items()}
    df = _table(per_token, ["layer"], LENS_STATS, None, per_position)
    return (df, kept) if cache else df


def _mixture_lens(mixture, x, y, per_position: bool, batch_size: int | None) -> pd.DataFrame:
    _require_logits(mixture, "the logit lens")
    ads = [adapter(m) for m in mixture.members]
    parts: dict = {}
    with _inference(mixture):
        x = _mixture_batch(ads, x)
        yy = _targets(ads[0], x, y)
        for sl in _chunks(len(x), batch_size):
            with contextlib.ExitStack() as stack:    # every member's hooks fire inside one mixture forward
                caches = [stack.enter_context(record(ad, names=["blocks.*.resid_pre"] if ad.n_layers else []))
                          for ad in ads]
                out, member_logits, _ = _mixture_parts(mixture, x[sl])   # (B, T, V), (K, B, T, V)
            logp_final = out.float().log_softmax(-1)
            top_final = out.argmax(-1)
            tgt = None if yy is None else yy[sl].reshape(out.shape[:2])
            for k, (ad, cache) in enumerate(zip(ads, caches)):
                L = ad.n_layers
                for l in range(L + 1):
                    lens = ad.unembed(_tokens(cache[f"blocks.{l}.resid_pre"])) if l < L else member_logits[k]
                    for stat, v in _lens_stats(lens, logp_final, top_final, tgt).items():
                        parts.setdefault((k, l, stat), []).append(v)
    per_token = {k: torch.cat(v) for k, v in parts.items()}
    return _table(per_token, ["member", "layer"], LENS_STATS, None, per_position)
