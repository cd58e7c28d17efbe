"""Shallow unrolling and learngene benchmarks: each result against its reference from the same run.

    python bench/bench_unroll.py       # prints a table; --quick for smaller sizes

Rows:

1. Bermeitinger et al. (2023) Table 2 on MNIST-1D and digits: the parallel (first-order) layout retrained
   from scratch at equal parameters against the sequential one, mean validation loss over seeds
   (``unroll.compare_layouts``); the paper found the two within a few hundredths on MNIST
   (target: |difference| <= 0.05).
2. TLEG expansion on digits, MNIST-1D and the character LM (grammar corpus): descendants of several
   depths from one learngene against random initialisation after the same short training
   (``learngene.experiment``), mean validation loss over depths (target: ratio < 1).
3. The cost of ``unroll.gap`` (one JVP per block) against a plain forward pass of the same examples
   (reported, no target).

``run()`` returns the rows as dicts so a harness can collect them.
"""
from __future__ import annotations

import argparse
import time

import torch

import workbench as wb
from workbench import learngene, models, unroll


def _layouts(name: str, quick: bool) -> dict:
    ds = wb.data.load(name, **({"num_samples": 2000 if quick else 5000} if name == "mnist1d" else {}))
    cfg = models.config_for(ds, d_model=32 if quick else 64, d_hidden=64 if quick else 128, n_layers=6)
    steps = 150 if quick else 1000
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    table = unroll.compare_layouts(ds, cfg, wb.TrainConfig(steps=steps, lr=3e-3, eval_every=steps), seeds=seeds)
    mean = table.query("metric == 'loss'").groupby("layout")["value"].mean()
    diff = abs(mean["parallel"] - mean["sequential"])
    return {"entry": f"layouts {name}: parallel vs sequential mean val loss", "ours": mean["parallel"],
            "reference": mean["sequential"], "unit": "nats", "ratio": mean["parallel"] / mean["sequential"],
            "target": "|diff| <= 0.05", "ok": bool(diff <= 0.05),
            "note": f"{len(seeds)} seeds, {steps} steps, 6 blocks; |diff| = {diff:.4f}"}


def _expansion(name: str, quick: bool) -> dict:
    options = {"mnist1d": {"num_samples": 2000 if quick else 5000},
               "text": {"corpus_chars": 20000 if quick else 100000, "context": 32}}.get(name, {})
    ds = wb.data.load(name, **options)
    depths = [2, 4, 6] if quick else [2, 3, 4, 5, 6, 7, 8]
    over = {"d_model": 32} if name == "text" else {"d_model": 32, "d_hidden": 64}
    if name == "text":
        over.update(n_heads=2, d_mlp=64)
    aux_steps, steps = (150, 20) if quick else (600, 60)
    _, table = learngene.experiment(ds, depths=depths, aux_layers=4,
                                    learngene_train=wb.TrainConfig(steps=aux_steps, lr=3e-3, eval_every=aux_steps),
                                    train_config=wb.TrainConfig(steps=steps, lr=3e-3, eval_every=steps), **over)
    mean = table.query("metric == 'loss'").groupby("init")["value"].mean()
    ratio = mean["learngene"] / mean["random"]
    return {"entry": f"learngene expansion {name}: mean val loss over depths", "ours": mean["learngene"],
            "reference": mean["random"], "unit": "nats", "ratio": ratio, "target": "< 1", "ok": bool(ratio < 1),
            "note": f"depths {depths[0]}..{depths[-1]}, learngene {aux_steps} steps, descendants {steps} steps"}


def _gap_cost(quick: bool) -> dict:
    ds = wb.data.load("digits")
    model = models.build(models.config_for(ds, d_model=64, d_hidden=128, n_layers=8)).eval()
    x, y = ds.split("val")
    x = x[:256]
    repeats = 3 if quick else 10

    def clock(fn):
        fn()
        t = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - t) / repeats

    with torch.no_grad():
        fwd = clock(lambda: model(x))
    g = clock(lambda: unroll.gap(model, x, max_examples=256))
    return {"entry": "unroll.gap (8 blocks, JVPs) vs one forward pass", "ours": g, "reference": fwd, "unit": "s CPU",
            "ratio": g / fwd, "target": "", "ok": True, "note": f"256 digits, mean of {repeats}"}


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    rows = [_layouts("mnist1d", quick), _layouts("digits", quick)]
    rows += [_expansion(name, quick) for name in ("digits", "mnist1d", "text")]
    rows.append(_gap_cost(quick))
    return rows


if __name__ == "__main__":
    import pandas as pd

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))
