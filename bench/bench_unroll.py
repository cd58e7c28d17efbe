"""Shallow unrolling and learngene benchmarks: each result against its reference from the same run.

    python bench/bench_unroll.py       # prints a table; --quick for smaller sizes

Rows:

1. Bermeitinger et al. (2023) Table 2 on MNIST-1D and digits: the parallel (first-order) layout retrained
   from scratch at equal parameters against the sequential one (``unroll.compare_layouts``). The paper
   trained each of its 6,912 CNN configurations to (near) convergence -- training losses of 1e-4 in the
   over-parameterised group -- and compared mean validation losses: 0.0520 vs 0.0755 (Q < 1), 0.1245 vs
   0.1147, 0.1174 vs 0.1147, 0.1355 vs 0.1490 on MNIST. Here both layouts train long enough to overfit
   (cosine schedule, training loss near 0) and the row compares the best validation loss over the
   evaluations (the early-stopping point) per seed, paired; the note gives the paired difference's mean
   and standard deviation over seeds and the same at the end of training (target: |mean difference| <=
   0.05, the paper's "few hundredths"). Both data sets are over-parameterised here (Q < 1).
2. TLEG expansion on digits, MNIST-1D and the character LM (grammar corpus), TLEG's protocol
   (``learngene.experiment``): per seed a learngene in an auxiliary model as deep as the deepest descendant
   (8 blocks), distilled (soft, alpha 1) from a teacher of that depth trained for the same steps; descendants
   of depths 2..8 against random initialisation after the same training (same steps, learning rate and
   minibatches). Headline: mean validation loss over depths and seeds after 60 descendant steps (target:
   ratio < 1); the note has the ratio's spread over seeds and the budget curve (0, 20, 60, 200 steps).
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


def _mnist1d(quick: bool) -> dict:
    return {"num_samples": 2000 if quick else 5000}


def _layouts(name: str, quick: bool) -> dict:
    ds = wb.data.load(name, **(_mnist1d(quick) if name == "mnist1d" else {}))
    cfg = models.config_for(ds, d_model=32 if quick else 64, d_hidden=64 if quick else 128, n_layers=6)
    steps = 300 if quick else 1500
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    tc = wb.TrainConfig(steps=steps, lr=3e-3, schedule="cosine", warmup=50, eval_every=steps // 20, eval_max=0)
    table = unroll.compare_layouts(ds, cfg, tc, seeds=seeds)
    per = table.pivot_table(index="seed", columns=["metric", "layout"], values="value")
    diff = per["best_loss"]["parallel"] - per["best_loss"]["sequential"]
    dfinal = per["loss"]["parallel"] - per["loss"]["sequential"]
    dacc = per["best_acc"]["parallel"] - per["best_acc"]["sequential"]
    params = int(per["params"]["sequential"].iloc[0])
    q = len(ds.x_train) * ds.n_classes / params
    mean = per["best_loss"].mean()
    return {"entry": f"layouts {name}: parallel vs sequential best val loss", "ours": float(mean["parallel"]),
            "reference": float(mean["sequential"]), "unit": "nats",
            "ratio": float(mean["parallel"] / mean["sequential"]),
            "target": "|mean diff| <= 0.05", "ok": bool(abs(diff.mean()) <= 0.05),
            "note": (f"{len(seeds)} seeds, {steps} cosine steps, 6 blocks, {params} params (Q = {q:.2f}); "
                     f"best-val diff {diff.mean():+.3f} +- {diff.std():.3f} (at steps "
                     f"{per['best_step']['sequential'].mean():.0f} / {per['best_step']['parallel'].mean():.0f}), "
                     f"acc {dacc.mean():+.3f} +- {dacc.std():.3f}; at the end {dfinal.mean():+.3f} +- "
                     f"{dfinal.std():.3f}; train loss {per['train_loss']['sequential'].mean():.4f} / "
                     f"{per['train_loss']['parallel'].mean():.4f}")}


def _expansion(name: str, quick: bool) -> dict:
    options = {"mnist1d": _mnist1d(quick),
               "text": {"corpus_chars": 20000 if quick else 100000, "context": 32}}.get(name, {})
    ds = wb.data.load(name, **options)
    depths = [2, 4, 6] if quick else [2, 3, 4, 5, 6, 7, 8]
    over = {"d_model": 32} if name == "text" else {"d_model": 32, "d_hidden": 64}
    if name == "text":
        over.update(n_heads=2, d_mlp=64)
    aux_steps, steps, budgets = (150, 60, (20,)) if quick else (600, 200, (20, 60))
    seeds = (0,) if quick else (0, 1, 2)
    head = 60 if not quick else 20
    _, table = learngene.experiment(ds, depths=depths, seeds=seeds, teacher="train",
                                    learngene_train=wb.TrainConfig(steps=aux_steps, lr=3e-3, eval_every=aux_steps),
                                    train_config=wb.TrainConfig(steps=steps, lr=3e-3, eval_every=steps),
                                    budgets=budgets, **over)
    per = table.pivot_table(index=["seed", "depth"], columns=["metric", "init"], values="value")

    def ratio(metric):
        by_seed = per[metric].groupby(level="seed").mean()
        r = by_seed["learngene"] / by_seed["random"]
        return per[metric]["learngene"].mean() / per[metric]["random"].mean(), r.std()

    curve = {0: ratio("loss_at_init"), **{b: ratio(f"loss@{b}") for b in budgets}, steps: ratio("loss")}
    lg, rnd = per[f"loss@{head}"]["learngene"].mean(), per[f"loss@{head}"]["random"].mean()
    r, sd = curve[head]
    return {"entry": f"learngene expansion {name}: mean val loss over depths after {head} steps",
            "ours": float(lg), "reference": float(rnd), "unit": "nats", "ratio": float(r), "target": "< 1", "ok": bool(r < 1),
            "note": (f"depths {depths[0]}..{depths[-1]}, {len(seeds)} seeds (ratio sd {sd:.3f}); aux {max(depths)} blocks, "
                     f"teacher + learngene {aux_steps} steps each; ratio after "
                     + ", ".join(f"{k}: {v[0]:.3f}" for k, v in curve.items()) + " steps")}


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
