"""The second held-out set of the probe protocol (issue 22 item 5): synthetic T2-like and PD-like
images drawn from the MNI152 tissue maps at the evaluation heights (ld_ext.demos.synth)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# the demo data ship inside nilearn and are read with nibabel (the `demo` and `medical` extras);
# README: "tests of DICOM, NIfTI and the demos skip when `pydicom`, `nibabel` or `nilearn` is missing"
pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
pytest.importorskip("nibabel", reason="the demo data are NIfTI files")

from ld_ext.demos import synth  # noqa: E402
from ld_ext.demos.mni import STRUCTURES, mni_slices, structure_slices  # noqa: E402
from ld_ext.demos.tasks import PROBE_DEV_Z, PROBE_EVAL_Z, probe_data, probe_warp  # noqa: E402
from ld_ext.tasks import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
ZS = (-2, 8, 14, 20)  # evaluation heights through the ventricles and the deep structures


def _pure_means(item, threshold=0.9, min_pixels=20):
    """Mean image intensity over the pixels whose warped tissue probability exceeds ``threshold``, per class."""
    out = []
    for k in range(len(synth.CLASSES)):
        sel = item["probs"][k] > threshold
        out.append(float(item["image"][sel].mean()) if sel.sum() >= min_pixels else np.nan)
    return out


def test_same_seed_same_images_other_seed_other_images():
    a = synth.synth_slice(8, SIZE, "t2", seed=0)
    b = synth.synth_slice(8, SIZE, "t2", seed=0)
    c = synth.synth_slice(8, SIZE, "t2", seed=1)
    assert np.array_equal(a["image"], b["image"]) and a["params"] == b["params"]
    for name in STRUCTURES:
        assert np.array_equal(a["masks"][name], b["masks"][name])
    assert not np.allclose(a["image"], c["image"])
    assert not np.array_equal(a["masks"]["ventricles"], c["masks"]["ventricles"])  # a new warp too


def test_an_image_does_not_depend_on_the_other_heights_asked_for():
    full = synth.synth_probe_data(PROBE_EVAL_Z, SIZE, "t2", seed=0)
    part = synth.synth_probe_data(ZS, SIZE, "t2", seed=0)
    for name in STRUCTURES:
        imgs, masks, zs = full[name]
        pimgs, pmasks, pzs = part[name]
        for i, z in enumerate(pzs):
            j = zs.index(z)
            assert np.array_equal(pimgs[i], imgs[j]) and np.array_equal(pmasks[i], masks[j])


def test_t2_like_contrast_orders_csf_above_grey_above_white_matter():
    """The reverse of the T1 template's order (WM > GM > CSF), on every image, over nearly pure pixels."""
    t1 = mni_slices("t1", ZS, SIZE)
    for z, t1_img in zip(ZS, t1):
        item = synth.synth_slice(z, SIZE, "t2", seed=0)
        bg, csf, gm, wm = _pure_means(item)
        assert csf > gm + 0.1 and gm > wm + 0.1, (z, csf, gm, wm)
        # the same pixels on the T1 template are ordered the other way, so the contrast is not T1's
        p = synth.tissue_probabilities(z, SIZE)
        t1_means = [float(t1_img[p[k] > 0.9].mean()) for k in (1, 2, 3)]
        assert t1_means[0] < t1_means[1] < t1_means[2], (z, t1_means)


def test_pd_like_contrast_keeps_grey_above_white_matter_at_low_contrast():
    for z in ZS:
        t2 = _pure_means(synth.synth_slice(z, SIZE, "t2", seed=0))
        pd = _pure_means(synth.synth_slice(z, SIZE, "pd", seed=0))
        assert pd[2] > pd[3], (z, pd)
        assert pd[2] - pd[3] < t2[1] - t2[3], (z, pd, t2)  # GM-WM and CSF-WM gaps below T2's
        assert pd[1] - pd[3] < t2[1] - t2[3]


def test_masks_follow_the_image_through_the_warp():
    """Inside the warped ventricle mask the image is as bright as pure CSF (T2-like); the same mask
    before the warp, laid on the warped image, is not: the masks and the image share the warp."""
    aligned, unaligned, csf = [], [], []
    for z in ZS:
        item = synth.synth_slice(z, SIZE, "t2", seed=0)
        v = item["masks"]["ventricles"]
        assert v.sum() >= 100, z
        aligned.append(float(item["image"][v].mean()))
        unaligned.append(float(item["image"][structure_slices("ventricles", [z], SIZE)[0]].mean()))
        csf.append(_pure_means(item)[1])
        # the warped tissue labels agree with the warped ventricle mask
        assert (item["labels"][v] == 1).mean() > 0.8, z
    assert np.mean(aligned) > np.mean(csf) - 0.1, (aligned, csf)
    assert np.mean(aligned) > np.mean(unaligned) + 0.15, (aligned, unaligned)


def test_shapes_types_and_value_range():
    item = synth.synth_slice(14, SIZE, "pd", seed=3)
    assert item["image"].shape == (SIZE, SIZE) and item["image"].dtype == np.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].max() == 1.0
    assert item["probs"].shape == (4, SIZE, SIZE)
    np.testing.assert_allclose(item["probs"].sum(0), 1.0, atol=1e-5)
    assert item["labels"].shape == (SIZE, SIZE) and set(np.unique(item["labels"])) == {0, 1, 2, 3}
    assert set(item["masks"]) == set(STRUCTURES)
    for m in item["masks"].values():
        assert m.shape == (SIZE, SIZE) and m.dtype == bool
    data = synth.synth_probe_data(size=64, contrast="t2", seed=0)
    assert set(data) == set(STRUCTURES)
    for name, (imgs, masks, zs) in data.items():
        assert imgs.shape == masks.shape == (len(zs), 64, 64) and imgs.dtype == np.float32
        assert (masks.reshape(len(zs), -1).sum(1) >= 3).all()
        assert len(zs) >= 8, name  # enough slices for 5 shots and a held-out half


def test_never_development_heights():
    data = synth.synth_probe_data(size=32, contrast="t2", seed=0)
    used = {z for _, _, zs in data.values() for z in zs}
    assert used and used <= set(PROBE_EVAL_Z) and not used & set(PROBE_DEV_Z)
    with pytest.raises(ValueError, match="development heights"):
        synth.synth_probe_data(PROBE_DEV_Z, 32)
    with pytest.raises(ValueError, match="development heights"):
        synth.synth_slice(7, 32)
    with pytest.raises(ValueError, match="evaluation heights"):
        synth.synth_slice(5.5, 32)
    with pytest.raises(ValueError, match="contrast"):
        synth.synth_slice(8, 32, contrast="t1")


def test_probe_data_warps_with_probe_warp():
    """``probe_data(warped=True)`` and the synthetic set draw their warps from the same function."""
    zs = PROBE_EVAL_Z[:3]
    got = probe_data(zs, 32, warped=True, seed=4, structures=("ventricles",))
    rng = np.random.default_rng(4)
    want = [common.warp_image(img, probe_warp(32, rng)) for img in mni_slices("t1", zs, 32)]
    imgs, _, used = got["ventricles"]
    for img, z in zip(imgs, used):
        assert np.array_equal(img, want[zs.index(z)])


def test_protocol_refuses_development_slices_of_the_synthetic_set():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "protocols" / "probe_default_run.py"), "probe", "--checkpoint", "unused.pt"]
    r = subprocess.run(cmd + ["--set", "synth-t2", "--split", "dev"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "--split dev" in r.stderr and "evaluation heights" in r.stderr
    r = subprocess.run(cmd + ["--set", "mni"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "--split" in r.stderr
