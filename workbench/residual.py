"""What each layer writes into the residual stream.

Every function takes a model and an input batch and works on every model an adapter of
:mod:`workbench.hooks` reads: both model families of :mod:`workbench.models` and a Hugging Face
``GPT2LMHeadModel`` (:mod:`workbench.adapters.hf_gpt2` maps GPT-2's modules onto the same hook names):

==========================  ==================================================================
:func:`record`              context manager caching hook-point activations (detached)
:func:`contributions`       relative contribution norm and cosine per layer and sublayer
:func:`decompose`           the final residual as a sum of labelled components
:func:`logit_attribution`   direct logit attribution of each component to a target token
:func:`logit_lens`          per layer: KL to the final distribution, top-1 agreement, loss
:func:`skip_effects`        skipped x affected layer heat-map and output change per skip
:func:`integrated_gradients` per-layer IG (sequence-mean baseline): layer x position table
:func:`depth_score`         centre of mass of the skip effect on the output; :func:`depth_vs_difficulty`
:func:`erase`               token erasure (mean residual) and its downstream change
:func:`layer_map`           linear maps between the layers of two models, relative error per pair
:func:`patch`               activation patching: recovery per layer and position
:func:`estimate`            rough bytes and seconds of an analysis before it runs
:func:`report`              all of them at once: :class:`DepthReport` (as one HTML file: ``figures.residual.save_depth_report``)
==========================  ==================================================================

Hook names follow :mod:`workbench.models` (TransformerLens style): ``embed_out``,
``pos_embed_out``, ``blocks.{l}.resid_pre``, ``blocks.{l}.attn_out``, ``blocks.{l}.resid_mid``,
``blocks.{l}.mlp_out``, ``blocks.{l}.resid_post`` (``blocks.{l}.block_out`` in residual MLPs),
``features`` (final-norm output), plus ``blocks.{l}.attn.z``: the per-head attention outputs
``(B, T, H, D)`` entering the output projection (used for per-head decompositions).

Hooking lives in :mod:`workbench.hooks`: :func:`record`, :func:`adapter`, :func:`sites` and
:class:`ActivationCache` are re-exported here from there (``wb.residual.record`` and
``wb.hooks.record`` are the same function), so notebooks and the dashboard keep working.

Definitions (Csordas et al. 2025, "Do Language Models Use Their Depth Efficiently?"), per
token and then averaged over tokens, with ``x_l`` the residual entering layer ``l``, ``a_l``
its attention output, ``m_l`` its MLP output and ``y_l`` the residual leaving it:

- attention: ``||a_l|| / ||x_l||`` and ``cos(a_l, x_l)``
- MLP: ``||m_l|| / ||x_l + a_l||`` and ``cos(m_l, x_l + a_l)``
- whole layer: ``||y_l - x_l|| / ||x_l||`` and ``cos(y_l - x_l, x_l)``

Logit mixtures (:class:`workbench.compose.LogitMixture`) have one residual stream per member.
:func:`contributions`, :func:`logit_attribution`, :func:`logit_lens` and :func:`skip_effects` take a
mixture directly and return the same tables with a ``member`` column (member index ``k``), measured
inside the mixture: attribution scales each member's components by its weight, the lens and the
skip effects compare with the mixture's output distribution. See :func:`is_mixture`.

Norm denominators are clamped at ``EPS = 1e-6``. All functions run in eval mode without
gradients (the model's mode is restored afterwards) on the model's own device.

Definitions: ``docs/definitions.md#relative-contribution``, ``#decomposition``, ``#logit-attribution``,
``#logit-lens``, ``#skip-effects``, ``#local-skip``, ``#parallel-blocks``, ``#residual-memory``,
``#integrated-gradients``, ``#depth-score``, ``#erasure``, ``#layer-map``, ``#patching``.
"""
from __future__ import annotations

import contextlib
import numbers
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import checks
from .hooks import ActivationCache, Adapter, adapter, record, sites

__all__ = ["EPS", "ActivationCache", "Decomposition", "SkipEffects", "adapter", "sites", "record",
           "contributions", "decompose", "logit_attribution", "logit_lens", "skip_effects", "next_token_targets",
           "is_mixture", "integrated_gradients", "depth_score", "depth_vs_difficulty", "Erasure", "erase",
           "layer_map", "patch", "estimate", "DepthReport", "report"]

EPS = 1e-6
IGNORE = -100


# ============================================================================ helpers


