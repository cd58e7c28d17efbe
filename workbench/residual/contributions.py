"""What each layer writes: relative contribution and cosine per layer and sublayer (Csordas et al. 2025),
the final residual as a sum of labelled components, and direct logit attribution.

Definitions: ``docs/definitions.md#relative-contribution``, ``#decomposition``, ``#logit-attribution``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..hooks import ActivationCache, Adapter, adapter, record
from .batch import (
    _as_batch,
    _check_batch_size,
    _chunks,
    _cos,
    _inference,
    _mask,
    _norm,
    _rel,
    _table,
    _tensor,
    _tokens,
)
from .mixtures import (
    _mixture_batch,
    _mixture_parts,
    _require_logits,
    _with_member,
    is_mixture,
)

# ============================================================================ contributions


def _parallel(ad: Adapter) -> bool:
    """True when attention and MLP both read the block input (no ``resid_mid`` site)."""
    return bool(getattr(ad, "parallel", False))


def _contribution_sites(ad: Adapter) -> list[str]:
    if ad.family != "transformer":
        return ["resid_pre", "resid_post"]
    return ["resid_pre", "attn_out", "mlp_out", "resid_post"] + ([] if _parallel(ad) else ["resid_mid"])


def _contribution_layer(ad: Adapter, l: int, acts: dict) -> dict:
    """``{(layer, sublayer, stat): (B, T) float32}`` of one layer from its sites ``{site: activation}``.

    Parallel blocks: attention and MLP both read ``resid_pre``, so both ratios use it."""
    out = {}
    x, y = _tokens(acts["resid_pre"]), _tokens(acts["resid_post"])
    if ad.family == "transformer":
        a, m = _tokens(acts["attn_out"]), _tokens(acts["mlp_out"])
        mid = x if _parallel(ad) else _tokens(acts["resid_mid"])
        out[(l, "attn", "rel_norm")], out[(l, "attn", "cosine")] = _rel(a, x), _cos(a, x)
        out[(l, "mlp", "rel_norm")], out[(l, "mlp", "cosine")] = _rel(m, mid), _cos(m, mid)
    d = y.float() - x.float()
    out[(l, "layer", "rel_norm")], out[(l, "layer", "cosine")] = _rel(d, x), _cos(d, x)
    return out


def _contribution_tokens(ad: Adapter, cache: ActivationCache) -> dict:
    """``{(layer, sublayer, stat): (B, T) tensor}`` from one recorded forward."""
    out = {}
    for l in range(ad.n_layers):
        out.update(_contribution_layer(ad, l, {s: cache[f"blocks.{l}.{s}"] for s in _contribution_sites(ad)}))
    return out


class _Streamer:
    """Hook callback reducing each layer's activations to per-token statistics as soon as that layer's
    sites have all fired; nothing but the current layer's few activations is held (bounded memory)."""

    def __init__(self, ad: Adapter, need: list[str], reduce: Callable[[int, dict], dict]):
        self.need, self.reduce, self.buf, self.out = set(need), reduce, {}, {}

    def __call__(self, name: str, t: torch.Tensor) -> None:
        _, l, site = name.split(".", 2)
        b = self.buf.setdefault(int(l), {})
        b[site] = t
        if self.need <= b.keys():
            for k, v in self.reduce(int(l), self.buf.pop(int(l))).items():
                self.out.setdefault(k, []).append(v)


