"""Interventions on the residual stream: integrated gradients per layer, token erasure, linear maps between
the layers of two models, and activation patching.

Definitions: ``docs/definitions.md#integrated-gradients``, ``#erasure``, ``#layer-map``, ``#patching``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..hooks import Adapter, adapter, record
from .batch import (
    EPS,
    _as_batch,
    _inference,
    _last_target,
    _logits,
    _need_layers,
    _rel,
    _resid_stream,
)
from .skip import (
    _block_outputs,
    _cached_blocks,
    _distinct_blocks,
    _readout_is_unembed,
    _replace_input,
    _replace_output,
    _run_blocks,
)


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
    from ..hooks.adapters.native import NativeAdapter
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
