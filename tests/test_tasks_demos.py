"""Tests of the task demos (``ld-ext demo --task ...``, ``ld_ext.demos.tasks`` and ``.landmark``) and of the
MNI152 data they use (``ld_ext.demos.mni``): geometry, structures, argument wiring and quick runs."""
import argparse
import json

import numpy as np
import pytest
import torch

from ld_ext.checkpoint import save_checkpoint
from ld_ext.models import LDNet
from ld_ext.demos import landmark, mni, tasks

# the demo data ship inside nilearn and are read with nibabel (the `demo` and `medical` extras);
# README: "tests of DICOM, NIfTI and the demos skip when `pydicom`, `nibabel` or `nilearn` is missing"
pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
pytest.importorskip("nibabel", reason="the demo data are NIfTI files")


def test_ventricles_are_a_small_central_structure():
    v_mid = mni.ventricle_slice(16.0, 64)
    assert 10 < v_mid.sum() < 0.05 * v_mid.size
    ys, xs = np.nonzero(v_mid)
    assert abs(xs.mean() - 31.5) < 6
    assert mni.ventricle_slice(60.0, 64).sum() == 0


def test_probe_structures_are_small_separate_and_split_by_slice():
    masks = {n: mni.structure_slices(n, (0, 8, 16), 64) for n in mni.STRUCTURES}
    for n, m in masks.items():
        assert m.dtype == bool and m.shape == (3, 64, 64)
        assert 0 < m.sum() < 0.05 * m.size, n
    # the striatum lies in front of the thalamus (image rows grow towards posterior)
    assert np.nonzero(masks["striatum"])[1].mean() < np.nonzero(masks["thalamus"])[1].mean()
    assert not (masks["striatum"] & masks["thalamus"]).any()
    assert not set(tasks.PROBE_DEV_Z) & set(tasks.PROBE_EVAL_Z)
    data = tasks.probe_data((0, 8, 60), 64, structures=("ventricles",))
    imgs, m, zs = data["ventricles"]
    assert zs == [0, 8] and imgs.shape == (2, 64, 64) and m.sum(axis=(1, 2)).min() >= tasks.PROBE_MIN_PIXELS
    warped = tasks.probe_data((0, 8, 60), 64, warped=True, structures=("ventricles",))["ventricles"]
    assert not np.allclose(warped[0][0], imgs[0]) and warped[1].shape[1:] == (64, 64)
    with pytest.raises(ValueError, match="name must be one of"):
        mni.structure_volume("hippocampus")


def test_mni_geometry_maps_a_voxel_to_its_pixel():
    vol, aff = mni.mni_volume("t1")
    delta = np.zeros_like(vol)
    xyz = np.array([[20.0, -30.0, 10.0]])
    ijk = np.round(np.linalg.inv(aff) @ np.r_[xyz[0], 1.0])[:3].astype(int)
    delta[ijk[0] - 2 : ijk[0] + 3, ijk[1] - 2 : ijk[1] + 3, ijk[2]] = 1.0
    centre = (aff @ np.r_[ijk, 1.0])[:3]
    sl = mni.axial_slice(delta, aff, float(centre[2]), 96)
    px = mni.mni_to_pixel(centre[None], 96)[0]
    yy, xx = np.mgrid[0:96, 0:96]
    c = np.array([(sl * xx).sum(), (sl * yy).sum()]) / sl.sum()
    assert np.hypot(*(c - px)) < 0.1
    rois = mni.dosenbach_rois()
    assert len(rois) == 160 and {"name", "x", "y", "z"} <= set(rois[0])


def test_landmark_data_inside_the_brain():
    template, names, pts = landmark.landmark_data(64)
    assert len(names) == len(pts) >= 10
    assert all(template[int(round(y)), int(round(x))] > 0.1 for x, y in pts)


def test_task_arguments_do_not_clash_and_bad_task_is_refused():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="x")
    tasks.add_task_arguments(p)  # --out already present: not added twice
    args = p.parse_args(["--quick"])
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.run_task_demo("segment", args)


def test_quick_landmark_demo_with_given_checkpoint(tmp_path):
    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    p = argparse.ArgumentParser()
    tasks.add_task_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "o"), "--checkpoint", str(ck), "--quick", "--task-size", "32"])
    assert tasks.run_task_demo("landmark", args) == 0
    res = json.loads((tmp_path / "o" / "landmark" / "results.json").read_text())
    assert set(res["rows"]) == {"mild", "hard", "cross-slice"}
    methods = [r["method"] for r in res["rows"]["hard"]]
    assert "LD+term centre-sensitive" in methods and "NCC 17x17" in methods
    assert (tmp_path / "o" / "landmark" / "landmarks.png").stat().st_size > 0


def test_quick_probe_demo_with_given_checkpoint(tmp_path):
    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    p = argparse.ArgumentParser()
    tasks.add_task_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "o"), "--checkpoint", str(ck), "--quick", "--task-size", "64"])
    assert tasks.run_task_demo("probe", args) == 0
    md = (tmp_path / "o" / "probe" / "results.md").read_text()
    assert "**aligned**" in md and "**warped**" in md
    for tag in ("aligned", "warped"):
        res = json.loads((tmp_path / "o" / "probe" / tag / "results.json").read_text())
        assert res["setting"] == tag and len(res["results"]) >= 3
        for r in res["results"]:
            assert set(r["dice"]) == {"LD", "random-init", "intensity", "position"}
            assert all(0.0 <= d <= 1.0 for m in r["dice"].values() for v in m.values() for d in v)
            assert all(z in tasks.PROBE_EVAL_Z for z in r["z_mm"])


def test_quick_finetune_demo_with_given_checkpoint(tmp_path):
    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    save_checkpoint(ck, LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)))
    p = argparse.ArgumentParser()
    tasks.add_task_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "o"), "--checkpoint", str(ck), "--quick", "--task-size", "64",
                         "--task-steps", "1"])
    assert tasks.run_task_demo("finetune", args) == 0
    res = json.loads((tmp_path / "o" / "finetune" / "results.json").read_text())
    assert [r["label"] for r in res["results"]] == ["white_matter", "grey_matter", "ventricles"]
    assert res["shots"] == 1 and (tmp_path / "o" / "finetune" / "data" / "masks_ventricles").is_dir()


@pytest.mark.parametrize("quick", [False, True])
def test_finetune_demo_split_has_enough_non_empty_shots(quick):
    """The full demo once stopped: the held-out half of its 22 slices took 6 of the 10 with ventricles
    (5 shots asked, 4 left). The split runs on the pairs in file-name order, as the demo reads them."""
    from ld_ext.tasks.segmentation import split_indices

    zs = tasks.FINETUNE_Z[::2] if quick else tasks.FINETUNE_Z
    order = sorted(range(len(zs)), key=lambda i: f"mni_z{zs[i]:+03d}.png")
    for name, m in tasks.finetune_targets(zs, 64).items():
        fg = m[order].reshape(len(zs), -1).any(1)
        test, trains = split_indices(len(zs), 1 if quick else 5, 1 if quick else 3, 0.5, fg)
        assert all(fg[t].all() for t in trains), name
