"""Residual-stream benchmarks, each against a reference measured in the same run.

    python bench/bench_residual.py       # prints a table; --quick for smaller sizes

Rows:

1. Forward with full recording (``wb.hooks.record(model)``, the one hooks layer: every hook site, 7 per block
   plus 3) against the plain forward of the same workbench Transformer (target <= 1.15x).
2. The same on the Hugging Face GPT-2 export of that model (our adapter's forward hooks on
   GPT-2's modules) against the plain GPT-2 forward (target <= 1.15x).
3. TransformerLens 4.x ``TransformerBridge.run_with_cache`` on the same weights, loaded from
   the export directory, against our recorded forward (ratio reported; no target). Skipped,
   with the reason, when transformer-lens is not installed.
4. Residual page: choosing a layer or a token re-slices the cached analysis and patches the
   figures; median milliseconds per choice against the 300 ms requirement. The first
   analysis of the input (all engine calls) is in the note.

5. Memory (GPT-2-small shape: ``transformers.GPT2Config()`` defaults, random init, 124M, one sequence
   of 1024 tokens; default and quick: 2 layers, 256 tokens): peak RSS above the loaded model of
   ``contributions`` + ``logit_lens`` (streamed statistics) against one plain forward, each side in
   its own fresh subprocess, RSS sampled every 2 ms by a thread, after one warm-up call of that side on
   8 tokens (one-time imports and first-call allocations, about 150 MiB for the lens, are not counted)
   (target <= 2x).
6. Skip-effect matrix (``skip_effects``) against (L + 1) plain forwards of the same input in the same
   process: CPU time on one thread, median of interleaved repeats (target <= 1.2x); the wall-clock
   ratio on two threads is in the note.
7. Depth report (``residual.report``: contributions, lens, skips, IG, erasure; no patching) wall time on
   two threads against the estimate shown before it (``residual.estimate(model, T, "report", steps)``,
   calibration included in the estimate's call, not in the report's time): within 30% (ratio
   estimate / measured in 0.7 .. 1.3). IG steps: the report's default 16, 2 in ``--full``.
   ``--full``: rows 5-7 at the GPT-2-small shape (12 layers, 1024 tokens; several minutes on two cores).
   ``--depth``: only rows 5-7.

Every row carries ``load``: the machine's 1-minute load average when the row was measured.

Times are CPU time of this process with torch on one thread, median of interleaved repeats
(robust on a shared machine); wall-clock medians are in the notes. Model: d_model 128, 4 layers,
4 heads, d_mlp 512, context 64, batch 32 x 64 tokens (quick: batch 4).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch

import workbench as wb
from workbench import hooks, interop

CONTEXT = 64


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median CPU and wall time of each function, measured round-robin (drift hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def _model_and_data(quick: bool):
    ds = wb.data.load("text", context=CONTEXT, corpus_chars=20_000)
    cfg = wb.models.TransformerConfig(vocab_size=ds.vocab_size, context=CONTEXT, vocab=list(ds.vocab), d_model=128,
                                      n_layers=4, n_heads=4, d_mlp=512)
    model = wb.models.build(cfg).eval()
    x = ds.x_val[: 4 if quick else 32]
    return ds, model, x


def _row(entry, ours, reference, unit, target, note):
    ratio = ours / reference if reference else float("nan")
    return {"entry": entry, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "target": target, "ok": (ratio <= target) if target is not None else None, "note": note}


def _record_rows(model, x, hf, repeats):
    rows = []

    def plain():
        with torch.no_grad():
            model(x)

    def recorded():
        with torch.no_grad(), hooks.record(model):
            model(x)

    def hf_plain():
        with torch.no_grad():
            hf(input_ids=x)

    def hf_recorded():
        with torch.no_grad(), hooks.record(hf):
            hf(input_ids=x)

    t = _interleaved({"plain": plain, "rec": recorded, "hf": hf_plain, "hf_rec": hf_recorded}, repeats)
    n_sites = len(hooks.sites(model))
    rows.append(_row("residual: forward + record every site / plain forward", t["rec"][0] * 1e3, t["plain"][0] * 1e3,
                     "ms CPU", 1.15, f"{n_sites} sites; wall {t['rec'][1] * 1e3:.1f} vs {t['plain'][1] * 1e3:.1f} ms"))
    rows.append(_row("residual: HF GPT-2 export, adapter record / plain HF forward", t["hf_rec"][0] * 1e3,
                     t["hf"][0] * 1e3, "ms CPU", 1.15,
                     f"wall {t['hf_rec'][1] * 1e3:.1f} vs {t['hf'][1] * 1e3:.1f} ms"))
    return rows, t


def _transformer_lens_row(path, x, ours_recorded_cpu, hf_cpu, repeats):
    try:
        import transformer_lens  # noqa: F401
        from transformer_lens.model_bridge import TransformerBridge
    except Exception as e:  # not installed (it is in the optional "bench" extra)
        return _row("residual: TransformerLens run_with_cache / our record", float("nan"), ours_recorded_cpu * 1e3,
                    "ms CPU", None, f"skipped: transformer-lens unavailable ({type(e).__name__}: {e})")
    from importlib.metadata import version as _version

    version = _version("transformer-lens")
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    bridge.eval()

    def tl():
        with torch.no_grad():
            bridge.run_with_cache(x)

    t = _interleaved({"tl": tl}, repeats)["tl"]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(x)
    return _row("residual: TransformerLens run_with_cache / our record", t[0] * 1e3, ours_recorded_cpu * 1e3, "ms CPU",
                None, f"transformer-lens {version} bridge from the export dir, {len(cache)} hooks cached; "
                      f"{t[0] / hf_cpu:.2f}x a plain HF forward; wall {t[1] * 1e3:.1f} ms")


def _page_row(model, ds, quick):
    import panel as pn  # noqa: F401

    from workbench.ui.session import DataStore
    from workbench.ui.residual import ResidualPage

    with tempfile.TemporaryDirectory() as home:
        store = wb.RunStore(home)
        run = wb.train(model, ds, wb.TrainConfig(steps=1, eval_every=1, eval_max=16))
        run_id = store.save(run)
        page = ResidualPage(DataStore(store))
        page.run_select.value = run_id
        t = time.perf_counter()
        page.analyse(wait=True)
        first = time.perf_counter() - t
        if page.errors.text or page.task.status != "done":
            raise RuntimeError(page.errors.text or page.task.error)
        times = []
        n = 8 if quick else 24
        for i in range(n):
            t = time.perf_counter()
            if i % 2:
                page.position.value = (7 * i) % CONTEXT
            else:
                page.layer.value = (i // 2) % model.config.n_layers
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return _row("residual page: choose a layer or token (cached analysis)", ms, 300.0, "ms wall", 1.0,
                f"max {max(times) * 1e3:.0f} ms over {n} choices; first analysis {first:.2f} s")


def run(quick: bool = False, full: bool = False) -> list[dict]:
    load = _load()
    return [{**r, "load": load} for r in _run_rows(quick)] + run_depth(quick, full)


def _run_rows(quick: bool) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = 5 if quick else 30
        ds, model, x = _model_and_data(quick)
        with tempfile.TemporaryDirectory() as tmp:
            with contextlib.redirect_stderr(io.StringIO()):
                path = interop.export_gpt2(model, tmp, vocab=ds.vocab)
                hf, _ = interop.load_gpt2(path)
            rows, t = _record_rows(model, x, hf, repeats)
            rows.append(_transformer_lens_row(path, x, t["rec"][0], t["hf"][0], repeats))
        rows.append(_page_row(model, ds, quick))
        return rows
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- depth rows (5-7)

_MEM_CHILD = r"""
import gc, sys, threading, time, psutil, torch, transformers
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
side, n_layer, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = transformers.GPT2Config(n_layer=n_layer)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(cfg).eval()
x = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
from workbench import hooks, residual
hooks.adapter(model)          # imports (adapters, transformers modules) before the baseline, both sides
with torch.no_grad():            # one warm-up call of the measured side on 8 tokens: one-time imports and
    if side == "forward":        # first-call allocations are not per-analysis memory
        model(input_ids=x[:, :8])
    else:
        residual.contributions(model, x[:, :8])
        residual.logit_lens(model, x[:, :8])
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
th = threading.Thread(target=sample); th.start()
with torch.no_grad():
    if side == "forward":
        model(input_ids=x)
    else:
        residual.contributions(model, x)
        residual.logit_lens(model, x)
