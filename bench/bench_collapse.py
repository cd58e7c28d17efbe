"""Collapse benchmarks, each against a reference measured in the same run.

    python bench/bench_collapse.py       # prints a table; --quick for smaller sizes

Rows:

1. ``collapse.metrics`` on 10,000 x 512 float32 features with 10 classes and a classifier
   (target < 0.1 s), against the textbook transcription of Papyan et al.'s formulas in numpy
   (d x d within-class covariance, eigendecomposition for the rank C-1 pseudo-inverse; the
   reference of ``tests/test_collapse.py`` minus its O(N C d) nearest-centre loop).
2. Per-layer tracking every epoch (``collapse.track(every=1)``, all layers) on the digits
   recipe: the cost of the slowest record against the mean epoch time of the same run's
   training steps (target <= 20% at every epoch), and the whole run's overhead against an
   identical untracked run (target <= 20%).

``run()`` returns the rows as dicts so a harness can collect them.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

import workbench as wb
from workbench import collapse


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _numpy_reference(h: np.ndarray, y: np.ndarray, W: np.ndarray) -> dict:
    h = h.astype(np.float64)
    classes = np.unique(y)
    C, (N, d) = len(classes), h.shape
    M = np.stack([h[y == c].mean(0) for c in classes])
    mu = M.mean(0)
    Sw = np.zeros((d, d))
    for i, c in enumerate(classes):
        r = h[y == c] - M[i]
        Sw += r.T @ r
    Sw /= N
    Mc = M - mu
    Sb = Mc.T @ Mc / C
    evals, evecs = np.linalg.eigh(Sb)
    top = np.argsort(evals)[::-1][:C - 1]
    nc1 = np.trace(Sw @ (evecs[:, top] / evals[top]) @ evecs[:, top].T) / C
    norms = np.linalg.norm(Mc, axis=1)
    cos = (Mc / norms[:, None]) @ (Mc / norms[:, None]).T
    wn = np.linalg.norm(W, axis=1)
    nc3 = np.linalg.norm(W.T / np.linalg.norm(W) - Mc.T / np.linalg.norm(Mc)) ** 2
    return {"nc1": nc1, "equinorm": norms.std(ddof=1) / norms.mean(), "cos": cos, "wn": wn, "nc3": nc3}


def bench_metrics(quick: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    N, d, C = (2000, 128, 10) if quick else (10_000, 512, 10)
    y = torch.arange(N) % C
    centres = torch.randn(C, d, generator=g) * 3
    h = centres[y] + torch.randn(N, d, generator=g)
    W = torch.randn(C, d, generator=g)
    repeats = 3 if quick else 7
    ours = _median_time(lambda: collapse.metrics(h, y, classifier=W), repeats)
    hn, yn, Wn = h.numpy(), y.numpy(), W.numpy().astype(np.float64)
    ref = _median_time(lambda: _numpy_reference(hn, yn, Wn), repeats)
    a, b = collapse.metrics(h, y, classifier=W)["nc1"], _numpy_reference(hn, yn, Wn)["nc1"]
    return [{"entry": f"collapse.metrics {N}x{d}, {C} classes (s)", "ours": ours, "reference": ref, "unit": "s",
             "ratio": ref / ours, "target": "ours < 0.1 s", "ok": ours < 0.1,
             "note": f"reference: numpy d x d transcription; NC1 ours {a:.6g} vs reference {b:.6g}"}]


def bench_tracking(quick: bool) -> list[dict]:
    epochs = 6 if quick else 30
    model_kwargs = dict(epochs=epochs, eval_every_epochs=10_000)   # evaluation only at the end, in both runs

    def run(tracked: bool):
        model, cfg, ds = collapse.recipe("digits", **model_kwargs)
        spe = math.ceil(len(ds.x_train) / cfg.batch_size)
        tracker = collapse.track(every=1)
        callbacks = [tracker] if tracked else []
        t0 = time.perf_counter()
        wb.train(model, ds, cfg, callbacks=callbacks)
        return time.perf_counter() - t0, tracker, spe

    plain, _, spe = run(False)
    tracked, tracker, _ = run(True)
    plain2, _, _ = run(False)
    plain = min(plain, plain2)
    train_only = tracked - tracker.seconds            # the tracked run's own training time
    epoch_time = train_only / epochs
    worst = max(tracker.record_seconds[1:])           # every per-epoch record after the one at step 0
    per_epoch = worst / epoch_time
    whole = (tracked - plain) / plain
    n_sites = len(collapse.sites(collapse.recipe("digits", epochs=1)[0]))
    return [
        {"entry": f"track(every=1), {n_sites} sites: slowest record / epoch", "ours": worst, "reference": epoch_time,
         "unit": "s", "ratio": per_epoch, "target": "<= 0.20", "ok": per_epoch <= 0.20,
         "note": f"digits recipe, {epochs} epochs of {spe} steps; 512-example stratified subsample"},
        {"entry": "track(every=1): whole-run overhead", "ours": tracked, "reference": plain, "unit": "s",
         "ratio": whole, "target": "<= 0.20", "ok": whole <= 0.20,
         "note": "tracked run against the faster of two untracked runs, same seed"},
    ]


def run(quick: bool = False) -> list[dict]:
    return bench_metrics(quick) + bench_tracking(quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 90, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(pd.DataFrame(run(args.quick)).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
