"""Lenses: what the residual stream entering each layer already predicts, read three ways.

==============================  ==================================================================
:class:`TunedLens`              per-layer affine translators ``h + A_l h + b_l``, zero-initialised (= the logit lens)
:func:`train_tuned_lens`        fit them to minimise KL(final || lens): :class:`TunedLensFit`
:class:`JacobianLens`           per-layer prompt-averaged Jacobians ``J_l`` to the final residual (training-free)
:func:`fit_jacobian_lens`       estimate ``J_l`` by batched vector-Jacobian products
:func:`compare`                 per lens and layer: KL to final, top-1 agreement, top-5 overlap, loss, perplexity
:func:`diagnostics`             fidelity per lens and layer: top-k agreement, kurtosis, autocorrelation, effective dim
:func:`commitment`              per token and lens: the layer from which the final prediction is top-1 (top-3, p > 0.5)
:func:`top_tokens`              per lens, token and layer: the lens's top-1 token and its probability (the heat-map)
:func:`fingerprint`             what a stored lens remembers of its model (to refuse a stale lens)
==============================  ==================================================================

Layers follow :func:`workbench.residual.logit_lens`: layer ``l < L`` reads ``h_l``, the residual
entering block ``l`` (layer 0: the embeddings), and layer ``L`` the final residual, where every lens
is the model's own output. Every lens is read through the model's own final norm and unembedding
(its adapter's ``unembed``), so all of this works for every model an adapter of :mod:`workbench.hooks`
reads: our Transformers and residual MLPs (one "position" per example) and the Hugging Face families.

- Logit lens (nostalgebraist 2020): ``W_U norm(h_l)``.
- Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
  Lens"): ``W_U norm(h_l + A_l h_l + b_l)``; ``A_l, b_l`` start at 0 and are trained on frozen-model
  activations to minimise ``KL(p_final || p_lens)`` at the same position, with the reference's SGD.
- Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace in
  Language Models"): ``W_U norm(J_l h_l)`` with ``J_l = E_prompt[(1/|P|) sum_{t in P} sum_{t' in P}
  d h_final,t' / d h_l,t]`` (``P``: positions from ``skip_first`` on; causality leaves only
  ``t' >= t``). The logit lens is ``J = I``.

Stored lenses (:meth:`TunedLens.save`, :meth:`TunedLens.save_to_run`) are a folder with
``lens.safetensors`` and ``lens.json`` (format tag, the model's :func:`fingerprint`, the tensors'
SHA-256 and how the lens was trained), each written atomically; loading refuses a lens whose model
differs (layers, width, vocabulary, or the final norm and unembedding weights) with a message naming why.

Definitions: ``docs/definitions.md#tuned-lens``, ``#jacobian-lens``, ``#lens-diagnostics``,
``#commitment-layer``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core import checks
from ..hooks import Adapter, adapter
from .batch import (
    _as_batch,
    _chunks,
    _inference,
    _need_layers,
    _resid_stream,
    _table,
    _targets,
)
from .jacobian_lens import JacobianLens, fit_jacobian_lens
from .lens import LENS_STATS, TOKEN_CHUNK, _lens_reduce
from .lens_files import CRITERIA, LENSES, _participation_ratio, fingerprint
from .tuned_lens import TunedLens, TunedLensFit, train_tuned_lens

__all__ = ["TunedLens", "TunedLensFit", "train_tuned_lens", "JacobianLens", "fit_jacobian_lens", "compare",
           "diagnostics", "commitment", "top_tokens", "fingerprint", "LENSES", "CRITERIA"]

# ============================================================================ reading the lenses


def _readouts(ad: Adapter, tuned, jacobian) -> dict:
    """``{lens name: readout(layer, h) -> logits}`` for the logit lens and the lenses given."""
    out = {"logit": lambda l, h: ad.unembed(h)}
    if tuned is not None:
        if not isinstance(tuned, TunedLens):
            raise ValueError(f"tuned must be a TunedLens (train_tuned_lens(...).lens or TunedLens.load) or None, "
                             f"got {type(tuned).__name__}")
        tuned.check_model(ad)
        tuned.to(ad.device)
        out["tuned"] = lambda l, h: ad.unembed(tuned.transform(h, l))
    if jacobian is not None:
        if not isinstance(jacobian, JacobianLens):
            raise ValueError(f"jacobian must be a JacobianLens (fit_jacobian_lens or JacobianLens.load) or None, "
                             f"got {type(jacobian).__name__}")
        jacobian.check_model(ad)
        out["jacobian"] = lambda l, h: ad.unembed(jacobian.transport(h, l).to(h.dtype))
    return out


def _matrices(ad: Adapter, tuned, jacobian) -> dict:
    C = int(ad.readout()[0].shape[1])
    out = {"logit": lambda l: torch.eye(C)}
    if tuned is not None:
        out["tuned"] = tuned.matrix
    if jacobian is not None:
        out["jacobian"] = jacobian.matrix
    return out


def _layers(ad: Adapter, layers) -> list[int]:
    if layers is None:
        return list(range(ad.n_layers + 1))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of layers in [0, {ad.n_layers}] or None, got {layers!r}")
    return [checks.check_int("layers[]", l, 0, ad.n_layers) for l in layers]


def _start(model, what: str) -> Adapter:
    ad = adapter(model)
    _need_layers(ad, what)
    return ad


def _each_layer(ad: Adapter, readouts: dict, hs: list, logits: torch.Tensor):
    """Yield ``(lens, layer, ts, lens logits (B, t, V))`` over position chunks (bounded memory)."""
    L = ad.n_layers
    T = logits.shape[1]
    for t0 in range(0, T, TOKEN_CHUNK):
        ts = slice(t0, min(t0 + TOKEN_CHUNK, T))
        for name, fn in readouts.items():
            for l in range(L + 1):
                yield name, l, ts, (fn(l, hs[l][:, ts]) if l < L else logits[:, ts]).float()


def compare(model, x, y=None, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None, layers=None,
            per_position: bool = False, batch_size: int | None = 256) -> pd.DataFrame:
    """The lenses side by side, per layer: one tidy frame with a ``lens`` column.

    Rows ``lens`` (``"logit"`` always, ``"tuned"`` and ``"jacobian"`` when given) x ``layer``
    (``0 .. L`` or ``layers``); columns as :func:`workbench.residual.logit_lens` (``kl_to_final``,
    ``top1_agree``, ``top5_overlap``, ``loss`` on ``y``, default the next token of ``x``) plus
    ``perplexity = exp(loss)``, averaged over tokens (or per position). The logit rows are exactly
    ``logit_lens``. A stale lens (made for another model) is refused. ``docs/definitions.md#tuned-lens``.
    """
    checks.check_bool("per_position", per_position)
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "compare")
    chosen = _layers(ad, layers)
    readouts = _readouts(ad, tuned, jacobian)
    parts: dict = {}
    with _inference(ad.model):
        x = _as_batch(ad, x)
        yy = _targets(ad, x, y)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            tgt = None if yy is None else yy[sl].reshape(logits.shape[:2])
            for name, fn in readouts.items():
                _lens_reduce(ad, hs[:-1], logits, tgt, parts, key=(name,), readout=fn)
    df = _table({k: torch.cat(v) for k, v in parts.items()}, ["lens", "layer"], LENS_STATS, None, per_position)
    df["perplexity"] = np.exp(df["loss"])
    return df[df["layer"].isin(chosen)].reset_index(drop=True)


DIAGNOSTICS = ["top1_agree", "topk_agree", "kurtosis", "autocorr", "eff_dim"]


def diagnostics(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None, k: int | None = None,
                layers=None, batch_size: int | None = 256) -> pd.DataFrame:
    """Fidelity diagnostics per lens and layer (Gurnee et al. 2026), a tidy frame.

    Columns ``lens, layer, top1_agree, topk_agree, kurtosis, autocorr, eff_dim``:

    - ``topk_agree``: share of tokens whose model top-1 is among the lens's top-``k`` (default ``min(5, V)``;
      ``top1_agree``: k = 1; ``k`` is kept in ``df.attrs["k"]``);
    - ``kurtosis``: excess kurtosis of the lens logits over the vocabulary, mean over tokens
      (``E[(z - mean)^4] / var^2 - 3``; 0 for Gaussian logits, large when a few tokens stand out);
    - ``autocorr``: share of adjacent positions ``(t, t+1)`` of a sequence whose lens top-1 tokens are
      the same (NaN with one position);
    - ``eff_dim``: participation ratio ``(sum s^2)^2 / sum s^4`` of the singular values of the lens's
      linear map (``I`` for the logit lens: ``C``; ``I + A_l`` tuned; ``J_l`` Jacobian).

    ``docs/definitions.md#lens-diagnostics``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "diagnostics")
    chosen = _layers(ad, layers)
    readouts = _readouts(ad, tuned, jacobian)
    sums: dict = {}
    with _inference(ad.model):
        x = _as_batch(ad, x)
        V = int(ad.readout()[0].shape[0])
        k = min(5, V) if k is None else checks.check_int("k", k, 1, V)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)
            tops: dict = {}
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                s = sums.setdefault((name, l), dict.fromkeys(["top1", "topk", "kurt", "n_kurt", "n", "same", "pairs"], 0.0))
                top = z.topk(k, dim=-1).indices
                ft = final_top[:, ts]
                s["top1"] += float((top[..., 0] == ft).sum())
                s["topk"] += float((top == ft[..., None]).any(-1).sum())
                c = z.double() - z.double().mean(-1, keepdim=True)
                m2 = c.pow(2).mean(-1)
                kurt = c.pow(4).mean(-1) / m2.pow(2) - 3.0
                ok = m2 > 0
                s["kurt"] += float(kurt[ok].sum())
                s["n_kurt"] += float(ok.sum())
                s["n"] += ft.numel()
                tops.setdefault((name, l), []).append(top[..., 0])
            for key, parts in tops.items():
                top1 = torch.cat(parts, dim=1)                      # (B, T)
                sums[key]["same"] += float((top1[:, 1:] == top1[:, :-1]).sum())
                sums[key]["pairs"] += top1[:, 1:].numel()
    mats = _matrices(ad, tuned, jacobian)
    rows = []
    for (name, l), s in sums.items():
        if l not in chosen:
            continue
        rows.append((name, l, s["top1"] / s["n"], s["topk"] / s["n"],
                     s["kurt"] / s["n_kurt"] if s["n_kurt"] else float("nan"),
                     s["same"] / s["pairs"] if s["pairs"] else float("nan"), _participation_ratio(mats[name](l))))
    df = _by_lens(pd.DataFrame(rows, columns=["lens", "layer"] + DIAGNOSTICS), ["layer"])
    df.attrs["k"] = k
    return df


