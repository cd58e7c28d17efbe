"""Depth-lab benchmarks, each against a reference measured in the same run.

    python bench/bench_depthlab.py       # prints a table; --quick for smaller sizes
    python -m bench --only depthlab

Rows (model: a workbench Transformer on hop-tagged k-hop, 1 to 3 hops, table layout, 8 nodes; d_model 32,
2 heads, d_mlp 64; rows 1-2 and 4: 6 blocks, 256 validation examples; quick: 64 examples):

1. Rankings: ``depthlab.layer_similarity`` (Block Influence and the angular distance of every span) against
   one plain forward of the same examples (target <= 1.5x: one forward plus the cosines).
2. Strategies: ``depthlab.strategies`` over every strategy and span of 2 blocks against as many plain
   forwards as the strategies run block applications (``sum(length) / L``; target <= 1.3x: one forward each).
3. Early-exit curve (``earlyexit.exit_curve``: ``L + 1`` exits) against one plain forward (target <= 1.5x).
4. Oracle depth: ``depthlab.oracle_depth``, exhaustive for L = 6 (729 chains) on 256 examples of a model
   trained 300 steps (quick: 60), torch on two threads, wall seconds against the 60 s goal (target <= 1).
   The note has the plain-forward time and the examples' shares (CoLa's two claims).
5. Depth profile (``depthlab.depth_profile`` with 4 JVP directions, no skips) against one plain forward
   (reported, no target: 4 JVPs per block cost about 4-8 forwards).

Rows 1-3 and 5: CPU time of this process on one torch thread, median of interleaved repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import workbench as wb
from workbench import depthlab, earlyexit


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median CPU and wall time of each function, measured round-robin (drift hits all alike)."""
    for fn in fns.values():
        fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def _row(entry, ours, reference, unit, target, note):
    ratio = ours / reference if reference else float("nan")
    return {"entry": entry, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "target": target, "ok": (ratio <= target) if target is not None else None, "note": note}


def _setup(quick: bool, n_layers: int = 6, steps: int = 0):
    ds, hops = depthlab.hop_tagged_khop(hops=(1, 2, 3), nodes=8, n_train=4000, n_val=256, seed=0)
    cfg = wb.models.config_for(ds, d_model=32, n_heads=2, d_mlp=64, n_layers=n_layers)
    model = wb.models.build(cfg)
    if steps:
        wb.train(model, ds, wb.TrainConfig(steps=steps, batch_size=64, lr=3e-3, eval_every=steps, eval_max=256))
    model.eval()
    n = 64 if quick else 256
    return ds, hops[:n], model, ds.x_val[:n], ds.y_val[:n]


def _cost_rows(quick: bool) -> list[dict]:
    ds, hops, model, x, y = _setup(quick)
    L = len(model.blocks)
    mask = y != -100
    repeats = 3 if quick else 7

    def plain():
        with torch.no_grad():
            model(x)

    spans = [(s, 2) for s in range(L - 1)]
    plan = depthlab.strategies(model, x, y, spans=spans)       # the runs, for the count of block applications
    blocks = int(plan["length"].sum())
    forwards = blocks / L
    t = _interleaved({
        "plain": plain,
        "sim": lambda: depthlab.layer_similarity(model, x, mask=mask),
        "strat": lambda: depthlab.strategies(model, x, y, spans=spans),
        "exit": lambda: earlyexit.exit_curve(model, x, y),
        "profile": lambda: depthlab.depth_profile(model, x, mask=mask, n_directions=4, skip=False),
    }, repeats)
    p = t["plain"][0]
    return [
        _row(f"rankings: layer_similarity (BI + angular, {L} blocks, {len(x)} examples) / 1 forward",
             t["sim"][0] * 1e3, p * 1e3, "ms CPU", 1.5, f"wall {t['sim'][1] * 1e3:.1f} vs {t['plain'][1] * 1e3:.1f} ms"),
        _row(f"strategies: 6 strategies x spans of 2 ({len(plan) - 1} runs + full) / {forwards:.1f} forwards",
             t["strat"][0] * 1e3, p * forwards * 1e3, "ms CPU", 1.3,
             f"{blocks} block applications; wall {t['strat'][1] * 1e3:.0f} ms"),
        _row(f"early exit: exit_curve ({L + 1} exits) / 1 forward", t["exit"][0] * 1e3, p * 1e3, "ms CPU", 1.5,
             f"wall {t['exit'][1] * 1e3:.1f} ms"),
        _row("depth profile: 4 JVP directions per block, no skips / 1 forward", t["profile"][0] * 1e3, p * 1e3,
             "ms CPU", None, f"wall {t['profile'][1] * 1e3:.0f} ms"),
    ]


def _oracle_row(quick: bool) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds, hops, model, x, y = _setup(quick, steps=60 if quick else 300)
        with torch.no_grad():
            model(x)                                     # warm-up
            t0 = time.perf_counter()
            model(x)
        fwd = time.perf_counter() - t0
        w = time.perf_counter()
        oracle = depthlab.oracle_depth(model, x, y, hops=hops)
        wall = time.perf_counter() - w
    finally:
        torch.set_num_threads(threads)
    s = oracle.summary()
    shares = "; ".join(f"{int(r.hops)} hops: acc {r.full_acc:.2f}, mean oracle {r.mean_oracle_length:.2f}, "
                       f"shorter {r.shorter_share:.2f}, fixed {r.fixed_share:.2f}" for r in s.itertuples())
    return _row(f"oracle depth: exhaustive, L = 6 ({oracle.n_chains} chains), {len(x)} k-hop examples, 2 threads",
                wall, 60.0, "s wall", 1.0, f"one plain forward {fwd * 1e3:.1f} ms; {shares}")


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _cost_rows(quick)
    finally:
        torch.set_num_threads(threads)
    return rows + [_oracle_row(quick)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 120, "display.width", 240, "display.float_format", "{:.4g}".format):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))


if __name__ == "__main__":
    main()