stop.set(); th.join()
print(peak[0] - base)
"""


def _memory_row(full: bool) -> dict:
    import subprocess
    import sys
    n_layer, T = (12, 1024) if full else (2, 256)
    out = {}
    for side in ("forward", "analyses"):
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, side, str(n_layer), str(T)], capture_output=True,
                             text=True, check=True)
        out[side] = int(res.stdout.strip().splitlines()[-1]) / 2**20
    return _row(f"contributions + logit lens peak RSS above the model (GPT-2 shape, {n_layer} layers, {T} tokens)",
                out["analyses"], out["forward"], "MiB", 2.0, "each side in a fresh subprocess after one warm-up call on 8 "
                "tokens; reference: one plain forward (no_grad)")


def _gpt2(full: bool):
    import transformers
    transformers.logging.set_verbosity_error()
    n_layer, T = (12, 1024) if full else (2, 256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer)).eval()
    x = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    return model, x, n_layer, T


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _skip_row(model, x, L: int, T: int, full: bool) -> dict:
    from workbench import residual
    threads = torch.get_num_threads()

    def plain():
        with torch.no_grad():
            for _ in range(L + 1):
                model(input_ids=x)
    fns = {"skip": lambda: residual.skip_effects(model, x), "plain": plain}
    load = _load()
    try:
        torch.set_num_threads(1)
        one = _interleaved(fns, 1 if full else 5)
        torch.set_num_threads(2)
        two = _interleaved(fns, 1 if full else 3)
    finally:
        torch.set_num_threads(threads)
    return {**_row(f"skip-effect matrix vs (L + 1) plain forwards (GPT-2 shape, {L} layers, {T} tokens)",
                   one["skip"][0], one["plain"][0], "s CPU", 1.2,
                   f"1 thread, median of interleaved repeats; wall on 2 threads {two['skip'][1]:.2f} vs "
                   f"{two['plain'][1]:.2f} s ({two['skip'][1] / two['plain'][1]:.2f}x)"), "load": load}


def _report_row(model, x, L: int, T: int, full: bool) -> dict:
    from workbench import residual
    steps = 2 if full else 16
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load = _load()
        w = time.perf_counter()
        est = residual.estimate(model, x.numel(), "report", steps=steps)
        t_est = time.perf_counter() - w
        w = time.perf_counter()
        residual.report(model, x, steps=steps)
        took = time.perf_counter() - w
    finally:
        torch.set_num_threads(threads)
    ratio = est["seconds"] / took
    return {"entry": f"depth report: estimate / measured, 2 threads (GPT-2 shape, {L} layers, {T} tokens, IG {steps} "
                     "steps, no patching)", "ours": est["seconds"], "reference": took, "unit": "s wall",
            "ratio": ratio, "target": "0.7-1.3", "ok": 0.7 <= ratio <= 1.3,
            "note": f"estimate {est['flops'] / 1e12:.2f} TFLOP, its call {t_est:.2f} s (calibration); load "
                    f"{load} -> {_load()}", "load": load}


def run_depth(quick: bool = False, full: bool = False) -> list[dict]:
    model, x, L, T = _gpt2(full)
    return [{**_memory_row(full), "load": _load()}, _skip_row(model, x, L, T, full), _report_row(model, x, L, T, full)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="rows 5-7 at the GPT-2-small shape (minutes)")
    parser.add_argument("--depth", action="store_true", help="only rows 5-7 (GPT-2-shaped memory, skips, report)")
    args = parser.parse_args(argv)
    import pandas as pd

    print(f"torch {torch.__version__}, load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    with pd.option_context("display.max_colwidth", 90, "display.width", 220, "display.float_format", "{:.4g}".format):
        rows = (run_depth(quick=args.quick, full=args.full) if args.depth
                else run(quick=args.quick, full=args.full))
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
