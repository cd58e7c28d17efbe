"""Synthetic sequence tasks (tokens and per-position targets, ``IGNORE`` where unscored): k-hop pointer
chasing and modular addition (the grokking task of Power et al. 2022).

Definitions: ``docs/definitions.md#khop``, ``#modadd``.
"""
from __future__ import annotations

import torch

from .dataset import IGNORE, Dataset, Shape


# ----------------------------------------------------------------------------- sequence data


def _khop_shape(o: dict) -> Shape:
    nodes, queries = o["nodes"], o["queries"]
    length = o["length"] or nodes
    seq = nodes + 1 + queries if o["layout"] == "table" else 2 * length + 1 + 2 * queries
    vocab = tuple(_NODE_SYMBOLS[:nodes]) + ("|", "?")
    return Shape("khop", "sequence", seq, len(vocab), o["n_train"], o["n_val"], vocab)


def _modadd_shape(o: dict) -> Shape:
    p = o["p"]
    n_train = max(1, min(p * p - 1, round(o["train_fraction"] * p * p)))
    vocab = tuple(str(i) for i in range(p)) + ("+", "=")
    return Shape("modadd", "sequence", 4, len(vocab), n_train, p * p - n_train, vocab)


_NODE_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


KHOP_LAYOUTS = ("edges", "table")


def _khop(hops: int, nodes: int, length: int, queries: int, layout: str, n_train: int, n_val: int,
          seed: int) -> Dataset:
    """k-hop pointer chasing: the answer needs ``hops`` sequential look-ups.

    ``layout="edges"``: each sequence lists ``length`` edges ``a -> f(a)`` (shuffled), then
    ``|`` and ``queries`` pairs ``q ?``; the target at each ``?`` is ``f^hops(q)``. The sources
    are ``length`` distinct nodes and every target is one of them, so chains never leave the
    listed edges (``length = 0`` means ``length = nodes``). Length ``2 * length + 1 + 2 * queries``.
    A look-up here needs an induction-style circuit (find the edge whose source is q, read its
    target), which small models learn slowly.

    ``layout="table"``: position ``i`` holds ``f(i)`` for every node ``i``, then ``|`` and
    ``queries`` query nodes; the target at each query token is ``f^hops(q)``. One look-up is
    one attention step (from a node's embedding to its position), so ``hops`` look-ups need
    about ``hops`` layers: the layout in which depth shows quickly. Length ``nodes + 1 + queries``.

    Tokens: node symbols, ``|``, ``?``. ``f`` is a uniformly random function, new per sequence.
    """
    if layout not in KHOP_LAYOUTS:
        raise ValueError(f"khop.layout must be one of {list(KHOP_LAYOUTS)}, got {layout!r}")
    if layout == "table" and length not in (0, nodes):
        raise ValueError(f"khop.length must be 0 or nodes={nodes} with layout='table', got {length}")
    length = length or nodes
    if length > nodes:
        raise ValueError(f"khop.length must be in [1, nodes={nodes}], got {length}")
    vocab = list(_NODE_SYMBOLS[:nodes]) + ["|", "?"]
    sep, qm = nodes, nodes + 1
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    src = torch.argsort(torch.rand(n, nodes, generator=g), dim=1)[:, :length]           # (n, L) distinct sources
    if layout == "table":  # node i at position i; the draw above still happens, so both layouts share
        src = torch.arange(nodes).expand(n, nodes)  # one random stream (same pointer structure per seed)
    tgt_idx = torch.randint(0, length, (n, length), generator=g)                          # f(src[i]) = src[tgt_idx[i]]
    tgt = torch.gather(src, 1, tgt_idx)
    q_idx = torch.randint(0, length, (n, queries), generator=g)
    cur = q_idx.clone()
    for _ in range(hops):
        cur = torch.gather(tgt_idx, 1, cur)
    answer = torch.gather(src, 1, cur)                                                    # (n, queries)
    query = torch.gather(src, 1, q_idx)
    if layout == "table":
        x = torch.cat([tgt, torch.full((n, 1), sep), query], dim=1)
        y = torch.full_like(x, IGNORE)
        y[:, nodes + 1:] = answer
        shape = f"a table of f over {nodes} nodes"
    else:
        order = torch.argsort(torch.rand(n, length, generator=g), dim=1)                  # shuffle edge order
        edges = torch.stack([torch.gather(src, 1, order), torch.gather(tgt, 1, order)], dim=2).reshape(n, 2 * length)
        asks = torch.stack([query, torch.full_like(query, qm)], dim=2).reshape(n, 2 * queries)
        x = torch.cat([edges, torch.full((n, 1), sep), asks], dim=1)
        y = torch.full_like(x, IGNORE)
        y[:, 2 * length + 2::2] = answer
        shape = f"{length} edges of {nodes} nodes"
    return Dataset("khop", "sequence", x[:n_train], y[:n_train], x[n_train:], y[n_train:], len(vocab),
                   f"{hops}-hop pointer chasing over {shape}, {queries} quer{'ies' if queries > 1 else 'y'} "
                   f"per sequence: {n_train} train / {n_val} val sequences of length {x.shape[1]}",
                   vocab, {"hops": hops, "nodes": nodes, "length": length, "queries": queries, "layout": layout,
                           "n_train": n_train, "n_val": n_val, "seed": seed})


def _modadd(p: int, train_fraction: float, seed: int) -> Dataset:
    """All ``p*p`` sequences ``a + b =`` with target ``(a + b) mod p`` at the last position."""
    vocab = [str(i) for i in range(p)] + ["+", "="]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, -1] = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(p * p - 1, round(train_fraction * p * p)))
    tr, va = perm[:n_train], perm[n_train:]
    return Dataset("modadd", "sequence", x[tr], y[tr], x[va], y[va], len(vocab),
                   f"a + b mod {p}: {len(tr)} train / {len(va)} val equations ({train_fraction:.0%} train)",
                   vocab, {"p": p, "train_fraction": train_fraction, "seed": seed})
