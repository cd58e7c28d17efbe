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
   identical untracked run (target <= 20%). Measured as CPU time of the training thread with
   torch on one thread (robust on a shared machine); wall-clock figures in the notes.

``run()`` returns the rows as dicts so a harness can collect them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import workbench as wb
from workbench import collapse


def _median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
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
    hn, yn, Wn = h.numpy(), y.numpy(), W.numpy().astype(np.float64)
    ours_wall = _median_time(lambda: collapse.metrics(h, y, classifier=W), repeats)
    # CPU time of this thread with torch and BLAS on one thread: robust to other load on the machine
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            ours = _median_time(lambda: collapse.metrics(h, y, classifier=W), repeats, time.thread_time)
            ref = _median_time(lambda: _numpy_reference(hn, yn, Wn), repeats, time.thread_time)
    finally:
        torch.set_num_threads(threads)
    a, b = collapse.metrics(h, y, classifier=W)["nc1"], _numpy_reference(hn, yn, Wn)["nc1"]
    return [{"entry": f"collapse.metrics {N}x{d}, {C} classes (CPU s, 1 thread)", "ours": ours, "reference": ref,
             "unit": "s", "ratio": ours / ref, "target": "ours < 0.1 s", "ok": ours < 0.1,
             "note": f"reference: numpy d x d transcription; NC1 {a:.6g} vs {b:.6g}; "
                     f"wall with {threads} threads: {ours_wall:.3f} s"}]


def bench_tracking(quick: bool) -> list[dict]:
    """Tracking overhead in CPU time of the training thread, with torch on one thread.

    On a shared machine wall time swings with other processes; the calling thread's CPU time
    (``time.thread_time``) with one intra-op thread counts only the work itself. Wall-time
    ratios of the same runs are given in the notes.
    """
    epochs = 6 if quick else 30
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(tracked: bool):
        model, cfg, ds = collapse.recipe("digits", epochs=epochs, eval_every_epochs=10_000)  # eval only at the end
        tracker = collapse.track(every=1)
        cpu_records = []
        record = tracker.record

        def timed(state):
            t = time.thread_time()
            record(state)
            cpu_records.append(time.thread_time() - t)

        tracker.record = timed
        c0, w0 = time.thread_time(), time.perf_counter()
        wb.train(model, ds, cfg, callbacks=[tracker] if tracked else [])
        return time.thread_time() - c0, time.perf_counter() - w0, cpu_records, tracker, cfg

    try:
        plain_cpu, plain_wall, _, _, cfg = run(False)
        cpu, wall, records, tracker, _ = run(True)
        plain_cpu2, plain_wall2, _, _, _ = run(False)
    finally:
        torch.set_num_threads(threads)
    plain_cpu, plain_wall = min(plain_cpu, plain_cpu2), min(plain_wall, plain_wall2)
    epoch_cpu = (cpu - sum(records)) / epochs                     # the tracked run's own training per epoch
    worst = max(records[1:])                                      # every per-epoch record after step 0
    epoch_wall = (wall - tracker.seconds) / epochs
    spe = cfg.steps // epochs
    n_sites = len(collapse.sites(collapse.recipe("digits", epochs=1)[0]))
    return [
        {"entry": f"track(every=1), {n_sites} sites: slowest record / epoch (CPU)", "ours": worst,
         "reference": epoch_cpu, "unit": "s", "ratio": worst / epoch_cpu, "target": "<= 0.20",
         "ok": worst / epoch_cpu <= 0.20,
         "note": f"digits recipe, {epochs} epochs of {spe} steps, 512-example subsample; wall: "
                 f"{max(tracker.record_seconds[1:]):.3f} s / {epoch_wall:.3f} s"},
        {"entry": "track(every=1): whole-run overhead (CPU)", "ours": cpu, "reference": plain_cpu, "unit": "s",
         "ratio": cpu / plain_cpu - 1, "target": "<= 0.20", "ok": cpu / plain_cpu - 1 <= 0.20,
         "note": f"against the cheaper of two untracked runs; wall: {wall:.1f} s vs {plain_wall:.1f} s"},
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
