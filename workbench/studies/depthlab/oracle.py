"""Oracle depth per example after CoLa (Li et al. 2025): the shortest chain of blocks (skips and repeats)
that still answers an example correctly, searched exhaustively up to :data:`EXHAUSTIVE_MAX` blocks and
greedily beyond; k-hop examples of several hop counts in one dataset to read it against difficulty.

Definitions: ``docs/definitions.md#oracle-depth``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ...core import checks
from ...core import monitor as _monitor
from ...core.data import IGNORE
from ...residual.batch import _tokens
from .runner import BlockRunner, _inference, _targets_for

# ============================================================================ 4. oracle depth per example


EXHAUSTIVE_MAX = 6         # oracle_depth searches every chain up to this depth, greedily beyond


@dataclass
class Oracle:
    """Result of :func:`oracle_depth`.

    ``examples``: one row per example: ``example, hops, full_correct, oracle_length, chain`` (``oracle_length``
    NaN and ``chain`` empty when no chain of the search space answers it). ``method``: ``"exhaustive"`` or
    ``"greedy"``; ``n_chains``: chains evaluated; ``n_layers``: ``L``.
    """

    examples: pd.DataFrame
    method: str
    n_chains: int
    n_layers: int

    def histogram(self) -> pd.DataFrame:
        """``hops, oracle_length, count, share`` (share within the hop count; ``oracle_length`` -1: no chain)."""
        df = self.examples.assign(oracle_length=self.examples["oracle_length"].fillna(-1).astype(int))
        out = df.groupby(["hops", "oracle_length"]).size().rename("count").reset_index()
        out["share"] = out["count"] / out.groupby("hops")["count"].transform("sum")
        return out

    def summary(self) -> pd.DataFrame:
        """Per hop count: ``n, full_acc, mean_oracle_length, shorter_share`` (share of the examples the full
        model answers that a shorter chain also answers) and ``fixed_share`` (share of those it gets wrong
        that some chain answers): CoLa's two claims."""
        rows = []
        for hops, g in self.examples.groupby("hops"):
            right, wrong = g[g["full_correct"]], g[~g["full_correct"]]
            rows.append((hops, len(g), float(g["full_correct"].mean()), float(g["oracle_length"].mean()),
                         float((right["oracle_length"] < self.n_layers).mean()) if len(right) else float("nan"),
                         float(wrong["oracle_length"].notna().mean()) if len(wrong) else float("nan")))
        return pd.DataFrame(rows, columns=["hops", "n", "full_acc", "mean_oracle_length", "shorter_share",
                                           "fixed_share"])