def contributions(model: nn.Module, x, per_position: bool = False, mask=None,
                  batch_size: int | None = 256, cache: bool = False):
    """Relative contribution and cosine of every layer's attention, MLP and whole layer.

    Returns a tidy DataFrame with columns ``layer, sublayer, rel_norm, cosine`` (plus
    ``position`` when ``per_position``), ``sublayer`` in ``"attn", "mlp", "layer"``
    (residual MLPs have only ``"layer"``: their block is one sublayer). Values are per-token
    ratios (definitions in the module docstring) averaged over all tokens, or over the batch
    at each position when ``per_position``. ``mask`` (``(B, T)`` bool) restricts the average
    to some tokens (e.g. the scored positions of k-hop). ``batch_size`` bounds memory.

    Memory: the statistics are computed layer by layer while the forward runs (hooks reduce each
    layer's activations to ``(B, T)`` ratios at once); no activation cache is kept. ``cache=True``
    records every site instead and returns ``(table, ActivationCache)`` (of the last batch chunk).
    Parallel blocks (``adapter.parallel``): attention and MLP both read ``resid_pre``, so the MLP
    ratio is ``||m_l|| / ||x_l||`` and ``cos(m_l, x_l)``. Statistics in float32.

    For a :class:`~workbench.compose.LogitMixture`: the rows of every member's own residual
    stream with a leading ``member`` column (``0 .. K-1``). A member computes the same residual
    stream inside the mixture as alone, so these are its single-model contributions.
    """
    checks.check_bool("per_position", per_position)
    checks.check_bool("cache", cache)
    _check_batch_size(batch_size)
    if is_mixture(model):
        if cache:
            raise ValueError("cache=True needs a single model; pass one of the mixture's .members")
        return pd.concat([_with_member(contributions(m, x, per_position, mask, batch_size), k)
                          for k, m in enumerate(model.members)], ignore_index=True)
    ad = adapter(model)
    kept = ActivationCache()
    with _inference(ad.model):
        x = _as_batch(ad, x)
        m = _mask(mask, (x.shape[0], x.shape[1] if x.dim() > 1 and ad.family == "transformer" else 1), ad.device)
        parts: dict = {}
        need = _contribution_sites(ad)
        names = [f"blocks.*.{s}" for s in need]
        for sl in _chunks(len(x), batch_size):
            if ad.n_layers == 0:
                break
            if cache:
                with record(ad) as kept:
                    ad.forward(x[sl])
                got = _contribution_tokens(ad, kept)
                for k, v in got.items():
                    parts.setdefault(k, []).append(v)
                continue
            stream = _Streamer(ad, need, lambda l, acts: _contribution_layer(ad, l, acts))
            with record(ad, names=names, fn=stream):
                ad.forward(x[sl])
            for k, v in stream.out.items():
                parts.setdefault(k, []).extend(v)
    per_token = {k: torch.cat(v) for k, v in sorted(parts.items(), key=lambda kv: kv[0])}
    per_token = {k: per_token[k] for k in sorted(per_token, key=lambda k: (k[0], ["attn", "mlp", "layer"].index(k[1])))}
    df = _table(per_token, ["layer", "sublayer"], ["rel_norm", "cosine"], m, per_position)
    return (df, kept) if cache else df


# ============================================================================ decomposition


@dataclass
class Decomposition:
    """The final residual (input of the final norm) as a sum of labelled components.

    ``components[k]`` has the shape of ``final`` (``(B, T, C)``; ``(B, 1, C)`` for vector
    models); ``labels[k]`` names it, ``layers[k]`` is its block (-1 for embeddings),
    ``kinds[k]`` one of ``embed, pos_embed, attn, head, attn_bias, mlp, block`` and
    ``heads[k]`` the head index for ``kind == "head"``.
    """

    labels: list[str]
    layers: list[int]
    kinds: list[str]
    heads: list[int | None]
    components: torch.Tensor          # (K, B, T, C)
    final: torch.Tensor               # (B, T, C)

    def total(self) -> torch.Tensor:
        """Sum of the components (equals ``final`` to float tolerance)."""
        return self.components.sum(0)

    def norms(self) -> pd.DataFrame:
        """Mean norm of each component over tokens: ``component, layer, kind, head, norm``."""
        n = _norm(self.components).mean(dim=(1, 2)).cpu().numpy()
        return pd.DataFrame({"component": self.labels, "layer": self.layers, "kind": self.kinds,
                             "head": self.heads, "norm": n})

    def __len__(self) -> int:
        return len(self.labels)


