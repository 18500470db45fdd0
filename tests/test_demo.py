"""The MNI152 demo (``ld-ext demo``, ``ld_ext.demos``): data preparation, scoring (NMI, k-means) and a tiny end-to-end run."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from ld_ext import demos


def test_nmi_known_values():
    a = torch.tensor([0, 0, 1, 1])
    assert demos.normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert demos.normalized_mutual_info(a, 5 - a) == pytest.approx(1.0)  # label names do not matter
    assert demos.normalized_mutual_info(a, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # hand computation: I = 0.5 ln(4/3) + 0.25 ln(2/3) + 0.25 ln 2, H(a) = ln 2, H(b) = -(0.75 ln 0.75 + 0.25 ln 0.25)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    hb = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((math.log(2) + hb) / 2)
    assert demos.normalized_mutual_info(a, torch.tensor([0, 0, 0, 1])) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        demos.normalized_mutual_info(a, torch.tensor([0, 1]))


def test_kmeans_1d_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (3000,), generator=g)
    values = torch.tensor([0.1, 0.5, 0.9])[truth] + 0.01 * torch.randn(3000, generator=g)
    labels, centres = demos.kmeans_1d(values, 3)
    assert demos.normalized_mutual_info(labels, truth) == pytest.approx(1.0)
    torch.testing.assert_close(centres.sort().values.float(), torch.tensor([0.1, 0.5, 0.9]), atol=0.01, rtol=0)


def test_mni_slices_and_tissue_labels():
    pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
    d = demos.load_mni_slices(size=32)
    n = d["images"].shape[0]
    assert d["images"].shape == (n, 1, 32, 32) and d["probs"].shape == (n, 4, 32, 32)
    assert n > 100 and d["test"].sum() > 10 and not (d["test"] & d["train"]).any()
    torch.testing.assert_close(d["probs"].sum(1), torch.ones(n, 32, 32), atol=1e-4, rtol=0)
    labels = demos.tissue_labels(d["probs"])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    # the template is brain-extracted: background pixels are dark, white matter bright
    img = d["images"][:, 0]
    assert img[labels == 0].mean() < 0.1 < img[labels == 2].mean() < img[labels == 3].mean()


def test_demo_defaults_are_a_fixed_step_budget():
    """By default every step runs (no time budget that a busy machine would turn into fewer steps)."""
    parser = argparse.ArgumentParser()
    demos.add_arguments(parser)
    args = parser.parse_args([])
    assert args.max_minutes is None
    assert (args.epochs1, args.epochs2, args.steps_per_epoch) == (4, 12, 5)
    assert parser.parse_args(["--max-minutes", "3"]).max_minutes == 3.0


def test_tiny_demo_end_to_end(tmp_path):
    pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
    parser = argparse.ArgumentParser()
    demos.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--size", "32", "--epochs1", "1", "--epochs2", "1",
                              "--steps-per-epoch", "1", "--batch-size", "2", "--clusters", "4", "--probe-seeds", "1",
                              "--no-progress"])
    res = demos.run_pretrain_demo(args)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["scores"] == res["scores"]
    assert set(res["scores"]) == {"LD (trained)", "untrained network", "k-means on intensities (K=4)"}
    for s in res["scores"].values():
        assert 0.0 <= s["nmi"] <= 1.0 and 0.0 <= s["nmi_brain"] <= 1.0
    assert res["first_epoch"]["stage"] == 1 and res["last_epoch"]["stage"] == 2 and not res["stopped_early"]
    # the final probe table: every structure with enough slices at 32x32, the four feature sets
    assert saved["probe"] and {r["label"] for r in saved["probe"]} <= {"ventricles", "striatum", "thalamus", "corpus_callosum"}
    for r in saved["probe"]:
        assert set(r["dice"]) == {"LD", "random-init", "intensity", "position"}
        assert all(0.0 <= d <= 1.0 for m in r["dice"].values() for v in m.values() for d in v)
        test = set(r["splits"]["5"]["test"])
        assert not test & set(r["splits"]["5"]["train"][0]) and set(r["splits"]["1"]["train"][0]) <= set(r["splits"]["5"]["train"][0])
    md = (tmp_path / "probe" / "results.md").read_text()
    assert "| **mean** | all |" in md and "points against the random-init network" in md
    assert "NMI scores how well" in (tmp_path / "nmi.md").read_text()
    for name in ("demo_clusters.png", "nmi.md", "model.pt", "metrics.jsonl", "overlays/stage2_epoch001.png",
                 "probe/overlays.png"):
        assert (tmp_path / name).stat().st_size > 0, name
