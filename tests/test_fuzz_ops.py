"""Fuzzing of the raw operators (torch.ops.ld_ext.*): random shapes, dims, dtypes and devices.

The calls run in a subprocess (tests/fuzz_ops_worker.py), so that a crash (SIGSEGV, abort) fails
this test instead of killing pytest. Seeded; LD_EXT_FUZZ_CALLS sets the number of calls (default
1,500 per seed here; run e.g. LD_EXT_FUZZ_CALLS=5000 for a longer search).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_ops_worker.py")
CALLS = int(os.environ.get("LD_EXT_FUZZ_CALLS", "1500"))


@pytest.mark.parametrize("seed", [0, 1])
def test_raw_ops_never_crash(seed):
    proc = subprocess.run(
        [sys.executable, WORKER, "--seed", str(seed), "--calls", str(CALLS), "--trace"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = "\n".join(proc.stderr.splitlines()[-25:])
    assert proc.returncode >= 0, f"the worker died with signal {-proc.returncode}; last calls:\n{tail}"
    assert proc.returncode == 0, f"misbehaving calls (rc {proc.returncode}):\n{tail}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["calls"] == CALLS and counts["problems"] == 0
    # Both kinds of call were exercised in numbers: valid ones ran, invalid ones were refused.
    assert counts["valid_ok"] >= CALLS // 10, counts
    assert counts["invalid_refused"] >= CALLS // 3, counts
