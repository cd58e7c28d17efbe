"""Lens benchmarks (tuned and Jacobian lens), each against plain forwards measured in the same run.

    python bench/bench_lenses.py        # prints a table; --quick for smaller sizes

Rows:

1. Tuned-lens training on our char LM (the ``TEXT`` recipe's data and width, 4 blocks trained for 300
   steps first, not timed): 250 steps of 32 windows of 32 characters (quick: 2 blocks, 60 steps). Stated
   KL: the tuned lens's held-out mean KL(final || lens) over layers 0 .. L-1 at most half the logit
   lens's. Wall seconds against plain forwards of the same windows (no grad); ``ok`` = the stated KL is
   reached within 60 s.
2. Jacobian lens on a 4-block d_model 64 Transformer (4 heads, d_mlp 256, 32 tokens, random init): wall
   seconds per prompt (8 prompts; quick 2) on two threads against one plain forward of one prompt;
   ``ok`` = at most 2 s per prompt.

Wall-clock medians; the machine may be shared, so read the ratios, not single seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import workbench as wb
from workbench import lenses
from workbench.core.recipes import TEXT


def _median_wall(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _tuned_row(quick: bool) -> dict:
    n_layers, lm_steps, steps, batch = (2, 100, 60, 32) if quick else (4, 300, 250, 32)
    ds = TEXT.load_data()
    torch.manual_seed(0)
    run = wb.train(wb.models.build(TEXT.model_config(ds, n_layers=n_layers)), ds,
                   TEXT.train_config(steps=lm_steps, eval_every=lm_steps))
    model = run.model.eval()
    x_val = ds.x_val[:200]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = lenses.train_tuned_lens(model, ds.x_train, steps=steps, batch_size=batch, max_passes=1000, seed=0)
    seconds = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(ds.x_train), (steps, batch), generator=g)

    def forwards():
        with torch.no_grad():
            for idx in order:
                model(ds.x_train[idx])
    reference = _median_wall(forwards, 1 if quick else 3)
    kl = lenses.compare(model, x_val, tuned=fit.lens).query("layer < @n_layers") \
        .groupby("lens")["kl_to_final"].mean()
    reached = kl["tuned"] <= 0.5 * kl["logit"]
    return {"entry": f"lenses: tuned-lens training, char LM ({n_layers} blocks, {steps} steps x {batch} windows) "
                     "/ plain forwards of the same windows",
            "ours": seconds, "reference": reference, "unit": "s wall", "ratio": seconds / reference,
            "target": None, "ok": bool(reached and seconds <= 60),
            "note": f"held-out mean KL over layers 0..{n_layers - 1}: tuned {kl['tuned']:.3f} vs logit "
                    f"{kl['logit']:.3f} (stated: tuned <= 0.5 x logit: {'reached' if reached else 'missed'}); "
                    f"goal <= 60 s; {fit.tokens_seen} tokens"}


def _jacobian_row(quick: bool) -> dict:
    n_prompts = 2 if quick else 8
    cfg = wb.models.TransformerConfig(vocab_size=64, context=32, d_model=64, n_layers=4, n_heads=4, d_mlp=256)
    model = wb.models.build(cfg).eval()
    x = torch.randint(0, 64, (n_prompts, 32), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lenses.fit_jacobian_lens(model, x[:1])  # warm-up
        t = time.perf_counter()
        lenses.fit_jacobian_lens(model, x)
        per_prompt = (time.perf_counter() - t) / n_prompts

        def forward():
            with torch.no_grad():
                model(x[:1])
        reference = _median_wall(forward, 20)
    finally:
        torch.set_num_threads(threads)
    return {"entry": "lenses: Jacobian lens per prompt (4 blocks, d_model 64, 32 tokens, 2 threads) / one plain "
                     "forward of the prompt",
            "ours": per_prompt, "reference": reference, "unit": "s wall", "ratio": per_prompt / reference,
            "target": None, "ok": per_prompt <= 2.0,
            "note": f"goal <= 2 s per prompt; {n_prompts} prompts; one forward of 64 copies and one backward per prompt"}


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [_tuned_row(quick)]
    finally:
        torch.set_num_threads(threads)
    rows.append(_jacobian_row(quick))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 120, "display.width", 220, "display.float_format", "{:.4g}".format):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))


if __name__ == "__main__":
    main()
