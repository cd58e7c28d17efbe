"""The depth report: every analysis at once, reduced layer by layer as the forward runs, and the estimate
of its memory and time shown before it starts.

Definitions: ``docs/definitions.md#residual-memory``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..hooks import Adapter, adapter
from .batch import _as_batch, _facts, _inference, _need_layers, _out_size
from . import attention, lenses
from .contributions import contributions
from .interventions import erase, integrated_gradients, patch
from .lens import TOKEN_CHUNK, logit_lens
from .skip import _run_blocks, depth_score, depth_vs_difficulty, skip_effects

ESTIMATE_ANALYSES = ["forward", "contributions", "logit_lens", "skip_effects", "integrated_gradients", "patch",
                     "report"]
# Costs beyond the matrix products, fitted once against timed runs (bench/bench_residual.py): log-softmax
# equivalents per (token, vocabulary entry) of the lens statistics per layer, of the skip comparison per skipped
# layer and of erasure's output comparison; a backward pass (input gradients only) in forwards: through the
# blocks' matrix products, and through attention (the kernels' backward recomputes the scores: 2.7x on CPU).
LENS_PASSES, SKIP_PASSES, ERASE_PASSES, BACKWARD, ATTENTION_BACKWARD = 2.6, 1.0, 12.0, 1.1, 2.7
_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> measured speeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rates(ad: Adapter, n_tokens: int) -> dict:
    """This machine's speed on this model, measured on the model itself once per process, model, device,
    dtype and thread count: the blocks' forward on ``n = min(n_tokens, 128)`` tokens (one sequence)
    gives ``blocks`` (FLOP/s), the unembedding of ``n`` residuals ``readout`` (FLOP/s) and of
    ``TOKEN_CHUNK`` of them ``readout_chunk`` (the lens' blocks), a log-softmax of that output
    ``softmax`` (elements/s). Each the median of three calls after a warm-up on 8 tokens: about 1 s for
    GPT-2 small on two CPU cores."""
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
        times = []
        for _ in range(3):          # the median: one burst of another process's work does not set the rate
            _sync(dev)
            t = time.perf_counter()
            out = fn()
            _sync(dev)
            times.append(time.perf_counter() - t)
        return sorted(times)[1], out
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
    """Matrix-product FLOPs of one forward on ``n_tokens`` tokens in sequences of ``T``: ``blocks`` (the sum
    of ``matrices``, ``2 x`` the blocks' weight entries per token, and ``attention``, ``4 T C`` per token and
    layer: scores and values over the whole sequence, as the kernels compute them with a causal mask) and
    ``readout`` (``2 C V`` per token)."""
    w, _ = ad.readout()
    V, C = int(w.shape[0]), int(w.shape[1])
    matrices = sum(p.numel() for l in range(ad.n_layers) for p in ad.block(l).parameters() if p.dim() >= 2)
    attention = 4 * T * C * n_tokens * ad.n_layers if ad.family == "transformer" else 0
    return {"blocks": 2 * matrices * n_tokens + attention, "matrices": 2 * matrices * n_tokens,
            "attention": attention, "readout": 2 * C * V * n_tokens}


def estimate(model: nn.Module, n_tokens: int, analysis: str = "report", steps: int | None = None) -> dict:
    """Rough cost of an analysis on ``n_tokens`` tokens: ``{"bytes": peak bytes above the model, "seconds": ...,
    "forwards": ..., "flops": ...}``.

    Bytes: float32 activations (attention scores ``H x T^2`` per sequence of the context length, a few
    ``tokens x C`` residuals, the ``tokens x V`` output) plus what the analysis keeps.

    Seconds: the matrix products counted from the model (``2 x`` the blocks' weight entries per token,
    ``4 T C`` per token and layer for attention over sequences of ``T`` tokens, ``2 C V`` per token
    and readout) at the speeds this machine reaches on the model itself (:func:`_rates`: a forward on up
    to 128 tokens, measured once), plus the passes over the ``tokens x V`` outputs that the statistics
    make, at the measured log-softmax speed. What each
    analysis runs: contributions one forward; the lens one forward and ``L`` more readouts; skip effects
    one forward, then for layer ``s`` the blocks after it and a readout; IG per layer ``l`` and step a
    forward and backward of the blocks from ``l`` (readout of the last position only); erasure two
    forwards; patching ``(L + 1) x T`` forwards; the report: all but patching, plus the lens comparison (a second lens
    pass) and two forwards for the head scores and the attention pattern. ``steps``: IG steps (default:
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
    backward = f["matrices"] * BACKWARD + f["attention"] * ATTENTION_BACKWARD    # one backward pass, in FLOPs
    outputs = n_tokens * V          # entries of the tokens x V output
    r = _rates(ad, n_tokens)

    def cost(block_passes=0.0, readouts=0.0, softmaxes=0.0, chunked_readouts=0.0, backward_passes=0.0):
        flops = block_passes * blocks + (readouts + chunked_readouts) * readout + backward_passes * backward
        return flops, (block_passes * blocks + backward_passes * backward) / r["blocks"] + \
            readouts * readout / r["readout"] + chunked_readouts * readout / r["readout_chunk"] + \
            softmaxes * outputs / r["softmax"]
    parts = {"forward": cost(1, 1), "contributions": cost(1, 1),
             "logit_lens": cost(1, 1, LENS_PASSES * (L + 1), chunked_readouts=L),
             "skip_effects": cost(1 + (L - 1) / 2, L + 1, SKIP_PASSES * L),
             "integrated_gradients": cost(1 + steps * (L + 1) / 2, 1, backward_passes=steps * (L + 1) / 2),
             "erase": cost(2, 2, ERASE_PASSES),
             "patch": cost((L + 1) * T, (L + 1) * T)}
    if analysis == "report":
        # besides the analyses: the lens comparison (another lens pass), the head scores and one pattern
        # (a forward each, with the attention weights computed explicitly)
        chosen = [parts[k] for k in ("contributions", "logit_lens", "logit_lens", "skip_effects",
                                     "integrated_gradients", "erase", "forward", "forward")]
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
    ``corrupt``), ``depth_vs_difficulty`` (empty without ``sets``), ``title``; the lenses and attention:
    ``lenses`` (:func:`workbench.lenses.compare`: the logit lens, and the tuned lens when one was given),
    ``lens_tokens`` and ``commitment`` (:func:`workbench.lenses.top_tokens` and
    :func:`~workbench.lenses.commitment` of the first prompt), ``head_scores``
    (:func:`workbench.attention.head_scores` on repeated random tokens) and ``attention`` (the pattern of
    block ``attention_layer`` on the first prompt, :meth:`workbench.attention.Pattern.frame`).
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
    lenses: pd.DataFrame = field(default_factory=pd.DataFrame)
    lens_tokens: pd.DataFrame = field(default_factory=pd.DataFrame)
    commitment: pd.DataFrame = field(default_factory=pd.DataFrame)
    head_scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    attention: pd.DataFrame = field(default_factory=pd.DataFrame)
    attention_layer: int | None = None

    def tables(self) -> dict:
        return {k: getattr(self, k) for k in ("contributions", "lens", "skip", "skip_output", "ig", "erasure",
                                               "patching", "depth_vs_difficulty", "lenses", "lens_tokens",
                                               "commitment", "head_scores", "attention")}


def report(model: nn.Module, inputs, corrupt=None, sets: dict | None = None, steps: int = 16,
           erase_layer: int = 0, erase_position: int = 0, title: str = "Depth report",
           batch_size: int | None = 256, tuned=None, attention_layer: int | None = 0,
           labels=None) -> DepthReport:
    """Every depth analysis of ``model`` on the prompt set ``inputs`` (token batch ``(B, T)``) at once.

    Skip effects with the max over tokens (as the paper), depth score from their ``l2`` output
    effect, integrated gradients with ``steps``, erasure of ``(erase_layer, erase_position)``,
    patching when ``corrupt`` (same shape as ``inputs``) is given, and depth vs difficulty for
    ``sets`` (see :func:`depth_vs_difficulty`). The lenses compared per layer (the logit lens, and
    ``tuned``, a :class:`workbench.lenses.TunedLens` of this model, when given), the lens heat-map and
    commitment layers of the first prompt, the head-type scores and the attention pattern of block
    ``attention_layer`` (None: none) on the first prompt, its positions named by ``labels`` (one string per
    position; default the model's vocabulary, else the ids). See :class:`DepthReport`.
    """
    ad = adapter(model)
    if ad.family != "transformer":
        raise ValueError("report needs a sequence model (token positions)")
    _need_layers(ad, "report")
    title = checks.check_str("title", title, 200)
    x = _as_batch(ad, inputs, "inputs")
    checks.check_int("erase_layer", erase_layer, 0, ad.n_layers - 1)
    checks.check_int("erase_position", erase_position, 0, x.shape[1] - 1)
    if attention_layer is not None:
        checks.check_int("attention_layer", attention_layer, 0, ad.n_layers - 1)
    contrib = contributions(ad, x, batch_size=batch_size)
    lens = logit_lens(ad, x, batch_size=batch_size)
    sk = skip_effects(ad, x, reduce="max", batch_size=batch_size)
    ig = integrated_gradients(ad, x, steps=steps)
    er = erase(ad, x, erase_layer, erase_position).residual
    pt = patch(ad, x, corrupt) if corrupt is not None else pd.DataFrame(columns=["layer", "position", "recovery"])
    dvd = (depth_vs_difficulty(ad, sets, batch_size=batch_size) if sets
           else pd.DataFrame(columns=["difficulty", "n_examples", "depth_score"]))
    first = x[:1]
    views = {"lenses": lenses.compare(ad, x, tuned=tuned, batch_size=batch_size),
             "lens_tokens": lenses.top_tokens(ad, first, tuned=tuned),
             "commitment": lenses.commitment(ad, first, tuned=tuned),
             "head_scores": attention.head_scores(ad)}
    if attention_layer is not None:
        views["attention"] = attention.pattern(ad, first, attention_layer, labels=labels).frame()
    return DepthReport(contrib, lens, sk.heatmap, sk.output, ig, depth_score(sk), er, pt, dvd, ad.n_layers, title,
                       attention_layer=attention_layer, **views)