def decompose(model: nn.Module, x, per_head: bool = False) -> Decomposition:
    """Split the final residual into embedding, positions and every attention and MLP output.

    ``per_head=True`` splits each attention output further into one term per head plus the
    output projection's bias (pre-LN Transformers only). For residual MLPs the components
    are the stem output and each block's output.
    """
    checks.check_bool("per_head", per_head)
    ad = adapter(model)
    with _inference(ad.model):
        x = _as_batch(ad, x)
        with record(ad) as cache:
            ad.forward(x)
        labels, layers, kinds, heads, comps = [], [], [], [], []

        def add(label, layer, kind, head, t):
            labels.append(label), layers.append(layer), kinds.append(kind), heads.append(head)
            comps.append(t)

        add("embed", -1, "embed", None, _tokens(cache["embed_out"]))
        shape = comps[0].shape
        if "pos_embed_out" in cache:
            add("pos_embed", -1, "pos_embed", None, cache["pos_embed_out"].expand(shape))
        for l in range(ad.n_layers):
            if ad.family == "transformer":
                if per_head:
                    w, b = ad.head_projection(l)
                    z = cache[f"blocks.{l}.attn.z"]  # (B, T, H, D)
                    per = torch.einsum("bthd,hdc->hbtc", z, w)
                    for h in range(per.shape[0]):
                        add(f"L{l}.H{h}", l, "head", h, per[h])
                    add(f"L{l}.attn_bias", l, "attn_bias", None,
                        (torch.zeros_like(per[0]) if b is None else b.expand(shape)))
                else:
                    add(f"L{l}.attn", l, "attn", None, cache[f"blocks.{l}.attn_out"])
                add(f"L{l}.mlp", l, "mlp", None, cache[f"blocks.{l}.mlp_out"])
            else:
                add(f"L{l}.block", l, "block", None, _tokens(cache[f"blocks.{l}.block_out"]))
        final = (_tokens(cache[f"blocks.{ad.n_layers - 1}.resid_post"]) if ad.n_layers
                 else torch.stack(comps).sum(0))
        return Decomposition(labels, layers, kinds, heads, torch.stack([c.expand(shape) for c in comps]), final)


