"""Causal tracing (ROME) and attribution patching, for our Transformers and every adapter family.

=================================  ==================================================================
:func:`causal_trace`               noise the subject, restore one clean state (or a window of MLP /
                                   attention outputs): indirect effect per (position, layer): :class:`Trace`
:func:`attribution_patching`       first-order estimate of :func:`workbench.residual.patch` per (layer,
                                   position) from one backward (``"atp"``) or along the path (``"ig"``)
:func:`compare_patching`           exact patching, AtP and AtP-IG on one grid with their rank correlation
=================================  ==================================================================

Both reuse the site replacement of :func:`workbench.residual.patch` (``resid_pre``, ``attn_out``,
``mlp_out``), so they run wherever patching runs.

- Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ``kmeng01/rome``
  ``experiments/causal_trace.py``): Gaussian noise, ``noise`` times the standard deviation of the
  token embeddings at the subject, is added to the embeddings of the subject positions in ``samples``
  copies of the prompt (seeded; the same noise for every cell); the probability of the answer at the
  last position, averaged over the copies, falls from ``p_clean`` to ``p_corrupt``. One clean state is
  then restored -- the residual leaving block ``l`` at position ``t`` (``kind="resid"``), or the MLP or
  attention outputs of the ``window`` blocks centred on ``l`` at ``t`` -- and the indirect effect is
  ``p_restored - p_corrupt``.
- Attribution patching (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms Automated
  Circuit Discovery"): the change of the metric when site ``a`` at one position takes its clean value
  in the corrupt run is estimated to first order as ``(a_clean - a_corrupt) . dm/da``, the gradient taken
  on the corrupt run: one forward and one backward for every site and position at once. The
  integrated-gradients version (Hanna et al. 2024, EAP-IG) averages the gradient over ``steps`` points
  on the straight path between the corrupt and the clean input embeddings. Both are exact when the
  metric is affine in the site.

Definitions: ``docs/definitions.md#causal-tracing``, ``#attribution-patching``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from ..hooks import Adapter, adapter, record
from .batch import EPS, _as_batch, _inference, _logits, _need_layers
from .interventions import PATCH_SITES, _site_replacer, patch

__all__ = ["TRACE_KINDS", "Trace", "causal_trace", "attribution_patching", "PatchingComparison", "compare_patching"]

TRACE_KINDS = ("resid", "mlp", "attn")
_KIND_SITE = {"mlp": "mlp_out", "attn": "attn_out"}
MAX_ROWS = 256   # rows of one batched tracing forward (cells x samples)


def _sequence_adapter(model, what: str) -> Adapter:
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError(f"model: {what} needs a sequence model (token positions); a {type(ad.model).__name__} "
                         "takes vectors")
    _need_layers(ad, what)
    return ad


# ============================================================================ causal tracing


@dataclass
class Trace:
    """The result of :func:`causal_trace`.

    ``effects``: tidy ``position, layer, prob, effect`` (``effect = prob - corrupt``); ``clean`` /
    ``corrupt``: the answer's probability on the clean prompt and under noise (mean over the samples);
    ``answer``: its token id; ``subject``: ``(start, end)`` positions noised; ``kind``: ``resid``, ``mlp``
    or ``attn``; ``window``: blocks restored together (1 for ``resid``); ``noise_std``: the noise's
    standard deviation; ``tokens``: one label per position."""

    effects: pd.DataFrame
    clean: float
    corrupt: float
    answer: int
    subject: tuple[int, int]
    kind: str
    window: int
    noise_std: float
    samples: int
    tokens: list[str] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """The effects with the run's constants as columns (``kind, clean, corrupt``)."""
        df = self.effects.copy()
        df["kind"] = self.kind
        df["clean"] = self.clean
        df["corrupt"] = self.corrupt
        return df


