"""The engine on an accelerator, in one call: tests, throughput, recording, matching and fusion, a Dask worker.

    python3 bench/device_check.py                  # --device cuda (make device-check)
    python3 bench/device_check.py --device cpu --quick    # the CPU smoke test (tests/test_device_check.py)

Made for a machine with a GPU and its own python3 (PyTorch with CUDA, transformers, pandas, scipy,
scikit-learn, safetensors) but no network and no Panel, plotly, POT, mnist1d or Dask: it imports only the
engine, and installs what it lacks (POT, Dask and distributed, pytest) from the wheels carried in
``bench/wheels/`` (``make device-wheels`` fills it on a machine with the registry; the folder is git-ignored,
so carry it along) with ``pip install --no-index``; a part whose package cannot be installed is skipped
with the reason. Sections, each timed against a reference measured in the same run:

1. engine imports: ``workbench.residual``, growth, lmc, training load without Panel, Bokeh or plotly;
2. the engine tests that take the ``device`` fixture (found under ``tests/``), ``pytest -m device --device``;
3. training tokens/s of our Transformer against an ``nn.TransformerEncoderLayer`` stack of the same shape
   in the same loop (goal >= 1.0x) in float32, TF32 and bf16 autocast, with the model FLOP utilisation
   (``6 N + 12 L T d`` per token) against a matmul measured here in that precision (and the data sheet's
   dense peak for H100/H200); ``wb.train`` itself against that plain loop;
4. recording every site against a plain forward, peak memory of contributions + logit lens against a plain
   forward (``torch.cuda.max_memory_allocated``), the skip matrix against (L + 1) forwards, the depth report
   against its estimate (GPT-2-small shape, random weights);
5. weight matching and OT fusion on the device (a model against a permuted copy of itself: recovered
   exactly), timed against the same on the CPU;
6. a Dask worker (a ``LocalCluster`` process) training a model on the device.

One table of results; the exit status is 1 when a check failed (a test, a wrong answer, an error), not
for a missed speed target (``--strict``: those too). ``--budget`` seconds (default 420) bounds the run:
a section that would start after it is skipped with a line.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WHEELS = ROOT / "bench" / "wheels"
# module -> what pip installs for it from the carried wheels
CARRIED = {"ot": ["POT"], "distributed": ["dask", "distributed"], "pytest": ["pytest"]}
# dense data-sheet peaks (FLOP/s) by precision, for the MFU against the vendor's number
PEAKS = {"H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
         "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}}
FORBIDDEN = ("panel", "bokeh", "plotly", "param")

ROWS: list[dict] = []


def row(section, entry, ours=None, reference=None, unit="", target=None, ok=None, note="", check=False):
    """One table row; ``check``: a correctness check (failing it fails the run), else a speed target."""
    ratio = ours / reference if isinstance(ours, (int, float)) and isinstance(reference, (int, float)) \
        and reference not in (0, None) and not math.isnan(reference) else None
    ROWS.append({"section": section, "entry": entry, "ours": ours, "reference": reference, "unit": unit,
                 "ratio": ratio, "target": target, "ok": ok, "kind": "check" if check else "target", "note": note})
    flag = "" if ok is None else ("ok" if ok else "FAILED" if check else "missed")
    print(f"[{section}] {entry}: {_fmt(ours)} vs {_fmt(reference)} {unit} {('ratio %.3g' % ratio) if ratio else ''} "
          f"{flag} {note}", flush=True)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3, warmup=1):
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- 0. carried wheels


def install_carried(no_install: bool) -> None:
    for module, packages in CARRIED.items():
        if importlib.util.find_spec(module) is not None:
            row("setup", f"{module} present", ok=True, note="already installed")
            continue
        if no_install:
            row("setup", f"{module} absent", note="--no-install: the parts that need it are skipped")
            continue
        if not WHEELS.is_dir():
            row("setup", f"{module} absent", note=f"no {WHEELS.relative_to(ROOT)}/ (make device-wheels, then carry "
                                                 "it): the parts that need it are skipped")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS),
               "--disable-pip-version-check", "-q", *packages]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        importlib.invalidate_caches()
        ok = res.returncode == 0 and importlib.util.find_spec(module) is not None
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] if not ok else []
        row("setup", f"install {' '.join(packages)} from the carried wheels", ok=ok,
            note="installed" if ok else f"not installed, the parts that need it are skipped: {' '.join(tail)[:200]}")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- 1. imports


def check_imports() -> None:
    before = {m for m in sys.modules if m.split(".")[0] in FORBIDDEN}
    import workbench as wb
    for name in ("residual", "growth", "lmc", "hooks", "permute", "lenses"):
        getattr(wb, name)
    wb.train, wb.TrainConfig  # noqa: B018  (the training module)
    loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN} - before)
    row("imports", "engine (residual, growth, lmc, training, hooks, lenses) without Panel/Bokeh/plotly",
        ok=not loaded, check=True, note=f"loaded: {loaded}" if loaded else "none of them loaded")


# ----------------------------------------------------------------------------- 2. tests


def device_test_files() -> list[str]:
    """Test files under tests/ with a test that takes the ``device`` fixture."""
    pattern = re.compile(r"def test_\w+\([^)]*\bdevice\b", re.S)
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            files.append(str(path.relative_to(ROOT)))
    return files


def run_tests(device, quick: bool, timeout: float) -> None:
    if not have("pytest"):
        row("tests", "engine tests on the device", ok=False, check=True, note="pytest is not installed")
        return
    files = device_test_files()
    if quick:
        files = [f for f in files if f.endswith("/test_device.py")] or files[:1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "pytest", *files, "-m", "device", "--device", str(device), "-q", "-p",
           "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestConfigWarning"]
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        out, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
    took = time.perf_counter() - t
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", out)}
    failures = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if code != 0:
        print(out[-6000:], flush=True)
    row("tests", f"pytest -m device --device {device} ({len(files)} files)", counts.get("passed", 0),
        counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "tests passed", ok=code == 0, check=True,
        note=f"{took:.0f} s; {counts}; " + ("; ".join(failures[:5]) if failures else "exit 0" if code == 0 else
                                            f"exit {code}"))


# ----------------------------------------------------------------------------- 3. training throughput


def _reference_lm(V, D, L, H, T, d_mlp):
    import torch
    import torch.nn as nn

    class ReferenceLM(nn.Module):
        """The same shape from torch's own layers (pre-LN, GELU, causal)."""

        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(V, D)
            self.pos = nn.Embedding(T, D)
            layer = nn.TransformerEncoderLayer(D, H, d_mlp, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.stack = nn.TransformerEncoder(layer, L, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(D)
            self.head = nn.Linear(D, V, bias=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

        def forward(self, x):
            h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
            return self.head(self.norm(self.stack(h, mask=self.mask, is_causal=True)))
    return ReferenceLM()


def _matmul_peak(device, mode: str) -> float:
    import torch
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats=5, warmup=2)


@contextlib.contextmanager
def precision(mode: str):
    import torch
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def check_training(device, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    import workbench as wb
    if device.type == "cuda":
        V, D, L, H, T, B, steps = 8192, 512, 8, 8, 512, 16, 20
        modes = ["fp32", "tf32", "bf16"]
    else:
        V, D, L, H, T, B, steps = 128, 64, 2, 2, 32, 4, 2 if quick else 6
        modes = ["fp32"]
    cfg = wb.models.TransformerConfig(vocab_size=V, context=T, d_model=D, n_layers=L, n_heads=H, d_mlp=4 * D, seed=0)
    ours = wb.models.build(cfg).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = _reference_lm(V, D, L, H, T, 4 * D).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g).to(device)
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    n_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(("tok_embed", "pos_embed")))
    flops_per_token = 6 * n_params + 12 * L * T * D
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    sheet = next((v for k, v in PEAKS.items() if k in gpu), None)

    def tokens_per_second(model, mode):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = F.cross_entropy(model(x).reshape(-1, V).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def run():
            for _ in range(steps):
                step()
        with precision(mode):
            return steps * B * T / timed(run, device, repeats=2, warmup=1)

    for mode in modes:
        a = tokens_per_second(ours, mode)
        b = tokens_per_second(ref, mode)
        with precision(mode):
            peak = _matmul_peak(device, mode)
        mfu = a * flops_per_token / peak
        note = f"d{D} L{L} H{H} T{T} B{B} V{V}, AdamW, {steps} steps; MFU {mfu:.2f} of a {peak / 1e12:.1f} TFLOP/s " \
               f"matmul measured here"
        if sheet:
            note += f", {a * flops_per_token / sheet[mode]:.2f} of the data sheet's {sheet[mode] / 1e12:.0f} TFLOP/s"
        row("train", f"tokens/s, ours vs nn.TransformerEncoderLayer stack, {mode}", a, b, "tokens/s", ">= 1.0",
            ok=a / b >= 1.0, note=note)

    # the engine's own loop (metrics, evaluation, a step budget) against the plain loop, float32
    ds = wb.data.Dataset("device-check", "sequence", x.cpu(), y.cpu(), x[:2].cpu(), y[:2].cpu(), n_classes=V,
                         description="random tokens")
    plain = tokens_per_second(ours, "fp32")
    config = wb.TrainConfig(steps=steps, batch_size=B, lr=1e-4, grad_clip=0.0, eval_every=10 ** 6, eval_max=2)
    wb.train(ours, ds, wb.TrainConfig(steps=1, batch_size=B, eval_every=10 ** 6, eval_max=2))
    sync(device)
    t = time.perf_counter()
    run = wb.train(ours, ds, config)
    sync(device)
    engine = steps * B * T / (time.perf_counter() - t)
    ok = run.status == "completed" and next(ours.parameters()).device == device
    row("train", "wb.train tokens/s vs the plain loop on our model, fp32", engine, plain, "tokens/s", ">= 0.9",
        ok=engine / plain >= 0.9 and ok, note=f"status {run.status}; one evaluation at the end (2 examples)")


# ----------------------------------------------------------------------------- 4. residual stream on the device


def check_residual(device, quick: bool) -> None:
    import torch
    import transformers

    import workbench as wb
    from workbench import residual
    transformers.logging.set_verbosity_error()
    big = device.type == "cuda" and not quick
    n_layer, T, B = (12, 1024, 4) if big else (2, 64, 2)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer) if big else \
        transformers.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=512, n_positions=128)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(device)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    shape = f"GPT-2 shape, {n_layer} layers, d {cfg.n_embd}, {B} x {T} tokens"

    def plain():
        with torch.no_grad():
            model(input_ids=x)

    def recorded():
        with torch.no_grad(), wb.hooks.record(model) as cache:
            model(input_ids=x)
        return cache
    t_plain, t_rec = timed(plain, device), timed(recorded, device)
    cache = recorded()
    on_device = all(t.device == device for t in cache.values())
    row("residual", f"forward + record every site vs plain forward ({shape})", t_rec, t_plain, "s", "<= 1.15",
        ok=t_rec / t_plain <= 1.15, note=f"{len(cache)} sites, all on {device}: {on_device}")
    row("residual", "recorded activations stay on the model's device", ok=on_device, check=True)

    if device.type == "cuda":
        def peak(fn):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        one = x[:1]
        m_plain = peak(lambda: _no_grad(model, one))
        m_ana = peak(lambda: (residual.contributions(model, one), residual.logit_lens(model, one)))
        row("residual", f"contributions + logit lens peak memory vs one plain forward (1 x {T} tokens)", m_ana, m_plain,
            "MiB", "<= 2", ok=m_ana / max(m_plain, 1e-9) <= 2, note="torch.cuda.max_memory_allocated above the model")
    else:
        row("residual", "peak memory on the device", note="skipped: torch.cuda.max_memory_allocated needs CUDA")

    xs = x[:1]

    def forwards():
        with torch.no_grad():
            for _ in range(n_layer + 1):
                model(input_ids=xs)
    t_skip = timed(lambda: residual.skip_effects(model, xs), device, repeats=3 if big else 2)
    t_fwd = timed(forwards, device, repeats=3 if big else 2)
    row("residual", f"skip-effect matrix vs (L + 1) plain forwards (1 x {T} tokens)", t_skip, t_fwd, "s", "<= 1.2",
        ok=t_skip / t_fwd <= 1.2)
    steps = 16 if big else 2
    est = residual.estimate(model, xs.numel(), "report", steps=steps)
    sync(device)
    t = time.perf_counter()
    rep = residual.report(model, xs, steps=steps)
    sync(device)
    took = time.perf_counter() - t
    ratio = est["seconds"] / took
    row("residual", f"depth report: its estimate vs measured (1 x {T} tokens, IG {steps} steps)", est["seconds"], took,
        "s", "0.7-1.3", ok=0.7 <= ratio <= 1.3, note=f"{est['flops'] / 1e12:.2f} TFLOP estimated; "
                                                     f"depth score {rep.depth_score:.2f}")


