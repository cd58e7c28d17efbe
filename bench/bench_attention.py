"""Attention-pattern, causal-tracing and attribution-patching benchmarks, each against a reference measured in
the same run.

    python bench/bench_attention.py       # prints a table; --quick for smaller sizes

Rows:

1. Attention-pattern capture on our Transformers: a forward inside ``attention.watch_patterns`` (every layer on
   the explicit path, each pattern handed to a function) against the plain fused forward of the same model
   (target <= 1.5x). Two models: the tiny one (d_model 48, 4 layers, 4 heads, context 24, batch 64) and
   d_model 128, 4 layers, 4 heads, context 64, batch 32 (quick: batch 8 / 4).
2. Head-type scores (``attention.head_scores`` on the same input: capture plus the five scores reduced per
   layer) against the plain forward (reported; no target).
3. The Hugging Face GPT-2 export of the d_model 128 model: capture under eager attention against its plain
   (SDPA) forward (reported).
4. Memory (GPT-2-small shape: ``transformers.GPT2Config()`` defaults, random init, one sequence of 1024 tokens;
   quick: 2 layers, 256 tokens): peak RSS above the loaded model of ``head_scores`` (patterns streamed per
   layer) against one plain forward, each in a fresh subprocess after a warm-up call on 8 tokens, RSS
   sampled every 2 ms (target <= 2x); the note gives the size all layers' patterns would take.
5. Causal tracing (``tracing.causal_trace``, 10 samples, one prompt of 16 tokens, the d_model 128 model)
   against exact patching (``residual.patch`` at ``resid_pre``, same prompt as a batch of 1 with the subject
   replaced) (reported: ROME's L x T cells of 10 rows, batched, against (L + 1) x T forwards of 1 row).
6. Attribution patching (AtP, one forward and backward) and AtP-IG (16 steps) at ``resid_pre`` against exact
   patching on the same batch (8 x 32 tokens; quick 2 x 16) (reported).

Times are CPU time of this process with torch on one thread, median of interleaved repeats (robust on a shared
machine); wall-clock medians are in the notes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch

import workbench as wb
from workbench import attention, interop, residual, tracing


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


def _row(entry, ours, reference, unit, target, note):
    ratio = ours / reference if reference else float("nan")
    return {"entry": entry, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "target": target, "ok": (ratio <= target) if target is not None else None, "note": note}


def _model(d_model: int, context: int, vocab: int = 64, seed: int = 0):
    cfg = wb.models.TransformerConfig(vocab_size=vocab, context=context, d_model=d_model, n_layers=4, n_heads=4,
                                      d_mlp=4 * d_model, seed=seed)
    return wb.models.build(cfg).eval()


def _capture_rows(quick: bool, repeats: int) -> list[dict]:
    rows = []
    for d, T, B in ((48, 24, 8 if quick else 64), (128, 64, 4 if quick else 32)):
        model = _model(d, T)
        x = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))

        def plain():
            with torch.no_grad():
                model(x)

        def capture():
            with torch.no_grad(), attention.watch_patterns(model, lambda layer, p: None):
                model(x)

        def scores():
            attention.head_scores(model, x)
        t = _interleaved({"plain": plain, "capture": capture, "scores": scores}, repeats)
        shape = f"d_model {d}, 4 layers, {B} x {T} tokens"
        rows.append(_row(f"attention: forward with pattern capture / plain forward ({shape})", t["capture"][0] * 1e3,
                         t["plain"][0] * 1e3, "ms CPU", 1.5,
                         f"wall {t['capture'][1] * 1e3:.1f} vs {t['plain'][1] * 1e3:.1f} ms"))
        rows.append(_row(f"attention: head_scores (5 kinds) / plain forward ({shape})", t["scores"][0] * 1e3,
                         t["plain"][0] * 1e3, "ms CPU", None,
                         f"wall {t['scores'][1] * 1e3:.1f} vs {t['plain'][1] * 1e3:.1f} ms"))
    return rows, model, x


def _hf_row(model, x, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        path = interop.export_gpt2(model, tmp)
        hf, _ = interop.load_gpt2(path)
    hf.eval()

    def plain():
        with torch.no_grad():
            hf(input_ids=x)

    def capture():
        with torch.no_grad(), attention.watch_patterns(hf, lambda layer, p: None):
            hf(input_ids=x)
    t = _interleaved({"plain": plain, "capture": capture}, repeats)
    impl = hf.config._attn_implementation
    return _row("attention: HF GPT-2 export, capture under eager attention / plain forward", t["capture"][0] * 1e3,
                t["plain"][0] * 1e3, "ms CPU", None,
                f"plain forward uses {impl!r}; wall {t['capture'][1] * 1e3:.1f} vs {t['plain'][1] * 1e3:.1f} ms")


_MEM_CHILD = r"""
import gc, sys, threading, time, psutil, torch, transformers
transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
side, n_layer, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = transformers.GPT2Config(n_layer=n_layer)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(cfg).eval()
x = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
from workbench import attention
attention.head_scores(model, x[:, :8]) if side == "scores" else None   # imports and first-call allocations
with torch.no_grad():
    model(input_ids=x[:, :8])
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
        attention.head_scores(model, x)