@contextlib.contextmanager
def _inference(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _tensor(name: str, value) -> torch.Tensor:
    """``value`` as a tensor without changing its dtype (lists and numpy arrays keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)) or np.isscalar(value):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"{name} must be a tensor (or an array of numbers), got {type(value).__name__}")


def _facts(ad: Adapter) -> tuple[int | None, int | None, int | None]:
    """``(vocab_size, context, d_in)`` of the model behind ``ad`` (None where it has no such bound)."""
    cfg = getattr(ad.model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) if ad.family == "transformer" else None
    context = (getattr(cfg, "context", None) or getattr(cfg, "n_positions", None)
               or getattr(cfg, "max_position_embeddings", None)) if ad.family == "transformer" else None
    d_in = getattr(cfg, "d_in", None) if ad.family == "mlp" else None
    return vocab, context, d_in


def _out_size(ad: Adapter) -> int:
    """Classes or vocabulary size: the rows of the readout."""
    return int(ad.readout()[0].shape[0])


def _as_batch(ad: Adapter, x, name: str = "x") -> torch.Tensor:
    """Validate and batch the input: token ids ``(B, T)`` in the vocabulary (at most the context) for
    Transformers, real vectors ``(B, d_in)`` for residual MLPs; never rounded or cast across kinds."""
    x = _tensor(name, x)
    vocab, context, d_in = _facts(ad)
    if ad.family == "transformer":
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids for a Transformer (vector inputs belong to an "
                             f"MLP), got dtype {x.dtype}")
        checks.check_tokens(name, x, vocab)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must be token ids (B, T) or (T,) with B, T >= 1, got shape {tuple(x.shape)}")
        if context is not None and x.shape[1] > context:
            raise ValueError(f"{name} must have at most the model's context of {context} positions, got {x.shape[1]}")
        x = x.long()
    else:
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be real floating-point vectors for an MLP (token ids belong to a "
                             f"Transformer), got dtype {x.dtype}")
        checks.check_features(name, x)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[0] < 1 or (d_in is not None and x.shape[1] != d_in):
            want = d_in if d_in is not None else "d_in"
            raise ValueError(f"{name} must be vectors (B, {want}) or ({want},) with B >= 1, got shape {tuple(x.shape)}")
        x = x.float()
    return x.to(ad.device)


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """Activations as ``(B, T, C)``: vector models get ``T = 1``."""
    return t[:, None] if t.dim() == 2 else t


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float().norm(dim=-1)


def _rel(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return _norm(num) / _norm(den).clamp_min(EPS)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (_norm(a).clamp_min(EPS) * _norm(b).clamp_min(EPS))


def _chunks(n: int, batch_size: int | None):
    step = n if batch_size is None else batch_size   # validated by the public functions (>= 1)
    for i in range(0, n, max(step, 1)):
        yield slice(i, min(i + step, n))


def next_token_targets(x: torch.Tensor) -> torch.Tensor:
    """Targets for language modelling on ``x`` itself: ``y[:, t] = x[:, t+1]``, last position ignored."""
    y = torch.full_like(x, IGNORE)
    y[:, :-1] = x[:, 1:]
    return y


def _targets(ad: Adapter, x: torch.Tensor, y) -> torch.Tensor | None:
    if y is None:
        return next_token_targets(x) if ad.family == "transformer" else None
    y = checks.check_labels("y", _tensor("y", y), _out_size(ad), ignore=IGNORE)
    if y.dim() == x.dim() - 1 and ad.family == "transformer":
        y = y[None]
    want = tuple(x.shape) if ad.family == "transformer" else (x.shape[0],)
    if tuple(y.shape) != want:
        raise ValueError(f"y must have one target per {'token' if ad.family == 'transformer' else 'example'} "
                         f"of x, shape {want}, got {tuple(y.shape)}")
    return y.to(ad.device).long().reshape(x.shape[0], -1)


def _table(per_token: dict, index_names: list[str], stats: list[str], mask: torch.Tensor | None,
           per_position: bool) -> pd.DataFrame:
    """Average ``{(*index, stat): (N, T) tensor}`` over tokens (or over examples per position).

    NaN entries (e.g. unscored positions of a loss) and tokens outside ``mask`` are left out.
    """
    keys = list(dict.fromkeys(k[:-1] for k in per_token))
    cols = index_names + (["position"] if per_position else []) + stats
    rows = []
    for key in keys:
        means = []
        for stat in stats:
            v = per_token[key + (stat,)].double()
            ok = ~torch.isnan(v)
            if mask is not None:
                ok &= mask
            v0 = torch.where(ok, v, torch.zeros_like(v))
            dims = 0 if per_position else (0, 1)
            means.append((v0.sum(dims) / ok.sum(dims)).tolist())  # 0/0 -> NaN
        if per_position:
            rows.extend((*key, pos, *vals) for pos, vals in enumerate(zip(*means)))
        else:
            rows.append((*key, *means))
    return pd.DataFrame(rows, columns=cols)


def _mask(mask, shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = _tensor("mask", mask)
    if m.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = token counts), got dtype {m.dtype}")
    if m.dim() == 1 and len(shape) == 2 and shape[0] == 1:
        m = m[None]
    if m.numel() != int(np.prod(shape)) or (m.dim() == len(shape) and tuple(m.shape) != tuple(shape)):
        raise ValueError(f"mask must have shape {tuple(shape)} (one entry per token of x), got {tuple(m.shape)}")
    return m.to(device).reshape(shape)


# ============================================================================ mixtures


def is_mixture(model) -> bool:
    """True for a :class:`workbench.compose.LogitMixture`: several residual streams, one output."""
    from .compose import LogitMixture  # compose does not import this module; imported late to keep imports light

    return isinstance(model, LogitMixture)


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


# ============================================================================ layer skipping


@dataclass
class SkipEffects:
    """Result of :func:`skip_effects`.

    ``heatmap``: ``skipped, affected, effect`` for every ``affected > skipped``, effect =
    mean over tokens of ``||d_l - d~_l|| / ||d_l||`` where ``d_l`` is layer ``l``'s whole-layer
    contribution ``y_l - x_l`` and ``d~_l`` the same with layer ``skipped`` replaced by the
    identity (mean, or max with ``reduce="max"``). ``output``: ``skipped, kl, l2, top1_changed, loss,
    loss_change`` per skipped layer: KL(p || p_skipped) of the output distribution,
    ``l2 = ||p - p_skipped||_2``, share of tokens whose top-1 changes, and
    the loss with the layer skipped and its change (NaN without targets).

    For a logit mixture both tables start with a ``member`` column, ``n_layers`` is the deepest
    member's depth and ``member_layers[k]`` member ``k``'s; :meth:`member` gives one member's
    result in the single-model form.
    """

    heatmap: pd.DataFrame
    output: pd.DataFrame
    n_layers: int = 0
    member_layers: list[int] | None = None

    def member(self, k: int) -> "SkipEffects":
        """Member ``k``'s rows of a mixture's result, without the ``member`` column."""
        if self.member_layers is None:
            raise ValueError("not a mixture's result: it has no members")
        checks.check_int("member", k, 0, len(self.member_layers) - 1)

        def pick(df):
            return df[df["member"] == k].drop(columns="member").reset_index(drop=True)
        return SkipEffects(pick(self.heatmap), pick(self.output), self.member_layers[k])

    def matrix(self, member: int | None = None) -> np.ndarray:
        """``(L, L)`` array ``[skipped, affected]`` (NaN where ``affected <= skipped``); a mixture needs ``member``."""
        if self.member_layers is not None:
            if member is None:
                raise ValueError("a mixture's skip effects have one matrix per member: pass member=k")
            return self.member(member).matrix()
        m = np.full((self.n_layers, self.n_layers), np.nan)
        for r in self.heatmap.itertuples():
            m[int(r.skipped), int(r.affected)] = r.effect
        return m


def skip_effects(model: nn.Module, x, y=None, mask=None, batch_size: int | None = 256, reduce: str = "mean",
                 from_position: int | None = None, local: bool = False) -> SkipEffects:
    """Skip each layer in turn (identity) and measure how later layers and the output change.

    Definitions as in Csordas et al. (2025); see :class:`SkipEffects` and
    ``docs/definitions.md#skip-effects``. ``y``: targets for the loss (default for sequences: the
    next token of ``x``). ``mask`` restricts the token reduction. ``reduce``: ``"mean"`` or
    ``"max"`` over tokens (the paper's figures use the max). ``from_position`` (``1 .. T-1``):
    the skipped layer is the identity only at positions ``>= from_position`` (never at the first
    token) and the reduction runs over those positions (earlier ones cannot change).
    ``local=True``: remove only the skipped layer's own contribution ``d_s`` from the residual that
    each later layer reads, every later layer computed on the *original* stream minus ``d_s``, so
    the effect on layer ``l`` is its direct dependence on ``d_s`` (not mediated by layers between);
    the output columns then compare ``unembed(h_L - d_s)`` with the output.
    Output columns: ``skipped, kl, l2, top1_changed, loss, loss_change`` with ``l2`` =
    ``||softmax - softmax'||_2`` per token. Cost: one base forward, then per skipped layer ``s`` only the
    blocks after ``s`` and the readout (the blocks before ``s`` replay the base forward's outputs): at
    most L + 1 forwards, about ``L / 2`` block passes fewer.

    For a :class:`~workbench.compose.LogitMixture` (either mode), each member's layers are
    skipped in turn inside the mixture: the heat-map is within that member's residual stream and
    the output columns measure the change of the *mixture's* distribution. Both tables get a
    leading ``member`` column (see :class:`SkipEffects`). ``local`` is refused for mixtures.
    """
    _check_batch_size(batch_size)
    checks.check_choice("reduce", reduce, ["mean", "max"])
    checks.check_bool("local", local)
    if from_position is not None:
        checks.check_int("from_position", from_position, 1)
    if is_mixture(model):
        if local:
            raise ValueError("local=True needs a single model; pass one of the mixture's .members")
        ads = [adapter(m) for m in model.members]
        heats, outs = [], []
        with _inference(model):
            xb = _mixture_batch(ads, x)
            yy = _targets(ads[0], xb, y)
            for k, ad in enumerate(ads):
                res = _skip(ad, lambda xs: _mixture_parts(model, xs)[0], xb, yy, mask, batch_size, reduce,
                            from_position, False)
                heats.append(_with_member(res.heatmap, k))
                outs.append(_with_member(res.output, k))
        layers = [ad.n_layers for ad in ads]
        return SkipEffects(pd.concat(heats, ignore_index=True), pd.concat(outs, ignore_index=True),
                           max(layers), layers)
    ad = adapter(model)
    with _inference(ad.model):
        x = _as_batch(ad, x)
        return _skip(ad, lambda xs: _logits(ad, xs), x, _targets(ad, x, y), mask, batch_size, reduce,
                     from_position, local)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def _block_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _replace_input(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Feed ``block`` ``fn(its input)`` instead of its input (positional or ``hidden_states``)."""
    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _replace_output(block: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Replace ``block``'s (first) output by ``fn(input, output)``."""
    def post(module, args, kwargs, output):
        return _with_first(output, fn(_block_input(args, kwargs), _first(output)))
    h = block.register_forward_hook(post, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _block_outputs(ad: Adapter):
    """``{layer: output}``: every block's whole output (tensor or tuple, as the model returns it) of the
    forwards run inside the context; what :func:`_cached_blocks` replays."""
    outs: dict = {}
    handles = []
    try:
        for l in range(ad.n_layers):
            handles.append(ad.block(l).register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o)))
        yield outs
    finally:
        for h in handles:
            h.remove()


def _distinct_blocks(ad: Adapter) -> bool:
    """Whether every layer is its own module (a block object used twice cannot be replayed per layer)."""
    return len({id(ad.block(l)) for l in range(ad.n_layers)}) == ad.n_layers


@contextlib.contextmanager
def _cached_blocks(ad: Adapter, outputs: dict):
    """Blocks that do not run: block ``l`` returns ``outputs[l](input)`` instead of computing.

    A block whose input is what it was in a recorded forward returns that forward's output
    (:func:`_block_outputs`), so an intervention at layer ``s`` runs only the blocks after ``s``
    (the prefix of the network is the same; its residuals are cached, not recomputed). The block's
    hooks still fire, on the replayed output. The instance's own ``forward`` is restored on exit."""
    saved = {}
    try:
        for l, make in outputs.items():
            block = ad.block(l)
            saved[l] = block.__dict__.get("forward")

            def stub(*args, make=make, **kwargs):
                return make(_block_input(args, kwargs))
            block.forward = stub
        yield
    finally:
        for l, old in saved.items():
            block = ad.block(l)
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


class _Stop(Exception):
    """Raised by a hook to end a forward whose remaining modules are not needed."""


def _run_blocks(ad: Adapter, forward: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """Run ``forward(x)`` up to the end of the last block and return the final residual (not detached);
    the final norm and readout do not run. Hooks registered before the call fire as usual."""
    final = []

    def stop(module, args, output):
        final.append(_first(output))
        raise _Stop
    h = ad.block(ad.n_layers - 1).register_forward_hook(stop)
    try:
        forward(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not final:
        raise RuntimeError(f"the forward of {type(ad.model).__name__} never ran its last block")
    return _tokens(final[0])


def _readout_is_unembed(ad: Adapter, final: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``ad.unembed`` of the final residual gives the model's own logits on this input (then
    an analysis may read out only the positions it needs); False for a head that does more (e.g. a
    logit soft-cap the adapter does not know)."""
    got = ad.unembed(final).float()
    want = logits.float()
    if got.shape != want.shape:
        return False
    tol = 64 * torch.finfo(logits.dtype).eps * (1.0 + float(want.abs().max()))
    return bool(((got - want).abs() <= tol).all())


def _skip_layer(ad: Adapter, layer: int, from_position: int | None):
    """Block ``layer`` as the identity (at positions ``>= from_position`` when given)."""
    if from_position is None:
        return ad.skip(layer)

    def keep_early(h, out):
        out = out.clone()
        out[:, from_position:] = h[:, from_position:]
        return out
    return _replace_output(ad.block(layer), keep_early)


def _skipped_output(cached, from_position: int | None):
    """Replayed output of a skipped block: its input (the identity), at positions ``>= from_position``
    only when given (earlier positions keep the block's recorded output)."""
    def make(h):
        if from_position is None:
            return _with_first(cached, h)
        out = _first(cached).clone()
        out[:, from_position:] = h[:, from_position:]
        return _with_first(cached, out)
    return make


def _reduce(v: torch.Tensor, mask: torch.Tensor | None, how: str) -> float:
    return _masked_mean(v, mask) if how == "mean" else _masked_max(v, mask)


def _masked_max(v: torch.Tensor, mask: torch.Tensor | None) -> float:
    v = v.double()
    ok = ~torch.isnan(v)
    if mask is not None:
        ok &= mask
    return float(torch.where(ok, v, torch.full_like(v, -float("inf"))).max()) if ok.any() else float("nan")


OUT_CHUNK = 1 << 20   # elements per CPU thread of the (rows, V) output block compared at once (cache-sized)


def _out_base(base: torch.Tensor, tgt: torch.Tensor | None) -> dict:
    """What every skipped run is compared with, once per batch: the base log-probabilities and
    probabilities ``(N, V)`` (``N = B T``), their top-1 ids ``(N,)``, the targets and the loss ``(B, T)``."""
    shape, V = base.shape[:2], base.shape[-1]
    logp = base.float().log_softmax(-1)
    return {"shape": shape, "logp": logp.reshape(-1, V), "p": logp.exp().reshape(-1, V),
            "top": logp.argmax(-1).reshape(-1), "tgt": None if tgt is None else tgt.reshape(-1),
            "loss": _token_loss(logp, tgt)}


def _out_effects(base: dict, logits: torch.Tensor) -> dict:
    """Per token ``(B, T)``: ``kl`` = KL(p || q), ``l2`` = ``||p - q||_2``, ``top1_changed`` and ``loss`` of
    ``q = softmax(logits)`` against the base output ``p`` (:func:`_out_base`), and ``base_loss``.

    On the CPU formed ``OUT_CHUNK`` elements per thread at a time, so that the temporaries of each
    operation stay in cache (the same per-row formulas; elsewhere in one block)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    N, dev = z.shape[0], z.device
    rows = max(1, OUT_CHUNK * torch.get_num_threads() // V) if dev.type == "cpu" else max(N, 1)
    kl, l2 = torch.empty(N, device=dev), torch.empty(N, device=dev)
    changed, loss = torch.empty(N, device=dev), torch.full((N,), float("nan"), device=dev)
    tgt = base["tgt"]
    for r0 in range(0, N, rows):
        r = slice(r0, min(r0 + rows, N))
        logq = z[r].float().log_softmax(-1)
        p = base["p"][r]
        kl[r] = torch.sub(base["logp"][r], logq).mul_(p).sum(-1)
        changed[r] = (logq.argmax(-1) != base["top"][r]).float()
        if tgt is not None:
            loss[r] = F.nll_loss(logq, tgt[r], ignore_index=IGNORE, reduction="none")
        l2[r] = logq.exp_().sub_(p).norm(dim=-1)
    if tgt is not None:
        loss = torch.where(tgt == IGNORE, torch.full_like(loss, float("nan")), loss)
    shape = base["shape"]
    return {"kl": kl.reshape(shape), "l2": l2.reshape(shape), "top1_changed": changed.reshape(shape),
            "loss": loss.reshape(shape), "base_loss": base["loss"]}


def _skip(ad: Adapter, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, yy, mask,
          batch_size: int | None, reduce: str = "mean", from_position: int | None = None,
          local: bool = False) -> SkipEffects:
    """Skip each of ``ad``'s layers; ``forward(x)`` gives the output logits ``(B, T, V)`` to compare
    (the model's own, or a mixture's that runs ``ad``'s model inside it).

    Cost: the base forward, then for skipped layer ``s`` only the blocks after ``s`` and the readout
    (blocks ``< s`` replay the base forward's outputs: :func:`_cached_blocks`); ``local`` runs no
    readout (its output is ``unembed(h_L - d_s)``) and no forward at all for the last layer."""
    L = ad.n_layers
    effects: dict = {}
    outs: dict = {}
    T = x.shape[1] if ad.family == "transformer" else 1
    if from_position is not None:
        if ad.family != "transformer":
            raise ValueError("from_position needs a sequence model (token positions); this model takes vectors")
        checks.check_int("from_position", from_position, 1, T - 1)
    m = _mask(mask, (x.shape[0], T), ad.device)
    if from_position is not None:
        late = torch.zeros(x.shape[0], T, dtype=torch.bool, device=ad.device)
        late[:, from_position:] = True
        m = late if m is None else (m & late)
    names = ["blocks.*.resid_pre", "blocks.*.resid_post"]
    replay = L > 0 and _distinct_blocks(ad)
    own_skip = type(ad).skip is not Adapter.skip      # an adapter's own skip is used as it is
    for sl in _chunks(len(x), batch_size):
        if L == 0:
            break
        with record(ad, names=names) as cache, _block_outputs(ad) as block_out:
            base = forward(x[sl])
        pre = [cache[f"blocks.{l}.resid_pre"] for l in range(L)]
        final = cache[f"blocks.{L - 1}.resid_post"]
        d = [_tokens(cache[f"blocks.{l}.resid_post"]).float() - _tokens(pre[l]).float() for l in range(L)]
        raw_d = [cache[f"blocks.{l}.resid_post"] - pre[l] for l in range(L)]
        tgt = None if yy is None else yy[sl].reshape(base.shape[:2])
        compare = _out_base(base, tgt)
        del base
        for s in range(L):
            with contextlib.ExitStack() as stack:
                cache = stack.enter_context(record(ad, names=names, layers=range(s + 1, L)))
                if local:
                    ds = raw_d[s]
                    if from_position is not None:
                        ds = ds.clone()
                        ds[:, :from_position] = 0
                    for l in range(s + 1, L):
                        stack.enter_context(_replace_input(ad.block(l), lambda h, l=l, ds=ds: pre[l] - ds))
                    if s + 1 < L:    # blocks 0 .. s: their outputs are replaced before anyone reads them
                        if replay:
                            stack.enter_context(_cached_blocks(
                                ad, {l: (lambda h, o=block_out[l]: o) for l in range(s + 1)}))
                        _run_blocks(ad, forward, x[sl])
                else:
                    if replay:
                        prefix = {l: (lambda h, o=block_out[l]: o) for l in range(s)}
                        if own_skip and from_position is None:
                            stack.enter_context(_skip_layer(ad, s, None))
                        else:
                            prefix[s] = _skipped_output(block_out[s], from_position)
                        stack.enter_context(_cached_blocks(ad, prefix))
                    else:
                        stack.enter_context(_skip_layer(ad, s, from_position))
                    skipped = forward(x[sl])
                for l in range(s + 1, L):
                    dt = _tokens(cache[f"blocks.{l}.resid_post"]).float() - _tokens(cache[f"blocks.{l}.resid_pre"]).float()
                    effects.setdefault((s, l), []).append(_rel(d[l] - dt, d[l]))
            if local:
                skipped = ad.unembed(final - ds)
                skipped = skipped if skipped.dim() == 3 else skipped[:, None]
            for stat, v in _out_effects(compare, skipped).items():
                outs.setdefault((s, stat), []).append(v)
            del skipped
    heat = [{"skipped": s, "affected": l, "effect": _reduce(torch.cat(v), m, reduce)} for (s, l), v in effects.items()]
    rows = {}
    for (s, stat), v in outs.items():
        rows.setdefault(s, {"skipped": s})[stat] = _reduce(torch.cat(v), m, reduce)
    out = pd.DataFrame(list(rows.values()), columns=["skipped", "kl", "l2", "top1_changed", "loss", "base_loss"])
    out["loss_change"] = out["loss"] - out["base_loss"]
    out = out.drop(columns="base_loss")
    return SkipEffects(pd.DataFrame(heat, columns=["skipped", "affected", "effect"]), out, L)


def _logits(ad: Adapter, x: torch.Tensor) -> torch.Tensor:
    out = ad.forward(x)
    out = getattr(out, "logits", out)
    return out if out.dim() == 3 else out[:, None]


def _token_loss(logp: torch.Tensor, tgt: torch.Tensor | None) -> torch.Tensor:
    if tgt is None:
        return torch.full(logp.shape[:2], float("nan"), device=logp.device)
    loss = F.nll_loss(logp.reshape(-1, logp.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                      reduction="none").reshape(tgt.shape)
    return torch.where(tgt == IGNORE, torch.full_like(loss, float("nan")), loss)


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None) -> float:
    v = v.double()
    ok = ~torch.isnan(v)
    if mask is not None:
        ok &= mask
    return float(torch.where(ok, v, torch.zeros_like(v)).sum() / ok.sum()) if ok.any() else float("nan")


# ============================================================================ depth-efficiency analyses


def _final_logits(ad: Adapter, x: torch.Tensor) -> torch.Tensor:
    return _logits(ad, x)


def _resid_stream(ad: Adapter, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([h_0 .. h_L], logits)``: the residual entering each block and the final residual, ``(B, T, C)``."""
    L = ad.n_layers
    with record(ad, names=["blocks.*.resid_pre", f"blocks.{L - 1}.resid_post"]) as cache:
        logits = _logits(ad, x)
    hs = [_tokens(cache[f"blocks.{l}.resid_pre"]) for l in range(L)] + [_tokens(cache[f"blocks.{L - 1}.resid_post"])]
    return hs, logits


def _need_layers(ad: Adapter, what: str) -> None:
    if ad.n_layers == 0:
        raise ValueError(f"{what} needs a model with at least one block, got n_layers = 0")


def _last_target(target, logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` target ids at the last position: top-1 for ``None``, one id, or one per example."""
    B, V = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits[:, -1].argmax(-1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        checks.check_int("target", target, 0, V - 1)
        return torch.full((B,), int(target), device=logits.device, dtype=torch.long)
    tgt = checks.check_tokens("target", _tensor("target", target), V)
    if tgt.dim() != 1 or tgt.shape[0] != B:
        raise ValueError(f"target must be None, one token id in [0, {V - 1}] or one per example (shape ({B},)), "
                         f"got shape {tuple(tgt.shape)}")
    return tgt.to(logits.device).long()


def integrated_gradients(model: nn.Module, x, target=None, steps: int = 32, layers=None) -> pd.DataFrame:
    """Per-layer integrated gradients of the target's probability at the last position.

    For each layer ``l`` the residual entering block ``l`` (``h_l``, layer ``L``: the final residual)
    is interpolated from the baseline ``b`` = the sequence-mean of ``h_l`` (per example, at every
    position) to ``h_l``; the model runs on from there. Attribution of position ``t``:
    ``sum_c (h_l - b)[t, c] * mean_k dF/dh[t, c] (b + a_k (h_l - b))`` with ``a_k = (k + 1/2) / steps``
    (midpoint rule), ``F`` = softmax probability of ``target`` at the last position. Completeness:
    per layer and example the attributions sum to ``F(h_l) - F(b)`` up to the rule's O(1/steps^2) error.

    ``target``: ``None`` = the model's top-1 at the last position, a token id, or one per example.
    ``layers``: block indices ``0 .. L`` (default all). Returns ``layer, position, attribution``
    (mean over the batch) -- ``docs/definitions.md#integrated-gradients``.

    Cost per layer ``l`` and step: a forward and backward of the blocks from ``l`` on (the blocks before
    ``l`` replay their recorded outputs) and the readout of the last position only (when the adapter's
    ``unembed`` is the model's own head on this input; else the model's whole forward).
    """
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError("integrated_gradients needs a sequence model (token positions)")
    _need_layers(ad, "integrated_gradients")
    steps = checks.check_int("steps", steps, 1, 1024)
    L = ad.n_layers
    chosen = list(range(L + 1)) if layers is None else [checks.check_int("layers[]", l, 0, L) for l in layers]
    rows = []
    was = ad.model.training
    ad.model.eval()
    try:
        x = _as_batch(ad, x)
        with torch.no_grad(), _block_outputs(ad) as block_out:
            hs, logits = _resid_stream(ad, x)
            last_only = _readout_is_unembed(ad, hs[L][:, -1:], logits[:, -1:])
        tgt = _last_target(target, logits)
        del logits
        idx = torch.arange(len(x), device=ad.device)
        replay = _distinct_blocks(ad)
        for l in chosen:
            h = hs[l].detach()
            base = h.mean(1, keepdim=True).expand_as(h)
            total = torch.zeros(h.shape[:2], device=ad.device)
            for k in range(steps):
                a = (k + 0.5) / steps
                hi = (base + a * (h - base)).clone().requires_grad_(True)
                with torch.enable_grad():
                    if l == L:
                        out = ad.unembed(hi[:, -1:])
                    else:
                        with contextlib.ExitStack() as stack:
                            if replay:    # blocks before l: their recorded outputs (no gradient reaches them)
                                stack.enter_context(_cached_blocks(ad, {m: (lambda _h, o=block_out[m]: o)
                                                                        for m in range(l)}))
                            stack.enter_context(_replace_input(ad.block(l), lambda _h, hi=hi: hi))
                            if last_only:   # the readout of the last position only: F reads no other
                                out = ad.unembed(_run_blocks(ad, ad.forward, x)[:, -1:])
                            else:
                                out = _logits(ad, x)
                    f = out[:, -1].float().softmax(-1)[idx, tgt].sum()
                    (g,) = torch.autograd.grad(f, hi)
                total += (g.float() * (h - base).float()).sum(-1)
            attr = (total / steps).mean(0).cpu().numpy()
            rows.extend((l, t, float(v)) for t, v in enumerate(attr))
    finally:
        ad.model.train(was)
    return pd.DataFrame(rows, columns=["layer", "position", "attribution"])


def depth_score(effects, x=None, metric: str = "l2", **skip_kwargs) -> float:
    """Centre of mass ``sum_l l m_l / sum_l m_l`` of the skip effect on the output (layers ``0 .. L-1``).

    ``effects``: a :class:`SkipEffects`, its ``output`` table, or a model (then ``x`` is required and
    :func:`skip_effects` runs with ``skip_kwargs``). ``metric``: ``"l2"`` (default: the paper's
    ``||softmax - softmax'||_2``) or ``"kl"``. NaN when every effect is 0 --
    ``docs/definitions.md#depth-score``.
    """
    checks.check_choice("metric", metric, ["l2", "kl"])
    if isinstance(effects, SkipEffects):
        out = effects.output
    elif isinstance(effects, pd.DataFrame):
        out = effects
    else:
        if x is None:
            raise ValueError("x is required when depth_score is given a model")
        out = skip_effects(effects, x, **skip_kwargs).output
    if "member" in out.columns:
        raise ValueError("a mixture's skip effects have one depth score per member: pass effects.member(k)")
    missing = {"skipped", metric} - set(out.columns)
    if missing:
        raise ValueError(f"effects must have columns skipped and {metric}, missing {sorted(missing)}")
    m = out[metric].to_numpy(dtype=float).clip(min=0)
    l = out["skipped"].to_numpy(dtype=float)
    return float((l * m).sum() / m.sum()) if m.sum() > 0 else float("nan")


def depth_vs_difficulty(model: nn.Module, sets: dict, metric: str = "l2", max_examples: int = 64,
                        reduce: str = "mean", batch_size: int | None = 256) -> pd.DataFrame:
    """Depth score per problem set: ``difficulty, n_examples, depth_score`` (one row per entry of ``sets``).

    ``sets``: ``{difficulty: inputs}``, inputs a token batch ``(B, T)`` or a
    :class:`workbench.data.Dataset` (its validation split; the token average is restricted to the
    scored positions ``y_val != IGNORE``), e.g. ``{h: wb.data.load("khop", hops=h) for h in (1, 2, 3)}``
    or modadd sets of growing ``p``. ``max_examples`` caps each set (first examples).
    """
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"sets must be a non-empty dict {{difficulty: inputs}}, got {type(sets).__name__}")
    checks.check_int("max_examples", max_examples, 1)
    rows = []
    for diff, inputs in sets.items():
        mask = None
        if hasattr(inputs, "x_val") and hasattr(inputs, "y_val"):
            xs, ys = inputs.x_val[:max_examples], inputs.y_val[:max_examples]
            mask = (ys != IGNORE) if ys.shape == xs.shape else None
        else:
            xs = _tensor(f"sets[{diff!r}]", inputs)[:max_examples]
        res = skip_effects(model, xs, mask=mask, reduce=reduce, batch_size=batch_size)
        rows.append((diff, int(len(xs)), depth_score(res, metric=metric)))
    return pd.DataFrame(rows, columns=["difficulty", "n_examples", "depth_score"])


@dataclass
class Erasure:
    """Result of :func:`erase`. ``residual``: ``layer, position, rel_change`` = mean over the batch of
    ``||h'_l[t] - h_l[t]|| / ||h_l[t]||`` for ``layer .. L`` (``L``: the final residual); ``output``:
    ``position, kl, l2`` of the output distribution at each position (mean over the batch)."""

    residual: pd.DataFrame
    output: pd.DataFrame
    layer: int
    position: int


def erase(model: nn.Module, x, layer: int, position: int) -> Erasure:
    """Token erasure: replace ``h_layer[position]`` (the residual entering block ``layer``) by the mean
    residual of that layer over all the batch's tokens and measure the change downstream.

    ``layer`` in ``0 .. L-1``, ``position`` in ``0 .. T-1``. See :class:`Erasure` and
    ``docs/definitions.md#erasure``. Two forwards.
    """
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError("erase needs a sequence model (token positions)")
    _need_layers(ad, "erase")
    L = ad.n_layers
    layer = checks.check_int("layer", layer, 0, L - 1)
    with _inference(ad.model):
        x = _as_batch(ad, x)
        position = checks.check_int("position", position, 0, x.shape[1] - 1)
        hs, logits = _resid_stream(ad, x)
        mean = hs[layer].reshape(-1, hs[layer].shape[-1]).mean(0)

        def put(h):
            h = h.clone()
            h[:, position] = mean.to(h.dtype)
            return h
        with _replace_input(ad.block(layer), put):
            hs2, logits2 = _resid_stream(ad, x)
        rows = []
        for l in range(layer, L + 1):
            rel = _rel(hs2[l].float() - hs[l].float(), hs[l]).mean(0)
            rows.extend((l, t, float(v)) for t, v in enumerate(rel.tolist()))
        p, q = logits.float().log_softmax(-1), logits2.float().log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1).mean(0)
        l2 = (p.exp() - q.exp()).norm(dim=-1).mean(0)
    out = pd.DataFrame({"position": np.arange(len(kl)), "kl": kl.cpu().numpy(), "l2": l2.cpu().numpy()})
    return Erasure(pd.DataFrame(rows, columns=["layer", "position", "rel_change"]), out, layer, position)


def layer_map(model_a: nn.Module, model_b: nn.Module, x_fit, x_eval) -> pd.DataFrame:
    """Linear maps from every layer of model A's residual to every layer of model B's.

    Residuals ``h_0 .. h_L`` (entering each block; ``L``: final) of both models on ``x_fit`` are
    flattened over tokens; for each pair a least-squares map with a bias (``torch.linalg.lstsq``, float64)
    from A's layer to B's is fitted, and on ``x_eval`` its relative error
    ``||Y - Y_hat||_F / ||Y - mean(Y)||_F`` is measured (0: exact, 1: no better than the mean).
    Returns ``layer_a, layer_b, rel_error`` -- ``docs/definitions.md#layer-map``. The fitting set
    needs more tokens than A's width + 1.
    """
    ads = [adapter(model_a), adapter(model_b)]
    for ad, name in zip(ads, ("model_a", "model_b")):
        if ad.family != "transformer":
            raise ValueError(f"{name} must be a sequence model")
        _need_layers(ad, "layer_map")

    def streams(name, xs):
        out = []
        for ad in ads:
            with _inference(ad.model):
                hs, _ = _resid_stream(ad, _as_batch(ad, xs, name))
            out.append([h.reshape(-1, h.shape[-1]).double().cpu() for h in hs])
        return out
    fa, fb = streams("x_fit", x_fit)
    ea, eb = streams("x_eval", x_eval)
    n = fa[0].shape[0]
    if n <= fa[0].shape[1] + 1:
        raise ValueError(f"x_fit must hold more than d_model + 1 = {fa[0].shape[1] + 1} tokens of model_a, got {n}")
    rows = []
    for i, (xa, xe) in enumerate(zip(fa, ea)):
        Xa = torch.cat([xa, torch.ones(len(xa), 1, dtype=xa.dtype)], 1)
        Xe = torch.cat([xe, torch.ones(len(xe), 1, dtype=xe.dtype)], 1)
        for j, (yb, ye) in enumerate(zip(fb, eb)):
            W = torch.linalg.lstsq(Xa, yb).solution
            err = (ye - Xe @ W).norm() / (ye - ye.mean(0)).norm().clamp_min(EPS)
            rows.append((i, j, float(err)))
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "rel_error"])


PATCH_SITES = ["resid_pre", "attn_out", "mlp_out"]


def _site_replacer(ad: Adapter, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Context replacing activation ``blocks.{layer}.{site}`` by ``fn(activation)``.

    ``resid_pre`` works for every adapter (the block's input; ``layer = L``: the last block's output).
    ``attn_out``/``mlp_out`` need the adapter's ``replace_hook(name, fn)`` (``fn`` returns the new
    activation) or a workbench model, whose hook points take the hook's return value."""
    if site == "resid_pre":
        if layer == ad.n_layers:
            return _replace_output(ad.block(layer - 1), lambda h, out: fn(out))
        return _replace_input(ad.block(layer), fn)
    name = f"blocks.{layer}.{site}"
    own = getattr(ad, "replace_hook", None)
    if callable(own):
        return _handle_ctx(own(name, fn))
    from .hooks.adapters.native import NativeAdapter
    if isinstance(ad, NativeAdapter):
        return _handle_ctx(ad.add_hook(name, fn))
    raise ValueError(f"site {site!r} cannot be patched in {type(ad.model).__name__} (its adapter has no replace_hook); "
                     "use site='resid_pre'")


@contextlib.contextmanager
def _handle_ctx(handle):
    try:
        yield
    finally:
        handle.remove()


def patch(model: nn.Module, clean, corrupt, answer=None, site: str = "resid_pre") -> pd.DataFrame:
    """Activation patching: the corrupt run with one site at one position set to its clean value.

    Returns ``layer, position, recovery`` with ``recovery = (m(patched) - m(corrupt)) / (m(clean) - m(corrupt))``,
    ``m`` = logit of the clean answer minus logit of the corrupt answer at the last position, each
    ``m`` averaged over the batch before the ratio (NaN when clean and corrupt agree). ``answer``:
    ``None`` = each run's top-1 at the last position (per example), or a pair ``(clean_id, corrupt_id)``.
    ``site``: ``resid_pre`` (layers ``0 .. L``; ``L`` = the final residual), ``attn_out`` or ``mlp_out``
    (layers ``0 .. L-1``; parallel blocks too). ``clean`` and ``corrupt``: token batches of one shape.
    One forward per (layer, position) -- ``docs/definitions.md#patching``.
    """
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError("patch needs a sequence model (token positions)")
    _need_layers(ad, "patch")
    checks.check_choice("site", site, PATCH_SITES)
    L = ad.n_layers
    with _inference(ad.model):
        xc, xk = _as_batch(ad, clean, "clean"), _as_batch(ad, corrupt, "corrupt")
        if xc.shape != xk.shape:
            raise ValueError(f"clean and corrupt must have the same shape, got {tuple(xc.shape)} and {tuple(xk.shape)}")
        names = ["blocks.*.resid_pre", f"blocks.{L - 1}.resid_post"] if site == "resid_pre" else [f"blocks.*.{site}"]
        with record(ad, names=names) as cache:
            lc = _logits(ad, xc)
        clean_acts = dict(cache)
        lk = _logits(ad, xk)
        V = lc.shape[-1]
        if answer is None:
            a, b = lc[:, -1].argmax(-1), lk[:, -1].argmax(-1)
        else:
            if not isinstance(answer, (tuple, list)) or len(answer) != 2:
                raise ValueError(f"answer must be None or a pair (clean_id, corrupt_id), got {answer!r}")
            a, b = (torch.full((len(xc),), checks.check_int(f"answer[{i}]", v, 0, V - 1), device=ad.device)
                    for i, v in enumerate(answer))
        idx = torch.arange(len(xc), device=ad.device)

        def metric(logits):
            z = logits[:, -1].float()
            return float((z[idx, a] - z[idx, b]).mean())
        mc, mk = metric(lc), metric(lk)
        den = mc - mk
        layers = range(L + 1) if site == "resid_pre" else range(L)
        rows = []
        for l in layers:
            key = f"blocks.{L - 1}.resid_post" if l == L else f"blocks.{l}.{site}"
            src = clean_acts[key]
            for t in range(xc.shape[1]):
                def put(h, t=t, src=src):
                    h = h.clone()
                    h[:, t] = src[:, t].to(h.dtype)
                    return h
                with _site_replacer(ad, site, l, put):
                    mp = metric(_logits(ad, xk))
                rows.append((l, t, (mp - mk) / den if abs(den) > EPS else float("nan")))
    return pd.DataFrame(rows, columns=["layer", "position", "recovery"])


ESTIMATE_ANALYSES = ["forward", "contributions", "logit_lens", "skip_effects", "integrated_gradients", "patch",
                     "report"]
# Costs beyond the matrix products, fitted once against timed runs (bench/bench_residual.py): log-softmax
# equivalents per (token, vocabulary entry) of the lens statistics per layer, of the skip comparison per skipped
# layer and of erasure's output comparison; a backward pass through a block (input gradients only) in forwards.
LENS_PASSES, SKIP_PASSES, ERASE_PASSES, BACKWARD = 2.6, 1.0, 12.0, 1.1
_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> measured speeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rates(ad: Adapter, n_tokens: int) -> dict:
    """This machine's speed on this model, measured on the model itself once per process, model, device,
    dtype and thread count: the blocks' forward on ``n = min(n_tokens, 128)`` tokens (one sequence)
    gives ``blocks`` (FLOP/s), the unembedding of ``n`` residuals ``readout`` (FLOP/s) and of
    ``TOKEN_CHUNK`` of them ``readout_chunk`` (the lens' blocks), a log-softmax of that output
    ``softmax`` (elements/s). Each timed once after a warm-up on 8 tokens: about 0.5 s for GPT-2 small
    on two CPU cores."""
    import time

    w, _ = ad.readout()
    dev, dtype = w.device, w.dtype
    key = (str(dev), dtype, torch.get_num_threads())
    per_model = _RATES.setdefault(ad.model, {})
    if key in per_model:
        return per_model[key]
    if dev.type == "meta":          # nothing runs on meta tensors: two CPU cores' order of magnitude
        return {"blocks": 4e10, "readout": 3e10, "readout_chunk": 2e10, "softmax": 1e9}
    V, C = int(w.shape[0]), int(w.shape[1])
    _, context, d_in = _facts(ad)
    n = min(n_tokens, 128, context or 128)

    def timed(fn, warm):
        warm()                      # one-time allocations and dispatch, on a few tokens
        _sync(dev)
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        return time.perf_counter() - t, out
    with _inference(ad.model):
        if ad.family == "transformer":
            x = torch.zeros(1, n, dtype=torch.long, device=dev)
            small = x[:, :8]
        else:
            x = torch.zeros(n, d_in or C, device=dev, dtype=dtype)
            small = x[:8]
        h = torch.full((1, n, C), 0.01, device=dev, dtype=dtype)
        if ad.n_layers:
            t_blocks, _ = timed(lambda: _run_blocks(ad, ad.forward, x), lambda: _run_blocks(ad, ad.forward, small))
        else:
            t_blocks = 0.0
        t_ro, logits = timed(lambda: ad.unembed(h), lambda: ad.unembed(h[:, :8]))
        t_chunk, _ = timed(lambda: ad.unembed(h[:, :TOKEN_CHUNK]), lambda: None)
        t_sm, _ = timed(lambda: logits.float().log_softmax(-1), lambda: None)
    flops = _flops(ad, n, n)
    per_model[key] = {"blocks": flops["blocks"] / max(t_blocks, 1e-6), "readout": flops["readout"] / max(t_ro, 1e-9),
                      "readout_chunk": 2 * C * V * min(n, TOKEN_CHUNK) / max(t_chunk, 1e-9),
                      "softmax": n * V / max(t_sm, 1e-9)}
    return per_model[key]


def _flops(ad: Adapter, n_tokens: int, T: int) -> dict:
    """Matrix-product FLOPs of one forward on ``n_tokens`` tokens in sequences of ``T``: ``blocks`` (``2 x``
    the blocks' weight entries per token, and ``2 T C`` per token and layer for causal attention) and
    ``readout`` (``2 C V`` per token)."""
    w, _ = ad.readout()
    V, C = int(w.shape[0]), int(w.shape[1])
    matrices = sum(p.numel() for l in range(ad.n_layers) for p in ad.block(l).parameters() if p.dim() >= 2)
    attention = 2 * T * C * n_tokens * ad.n_layers if ad.family == "transformer" else 0
    return {"blocks": 2 * matrices * n_tokens + attention, "readout": 2 * C * V * n_tokens}


def estimate(model: nn.Module, n_tokens: int, analysis: str = "report", steps: int | None = None) -> dict:
    """Rough cost of an analysis on ``n_tokens`` tokens: ``{"bytes": peak bytes above the model, "seconds": ...,
    "forwards": ..., "flops": ...}``.

    Bytes: float32 activations (attention scores ``H x T^2`` per sequence of the context length, a few
    ``tokens x C`` residuals, the ``tokens x V`` output) plus what the analysis keeps.

    Seconds: the matrix products counted from the model (``2 x`` the blocks' weight entries per token,
    ``2 T C`` per token and layer for causal attention over sequences of ``T`` tokens, ``2 C V`` per token
    and readout) at the speeds this machine reaches on the model itself (:func:`_rates`: a forward on up
    to 128 tokens, measured once), plus the passes over the ``tokens x V`` outputs that the statistics
    make, at the measured log-softmax speed. What each
    analysis runs: contributions one forward; the lens one forward and ``L`` more readouts; skip effects
    one forward, then for layer ``s`` the blocks after it and a readout; IG per layer ``l`` and step a
    forward and backward of the blocks from ``l`` (readout of the last position only); erasure two
    forwards; patching ``(L + 1) x T`` forwards; the report: all but patching. ``steps``: IG steps (default:
    the analysis' own, 16 in the report, 32 alone). ``forwards``: the nominal count (IG ``3 x steps x (L + 1)``).
    """
    ad = adapter(model)
    n_tokens = checks.check_int("n_tokens", n_tokens, 1)
    checks.check_choice("analysis", analysis, ESTIMATE_ANALYSES)
    steps = (16 if analysis == "report" else 32) if steps is None else checks.check_int("steps", steps, 1, 1024)
    C = int(ad.readout()[0].shape[1])
    V = _out_size(ad)
    L = max(ad.n_layers, 1)
    H = max(ad.n_heads, 1)
    _, context, _ = _facts(ad)
    T = min(context or n_tokens, n_tokens) if ad.family == "transformer" else 1
    fwd_bytes = 4 * (n_tokens * (6 * C + 2 * V) + H * T * n_tokens)
    extra = {"forward": 0, "contributions": 4 * n_tokens * 6 * C, "logit_lens": 4 * n_tokens * C * (L + 1),
             "skip_effects": 4 * n_tokens * C * 2 * (L + 1), "integrated_gradients": 3 * fwd_bytes,
             "patch": 4 * n_tokens * C * (L + 1)}
    extra["report"] = max(extra.values())
    forwards = {"forward": 1, "contributions": 1, "logit_lens": 1.5, "skip_effects": L + 1,
                "integrated_gradients": 3 * steps * (L + 1), "patch": (L + 1) * T}
    forwards["report"] = sum(v for k, v in forwards.items() if k not in ("forward", "patch"))

    f = _flops(ad, n_tokens, T)
    blocks, readout = f["blocks"], f["readout"]
    outputs = n_tokens * V          # entries of the tokens x V output
    r = _rates(ad, n_tokens)

    def cost(block_passes=0.0, readouts=0.0, softmaxes=0.0, chunked_readouts=0.0):
        flops = block_passes * blocks + (readouts + chunked_readouts) * readout
        return flops, block_passes * blocks / r["blocks"] + readouts * readout / r["readout"] + \
            chunked_readouts * readout / r["readout_chunk"] + softmaxes * outputs / r["softmax"]
    parts = {"forward": cost(1, 1), "contributions": cost(1, 1),
             "logit_lens": cost(1, 1, LENS_PASSES * (L + 1), chunked_readouts=L),
             "skip_effects": cost(1 + (L - 1) / 2, L + 1, SKIP_PASSES * L),
             "integrated_gradients": cost(1 + steps * (1 + BACKWARD) * (L + 1) / 2, 1),
             "erase": cost(2, 2, ERASE_PASSES),
             "patch": cost((L + 1) * T, (L + 1) * T)}
    if analysis == "report":
        chosen = [parts[k] for k in ("contributions", "logit_lens", "skip_effects", "integrated_gradients", "erase")]
        flops, seconds = sum(f for f, _ in chosen), sum(s for _, s in chosen)
    else:
        flops, seconds = parts[analysis]
    return {"bytes": int(fwd_bytes + extra[analysis]), "seconds": float(seconds), "forwards": float(forwards[analysis]),
            "flops": float(flops)}


@dataclass
class DepthReport:
    """All depth analyses of one model on one prompt set (:func:`report`); every field a DataFrame.

    ``contributions`` (``layer, sublayer, rel_norm, cosine``), ``lens`` (``layer, kl_to_final,
    top1_agree, top5_overlap, loss``), ``skip`` / ``skip_output`` (:class:`SkipEffects` tables, max
    over tokens), ``ig`` (``layer, position, attribution``), ``depth_score`` (float), ``erasure``
    (``layer, position, rel_change``), ``patching`` (``layer, position, recovery``; empty without
    ``corrupt``), ``depth_vs_difficulty`` (empty without ``sets``), ``title``.
    """

    contributions: pd.DataFrame
    lens: pd.DataFrame
    skip: pd.DataFrame
    skip_output: pd.DataFrame
    ig: pd.DataFrame
    depth_score: float
    erasure: pd.DataFrame
    patching: pd.DataFrame
    depth_vs_difficulty: pd.DataFrame
    n_layers: int
    title: str = "Depth report"

    def tables(self) -> dict:
        return {k: getattr(self, k) for k in ("contributions", "lens", "skip", "skip_output", "ig", "erasure",
                                               "patching", "depth_vs_difficulty")}


def report(model: nn.Module, inputs, corrupt=None, sets: dict | None = None, steps: int = 16,
           erase_layer: int = 0, erase_position: int = 0, title: str = "Depth report",
           batch_size: int | None = 256) -> DepthReport:
    """Every depth analysis of ``model`` on the prompt set ``inputs`` (token batch ``(B, T)``) at once.

    Skip effects with the max over tokens (as the paper), depth score from their ``l2`` output
    effect, integrated gradients with ``steps``, erasure of ``(erase_layer, erase_position)``,
    patching when ``corrupt`` (same shape as ``inputs``) is given, and depth vs difficulty for
    ``sets`` (see :func:`depth_vs_difficulty`). See :class:`DepthReport`.
    """
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError("report needs a sequence model (token positions)")
    _need_layers(ad, "report")
    title = checks.check_str("title", title, 200)
    x = _as_batch(ad, inputs, "inputs")
    checks.check_int("erase_layer", erase_layer, 0, ad.n_layers - 1)
    checks.check_int("erase_position", erase_position, 0, x.shape[1] - 1)
    contrib = contributions(ad, x, batch_size=batch_size)
    lens = logit_lens(ad, x, batch_size=batch_size)
    sk = skip_effects(ad, x, reduce="max", batch_size=batch_size)
    ig = integrated_gradients(ad, x, steps=steps)
    er = erase(ad, x, erase_layer, erase_position).residual
    pt = patch(ad, x, corrupt) if corrupt is not None else pd.DataFrame(columns=["layer", "position", "recovery"])
    dvd = (depth_vs_difficulty(ad, sets, batch_size=batch_size) if sets
           else pd.DataFrame(columns=["difficulty", "n_examples", "depth_score"]))
    return DepthReport(contrib, lens, sk.heatmap, sk.output, ig, depth_score(sk), er, pt, dvd, ad.n_layers, title)
