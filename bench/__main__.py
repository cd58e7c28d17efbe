"""Run every benchmark module and print one table of ratios measured in this run.

    python -m bench                # all entries
    python -m bench --quick        # small sizes (smoke test)
    python -m bench --only train   # modules whose name contains "train"
    python -m bench --full         # full sizes where a module has them (bench_residual: GPT-2 small, 1024 tokens)
    python -m bench --csv out.csv  # also save the table
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import time
import traceback

import pandas as pd

import bench

COLUMNS = ["entry", "ours", "reference", "unit", "ratio", "target", "ok", "note"]


def collect(quick: bool, only: str | None, full: bool = False) -> pd.DataFrame:
    rows = []
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if not info.name.startswith("bench_") or (only and only not in info.name):
            continue
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{info.name}")
            kwargs = {"full": True} if full and "full" in inspect.signature(module.run).parameters else {}
            got = module.run(quick=quick, **kwargs)
        except Exception as e:  # one broken entry must not hide the others
            traceback.print_exc()
            got = [{"entry": info.name, "ok": False, "note": f"failed: {type(e).__name__}: {e}"}]
        print(f"[{info.name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        rows.extend(got)
    table = pd.DataFrame(rows)
    return table[[c for c in COLUMNS if c in table] + [c for c in table if c not in COLUMNS]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", help="run modules whose name contains this")
    parser.add_argument("--full", action="store_true", help="full sizes where a module has them (minutes each)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    table = collect(args.quick, args.only, args.full)
    with pd.option_context("display.max_colwidth", 70, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
