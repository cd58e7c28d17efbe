"""bench/device_check.py on the CPU: the script a GPU machine runs in one call works without one.

It runs the engine tests that take the ``device`` fixture (here only tests/api/test_device.py), training
throughput against ``nn.TransformerEncoderLayer``, recording, the skip matrix and the depth report, weight
matching and OT fusion, and a Dask worker, at tiny sizes; every correctness check must pass.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_runs_on_the_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--device", "cpu", "--quick",
                          "--no-install", "--budget", "300"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "0 failed" in out and "FAILED" not in out, out[-4000:]
    for section in ("[imports]", "[tests]", "[train]", "[residual]", "[matching]"):
        assert section in out, (section, out[-3000:])
    assert "tokens/s, ours vs nn.TransformerEncoderLayer stack, fp32" in out
