"""Attention patterns and head types, for our Transformers and every Hugging Face family an adapter reads.

=================================  ==================================================================
:func:`watch_patterns`             context: ``fn(layer, pattern)`` per layer as the forward runs (streamed)
:func:`pattern`                    the pattern of one layer (and head) on a prompt: :class:`Pattern` with ``.frame()``
:func:`repeated_tokens`            seeded random sequences repeated once (the induction test set)
:func:`head_scores`                previous-token, induction, duplicate, first-token and self scores per head
:func:`head_scores_across`         the same for a list of ``(label, model)``: growth stages or checkpoints
:func:`score_patterns`             the scores of one pattern tensor ``(B, H, T, T)`` (the formulas, no model)
=================================  ==================================================================

The pattern of a head is ``A = softmax(q k^T / sqrt(D) + M)`` ``(T, T)``, rows the query (destination)
positions, columns the key (source) positions, ``M`` the causal mask (``-inf`` above the diagonal).
Our Transformers run the fused ``scaled_dot_product_attention``, which returns no weights: asking for
patterns switches the chosen blocks to the explicit path (the pattern, then ``A v``) for that forward
only (:meth:`workbench.models.CausalSelfAttention.watch_pattern`). Hugging Face models switch to
``transformers``' eager attention for the forward and back (:func:`workbench.adapters.hf_common.eager_patterns`):
eager attention is each family's reference implementation (positions, grouped-query heads, q/k norms),
so its weights are exactly the pattern the model uses.

Patterns are handed over one layer at a time and reduced at once (scores), so memory holds one layer's
``B x H x T x T`` weights, never all layers'.

Definitions: ``docs/definitions.md#attention-pattern``, ``#head-scores``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from ..hooks import Adapter, adapter
from .batch import _as_batch, _inference

__all__ = ["KINDS", "Pattern", "watch_patterns", "pattern", "repeated_tokens", "head_scores", "head_scores_across",
           "score_patterns", "detection_masks"]

#: The head-type scores, in the order of the score frames.
KINDS = ("previous", "induction", "duplicate", "first", "self")


# ============================================================================ capture


def _attention_adapter(model) -> Adapter:
    ad = adapter(model)
    if ad.family != "transformer" or ad.n_heads < 1:
        raise ValueError(f"model: a {type(ad.model).__name__} has no attention (it takes vectors); attention "
                         "patterns need a Transformer")
    if ad.n_layers == 0:
        raise ValueError("model: the model has no blocks, so no attention to read")
    return ad


def _layers(ad: Adapter, layers) -> list[int]:
    if layers is None:
        return list(range(ad.n_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of block indices in [0, {ad.n_layers - 1}] or None, got {layers!r}")
    out = [checks.check_int("layers[]", l, 0, ad.n_layers - 1) for l in layers]
    if not out:
        raise ValueError("layers must name at least one block (None: all)")
    return sorted(set(out))


@contextlib.contextmanager
def watch_patterns(model: nn.Module, fn: Callable[[int, torch.Tensor], None], layers: Iterable[int] | None = None):
    """While open, every forward of ``model`` calls ``fn(layer, pattern)`` for each chosen layer, in
    layer order, ``pattern`` the attention weights ``(B, H, T, T)`` (query, key) of that layer.

    The tensor is only valid inside ``fn`` (reduce it or copy what you keep): that is what keeps memory
    at one layer's patterns. ``layers``: block indices (default all). A model without attention
    (a residual MLP) raises ``ValueError`` naming ``model``. See ``docs/definitions.md#attention-pattern``::

        with wb.attention.watch_patterns(model, lambda l, p: print(l, p.shape)):
            model(tokens)
    """
    ad = _attention_adapter(model)
    chosen = _layers(ad, layers)
    with ad.watch_patterns(fn, chosen):
        yield


def _labels(ad: Adapter, x: torch.Tensor, labels) -> list[str]:
    T = x.shape[1]
    if labels is not None:
        if isinstance(labels, str) or not hasattr(labels, "__len__") or len(labels) != T:
            raise ValueError(f"labels must be a list of {T} token strings (one per position), got {labels!r}"[:300])
        return [str(t) for t in labels]
    vocab = getattr(getattr(ad.model, "config", None), "vocab", None)
    if isinstance(vocab, (list, tuple)):
        return [str(vocab[int(i)]) for i in x[0]]
    return [str(int(i)) for i in x[0]]


@dataclass
class Pattern:
    """The attention pattern of one layer on one prompt (:func:`pattern`).

    ``weights``: ``(H, T, T)`` numpy array (query, key), ``heads``: the head index of each row of
    ``weights``, ``tokens``: one label per position."""

    layer: int
    heads: list[int]
    tokens: list[str]
    weights: np.ndarray

    def frame(self) -> pd.DataFrame:
        """Tidy: ``layer, head, query, key, query_token, key_token, weight`` for ``key <= query``."""
        H, T, _ = self.weights.shape
        q, k = np.tril_indices(T)
        rows = []
        for i, h in enumerate(self.heads):
            rows.append(pd.DataFrame({"layer": self.layer, "head": h, "query": q, "key": k,
                                      "query_token": [self.tokens[j] for j in q],
                                      "key_token": [self.tokens[j] for j in k],
                                      "weight": self.weights[i][q, k].astype(float)}))
        return pd.concat(rows, ignore_index=True)


def pattern(model: nn.Module, tokens, layer: int, head: int | None = None, labels=None) -> Pattern:
    """The attention pattern of block ``layer`` (one ``head``, or all) on one prompt ``tokens`` ``(T,)``
    or ``(1, T)``; ``labels``: one string per position (default: the model's vocabulary, else the ids).
    Only this layer's weights are kept. See ``docs/definitions.md#attention-pattern``."""
    ad = _attention_adapter(model)
    layer = checks.check_int("layer", layer, 0, ad.n_layers - 1)
    if head is not None:
        head = checks.check_int("head", head, 0, ad.n_heads - 1)
    x = _as_batch(ad, tokens, "tokens")
    if x.shape[0] != 1:
        raise ValueError(f"tokens must be one prompt (T,) or (1, T), got shape {tuple(x.shape)}")
    names = _labels(ad, x, labels)
    kept = {}

    def keep(l, p):
        kept["p"] = (p[0] if head is None else p[0, head:head + 1]).detach().float().cpu().numpy()
    with _inference(ad.model), ad.watch_patterns(keep, [layer]):
        ad.forward(x)
    heads = list(range(ad.n_heads)) if head is None else [head]
    return Pattern(layer, heads, names, kept["p"])


# ============================================================================ head-type scores


def repeated_tokens(vocab_size: int, half: int, batch: int = 8, seed: int = 0, low: int = 1) -> torch.Tensor:
    """``(batch, 2 * half)`` token ids: a random sequence of ``half`` tokens followed by itself.

    Tokens are drawn from ``[low, vocab_size)`` (default ``low = 1``: id 0 is often padding or a BOS),
    without replacement within a sequence when the range allows (then the only repeats are the copy,
    and every score's target positions are unambiguous), seeded. See ``docs/definitions.md#head-scores``."""
    vocab_size = checks.check_int("vocab_size", vocab_size, 2)
    low = checks.check_int("low", low, 0, vocab_size - 1)
    half = checks.check_int("half", half, 1)
    batch = checks.check_int("batch", batch, 1, 4096)
    g = torch.Generator().manual_seed(checks.check_seed("seed", seed))
    n = vocab_size - low
    if n >= half:
        first = torch.stack([torch.randperm(n, generator=g)[:half] for _ in range(batch)]) + low
    else:
        first = torch.randint(low, vocab_size, (batch, half), generator=g)
    return torch.cat([first, first], dim=1)


def detection_masks(tokens: torch.Tensor, kinds: Iterable[str] = KINDS) -> dict[str, torch.Tensor]:
    """``{kind: (B, T, T) bool}``: the key positions each query position attends to in a head of that kind.

    - ``previous``: key ``t - 1`` (queries ``t >= 1``);
    - ``self``: key ``t`` (queries ``t >= 1``; at ``t = 0`` every head attends to itself);
    - ``first``: key 0 (queries ``t >= 1``), the first-token or attention-sink head;
    - ``duplicate``: keys ``j < t`` holding the same token as ``t``;
    - ``induction``: keys ``1 <= j <= t`` whose previous token equals token ``t`` (the token after an
      earlier occurrence of the current one).

    As TransformerLens's ``head_detector`` patterns. See ``docs/definitions.md#head-scores``."""
    B, T = tokens.shape
    dev = tokens.device
    eye = torch.eye(T, dtype=torch.bool, device=dev)
    later = torch.arange(T, device=dev) >= 1                                   # queries t >= 1
    same = tokens[:, :, None] == tokens[:, None, :]                            # (B, t, j)
    strictly_before = torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)
    out = {}
    for kind in kinds:
        if kind == "previous":
            m = torch.zeros(T, T, dtype=torch.bool, device=dev)
            m[1:, :-1] = eye[1:, 1:]
        elif kind == "self":
            m = eye & later[:, None]
        elif kind == "first":
            m = torch.zeros(T, T, dtype=torch.bool, device=dev)
            m[1:, 0] = True
        elif kind == "duplicate":
            out[kind] = same & strictly_before
            continue
        elif kind == "induction":
            m = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
            m[:, :, 1:] = same[:, :, :-1] & torch.ones(T, T - 1, dtype=torch.bool, device=dev).tril(-1)  # j - 1 < t
            out[kind] = m
            continue
        else:
            raise ValueError(f"kinds must be drawn from {list(KINDS)}, got {kind!r}")
        out[kind] = m.expand(B, T, T)
    return out