def _hits(z: torch.Tensor, final_top: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token ``(B, t)``: is the final top-1 the lens top-1, within its top-3, or above probability 0.5."""
    top3 = z.topk(min(3, z.shape[-1]), dim=-1).indices
    p = z.softmax(-1).gather(-1, final_top[..., None])[..., 0]
    return {"top1": top3[..., 0] == final_top, "top3": (top3 == final_top[..., None]).any(-1), "p50": p > 0.5}


def commitment(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None,
               batch_size: int | None = 256) -> pd.DataFrame:
    """The commitment layer of every token under every lens: the first layer from which on the model's
    final prediction (its top-1 token) is the lens's top-1 and stays so up to layer ``L``.

    Criteria: ``"top1"``; ``"top3"`` (within the lens's top 3 from there on); ``"p50"`` (lens
    probability above 0.5 from there on; never met, NaN, when the model's own probability is at most
    0.5). Tidy frame ``batch, position, lens, criterion, token, layer`` (``token``: the model's top-1;
    ``layer`` in ``0 .. L``, float, NaN = never). ``docs/definitions.md#commitment-layer``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "commitment")
    readouts = _readouts(ad, tuned, jacobian)
    L = ad.n_layers
    frames = []
    with _inference(ad.model):
        x = _as_batch(ad, x)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)                             # (B, T)
            B, T = final_top.shape
            hits: dict = {}
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                for crit, v in _hits(z, final_top[:, ts]).items():
                    hits.setdefault((name, crit, l), []).append(v)
            for name in readouts:
                for crit in CRITERIA:
                    layer = torch.full((B, T), float("nan"))
                    stays = torch.ones(B, T, dtype=torch.bool)
                    for l in range(L, -1, -1):
                        stays &= torch.cat(hits[(name, crit, l)], dim=1).cpu()
                        layer = torch.where(stays, torch.tensor(float(l)), layer)
                    bi, ti = np.meshgrid(np.arange(sl.start, sl.start + B), np.arange(T), indexing="ij")
                    frames.append(pd.DataFrame({"batch": bi.ravel(), "position": ti.ravel(), "lens": name,
                                                "criterion": crit, "token": final_top.cpu().numpy().ravel(),
                                                "layer": layer.numpy().ravel()}))
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["batch", "position"], kind="stable").reset_index(drop=True)