def _example_correct(run: BlockRunner, h: torch.Tensor, sel: torch.Tensor, tgt_sel: torch.Tensor,
                     owner: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` bool: every scored token of each example right, reading only the scored positions of ``h``."""
    flat = _tokens(h)[sel]                                   # (S, C) scored positions
    logits = run.ad.unembed(flat)
    wrong = (logits.argmax(-1) != tgt_sel).long()
    bad = torch.zeros(n, dtype=torch.long, device=h.device).index_add_(0, owner, wrong)
    return bad == 0


def _chain_str(chain) -> str:
    return " ".join(map(str, chain))


def oracle_depth(model: nn.Module, x, y=None, hops=None, repeat: bool = True, exhaustive_max: int = EXHAUSTIVE_MAX,
                 monitor=None) -> Oracle:
    """Per example, the shortest chain of blocks that still answers it correctly (after CoLa, Li et al. 2025).

    Search space (``L`` blocks): chains ``c = (0^{m_0}, 1^{m_1}, ..., (L-1)^{m_{L-1}})``, block ``l`` run
    ``m_l`` times in a row, ``m_l`` in ``{0, 1, 2}`` (skipped, once, repeated once; ``repeat=False``: ``{0, 1}``),
    blocks in their own order: ``3^L`` chains (``2^L``), lengths ``0 .. 2L``. An example is answered when
    every scored token's argmax is its target. Its oracle length is the smallest ``|c|`` of a chain that
    answers it (the chain: the first such in the order skip < once < twice, block 0 deciding first).

    ``L <= exhaustive_max`` (6): every chain, depth first, sharing prefixes (``3^L - 1`` block applications
    for all examples at once). Deeper: greedy. Examples the full chain gets wrong first try each one-repeat
    chain (the first that answers wins, else no chain); then, repeatedly, each example moves to the first
    chain with one step of its current chain deleted that still answers it, until none does. The greedy
    length is an upper bound of the oracle's.

    ``y``: targets ``(B, T)`` with ``IGNORE`` (default for sequences: next token) or labels ``(B,)``.
    ``hops``: ``(B,)`` difficulty per example for the histogram (default 0). Returns :class:`Oracle`.
    ``docs/definitions.md#oracle-depth``.
    """
    mon = _monitor.resolve(monitor)
    checks.check_bool("repeat", repeat)
    exhaustive_max = checks.check_int("exhaustive_max", exhaustive_max, 0, 10)
    run = BlockRunner(model)
    L = run.n_layers
    with _inference(run.model):
        xb = run.batch(x)
        tgt = _targets_for(run, xb, y)
        N = len(xb)
        hv = np.zeros(N, dtype=int) if hops is None else np.asarray(hops)
        if hv.shape != (N,):
            raise ValueError(f"hops must have one value per example, shape ({N},), got {tuple(hv.shape)}")
        scored = tgt != IGNORE
        has = scored.any(1)
        if L <= exhaustive_max:
            best, chains, n_chains = _exhaustive(run, xb, tgt, repeat, mon)
            method = "exhaustive"
        else:
            best, chains, n_chains = _greedy(run, xb, tgt, repeat, mon)
            method = "greedy"
        full = _example_correct_batch(run, xb, tgt, list(range(L)))
    length = [float(len(c)) if c is not None else float("nan") for c in chains]
    df = pd.DataFrame({"example": np.arange(N), "hops": hv, "full_correct": full.cpu().numpy(),
                       "oracle_length": length, "chain": [_chain_str(c) if c is not None else "" for c in chains]})
    df = df[has.cpu().numpy()].reset_index(drop=True)
    return Oracle(df, method, n_chains, L)


def _scored_parts(tgt: torch.Tensor):
    sel = tgt != IGNORE
    owner = torch.arange(tgt.shape[0], device=tgt.device)[:, None].expand_as(tgt)[sel]
    return sel, tgt[sel], owner


def _example_correct_batch(run: BlockRunner, xb, tgt, chain) -> torch.Tensor:
    sel, ts, owner = _scored_parts(tgt)
    return _example_correct(run, run.run(chain, run.begin(xb)), sel, ts, owner, len(xb))


def _exhaustive(run: BlockRunner, xb, tgt, repeat: bool, mon):
    """Depth-first over the multiplicities ``m_0, m_1, ...`` (skip first), sharing prefixes. A subtree whose
    chain is already as long as every remaining example's best is cut, and only the examples a subtree
    can still improve (best > its prefix length) are carried into it, so solved examples cost nothing."""
    L, N = run.n_layers, len(xb)
    best = torch.full((N,), 10**9, dtype=torch.long)
    found: list = [None] * N
    total = (3 if repeat else 2) ** L
    count = [0]

    def leaf(h, idx, chain):
        sel, ts, owner = _scored_parts(tgt[idx])
        ok = _example_correct(run, h, sel, ts, owner, len(idx)).cpu()
        better = ok & (best[idx] > len(chain))
        for i in idx[better].tolist():
            best[i] = len(chain)
            found[i] = list(chain)

    def dfs(l, h, idx, extra, chain):
        if mon.stopped:
            return
        keep = best[idx] > len(chain)
        if not bool(keep.any()):
            count[0] += (3 if repeat else 2) ** (L - l)
            return
        if not bool(keep.all()):
            idx, h = idx[keep], h[keep.to(h.device)]
            if not run.native:
                run.begin(xb[idx.to(xb.device)])
                extra = run._extra
        if l == L:
            leaf(h, idx, chain)
            count[0] += 1
            mon.report(min(1.0, count[0] / total), f"{count[0]} of {total} chains")
            return
        dfs(l + 1, h, idx, extra, chain)
        run._extra = extra
        h1 = run.block(l, h)
        dfs(l + 1, h1, idx, extra, chain + [l])
        if repeat:
            run._extra = extra
            h2 = run.block(l, h1)
            dfs(l + 1, h2, idx, extra, chain + [l, l])

    h0 = run.begin(xb)
    dfs(0, h0, torch.arange(N), run._extra, [])
    return best, found, count[0]


def _greedy(run: BlockRunner, xb, tgt, repeat: bool, mon):
    L, N = run.n_layers, len(xb)
    full = list(range(L))
    n_chains = [0]

    def answers(idx: list[int], chain) -> torch.Tensor:
        n_chains[0] += 1
        return _example_correct_batch(run, xb[idx], tgt[idx], chain)

    current: list = [None] * N
    ok = answers(list(range(N)), full)
    for i in ok.nonzero().flatten().tolist():
        current[i] = full
    wrong = [i for i in range(N) if current[i] is None]
    if repeat and wrong:
        for l in range(L):
            if not wrong or mon.stopped:
                break
            chain = full[:l + 1] + [l] + full[l + 1:]
            got = answers(wrong, chain)
            for i, g in zip(list(wrong), got.tolist()):
                if g:
                    current[i] = chain
            wrong = [i for i in wrong if current[i] is None]
    active = {i for i in range(N) if current[i] is not None}
    rounds = 0
    while active and not mon.stopped:
        groups: dict = {}
        for i in active:
            groups.setdefault(tuple(current[i]), []).append(i)
        moved = set()
        for chain, idx in groups.items():
            chain = list(chain)
            pending = list(idx)
            tried = set()
            for j in range(len(chain)):
                cand = chain[:j] + chain[j + 1:]
                if tuple(cand) in tried or not pending:
                    continue
                tried.add(tuple(cand))
                got = answers(pending, cand)
                for i, g in zip(list(pending), got.tolist()):
                    if g:
                        current[i] = cand
                        moved.add(i)
                pending = [i for i in pending if i not in moved]
        active = moved
        rounds += 1
        mon.report(min(1.0, rounds / (2 * L)), f"greedy round {rounds}")
    best = torch.tensor([len(c) if c is not None else 10**9 for c in current])
    return best, current, n_chains[0]


def hop_tagged_khop(hops=(1, 2, 3), nodes: int = 8, queries: int = 1, n_train: int = 6000, n_val: int = 256,
                    seed: int = 0):
    """k-hop pointer chasing (table layout) with several hop counts in one dataset: ``(dataset, val_hops)``.

    Each sequence starts with a token naming its hop count (``"#1"``, ``"#2"``, ...), then the table layout of
    :func:`workbench.data.load` ``("khop", layout="table")``; the hop counts alternate (example ``i`` has
    ``hops[i % len(hops)]``), each drawn from its own seed. ``val_hops`` ``(n_val,)`` is the hop count of each
    validation example (the difficulty axis of :func:`oracle_depth`). The dataset is built here, not by
    ``data.load``, so its runs are not meant for the run store. ``docs/definitions.md#oracle-depth``.
    """
    from ...core.data import Dataset, load

    if isinstance(hops, (str, bytes)) or not isinstance(hops, Iterable):
        raise ValueError(f"hops must be a list of hop counts, got {hops!r:.80}")
    hops = [checks.check_int(f"hops[{i}]", h, 1, 8) for i, h in enumerate(hops)]
    if not hops or len(set(hops)) != len(hops):
        raise ValueError(f"hops must list distinct hop counts, got {hops}")
    n_train = checks.check_int("n_train", n_train, len(hops), 1_000_000)
    n_val = checks.check_int("n_val", n_val, len(hops), 100_000)
    seed = checks.check_seed("seed", seed)
    K = len(hops)
    parts = [load("khop", hops=h, nodes=nodes, queries=queries, layout="table", n_train=max(10, -(-n_train // K)),
                  n_val=max(10, -(-n_val // K)), seed=seed + 1000 * j) for j, h in enumerate(hops)]
    base = parts[0]
    vocab = list(base.vocab) + [f"#{h}" for h in hops]

    def merge(split: str, n: int):
        xs, ys = [], []
        for j, p in enumerate(parts):
            x, y = p.split(split)
            tag = torch.full((len(x), 1), len(base.vocab) + j, dtype=x.dtype)
            xs.append(torch.cat([tag, x], 1))
            ys.append(torch.cat([torch.full((len(y), 1), IGNORE, dtype=y.dtype), y], 1))
        # interleave: example i comes from part i % K
        x = torch.stack(xs, 1).reshape(-1, xs[0].shape[1])[:n]
        y = torch.stack(ys, 1).reshape(-1, ys[0].shape[1])[:n]
        return x, y

    x_tr, y_tr = merge("train", n_train)
    x_va, y_va = merge("val", n_val)
    val_hops = np.array([hops[i % K] for i in range(n_val)])
    ds = Dataset("khop", "sequence", x_tr, y_tr, x_va, y_va, len(vocab),
                 f"k-hop pointer chasing (table layout, {nodes} nodes) with hop counts {hops} tagged by a first token: "
                 f"{n_train} train / {n_val} val sequences of length {x_tr.shape[1]}", vocab,
                 {"hops_tagged": hops, "nodes": nodes, "queries": queries, "n_train": n_train, "n_val": n_val,
                  "seed": seed})
    return ds, val_hops