def _no_grad(model, x):
    import torch
    with torch.no_grad():
        model(input_ids=x)


# ----------------------------------------------------------------------------- 5. matching and fusion


def check_matching(device, quick: bool) -> None:
    import torch

    import workbench as wb
    permute = wb.permute
    D, L = (256, 4) if device.type == "cuda" and not quick else (32, 2)
    cfg = wb.models.TransformerConfig(vocab_size=97, context=32, d_model=D, n_layers=L, n_heads=4, d_mlp=4 * D, seed=0)
    model = wb.models.build(cfg).eval()
    shuffled = permute.permute(model, permute.random_permutation(model, seed=1))
    times, recovered = {}, {}
    for where in (torch.device("cpu"), device):
        a, b = copy.deepcopy(model).to(where), copy.deepcopy(shuffled).to(where)
        sync(where)
        t = time.perf_counter()
        perm, info = permute.match_weights(a, b)
        sync(where)
        times[where.type] = time.perf_counter() - t
        back = permute.permute(b, perm)
        recovered[where.type] = all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(a.state_dict().values(),
                                                                                back.state_dict().values()))
    row("matching", f"weight matching on {device} vs the CPU (Transformer d{D} L{L}, a permuted copy)",
        times[device.type], times["cpu"], "s", None, ok=recovered[device.type], check=True,
        note=f"recovered exactly on {device}: {recovered[device.type]}, on the CPU: {recovered['cpu']}")
    if not have("ot"):
        row("fusion", "OT fusion on the device", note="skipped: POT is not installed (make device-wheels, carry "
                                                      "bench/wheels)")
        return
    mlp = wb.models.build(wb.models.MLPConfig(d_in=40, n_classes=7, d_model=D, n_layers=L, d_hidden=2 * D, seed=0))
    mlp_b = permute.permute(mlp, permute.random_permutation(mlp, seed=2))
    data = torch.randn(256, 40, generator=torch.Generator().manual_seed(0))
    times, errors = {}, {}
    for where in (torch.device("cpu"), device):
        a, b, xd = copy.deepcopy(mlp).to(where), copy.deepcopy(mlp_b).to(where), data.to(where)
        sync(where)
        t = time.perf_counter()
        fused = wb.lmc.fuse(a, b, method="emd", data=xd).eval()
        sync(where)
        times[where.type] = time.perf_counter() - t
        with torch.no_grad():
            errors[where.type] = float((fused(xd) - a.eval()(xd)).abs().max())
    row("fusion", f"OT fusion (EMD, activations) on {device} vs the CPU (MLP d{D} L{L} with a permuted copy)",
        times[device.type], times["cpu"], "s", None, ok=errors[device.type] < 1e-3, check=True,
        note=f"fused vs the model, max |logit difference| {errors[device.type]:.2g} on {device}")