def score_patterns(patterns: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{kind: (H,) scores}`` of attention weights ``(B, H, T, T)`` against :func:`detection_masks`.

    Score of a head = the attention mass on the target keys, averaged over the query positions that
    have at least one target key (over the batch too): ``sum_{b,t in Q} sum_j A[b,h,t,j] D[b,t,j] / |Q|``.
    1 for a head that does exactly that, 0 for one that never does; NaN when no query has a target.
    (TransformerLens divides by all queries, so a perfect previous-token head scores ``(T-1)/T`` there.)
    See ``docs/definitions.md#head-scores``."""
    p = patterns.float()
    kinds = list(masks)
    m = torch.stack([masks[k] for k in kinds])                            # (K, B, T, T)
    rows = m.any(-1)                                                      # (K, B, T) queries with a target
    mass = torch.einsum("bhtj,kbtj->kbht", p, m.to(p.dtype))              # (K, B, H, T)
    n = rows.sum((1, 2)).to(p.dtype)                                      # (K,)
    score = (mass * rows[:, :, None, :]).sum((1, 3)) / n[:, None]         # (K, H); NaN where n = 0
    return {k: score[i] for i, k in enumerate(kinds)}


def _check_kinds(kinds) -> list[str]:
    return checks.check_choices("kinds", list(kinds) if isinstance(kinds, tuple) else kinds, KINDS)


def _default_half(ad: Adapter) -> int:
    from .batch import _facts
    _, context, _ = _facts(ad)
    return max(1, min(32, (context or 64) // 2))


def head_scores(model: nn.Module, tokens=None, kinds=KINDS, layers=None, half: int | None = None, batch: int = 8,
                seed: int = 0) -> pd.DataFrame:
    """Head-type scores of every head: ``layer, head, score_kind, value`` (tidy).

    ``tokens``: a batch ``(B, T)`` to score on; default :func:`repeated_tokens` (``batch`` sequences of
    ``half`` random tokens repeated once, ``half`` = min(32, context / 2), seeded), where an induction
    head has a target in every query of the second half. Scores are reduced layer by layer as the
    forward runs (memory: one layer's patterns). ``kinds``: drawn from :data:`KINDS`.
    See ``docs/definitions.md#head-scores``."""
    ad = _attention_adapter(model)
    kinds = _check_kinds(kinds)
    chosen = _layers(ad, layers)
    if tokens is None:
        half = _default_half(ad) if half is None else checks.check_int("half", half, 1)
        vocab = int(ad.readout()[0].shape[0])
        tokens = repeated_tokens(vocab, half, batch, seed)
    x = _as_batch(ad, tokens, "tokens")
    masks = detection_masks(x, kinds)
    rows = []

    def reduce(layer, p):
        for kind, v in score_patterns(p, masks).items():
            rows.extend((layer, h, kind, float(s)) for h, s in enumerate(v.tolist()))
    with _inference(ad.model), ad.watch_patterns(reduce, chosen):
        ad.forward(x)
    df = pd.DataFrame(rows, columns=["layer", "head", "score_kind", "value"])
    df["score_kind"] = pd.Categorical(df["score_kind"], categories=kinds)
    return df.sort_values(["score_kind", "layer", "head"]).reset_index(drop=True).astype({"score_kind": str})


def head_scores_across(models, tokens=None, kinds=KINDS, column: str = "stage", half: int | None = None,
                       batch: int = 8, seed: int = 0, monitor=None) -> pd.DataFrame:
    """:func:`head_scores` of each ``(label, model)`` in ``models`` on the same tokens, with a ``column``
    (``"stage"`` for growth stages, ``"step"`` for checkpoints) holding the label, in the given order.

    The models must share a vocabulary (the default tokens are drawn once, from the first model).
    "When does the induction head form, and in which layer?": the first label where some head's
    ``induction`` value passes a threshold (``figures.attention.scores_across`` draws it).
    Stops early (returning the labels done) when ``monitor.stopped``. See ``docs/definitions.md#head-scores``."""
    mon = _monitor.resolve(monitor)
    column = checks.check_choice("column", column, ("stage", "step", "label"))
    if isinstance(models, (str, bytes)) or not hasattr(models, "__iter__"):
        raise ValueError("models must be a list of (label, model) pairs")
    models = list(models)
    if not models or not all(isinstance(m, (tuple, list)) and len(m) == 2 for m in models):
        raise ValueError("models must be a non-empty list of (label, model) pairs")
    vocab = None
    frames = []
    for i, (label, model) in enumerate(models):
        ad = _attention_adapter(model)
        v = int(ad.readout()[0].shape[0])
        if vocab is None:
            vocab = v
            if tokens is None:
                h = _default_half(ad) if half is None else checks.check_int("half", half, 1)
                tokens = repeated_tokens(v, h, batch, seed)
        elif v != vocab:
            raise ValueError(f"models: every model must share one vocabulary; {label!r} has {v} tokens, the first "
                             f"has {vocab}")
        if mon.stopped:
            break
        df = head_scores(ad, tokens, kinds)
        df.insert(0, column, label)
        frames.append(df)
        mon.report((i + 1) / len(models), f"scored {label}")
    if not frames:
        return pd.DataFrame(columns=[column, "layer", "head", "score_kind", "value"])
    return pd.concat(frames, ignore_index=True)
