"""How long an explorer takes to recompute after a widget changes, on the notebooks' model sizes.

    python bench/bench_explore.py        # prints a table; --quick: fewer repeats

Each row sets one choice of an explorer in code, as its widget would (``wb.ui.explore(...)``), and times the
wall clock until the figures are redrawn (median of a few changes, after one warm-up change). The target is
under 2 s on one CPU thread. The reference is what the change costs at least: a plain forward pass of the
model over the same inputs for views that read a model, building the view's main figure from its frame for
views that read a table. Models are the notebooks' sizes (trained for a few steps only: the sizes set the
cost, not the accuracy):

1. residual stream explorer (notebook 02: d_model 48, 4 blocks, 24 characters): the layer slider (re-slices
   the cached analysis), and a click on the lens heat-map (runs the erase intervention there);
2. interpolation and barriers (notebook 03: two width-128 MLPs on digits): adding a method (one alignment and
   its curve over 1024 examples per split), and the number of alphas (every method shown again);
3. collapse geometry (notebook 04: the digits recipe, width 128, 3 blocks, 1024 examples): the layer;
4. growth stages (notebook 01: KHOP grown 1 -> 2 blocks): the stage and the x axis;
5. grokking progress measures (notebook 07: p = 31): the step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import workbench as wb
from workbench import collapse, grokking, growth, lmc

TARGET_S = 2.0


def _median_wall(changes, repeats: int) -> float:
    """Median wall time of applying each change (a no-argument callable) ``repeats`` times round-robin."""
    changes[0]()   # warm-up: lazy imports, first figure templates
    times = []
    for i in range(repeats * len(changes)):
        t0 = time.perf_counter()
        changes[i % len(changes)]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _forward(model, x) -> float:
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def _row(entry: str, ours: float, reference: float, ref_name: str, note: str = "") -> dict:
    return {"entry": entry, "ours": ours, "reference": reference, "unit": "s wall", "ratio": ours / reference,
            "target": f"< {TARGET_S:g} s", "ok": bool(ours < TARGET_S), "note": f"reference: {ref_name}" +
            (f"; {note}" if note else "")}


def _cycle(view, name: str, values):
    values = list(values)
    state = {"i": 0}

    def change():
        state["i"] += 1
        setattr(view, name, values[state["i"] % len(values)])
        if getattr(view, "errors", None) is not None and view.errors.text:
            raise RuntimeError(view.errors.text)
    return change


def residual_rows(repeats: int) -> list[dict]:
    ds = wb.data.load("text", context=24, corpus_chars=30_000)
    cfg = wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=24, vocab=list(ds.vocab), d_model=48,
                                      n_layers=4, n_heads=4, d_mlp=128, seed=0)
    model = wb.models.build(cfg)
    wb.train(model, ds, wb.TrainConfig(steps=20, eval_every=20, eval_max=32))
    x = ds.x_val[0]
    view = wb.ui.explore(model, x)
    stream = view.stream
    layer = _median_wall([_cycle(stream, "layer", [1, 2, 3, 0])], repeats)
    cells = iter(range(10_000))

    def click():
        k = next(cells)
        stream.lens_pane.click_data = {"points": [{"x": k % 24, "y": k % 4, "pointNumber": [k % 4, k % 24]}]}
    clicked = _median_wall([click], repeats)
    ref = _forward(model, x[None])
    return [_row("residual explorer: layer slider (notebook 02 model)", layer, ref, "one forward of the input"),
            _row("residual explorer: click on the lens heat-map (erase there)", clicked, ref,
                 "one forward of the input")]


def connectivity_rows(repeats: int) -> list[dict]:
    ds = wb.data.load("digits")
    cfg = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=128, d_hidden=128, n_layers=2)
    a, b = (r.model for r in lmc.train_pair(cfg, ds, seeds=(0, 1), train_config=wb.TrainConfig(steps=20)))
    view = wb.ui.explore(a, b, ds, methods=["none"], n_alphas=11, max_examples=1024)

    def add_method():
        view.methods = ["none"]            # drops the curve: the next change computes it again
        view.curves = view.curves[view.curves["method"] == "none"]
        t0 = time.perf_counter()
        view.methods = ["none", "activations"]
        return time.perf_counter() - t0

    add_method()
    added = statistics.median(add_method() for _ in range(repeats))
    alphas = _median_wall([_cycle(view, "n_alphas", [13, 11])], repeats)
    ref = _forward(a, ds.x_val[:1024])
    return [_row("connectivity view: add activation matching (notebook 03 pair, width 128)", added, ref,
                 "one forward of 1024 examples", "align by activations, 11 alphas x 2 splits"),
            _row("connectivity view: alphas 11 <-> 13 (two methods)", alphas, ref, "one forward of 1024 examples")]


def collapse_rows(repeats: int) -> list[dict]:
    model, cfg, ds = collapse.recipe("digits", epochs=1)
    wb.train(model, ds, cfg)
    view = wb.ui.explore(model, ds.x_train, ds.y_train, max_samples=1024)
    layer = _median_wall([_cycle(view, "layer", [0, 1, 2, 3, -1])], repeats)
    ref = _forward(model, ds.x_train[:1024])
    return [_row("collapse view: layer (notebook 04 recipe, 1024 examples)", layer, ref,
                 "one forward of 1024 examples")]


def growth_rows(repeats: int) -> list[dict]:
    from workbench.figures.growth import growth_curves

    khop = wb.recipes.KHOP
    ds = khop.load_data()
    model = wb.models.build(khop.model_config(ds, n_layers=1))
    run = growth.grow(model, ds, growth.preset("layerwise", 30, start_layers=1, final_layers=khop.final_layers),
                      khop.train_config())
    view = wb.ui.explore(run)
    stage = _median_wall([_cycle(view, "stage", [0, 1])], repeats)
    axis = _median_wall([_cycle(view, "x", ["flops", "step"])], repeats)
    t0 = time.perf_counter()
    growth_curves(run.metrics, x="flops")
    ref = time.perf_counter() - t0
    return [_row("growth view: stage (notebook 01 KHOP run)", stage, ref, "building the curves figure"),
            _row("growth view: x axis step <-> flops", axis, ref, "building the curves figure")]


def grokking_rows(repeats: int) -> list[dict]:
    from workbench.figures import grokking as gfigs

    run = grokking.run(grokking.GrokConfig(p=31, train_fraction=0.6, steps=300, eval_every=50, every=50))
    view = wb.ui.explore(run)
    steps = view.steps
    step = _median_wall([_cycle(view, "step", steps[::2] or steps)], repeats)
    t0 = time.perf_counter()
    gfigs.loss_curves(run.metrics, grokking.phases(run.metrics))
    ref = time.perf_counter() - t0
    return [_row("grokking view: step (notebook 07, p = 31)", step, ref, "building the loss figure")]


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    repeats = 2 if quick else 5
    rows = []
    for part in (residual_rows, connectivity_rows, collapse_rows, growth_rows, grokking_rows):
        rows += part(repeats)
    return rows


if __name__ == "__main__":
    import pandas as pd

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with pd.option_context("display.max_colwidth", 90, "display.width", 240, "display.float_format", "{:.4g}".format):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))