def _frozen_norm(ad: Adapter, final: torch.Tensor):
    """``(f, b)`` with ``final_norm(r) = f(r) + b`` linear in ``r`` at the cached scale of ``final``.

    The adapter's own ``frozen_norm(final)`` is used when it has one (LayerNorm and RMSNorm of the
    Hugging Face families); this fallback handles ``nn.LayerNorm`` and ``nn.Identity``."""
    own = getattr(ad, "frozen_norm", None)
    if callable(own):
        return own(final)
    norm = ad.final_norm()
    if isinstance(norm, nn.LayerNorm):
        sigma = (final.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # (B, T, 1), frozen
        g = norm.weight if norm.weight is not None else 1.0

        def f(r):
            return (r - r.mean(-1, keepdim=True)) / sigma * g
        b = norm.bias if norm.bias is not None else torch.zeros(final.shape[-1], device=final.device)
        return f, b
    if isinstance(norm, nn.Identity):
        return (lambda r: r), torch.zeros(final.shape[-1], device=final.device)
    raise TypeError(f"direct logit attribution needs a LayerNorm or no final norm, got {type(norm).__name__}")


def logit_attribution(model: nn.Module, x, target=None, per_head: bool = False,
                      decomposition: Decomposition | None = None) -> pd.DataFrame:
    """Direct logit attribution of every component to a target token, through the final norm.

    The final LayerNorm is linearised at its cached scale (TransformerLens' ``logit_attrs``):
    component ``c`` contributes ``((c - mean(c)) / sigma * g) . W_U[target]``, where ``sigma``
    is the final residual's own scale. Two constant rows close the sum: ``final_norm_bias``
    (``b . W_U[target]``) and ``readout_bias``; all rows of one token add up to its logit.

    ``target``: ``None`` = the model's top-1 prediction at each position; an int = that token
    (class) everywhere; a ``(B, T)`` tensor = per position. Returns a tidy DataFrame:
    ``batch, position, component, layer, kind, head, target, attribution``.

    For a :class:`~workbench.compose.LogitMixture` in mode ``"logits"`` the output logit is
    ``sum_k w_k logit_k`` (``w`` per token when gated), so every member's rows (its components
    and its two bias rows) are scaled by that member's weight at that token. The table gains
    ``member`` (index ``k``) and ``weight`` (``w_k`` at that token) columns and labels such as
    ``"m0 L1.attn"``: ``batch, position, member, component, layer, kind, head, target, weight,
    attribution``; the rows of one token, over all members, add up to the mixture's logit.
    ``target=None`` is the mixture's top-1. Mode ``"probs"`` raises ``ValueError``.
    """
    checks.check_bool("per_head", per_head)
    if decomposition is not None and not isinstance(decomposition, Decomposition):
        raise ValueError(f"decomposition must be a Decomposition (from decompose) or None, got "
                         f"{type(decomposition).__name__}")
    if is_mixture(model):
        if decomposition is not None:
            raise ValueError("a LogitMixture has one decomposition per member; leave decomposition=None")
        return _mixture_attribution(model, x, target, per_head)
    ad = adapter(model)
    dec = decomposition if decomposition is not None else decompose(ad, x, per_head=per_head)
    with _inference(ad.model):
        final = dec.final
        logits = ad.unembed(final)                                    # (B, T, V)
        B, T = final.shape[:2]
        tgt = _target_ids(target, logits)
        w, bias = ad.readout()
        f, b = _frozen_norm(ad, final)
        directions = w[tgt]                                           # (B, T, C)
        attr = (f(dec.components) * directions).sum(-1)               # (K, B, T)
        extra = [("final_norm_bias", (b * directions).sum(-1)),
                 ("readout_bias", bias[tgt] if bias is not None else torch.zeros_like(attr[0]))]
    labels = dec.labels + [e[0] for e in extra]
    layers = dec.layers + [ad.n_layers, ad.n_layers]
    kinds = dec.kinds + ["bias", "bias"]
    heads = dec.heads + [None, None]
    values = torch.cat([attr, torch.stack([e[1] for e in extra])]).cpu().numpy()  # (K', B, T)
    K = len(labels)
    bi, ti = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    return pd.DataFrame({
        "batch": np.tile(bi.ravel(), K), "position": np.tile(ti.ravel(), K),
        "component": np.repeat(labels, B * T), "layer": np.repeat(layers, B * T),
        "kind": np.repeat(kinds, B * T), "head": np.repeat(np.array(heads, dtype=object), B * T),
        "target": np.tile(tgt.cpu().numpy().ravel(), K), "attribution": values.reshape(-1),
    })


def _target_ids(target, logits: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` target ids: top-1 of ``logits (B, T, V)`` for ``None``, else ``target`` broadcast."""
    B, T, V = logits.shape
    if target is None:
        return logits.argmax(-1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        checks.check_int("target", target, 0, V - 1)
    tgt = checks.check_tokens("target", _tensor("target", target), V)
    if tgt.dim() == 1 and B == 1 and tgt.numel() == T:
        tgt = tgt[None]
    if tgt.dim() != 0 and tuple(tgt.shape) != (B, T):
        raise ValueError(f"target must be None, one class index or a (B, T) = {(B, T)} tensor of them, "
                         f"got shape {tuple(tgt.shape)}")
    tgt = tgt.to(logits.device).long()
    return tgt.expand(B, T) if tgt.dim() == 0 else tgt


def _mixture_attribution(mixture, x, target, per_head: bool) -> pd.DataFrame:
    _require_logits(mixture, "direct logit attribution")
    ads = [adapter(m) for m in mixture.members]
    with _inference(mixture):
        x = _mixture_batch(ads, x)
        out, _, w = _mixture_parts(mixture, x)            # (B, T, V), _, (B, T, K)
        tgt = _target_ids(target, out)                     # the mixture's target at every token
        w = w.float().cpu().numpy()
        frames = []
        for k, ad in enumerate(ads):
            df = logit_attribution(ad, x, target=tgt, per_head=per_head)
            weight = w[df["batch"].to_numpy(), df["position"].to_numpy(), k]
            df = df.assign(component="m" + str(k) + " " + df["component"], weight=weight,
                           attribution=df["attribution"].to_numpy() * weight)
            frames.append(_with_member(df, k))
    cols = ["batch", "position", "member", "component", "layer", "kind", "head", "target", "weight", "attribution"]
    return pd.concat(frames, ignore_index=True)[cols]
