"""Execution strategies after Sun, Pickett et al. (2025, "Transformer Layers as Painters"): the block order of
skip, swap, reverse, shuffle, parallel and loop on a span, a model run along any block order, and accuracy
and loss per strategy and span.

Definitions: ``docs/definitions.md#execution-strategies``.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
import torch.nn as nn

from ...core import checks
from ...core import monitor as _monitor
from .runner import BlockRunner, _acc_loss, _batch_size, _chunks, _inference, _tally, _targets_for

# ============================================================================ 3. execution strategies


STRATEGIES = ("skip", "swap", "reverse", "shuffle", "parallel", "loop")
MAX_LOOP = 16              # largest loop count of the "loop" and "parallel" strategies


def _check_span(n_layers: int, start, n) -> tuple[int, int]:
    if n_layers == 0:
        raise ValueError("model: it has no blocks to reorder, got n_layers = 0")
    start = checks.check_int("start", start, 0, n_layers - 1)
    n = checks.check_int("n", n, 1, None)
    if start + n > n_layers:
        raise ValueError(f"n: the span of {n} blocks from block {start} runs past the last block {n_layers - 1} "
                         f"(n_layers = {n_layers}); n must be at most {n_layers - start}")
    return start, n


def strategy_sequence(n_layers: int, strategy: str, start: int, n: int = 2, k: int = 2, seed: int = 0) -> list:
    """The block order an execution strategy runs, on the span of ``n`` blocks ``start .. start+n-1``.

    - ``skip``: the span left out; ``swap``: blocks ``start`` and ``start+1`` exchanged (``n = 2``);
    - ``reverse``: the span in reverse order; ``shuffle``: the span in a seeded random order other than its
      own (``seed``; an identity draw is drawn again);
    - ``parallel``: every block of the span reads the same input and their outputs are averaged
      (Sun, Pickett et al. 2025, "Transformer Layers as Painters"), repeated ``k`` times (``k = 1``: plain
      parallel; more: looped parallel);
    - ``loop``: the span run ``k`` times in a row.

    Items are block indices; a parallel step is a tuple of indices. ``k`` in ``[1, 16]``. Refused with a
    message naming the argument: a span past the last block, ``swap`` with ``n != 2``, ``reverse``,
    ``shuffle`` or ``parallel`` with ``n < 2``. ``docs/definitions.md#execution-strategies``.
    """
    strategy = checks.check_choice("strategy", strategy, STRATEGIES)
    n_layers = checks.check_int("n_layers", n_layers, 0, 256)
    start, n = _check_span(n_layers, start, n)
    k = checks.check_int("k", k, 1, MAX_LOOP)
    seed = checks.check_seed("seed", seed)
    if strategy == "swap" and n != 2:
        raise ValueError(f"n: swap exchanges two adjacent blocks, so n must be 2, got {n}")
    if strategy in ("reverse", "shuffle", "parallel") and n < 2:
        raise ValueError(f"n: {strategy} needs a span of at least 2 blocks, got {n}")
    before, span, after = list(range(start)), list(range(start, start + n)), list(range(start + n, n_layers))
    if strategy == "skip":
        mid: list = []
    elif strategy in ("swap", "reverse"):
        mid = span[::-1]
    elif strategy == "shuffle":
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g).tolist()
        while perm == list(range(n)):            # a new order: the identity is drawn again
            perm = torch.randperm(n, generator=g).tolist()
        mid = [span[i] for i in perm]
    elif strategy == "parallel":
        mid = [tuple(span)] * k
    else:
        mid = span * k
    return before + mid + after


def sequence_label(sequence) -> str:
    """A readable block order: ``"0 1 (2|3) 4"`` (a parallel step in parentheses); ``"-"`` for none."""
    parts = ["(" + "|".join(map(str, it)) + ")" if isinstance(it, tuple) else str(it) for it in sequence]
    return " ".join(parts) if parts else "-"


def _check_sequence(sequence, n_layers: int) -> list:
    if isinstance(sequence, (str, bytes)) or not isinstance(sequence, Iterable):
        raise ValueError(f"sequence must be a list of block indices (or tuples of them, run in parallel), "
                         f"got {sequence!r:.80}")
    out = []
    for i, it in enumerate(sequence):
        if isinstance(it, (tuple, list)):
            if not it:
                raise ValueError(f"sequence[{i}]: a parallel step needs at least one block")
            out.append(tuple(checks.check_int(f"sequence[{i}][]", v, 0, n_layers - 1) for v in it))
        else:
            out.append(checks.check_int(f"sequence[{i}]", it, 0, n_layers - 1))
    if len(out) > 16 * 256:
        raise ValueError(f"sequence has {len(out)} steps; at most {16 * 256}")
    return out


def run_sequence(model: nn.Module, x, sequence) -> torch.Tensor:
    """Logits ``(B, T, V)`` (vector models ``(B, K)``) of ``model`` run along ``sequence`` instead of its own order.

    ``sequence``: block indices, each may appear any number of times or not at all; a tuple runs its
    blocks in parallel on the same input and averages their outputs. ``list(range(L))`` is the model's own
    forward. Eval mode, no gradients; ``model`` is not changed. ``docs/definitions.md#execution-strategies``.
    """
    run = BlockRunner(model)
    seq = _check_sequence(sequence, run.n_layers)
    with _inference(run.model):
        xb = run.batch(x)
        out = run.logits(run.run(seq, run.begin(xb)))
    return out if run.ad.family == "transformer" else out[:, 0]


def _default_spans(strategy: str, L: int) -> list[tuple[int, int]]:
    if strategy == "swap":
        return [(s, 2) for s in range(L - 1)]
    lo = 1 if strategy in ("skip", "loop") else 2
    return [(s, n) for n in range(lo, L + 1) for s in range(L - n + 1)]


def strategies(model: nn.Module, x, y=None, strategies=STRATEGIES, spans=None, k: int = 2, seed: int = 0,
               batch_size: int | None = 256, monitor=None) -> pd.DataFrame:
    """Accuracy and loss of ``model`` run under each execution strategy on each span: one forward each.

    ``spans``: ``(start, n)`` pairs (default: for ``swap`` every adjacent pair, for ``skip``/``loop`` every
    span, for the others every span of at least 2 blocks; spans a strategy cannot take are left out of the
    default, refused when given). ``y``: targets ``(B, T)`` with ``IGNORE`` at unscored positions (default
    for sequences: the next token), labels ``(B,)`` for vector models. The first row is the model's own
    order (``strategy = "full"``). Returns ``strategy, start, n, k, order, length, acc, loss`` (``length``:
    block applications, a parallel step counting its blocks). ``docs/definitions.md#execution-strategies``.
    """
    mon = _monitor.resolve(monitor)
    run = BlockRunner(model)
    L = run.n_layers
    names = list(checks.check_choices("strategies", strategies, STRATEGIES))
    k = checks.check_int("k", k, 1, MAX_LOOP)
    seed = checks.check_seed("seed", seed)
    batch_size = _batch_size(batch_size)
    if L == 0:
        raise ValueError("model: it has no blocks to reorder, got n_layers = 0")
    plan = [("full", 0, L, 1, list(range(L)))]
    for s in names:
        if spans is None:
            chosen = _default_spans(s, L)
        else:
            if isinstance(spans, (str, bytes)) or not isinstance(spans, Iterable):
                raise ValueError(f"spans must be a list of (start, n) pairs, got {spans!r:.80}")
            chosen = []
            for i, sp in enumerate(spans):
                if not isinstance(sp, (tuple, list)) or len(sp) != 2:
                    raise ValueError(f"spans[{i}] must be a (start, n) pair, got {sp!r:.80}")
                chosen.append((sp[0], sp[1]))
        for start, n in chosen:
            kk = k if s in ("loop", "parallel") else 1
            plan.append((s, int(start), int(n), kk, strategy_sequence(L, s, start, n, kk, seed)))
    rows = []
    with _inference(run.model):
        xb = run.batch(x)
        tgt = _targets_for(run, xb, y)
        chunks = list(_chunks(len(xb), batch_size))
        starts = [run.begin(xb[sl]) for sl in chunks] if len(chunks) == 1 else None
        for j, (s, start, n, kk, seq) in enumerate(plan):
            if mon.stopped:
                break
            parts = []
            for c, sl in enumerate(chunks):
                h0 = starts[c] if starts is not None else run.begin(xb[sl])
                parts.append(_tally(run, run.run(seq, h0), tgt[sl]))
            acc, loss = _acc_loss(parts)
            length = sum(len(it) if isinstance(it, tuple) else 1 for it in seq)
            rows.append((s, start, n, kk, sequence_label(seq), length, acc, loss))
            mon.report((j + 1) / len(plan), f"{s} {start}..{start + n - 1}")
    return pd.DataFrame(rows, columns=["strategy", "start", "n", "k", "order", "length", "acc", "loss"])
