"""Grokking benchmarks: the default run's wall time and the tracking overhead of the progress measures.

    python bench/bench_grokking.py       # prints a table; --quick for a shorter run

Rows:

1. The default :class:`~workbench.grokking.GrokConfig` run (progress measures every 100 steps): CPU
   time, and the steps at which train and validation accuracy first reach 0.99
   (:func:`~workbench.grokking.phases`).
2. Tracking overhead: the same run (same seed, same steps) with and without the
   :class:`~workbench.grokking.ProgressMeasures` callback (``every=0``), CPU-time ratio minus 1
   (target <= 20%); the time spent inside the callback is reported as well.

``run()`` returns the rows as dicts so a harness can collect them.
"""
from __future__ import annotations

import argparse
import time

import torch

from workbench import grokking


def _timed(config: grokking.GrokConfig):
    """``(run, seconds)``: process CPU time (robust to other jobs on a shared machine)."""
    t = time.process_time()
    out = grokking.run(config)
    return out, time.process_time() - t


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    steps = 1000 if quick else grokking.GrokConfig().steps
    base = grokking.GrokConfig(steps=steps)
    grokking.run(grokking.GrokConfig(p=7, d_model=8, n_heads=2, d_mlp=8, steps=2, n_key=1))  # warm-up: lazy imports
    tracked, t_with = _timed(base)
    ph = grokking.phases(tracked.metrics)
    _, t_without = _timed(grokking.GrokConfig(steps=steps, every=0))
    overhead = t_with / t_without - 1
    measure = tracked.meta["grok"]["measure_seconds"]
    return [
        {"entry": "default grokking run (p=53, 40% train), CPU time", "ours": t_with, "reference": float("nan"),
         "unit": "s CPU", "ratio": float("nan"), "target": "a few minutes", "ok": True,
         "note": f"{steps} steps; train acc 0.99 at step {ph['memorised']}, val acc 0.99 at step {ph['grokked']}"},
        {"entry": "progress-measure tracking overhead (every 100 steps)", "ours": t_with, "reference": t_without,
         "unit": "s CPU", "ratio": t_with / t_without, "target": "<= 20%", "ok": bool(overhead <= 0.20),
         "note": f"overhead {overhead:+.1%}; {measure:.2f} s wall inside the callback"},
    ]


if __name__ == "__main__":
    import pandas as pd

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with pd.option_context("display.max_colwidth", 100, "display.width", 220):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))