stop.set(); th.join()
print(peak[0] - base)
"""


def _memory_row(quick: bool) -> dict:
    import subprocess
    import sys
    n_layer, T = (2, 256) if quick else (12, 1024)
    out = {}
    for side in ("forward", "scores"):
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, side, str(n_layer), str(T)], capture_output=True,
                             text=True, check=True)
        out[side] = int(res.stdout.strip().splitlines()[-1]) / 2**20
    all_layers = n_layer * 12 * T * T * 4 / 2**20
    return _row(f"attention: head_scores peak RSS above the model (GPT-2 shape, {n_layer} layers, {T} tokens) / "
                "plain forward", out["scores"], out["forward"], "MiB", 2.0,
                f"patterns streamed per layer; all {n_layer} layers' patterns kept would be {all_layers:.0f} MiB; each "
                "side in a fresh subprocess after a warm-up on 8 tokens")


def _tracing_rows(model, quick: bool, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    T = 16
    prompt = torch.randint(0, 64, (T,), generator=g)
    corrupt = prompt.clone()
    corrupt[3:6] = torch.randint(0, 64, (3,), generator=g)
    B, Tb = (2, 16) if quick else (8, 32)
    clean_b = torch.randint(0, 64, (B, Tb), generator=g)
    corrupt_b = clean_b.clone()
    corrupt_b[:, 3:6] = torch.randint(0, 64, (B, 3), generator=g)
    pair = (1, 2)
    t = _interleaved({
        "trace": lambda: tracing.causal_trace(model, prompt, (3, 6), samples=10),
        "patch1": lambda: residual.patch(model, prompt[None], corrupt[None], pair),
        "patch": lambda: residual.patch(model, clean_b, corrupt_b, pair),
        "atp": lambda: tracing.attribution_patching(model, clean_b, corrupt_b, pair),
        "ig": lambda: tracing.attribution_patching(model, clean_b, corrupt_b, pair, method="ig", steps=16),
    }, max(1, repeats // 3))
    L = model.config.n_layers
    comp = tracing.compare_patching(model, clean_b, corrupt_b, pair, steps=16)
    rho = comp.correlation.set_index("method")["spearman"]
    return [
        _row(f"tracing: causal trace (ROME, 10 samples, {T} tokens) / exact patching of the prompt",
             t["trace"][0] * 1e3, t["patch1"][0] * 1e3, "ms CPU", None,
             f"{L * T} cells x 10 rows, batched, vs {(L + 1) * T} forwards of 1 row; wall "
             f"{t['trace'][1] * 1e3:.0f} vs {t['patch1'][1] * 1e3:.0f} ms"),
        _row(f"tracing: attribution patching (AtP) / exact patching ({B} x {Tb} tokens, resid_pre)",
             t["atp"][0] * 1e3, t["patch"][0] * 1e3, "ms CPU", None,
             f"2 forwards + 1 forward-backward vs {(L + 1) * Tb} forwards; Spearman rho with exact "
             f"{rho['atp']:.3f} (random-init model); wall {t['atp'][1] * 1e3:.0f} vs {t['patch'][1] * 1e3:.0f} ms"),
        _row(f"tracing: AtP-IG (16 steps) / exact patching ({B} x {Tb} tokens, resid_pre)",
             t["ig"][0] * 1e3, t["patch"][0] * 1e3, "ms CPU", None,
             f"Spearman rho with exact {rho['ig']:.3f} (random-init model); wall {t['ig'][1] * 1e3:.0f} ms"),
    ]


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = 5 if quick else 30
        rows, model, x = _capture_rows(quick, repeats)
        rows.append(_hf_row(model, x, repeats))
        rows.extend(_tracing_rows(model, quick, repeats))
    finally:
        torch.set_num_threads(threads)
    rows.append(_memory_row(quick))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 110, "display.width", 240, "display.float_format", "{:.4g}".format):
        print(pd.DataFrame(run(quick=args.quick)).to_string(index=False))


if __name__ == "__main__":
    main()
