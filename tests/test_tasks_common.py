"""Tests of ld_ext.tasks.common: I/O and pairing, Dice, warps with exact point transport."""
import numpy as np
import pytest
import torch

from ld_ext.tasks import common


def _png(path, arr):
    from PIL import Image

    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def test_dice_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert common.dice(a, b) == 1.0
    a[0, :2] = True
    assert common.dice(a, b) == 0.0
    b[0, 1:3] = True
    assert common.dice(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        common.dice(a, b[:2])


def test_soft_dice_loss_matches_formula_and_penalises_false_positives():
    g = torch.zeros(2, 1, 4, 4)
    g[0, 0, :2] = 1
    p = torch.full_like(g, 0.25)
    expected = -2 * (p * g).sum() / (g.sum() + p.sum() + 1)
    assert common.soft_dice_loss(p, g).item() == pytest.approx(expected.item())
    assert common.soft_dice_loss(g, g).item() == pytest.approx(-16 / 17)
    # image 1 has no foreground: predicting some there must cost something
    worse = g.clone()
    worse[1, 0, 0, :2] = 1
    assert common.soft_dice_loss(worse, g) > common.soft_dice_loss(g, g)


def test_pairing_rules_and_errors(tmp_path):
    imgs, msks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    msks.mkdir()
    for name in ("a", "b", "c"):
        _png(imgs / f"{name}.png", np.random.default_rng(0).integers(0, 255, (20, 20)))
    _png(msks / "a.png", np.zeros((20, 20)))
    _png(msks / "b_mask.png", np.full((20, 20), 255))
    with pytest.raises(ValueError, match=r"no mask found for 1 image\(s\): c.png"):
        common.pair_images_masks(imgs, msks)
    _png(msks / "c_seg.png", np.zeros((20, 18)))
    pairs = common.pair_images_masks(imgs, msks)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.png", "b_mask.png"), ("c.png", "c_seg.png")]
    with pytest.raises(ValueError, match="c.png has size 20x20 but its mask c_seg.png has size 18x20"):
        common.load_pairs(pairs)
    images, masks = common.load_pairs(pairs[:2], size=16)
    assert images.shape == (2, 16, 16) and masks.dtype == bool
    assert masks[1].all() and not masks[0].any()
    with pytest.raises(ValueError, match="images must be an existing directory"):
        common.pair_images_masks(tmp_path / "nope", msks)


def test_load_image_refuses_volumes(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        common.load_image(tmp_path / "v.npy")
    assert common.file_stem("x/y.nii.gz") == "y"


def test_warp_points_are_exact_inverse():
    rng = np.random.default_rng(3)
    w = common.random_warp((48, 40), rng, elastic_px=3.0)
    q = rng.uniform(5, 35, size=(10, 2))
    p = w.forward_points(q)
    assert np.abs(w.backward(p) - q).max() < 1e-8


def test_warp_moves_a_blob_where_the_points_say():
    rng = np.random.default_rng(5)
    h = w_ = 64
    q = np.array([[30.3, 25.7]])
    yy, xx = np.mgrid[0:h, 0:w_]
    img = np.exp(-((xx - q[0, 0]) ** 2 + (yy - q[0, 1]) ** 2) / (2 * 2.0**2)).astype(np.float32)
    wp = common.random_warp((h, w_), rng, max_rotation_deg=20, elastic_px=2.0)
    out = common.warp_image(img, wp)
    p = wp.forward_points(q)[0]
    # intensity-weighted centroid near the peak
    m = out * (np.hypot(xx - p[0], yy - p[1]) < 5)
    c = np.array([(m * xx).sum(), (m * yy).sum()]) / m.sum()
    assert np.hypot(*(c - p)) < 0.35


def test_task_size_uses_or_warns_about_the_training_size(caplog):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert common.task_size(None, None, "m.pt") is None
        assert common.task_size(None, None, "m.pt", default=96) == 96
        assert common.task_size(64, None, "m.pt") == 64
        assert common.task_size(128, 128, "m.pt") == 128
        with caplog.at_level("INFO", logger="ld_ext"):
            assert common.task_size(None, 128, "m.pt", default=96) == 128
    assert "resized to 128x128, the size m.pt was pre-trained at" in caplog.text
    with pytest.warns(UserWarning, match=r"--size 64 differs from the size m.pt was pre-trained at \(128\)"):
        assert common.task_size(64, 128, "m.pt") == 64


def test_train_size_of_reads_only_a_plausible_recorded_size():
    assert common.train_size_of({"train_config": {"size": 128}}) == 128
    for bad in ({}, {"train_config": None}, {"train_config": [1]}, {"train_config": {"size": True}},
                {"train_config": {"size": "128"}}, {"train_config": {"size": 8}}, {"train_config": {"size": 10**9}}):
        assert common.train_size_of(bad) is None, bad
