"""Logic of the GPU check's end-to-end training benchmark, run on the CPU at a tiny size (the GPU
figures themselves come from benchmarks/gpu_check.sh on a GPU machine)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_train_cpu_logic_writes_table_and_json(tmp_path, capsys):
    gpu_train = _load("gpu_train")
    torch.set_num_threads(1)
    rc = gpu_train.main(["--device", "cpu", "--size", "32", "--batch-size", "1", "--channels", "1",
                         "--repeats", "1", "--amp", "fp32", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "gpu_train.json").read_text())
    rows = {(r["impl"], r["amp"]): r for r in res["rows"]}
    assert set(rows) == {("fused", "fp32"), ("reference", "fp32")}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["images_per_s"] == pytest.approx(5 * 1e3 / r["ms_per_step"])
        assert torch.isfinite(torch.tensor(r["first_loss"]))
    # Same seed, same network and data: the first step's loss agrees between the implementations.
    assert rows[("fused", "fp32")]["first_loss"] == pytest.approx(rows[("reference", "fp32")]["first_loss"], rel=1e-4)
    ratio = res["ratios"]["fused_vs_reference_fp32"]
    assert ratio == pytest.approx(rows[("reference", "fp32")]["ms_per_step"] / rows[("fused", "fp32")]["ms_per_step"])
    md = (tmp_path / "gpu_train.md").read_text()
    assert "| fused | fp32 |" in md and "| reference | fp32 |" in md
    assert "fused vs reference fp32" in capsys.readouterr().out


def test_gpu_train_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    assert _load("gpu_train").main(["--size", "32"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_script_is_valid_bash():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_check_cpu_mode_runs_the_3d_head(tmp_path):
    """The GPU check's logic on the CPU (LD_EXT_GPU_CHECK_CPU=1, tiny sizes): its 3-D head stage runs
    `ld-ext bench --head3d`, whose tables come back in extra.tgz and are printed in the log."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile

    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("needs bash and tar")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, LD_EXT_GPU_CHECK_CPU="1",
               LD_EXT_GPU_DATA=str(tmp_path / "no_data"), OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert res.returncode == 0, log[-3000:]
    assert "3-D head rc=0" in log and "== ld-ext bench --head3d --device cpu --tiny" in log
    assert "| 16^3 | 2 |" in log  # the 3-D head's table, printed in the summary
    with tarfile.open(tmp_path / "out" / "extra.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"head3d/head3d.md", "head3d/head3d.json", "head3d.log"} <= names