def _window(layer: int, n_layers: int, window: int) -> range:
    """ROME's window: ``[l - w // 2, l + ceil(w / 2))`` clipped to the blocks."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


class _Tracer:
    """Batched noisy forwards of one prompt: ``G`` groups of ``S`` noisy copies, group ``g`` restoring
    its own clean states (position ``t_g``)."""

    def __init__(self, ad: Adapter, x: torch.Tensor, subject: tuple[int, int], answer: int, noise: torch.Tensor,
                 clean: dict):
        self.ad, self.x, self.subject, self.answer = ad, x, subject, answer
        self.noise = noise              # (S, n_subject, C)
        self.clean = clean              # {(site, layer): (1, T, C)}

    def prob(self, restores: list[list[tuple[str, int, int]]]) -> np.ndarray:
        """For each group, a list of ``(site, layer, position)`` to restore: the answer's probability at
        the last position, averaged over the noisy copies ``(G,)``."""
        ad, S = self.ad, self.noise.shape[0]
        G = len(restores)
        s, e = self.subject
        xs = self.x.expand(G * S, -1)

        def add_noise(h):
            h = h.clone()
            h[:, s:e] = (h[:, s:e].reshape(G, S, e - s, -1) + self.noise.to(h.dtype)).reshape(G * S, e - s, -1)
            return h

        by_site: dict = {}
        for g, states in enumerate(restores):
            for site, layer, t in states:
                by_site.setdefault((site, layer), []).append((g, t))

        def restorer(key, cells):
            src = self.clean[key][0]                                   # (T, C)
            groups = torch.tensor([g for g, _ in cells], device=ad.device)
            pos = torch.tensor([t for _, t in cells], device=ad.device)

            def put(h):
                h = h.clone()
                v = h.view(G, S, *h.shape[1:])
                v[groups, :, pos] = src[pos].to(h.dtype)[:, None]
                return h
            return put

        with contextlib.ExitStack() as stack:
            stack.enter_context(_site_replacer(ad, "resid_pre", 0, add_noise))
            for (site, layer), cells in by_site.items():
                stack.enter_context(_site_replacer(ad, site, layer, restorer((site, layer), cells)))
            logits = _logits(ad, xs)
        p = logits[:, -1].float().softmax(-1)[:, self.answer]
        return p.view(G, S).mean(1).cpu().numpy()


def _restores(kind: str, layer: int, position: int, n_layers: int, window: int) -> list[tuple[str, int, int]]:
    if kind == "resid":   # the residual leaving block l = the input of block l + 1 (l = L - 1: the final residual)
        return [("resid_pre", layer + 1, position)]
    return [(_KIND_SITE[kind], l, position) for l in _window(layer, n_layers, window)]


def causal_trace(model: nn.Module, tokens, subject, answer: int | None = None, kind: str = "resid",
                 samples: int = 10, noise: float = 3.0, window: int = 10, seed: int = 0, labels=None,
                 monitor=None) -> Trace:
    """Causal tracing (ROME) of one prompt ``tokens`` ``(T,)`` or ``(1, T)``: the indirect effect of
    restoring each clean state on the answer's probability under a noised subject.

    ``subject``: ``(start, end)``, the positions ``start <= t < end`` whose embeddings get noise;
    ``answer``: token id (default: the clean top-1 at the last position); ``kind``: ``"resid"`` (the
    residual leaving block ``l``), ``"mlp"`` or ``"attn"`` (the outputs of the ``window`` blocks centred
    on ``l``, as in ROME); ``samples``: noisy copies; ``noise``: the noise's standard deviation as a
    multiple of the embeddings' (``3``: ROME's "s3"), the embeddings' standard deviation measured over
    the subject's token embeddings (``embed_out``); ``seed``: the noise. ``labels``: one string per position.
    Cost: ``L x T`` cells of ``samples`` rows, batched up to ``MAX_ROWS`` rows a forward. Stops early
    on ``monitor.stopped`` (the cells done). See ``docs/definitions.md#causal-tracing``."""
    ad = _sequence_adapter(model, "causal_trace")
    kind = checks.check_choice("kind", kind, TRACE_KINDS)
    samples = checks.check_int("samples", samples, 1, 1000)
    noise = checks.check_float("noise", noise, 0.0, 1e6)
    window = checks.check_int("window", window, 1, 1024)
    seed = checks.check_seed("seed", seed)
    mon = _monitor.resolve(monitor)
    x = _as_batch(ad, tokens, "tokens")
    if x.shape[0] != 1:
        raise ValueError(f"tokens must be one prompt (T,) or (1, T), got shape {tuple(x.shape)}")
    T, L = x.shape[1], ad.n_layers
    if not isinstance(subject, (tuple, list)) or len(subject) != 2:
        raise ValueError(f"subject must be a pair (start, end) of positions with 0 <= start < end <= {T}, "
                         f"got {subject!r}")
    s = checks.check_int("subject[0]", subject[0], 0, T - 1)
    e = checks.check_int("subject[1]", subject[1], s + 1, T)
    from .attention import _labels
    names = _labels(ad, x, labels)
    if kind == "resid":
        window = 1
        sites = ["blocks.*.resid_post"]
    else:
        sites = [f"blocks.*.{_KIND_SITE[kind]}"]
    with _inference(ad.model):
        with record(ad, names=sites + ["embed_out"]) as cache:
            lc = _logits(ad, x)
        clean = {}
        for l in range(L):
            if kind == "resid":
                clean[("resid_pre", l + 1)] = cache[f"blocks.{l}.resid_post"]
            else:
                clean[(_KIND_SITE[kind], l)] = cache[f"blocks.{l}.{_KIND_SITE[kind]}"]
        emb = cache["embed_out"]
        emb = emb if emb.dim() == 3 else emb[None]
        V = lc.shape[-1]
        a = int(lc[0, -1].argmax()) if answer is None else checks.check_int("answer", answer, 0, V - 1)
        p_clean = float(lc[0, -1].float().softmax(-1)[a])
        std = float(emb[0, s:e].float().std(unbiased=False))
        C = emb.shape[-1]
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((samples, e - s, C), generator=g).to(ad.device) * (noise * std)
        tracer = _Tracer(ad, x, (s, e), a, z, clean)
        p_corrupt = float(tracer.prob([[]])[0])
        cells = [(l, t) for l in range(L) for t in range(T)]
        per = max(1, MAX_ROWS // samples)
        rows = []
        for i in range(0, len(cells), per):
            if mon.stopped:
                break
            chunk = cells[i:i + per]
            probs = tracer.prob([_restores(kind, l, t, L, window) for l, t in chunk])
            rows.extend((t, l, float(p), float(p) - p_corrupt) for (l, t), p in zip(chunk, probs))
            mon.report(min(1.0, (i + len(chunk)) / len(cells)), f"causal trace: {i + len(chunk)} of {len(cells)} cells")
    effects = pd.DataFrame(rows, columns=["position", "layer", "prob", "effect"]).sort_values(
        ["position", "layer"]).reset_index(drop=True)
    return Trace(effects, p_clean, p_corrupt, a, (s, e), kind, window, noise * std, samples, names)


# ============================================================================ attribution patching


def _answers(answer, lc: torch.Tensor, lk: torch.Tensor):
    """``(a, b)`` ``(B,)`` token ids as :func:`workbench.residual.patch` takes them."""
    B, V = lc.shape[0], lc.shape[-1]
    if answer is None:
        return lc[:, -1].argmax(-1), lk[:, -1].argmax(-1)
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise ValueError(f"answer must be None or a pair (clean_id, corrupt_id), got {answer!r}")
    return tuple(torch.full((B,), checks.check_int(f"answer[{i}]", v, 0, V - 1), device=lc.device)
                 for i, v in enumerate(answer))


def _site_layers(ad: Adapter, site: str) -> list[int]:
    return list(range(ad.n_layers + 1)) if site == "resid_pre" else list(range(ad.n_layers))


def _record_names(ad: Adapter, site: str) -> list[str]:
    L = ad.n_layers
    return ["blocks.*.resid_pre", f"blocks.{L - 1}.resid_post"] if site == "resid_pre" else [f"blocks.*.{site}"]


def _site_acts(ad: Adapter, site: str, cache) -> dict[int, torch.Tensor]:
    L = ad.n_layers
    return {l: cache[f"blocks.{L - 1}.resid_post" if l == L else f"blocks.{l}.{site}"] for l in _site_layers(ad, site)}


def _gradients(ad: Adapter, x: torch.Tensor, site: str, metric, h0: torch.Tensor | None = None) -> dict:
    """``{layer: dm/da (B, T, C)}`` at every layer of ``site`` on the run of ``x`` (block 0's input set
    to ``h0`` when given), from one backward. Each activation ``a`` is replaced by ``a + delta`` with a
    zero ``delta`` that requires a gradient, so the gradient flows on to earlier sites."""
    deltas: dict = {}

    def add(layer):
        def fn(h):
            d = torch.zeros_like(h, requires_grad=True)
            deltas[layer] = d
            return h + d
        return fn

    with contextlib.ExitStack() as stack, torch.enable_grad():
        if h0 is not None:
            stack.enter_context(_site_replacer(ad, "resid_pre", 0, lambda h: h0.to(h.dtype)))
        for l in _site_layers(ad, site):
            stack.enter_context(_site_replacer(ad, site, l, add(l)))
        m = metric(_logits(ad, x))
        layers = sorted(deltas)
        grads = torch.autograd.grad(m, [deltas[l] for l in layers], allow_unused=True)
    return {l: (torch.zeros_like(deltas[l]) if g is None else g) for l, g in zip(layers, grads)}


ATP_METHODS = ("atp", "ig")


def attribution_patching(model: nn.Module, clean, corrupt, answer=None, site: str = "resid_pre",
                         method: str = "atp", steps: int = 16) -> pd.DataFrame:
    """Attribution patching: the first-order estimate of :func:`workbench.residual.patch`'s recovery.

    Returns ``layer, position, recovery`` on patch's grid, with
    ``recovery = (a_clean - a_corrupt) . g / (m(clean) - m(corrupt))`` summed over the batch and the
    width at each (layer, position); ``m`` and ``answer`` as in :func:`workbench.residual.patch` (batch-mean
    logit difference at the last position). ``method="atp"``: ``g = dm/da`` on the corrupt run (one
    backward for the whole grid); ``"ig"``: ``g`` averaged over ``steps`` runs whose block-0 input is
    ``h_corrupt + alpha (h_clean - h_corrupt)``, ``alpha = (k + 1/2) / steps`` (the midpoint rule; EAP-IG
    on the input embeddings). Exact when ``m`` is affine in the site. See
    ``docs/definitions.md#attribution-patching``."""
    ad = _sequence_adapter(model, "attribution_patching")
    checks.check_choice("site", site, PATCH_SITES)
    method = checks.check_choice("method", method, ATP_METHODS)
    steps = checks.check_int("steps", steps, 1, 1024)
    L = ad.n_layers
    with _inference(ad.model):
        xc, xk = _as_batch(ad, clean, "clean"), _as_batch(ad, corrupt, "corrupt")
        if xc.shape != xk.shape:
            raise ValueError(f"clean and corrupt must have the same shape, got {tuple(xc.shape)} and {tuple(xk.shape)}")
        names = _record_names(ad, site) + ["blocks.0.resid_pre"]
        with record(ad, names=names) as cache:
            lc = _logits(ad, xc)
        ac, h0c = _site_acts(ad, site, cache), cache["blocks.0.resid_pre"]
        with record(ad, names=names) as cache:
            lk = _logits(ad, xk)
        ak, h0k = _site_acts(ad, site, cache), cache["blocks.0.resid_pre"]
        a, b = _answers(answer, lc, lk)
        idx = torch.arange(len(xc), device=ad.device)

        def metric(logits):
            z = logits[:, -1].float()
            return (z[idx, a] - z[idx, b]).mean()
        den = float(metric(lc) - metric(lk))
        if method == "atp":
            grads = _gradients(ad, xk, site, metric)
        else:
            grads = None
            for k in range(steps):
                alpha = (k + 0.5) / steps
                g = _gradients(ad, xk, site, metric, h0k + alpha * (h0c - h0k))
                grads = g if grads is None else {l: grads[l] + g[l] for l in g}
            grads = {l: v / steps for l, v in grads.items()}
    rows = []
    for l in _site_layers(ad, site):
        est = ((ac[l].float() - ak[l].float()) * grads[l].float()).sum((0, 2))       # (T,)
        for t, v in enumerate(est.tolist()):
            rows.append((l, t, v / den if abs(den) > EPS else float("nan")))
    return pd.DataFrame(rows, columns=["layer", "position", "recovery"])


@dataclass
class PatchingComparison:
    """Exact patching beside its attribution estimates (:func:`compare_patching`).

    ``grid``: tidy ``site, layer, position, method, recovery`` (``method``: ``exact``, ``atp``, ``ig``);
    ``correlation``: ``site, method, spearman, pvalue, n`` -- Spearman's rank correlation of each
    estimate with the exact recovery over the grid's cells (NaN cells left out)."""

    grid: pd.DataFrame
    correlation: pd.DataFrame

    def frame(self) -> pd.DataFrame:
        """The grid with the estimates beside the exact value: ``site, layer, position, exact, atp, ig``."""
        wide = self.grid.pivot_table(index=["site", "layer", "position"], columns="method", values="recovery",
                                     aggfunc="first", dropna=False).reset_index()
        wide.columns.name = None
        return wide


def compare_patching(model: nn.Module, clean, corrupt, answer=None, sites=("resid_pre",), steps: int = 16,
                     monitor=None) -> PatchingComparison:
    """:func:`workbench.residual.patch` (exact, one forward per cell), :func:`attribution_patching` and
    its integrated-gradients version on the same grid, per site, with Spearman's rank correlation of
    each estimate with the exact recovery (``scipy.stats.spearmanr``). Stops early on
    ``monitor.stopped`` (the sites done). See ``docs/definitions.md#attribution-patching``."""
    from scipy.stats import spearmanr

    mon = _monitor.resolve(monitor)
    sites = checks.check_choices("sites", list(sites) if isinstance(sites, tuple) else sites, PATCH_SITES)
    steps = checks.check_int("steps", steps, 1, 1024)
    grids, corr = [], []
    for i, site in enumerate(sites):
        if mon.stopped:
            break
        parts = {"exact": patch(model, clean, corrupt, answer, site),
                 "atp": attribution_patching(model, clean, corrupt, answer, site, "atp"),
                 "ig": attribution_patching(model, clean, corrupt, answer, site, "ig", steps)}
        for method, df in parts.items():
            grids.append(df.assign(site=site, method=method))
        exact = parts["exact"]["recovery"].to_numpy()
        for method in ("atp", "ig"):
            est = parts[method]["recovery"].to_numpy()
            ok = np.isfinite(exact) & np.isfinite(est)
            if ok.sum() >= 3 and np.ptp(exact[ok]) > 0 and np.ptp(est[ok]) > 0:
                r = spearmanr(exact[ok], est[ok])
                rho, pv = float(r.statistic), float(r.pvalue)
            else:
                rho = pv = float("nan")
            corr.append((site, method, rho, pv, int(ok.sum())))
        mon.report((i + 1) / len(sites), f"patching compared at {site}")
    cols = ["site", "layer", "position", "method", "recovery"]
    grid = pd.concat(grids, ignore_index=True)[cols] if grids else pd.DataFrame(columns=cols)
    return PatchingComparison(grid, pd.DataFrame(corr, columns=["site", "method", "spearman", "pvalue", "n"]))
