"""The workflows in python/ run as documented (tiny sizes) and print what they promise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def _run(args, timeout=600, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout, json.loads(res.stdout.strip().splitlines()[-1])  # the last line is the JSON summary


def test_drop_in_loss_in_a_user_training_loop():
    out, summary = _run([sys.executable, str(PYTHON_DIR / "drop_in_loss.py"), "--steps", "4", "--size", "32",
                         "--n-images", "12", "--batch-size", "3"])
    assert summary["steps"] == 4 and summary["processes"] == 1 and summary["images"] == 12
    # the fused clustering loss gives the published formulation's numbers (float32)
    assert summary["max_abs_diff_vs_published"] < 1e-4
    assert all(torch.isfinite(torch.tensor([summary["first_loss"], summary["last_loss"]])))
    assert "step 4/4: loss" in out


def test_drop_in_loss_reads_a_folder_of_images(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray((torch.rand(40, 36, generator=g) * 255).byte().numpy()).save(tmp_path / f"im{i}.png")
    _, summary = _run([sys.executable, str(PYTHON_DIR / "drop_in_loss.py"), "--images", str(tmp_path),
                       "--steps", "2", "--size", "32", "--batch-size", "2"])
    assert summary["images"] == 4 and summary["size"] == 32


def test_torchrun_launch_of_two_gloo_processes(tmp_path):
    out, summary = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         str(PYTHON_DIR / "torchrun_pretrain.py"), "--steps", "3", "--size", "32", "--n-images", "12",
                         "--batch-size", "2", "--out", str(tmp_path / "weights.pt")], cwd=tmp_path)
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert summary["max_weight_spread_across_processes"] == 0.0  # DDP kept the processes' weights equal
    assert summary["max_abs_diff_vs_published"] < 1e-4
    sd = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert "emb.weight" in sd and "clu.weight" in sd


def test_pretrain_then_probe_on_the_shipped_data(tmp_path):
    pytest.importorskip("nilearn", reason="the default data ship inside nilearn")
    out, summary = _run([sys.executable, str(PYTHON_DIR / "pretrain_then_probe.py"), "--out", str(tmp_path / "o"),
                         "--size", "32", "--epochs1", "1", "--epochs2", "1", "--steps-per-epoch", "1",
                         "--batch-size", "2", "--shots", "1", "--seeds", "1"])
    assert summary["structures"] == ["ventricles", "thalamus"]
    assert set(summary["mean_dice"]) == {"LD", "random-init", "intensity", "position"}
    assert all(0.0 <= d <= 1.0 for d in summary["mean_dice"].values())
    assert (tmp_path / "o" / "pretrain" / "model.pt").stat().st_size > 0
    md = (tmp_path / "o" / "probe" / "results.md").read_text()
    assert "| ventricles | 1 |" in md and "| thalamus | 1 |" in md
    assert (tmp_path / "o" / "probe" / "overlays.png").stat().st_size > 0
