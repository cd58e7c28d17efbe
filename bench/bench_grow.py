"""Grow benchmark: FLOPs for a grown model against one trained from scratch to reach scratch's final
validation loss on the default khop task, and the cost of a growth operation against one training step.

    python bench/bench_grow.py            # prints the rows
    python -m bench --only grow [--quick] # through the harness

Rows: layer-by-layer growth (lower blocks frozen) vs scratch, G_stack vs scratch (both on equal
training FLOPs, counted by ``workbench.flops``), and one growth operation vs one training step.
At this budget (``growth.KHOP_DEFAULTS``) neither model has learned the khop look-up yet; the FLOP
ratio measures how much sooner growth reaches the loss scratch ends at on the same compute.

Reference points: G_stack (Du et al. 2024) reports 54.6% fewer tokens at 7B to reach the loss of a
conventionally trained model (grown/scratch = 194B/300B ~ 0.65); the target for a growth operation
is < 1 training step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import workbench as wb
from workbench import growth

# The default khop task and model of notebooks/01_grow.ipynb (see growth.KHOP_DEFAULTS).
TASK = growth.KHOP_DEFAULTS["data"]
MODEL = growth.KHOP_DEFAULTS["model"]
TRAIN = growth.KHOP_DEFAULTS["train"]


def _step_time(model, ds, config, repeats: int = 20) -> float:
    """Median seconds of one training step (forward, backward, AdamW) at ``config.batch_size``."""
    opt = growth.rebuild_optimizer(model, None, config)
    x, y = ds.x_train[:config.batch_size], ds.y_train[:config.batch_size]
    times = []
    model.train()
    for _ in range(repeats + 3):
        t = time.perf_counter()
        loss, _, _ = wb.training.loss_and_correct(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def _growth_time(model, ds, config, repeats: int = 20) -> float:
    """Median seconds of add_layer(init="zero") + freeze + rebuild_optimizer (what grow does between
    stages), on a copy of ``model`` whose optimizer holds state from one step."""
    import copy

    x, y = ds.x_train[:config.batch_size], ds.y_train[:config.batch_size]
    times = []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        opt = growth.rebuild_optimizer(m, None, config)
        wb.training.loss_and_correct(m(x), y)[0].backward()
        opt.step()
        t = time.perf_counter()
        growth.add_layer(m, init="zero")
        growth.freeze(m, below=len(m.blocks) - 1)
        growth.rebuild_optimizer(m, opt, config)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    ds = wb.data.load("khop", **TASK)
    steps = TRAIN["steps_per_stage"] // (4 if quick else 1)
    config = wb.TrainConfig(**{k: v for k, v in TRAIN.items() if k != "steps_per_stage"})
    schedule = growth.preset("layerwise", steps, start_layers=1, final_layers=MODEL["final_layers"])
    model_config = {k: v for k, v in MODEL.items() if k != "final_layers"}
    t0 = time.perf_counter()
    cmp = growth.compare(schedule, ds, dict(model_config, n_layers=1), config)
    seconds = time.perf_counter() - t0
    grown_f, scratch_f = cmp.flops_to_target["grown"], cmp.flops_to_target["scratch"]
    reached = grown_f == grown_f  # NaN: the grown run never reached scratch's final loss
    s = cmp.summary.set_index("method")
    rows = [{
        "entry": "grow: training FLOPs to reach scratch's final val loss (khop, layer by layer vs scratch)",
        "ours": grown_f, "reference": scratch_f, "unit": "FLOPs", "ratio": cmp.ratio,
        "target": "< 1 (G_stack at 7B: 194B/300B tokens = 0.65)", "ok": bool(reached and cmp.ratio < 1),
        "note": (f"khop {TASK}, 1 -> {MODEL['final_layers']} blocks, {steps} steps/stage, lower blocks frozen; "
                 f"target loss {cmp.target_loss:.4f}; final val acc grown {s.loc['grown', 'val_acc']:.3f}, "
                 f"scratch {s.loc['scratch', 'val_acc']:.3f} on equal FLOPs"
                 + ("" if reached else "; the grown run never reached the target") + f"; {seconds:.0f} s"),
    }]
    # G_stack: train one block, stack it to the final depth, train on (nothing frozen)
    final = MODEL["final_layers"]
    gstack = growth.preset("gstack", steps, start_layers=1, final_layers=final, total_steps=final * steps,
                           stack_at=steps)
    t0 = time.perf_counter()
    g = growth.compare(gstack, ds, dict(model_config, n_layers=1), config)
    g_reached = g.flops_to_target["grown"] == g.flops_to_target["grown"]
    rows.append({
        "entry": "grow: training FLOPs to reach scratch's final val loss (khop, G_stack vs scratch)",
        "ours": g.flops_to_target["grown"], "reference": g.flops_to_target["scratch"], "unit": "FLOPs",
        "ratio": g.ratio, "target": "< 1 (G_stack at 7B: 0.65)", "ok": bool(g_reached and g.ratio < 1),
        "note": (f"1 block for {steps} steps, stacked x{final}, {(final - 1) * steps} more steps; target loss "
                 f"{g.target_loss:.4f}" + ("" if g_reached else "; never reached the target")
                 + f"; {time.perf_counter() - t0:.0f} s"),
    })
    probe = wb.models.build(wb.models.TransformerConfig(
        vocab_size=ds.vocab_size, context=ds.seq_len, **dict(model_config, n_layers=MODEL["final_layers"] - 1)))
    step = _step_time(probe, ds, config)
    grow_t = _growth_time(probe, ds, config)
    rows.append({"entry": "grow: one growth operation (add_layer zero + freeze + optimizer rebuild) vs one step",
                 "ours": grow_t, "reference": step, "unit": "s", "ratio": grow_t / step, "target": "< 1",
                 "ok": grow_t < step,
                 "note": f"{MODEL['final_layers'] - 1} -> {MODEL['final_layers']} blocks; a step at batch "
                         f"{config.batch_size} (forward, backward, AdamW), medians"})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="quarter of the steps (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for r in run(args.quick):
        print(f"{r['entry']}\n    ours {r['ours']:.4g} {r['unit']}, reference {r['reference']:.4g} {r['unit']}, "
              f"ratio {r['ratio']:.3f} (target {r['target']}, ok: {r['ok']})\n    {r['note']}")


if __name__ == "__main__":
    main()