# ----------------------------------------------------------------------------- 6. a Dask worker on the device


def _worker_job(device_name: str, root: str) -> dict:
    """Runs in the Dask worker's process: train a small model on the device, say where it ran."""
    import sys as _sys
    if root not in _sys.path:
        _sys.path.insert(0, root)
    import torch

    import workbench as wb
    device = torch.device(device_name)
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=64, n_layers=2,
                                                seed=0)).to(device)
    run = wb.train(model, ds, wb.TrainConfig(steps=30, batch_size=64, eval_every=30, eval_max=256))
    acc = run.metrics[(run.metrics.split == "val") & (run.metrics.metric == "acc")].value.iloc[-1]
    return {"param_device": str(next(model.parameters()).device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
            "acc": float(acc), "status": run.status}


def check_dask(device, quick: bool) -> None:
    if not (have("dask") and have("distributed")):
        row("dask", "a Dask worker on the device", note="skipped: dask/distributed are not installed (make "
                                                        "device-wheels, carry bench/wheels)")
        return
    from distributed import Client, LocalCluster
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                               env={"PYTHONPATH": str(ROOT)})
    try:
        with Client(cluster) as client:
            got = client.submit(_worker_job, str(device), str(ROOT), pure=False).result(timeout=300)
    finally:
        cluster.close()
    took = time.perf_counter() - t
    ok = got["param_device"].startswith(device.type) and got["status"] == "completed"
    row("dask", f"a LocalCluster worker process trains on {device}", ok=ok, check=True,
        note=f"parameters on {got['param_device']} {got['gpu']}, val acc {got['acc']:.2f}, {took:.0f} s with the "
             "cluster's start")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes; of the tests only test_device.py")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped after it")
    parser.add_argument("--no-install", action="store_true", help="do not pip install the carried wheels")
    parser.add_argument("--strict", action="store_true", help="a missed speed target fails the run too")
    parser.add_argument("--only", default="", help="comma-separated sections: tests,train,residual,matching,dask")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    install_carried(args.no_install)
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", flush=True)
        return 2
    info = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {device}: {info}, load average "
          f"{os.getloadavg()}", flush=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    sections = [("imports", check_imports),
                ("tests", lambda: run_tests(device, args.quick, max(60.0, args.budget * 0.45))),
                ("train", lambda: check_training(device, args.quick)),
                ("residual", lambda: check_residual(device, args.quick)),
                ("matching", lambda: check_matching(device, args.quick)),
                ("dask", lambda: check_dask(device, args.quick))]
    for name, fn in sections:
        if only and name not in only and name != "imports":
            continue
        spent = time.perf_counter() - t0
        if spent > args.budget:
            row(name, f"section {name}", note=f"skipped: {spent:.0f} s spent, over the --budget of {args.budget:.0f} s")
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:       # one broken section must not hide the others
            traceback.print_exc()
            row(name, f"section {name}", ok=False, check=True, note=f"error: {type(e).__name__}: {e}"[:300])
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)

    import pandas as pd
    table = pd.DataFrame(ROWS)
    with pd.option_context("display.max_colwidth", 110, "display.width", 250, "display.float_format", "{:.4g}".format):
        print(table.drop(columns=["kind"]).to_string(index=False))
    failed = table[(table.ok == False) & ((table.kind == "check") | args.strict)]  # noqa: E712
    print(f"device check on {device}: {len(table)} rows, {len(failed)} failed, {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 1 if len(failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