def top_tokens(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None,
               batch_size: int | None = 256) -> pd.DataFrame:
    """Each lens's top-1 token at every position and layer (what the lens heat-map shows).

    Tidy frame ``lens, batch, position, layer, token, prob, final_token`` (``prob``: the lens's
    probability of its top-1; ``final_token``: the model's top-1 at that position). One row per lens,
    token and layer: pass the few sequences you want to look at. ``docs/definitions.md#commitment-layer``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "top_tokens")
    readouts = _readouts(ad, tuned, jacobian)
    frames = []
    with _inference(ad.model):
        x = _as_batch(ad, x)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                p, tok = z.softmax(-1).max(-1)                        # (B, t)
                B, t = tok.shape
                bi, ti = np.meshgrid(np.arange(sl.start, sl.start + B), np.arange(ts.start, ts.start + t), indexing="ij")
                frames.append(pd.DataFrame({"lens": name, "batch": bi.ravel(), "position": ti.ravel(), "layer": l,
                                            "token": tok.cpu().numpy().ravel(), "prob": p.cpu().numpy().ravel(),
                                            "final_token": final_top[:, ts].cpu().numpy().ravel()}))
    return _by_lens(pd.concat(frames, ignore_index=True), ["batch", "position", "layer"])


def _by_lens(df: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Rows in the order logit, tuned, jacobian, then by ``then``."""
    return df.assign(_o=df["lens"].map(LENSES.index)).sort_values(["_o"] + then, kind="stable") \
        .drop(columns="_o").reset_index(drop=True)
