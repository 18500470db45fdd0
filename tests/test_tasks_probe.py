"""Tests of ld_ext.tasks.probe: features, the linear probe, splits, the experiment, CLI and errors."""
import argparse
import json

import numpy as np
import pytest
import torch

from ld_ext.checkpoint import save_checkpoint
from ld_ext.models import LDNet
from ld_ext.tasks import common, probe

TINY = dict(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8))


def _blobs(n=8, size=32, seed=0):
    """Images with a bright disc at a random place; the mask is the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    imgs, masks = [], []
    for _ in range(n):
        cx, cy = rng.uniform(8, size - 8, 2)
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < 20
        imgs.append(np.clip(0.2 + 0.6 * m + rng.normal(0, 0.03, m.shape), 0, 1).astype(np.float32))
        masks.append(m)
    return np.stack(imgs), np.stack(masks)


def test_intensity_and_position_features_values():
    img = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5) / 24
    f = probe.intensity_features(img, windows=(3,))
    assert f.shape == (1, 2, 5, 5)
    torch.testing.assert_close(f[0, 0], img[0])
    # interior: plain 3x3 mean; corner: mean over the 4 pixels inside the image
    torch.testing.assert_close(f[0, 1, 2, 2], img[0, 1:4, 1:4].mean())
    torch.testing.assert_close(f[0, 1, 0, 0], img[0, :2, :2].mean())
    p = probe.position_features(torch.zeros(2, 4, 6))
    assert p.shape == (2, 6, 4, 6)
    x, y = p[0, 1], p[0, 2]
    torch.testing.assert_close(x[0], torch.tensor([-5, -3, -1, 1, 3, 5]) / 6.0)  # pixel centres in [-1, 1]
    torch.testing.assert_close(y[:, 0], torch.tensor([-3, -1, 1, 3]) / 4.0)
    torch.testing.assert_close(p[0, 3], x * x)
    torch.testing.assert_close(p[0, 4], y * y)
    torch.testing.assert_close(p[0, 5], x * y)
    with pytest.raises(ValueError, match="odd"):
        probe.intensity_features(img, windows=(4,))
    with pytest.raises(ValueError, match="images must have shape"):
        probe.position_features(torch.zeros(5))


def test_network_features_shapes_and_unit_norm():
    torch.manual_seed(0)
    net = LDNet(**TINY)
    imgs = torch.rand(3, 32, 32)
    z = probe.network_features(net, imgs, "z")
    assert z.shape == (3, 8, 32, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3, 32, 32), atol=1e-5, rtol=0)
    d = probe.network_features(net, imgs, "decoder")
    assert d.shape == (3, net.decoder.out_channels, 32, 32)
    both = probe.network_features(net, imgs, "z+decoder")
    torch.testing.assert_close(both, torch.cat([z, d], 1))
    # the same as the network's own forward pass
    e, _ = net.eval()(probe.common.model_input(imgs))
    torch.testing.assert_close(z, e / (e.norm(dim=1, keepdim=True) + 1e-10))
    with pytest.raises(ValueError, match="kind"):
        probe.network_features(net, imgs, "logits")


def test_linear_probe_separates_a_linear_rule_and_is_balanced():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 16, 16, generator=g)
    mask = (f[:, 0] + 0.5 * f[:, 1] > 1.2).numpy()  # about 12 % foreground
    p = probe.LinearProbe(weight_decay=0.0).fit(f, mask)
    prob = p.predict_proba(f)
    assert prob.shape == (4, 16, 16)
    assert ((prob > 0.5) == mask).mean() > 0.97
    # the fitted direction is the rule's (in standardised units the third feature is ignored)
    w = p.weight / p.std
    assert abs(w[2]) < 0.1 * abs(w[0]) and w[1] / w[0] == pytest.approx(0.5, abs=0.15)
    # class balance: foreground and background carry equal weight, so on an ambiguous feature the
    # balanced probe calls more pixels foreground than the unbalanced one
    noisy = mask ^ (torch.rand(mask.shape, generator=g) < 0.2).numpy()
    pb = probe.LinearProbe(weight_decay=0.0).fit(f, noisy).predict_proba(f)
    pu = probe.LinearProbe(weight_decay=0.0, balanced=False).fit(f, noisy).predict_proba(f)
    assert (pb > 0.5).sum() > (pu > 0.5).sum()


def test_linear_probe_errors():
    f = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="both foreground and background"):
        probe.LinearProbe().fit(f, np.zeros((2, 8, 8), bool))
    with pytest.raises(ValueError, match="masks must have shape"):
        probe.LinearProbe().fit(f, np.zeros((2, 8, 7), bool))
    with pytest.raises(ValueError, match="weight_decay"):
        probe.LinearProbe(weight_decay=-1.0)
    with pytest.raises(RuntimeError, match="fit"):
        probe.LinearProbe().predict_proba(f)
    m = np.zeros((2, 8, 8), bool)
    m[:, 2:4, 2:4] = True
    p = probe.LinearProbe().fit(f, m)
    with pytest.raises(ValueError, match="channels"):
        p.predict_proba(torch.randn(1, 4, 8, 8))


def test_splits_draw_only_images_with_the_structure():
    masks = np.zeros((12, 4, 4), bool)
    masks[[1, 3, 4, 6, 7, 9, 10], 1, 1] = True
    test, trains = probe.probe_splits(masks, 2, 5, 0.5)
    assert len(test) == 6 and len(trains) == 5
    for t in trains:
        assert len(t) == 2 and not set(t) & set(test)
        assert masks[t].any(axis=(1, 2)).all()
    n_fg_pool = int(masks[np.setdiff1d(np.arange(12), test)].any(axis=(1, 2)).sum())
    with pytest.raises(ValueError, match=f"only {n_fg_pool} of the 6 non-held-out images contain"):
        probe.probe_splits(masks, n_fg_pool + 1, 1, 0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        probe.probe_splits(masks, 1, 1, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        probe.probe_splits(masks[:1], 1, 1)


def test_experiment_scores_informative_features_above_uninformative():
    imgs, masks = _blobs(8)
    good = torch.from_numpy(masks[:, None].astype(np.float32)) + 0.1 * torch.randn(8, 1, 32, 32)
    bad = torch.randn(8, 2, 32, 32)
    res = probe.probe_experiment({"good": good, "bad": lambda seed: bad + seed}, masks, shots=(1, 3), seeds=2)
    for s in ("1", "3"):
        assert len(res["dice"]["good"][s]) == 2
        assert min(res["dice"]["good"][s]) > 0.9
        assert max(res["dice"]["bad"][s]) < 0.5
    assert res["_preds"]["good"].shape == (len(res["splits"]["3"]["test"]), 32, 32)
    with pytest.raises(ValueError, match="features 'x' have shape"):
        probe.probe_experiment({"x": torch.zeros(3, 1, 32, 32)}, masks, shots=(1,), seeds=1)


def test_threshold_is_chosen_on_the_training_images_and_dice_is_per_image():
    # probabilities that separate the structure only above 0.8: a fixed 0.5 would mark everything
    m = np.zeros((2, 8, 8), bool)
    m[0, 2:4, 2:4] = True
    p = np.where(m, 0.9, 0.7)
    assert probe.choose_threshold(p, m) == 0.7  # 0.7 to 0.85 all give Dice 1: the nearest 0.5
    assert probe.choose_threshold(np.full((1, 4, 4), 0.5), np.ones((1, 4, 4), bool)) == 0.45
    with pytest.raises(ValueError, match="same shape"):
        probe.choose_threshold(p[:1], m)
    # per image: images without the structure are left out; pooled counts their false positives
    pred = np.zeros((3, 4, 4), bool)
    gt = np.zeros((3, 4, 4), bool)
    gt[0, :2, :2] = pred[0, :2, :2] = True  # Dice 1
    gt[1, :2, :2] = True
    pred[1, :1, :2] = True  # Dice 2*2/(4+2) = 2/3
    pred[2, 2:, 2:] = True  # no structure on image 2: 4 false positives
    assert probe.dice_per_image(pred, gt) == pytest.approx((1 + 2 / 3) / 2)
    assert common.dice(pred, gt) == pytest.approx(2 * 6 / (10 + 8))  # TP 6, predicted 10, true 8
    assert np.isnan(probe.dice_per_image(pred[2:], gt[2:]))


def test_experiment_reports_per_image_and_pooled_dice_at_the_chosen_threshold():
    imgs, masks = _blobs(8)
    # a feature that is high on the structure and, less, on a ring around it: the balanced fit's 0.5
    # takes the ring too; the threshold chosen on the training images does not
    ring = np.stack([binary_ring(m, 6) for m in masks])
    torch.manual_seed(0)
    f = torch.from_numpy((masks * 1.0 + ring * 0.5)[:, None].astype(np.float32)) + 0.2 * torch.randn(8, 1, 32, 32)
    res = probe.probe_experiment({"f": f}, masks, shots=(2,), seeds=2)
    test = np.asarray(res["splits"]["2"]["test"])
    for seed in range(2):
        thr = res["threshold"]["f"]["2"][seed]
        assert thr in probe.THRESHOLDS
        tr = np.asarray(res["splits"]["2"]["train"][seed])
        lp = probe.LinearProbe().fit(f[tr], masks[tr])
        assert thr == probe.choose_threshold(lp.predict_proba(f[tr]), masks[tr])
        pred = lp.predict_proba(f[test]) > thr
        assert res["dice"]["f"]["2"][seed] == pytest.approx(probe.dice_per_image(pred, masks[test]))
        assert res["dice_pooled"]["f"]["2"][seed] == pytest.approx(common.dice(pred, masks[test]))
        at_half = probe.dice_per_image(lp.predict_proba(f[test]) > 0.5, masks[test])
        assert res["dice"]["f"]["2"][seed] > at_half + 0.1  # measured: 0.75 vs 0.60
    assert res["summary_pooled"]["f"]["2"]["mean"] == pytest.approx(np.mean(res["dice_pooled"]["f"]["2"]))
    # a split whose held-out images have no structure is one clear error
    empty = masks.copy()
    empty[test] = False
    with pytest.raises(ValueError, match="no held-out image contains the structure"):
        probe.probe_experiment({"f": f}, empty, shots=(1,), seeds=1, split={1: (test, [np.asarray([0])])},
                               label="x")


def binary_ring(mask: np.ndarray, width: int = 3) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    grown = torch.nn.functional.max_pool2d(t, 2 * width + 1, stride=1, padding=width)[0, 0].numpy() > 0
    return grown & ~mask


def test_baselines_and_tables(tmp_path):
    imgs, masks = _blobs(8)
    torch.manual_seed(0)
    net = LDNet(**TINY)
    feats = probe.baseline_feature_sets(net, imgs)
    assert list(feats) == list(probe.FEATURE_SETS)
    c = 8 + net.decoder.out_channels  # the default features: unit embedding + decoder features
    assert probe.DEFAULT_FEATURES == "z+decoder"
    assert feats["LD"].shape == (8, c, 32, 32) and feats["position"].shape == (8, 6, 32, 32)
    assert feats["intensity"].shape == (8, 1 + len(probe.INTENSITY_WINDOWS), 32, 32)
    r1, r2 = feats["random-init"](0), feats["random-init"](1)
    assert r1.shape == (8, c, 32, 32) and not torch.equal(r1, r2) and not torch.equal(r1, feats["LD"])
    torch.testing.assert_close(r1, feats["random-init"](0))  # seeded
    res = probe.probe_experiment(feats, masks, shots=(1, 2), seeds=2, label="disc")
    res["_images"], res["_masks"] = imgs, masks
    md = probe.write_results(tmp_path, [res, dict(res, label="disc2")])
    assert "| disc | 1 |" in md and "| **mean** | all |" in md and "position control" in md
    sentence = probe.summary_sentence([res])
    assert "points against the random-init network" in sentence and "position control" in sentence
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["dice"]["LD"]["2"] == res["dice"]["LD"]["2"]
    assert (tmp_path / "overlays.png").stat().st_size > 0
    with pytest.raises(ValueError, match="methods must be among"):
        probe.baseline_feature_sets(net, imgs, methods=("LD", "sift"))


def _write_pairs(tmp_path, n=8, size=32):
    from PIL import Image

    imgs, masks = _blobs(n, size)
    for d in ("images", "masks_disc", "masks_empty"):
        (tmp_path / d).mkdir()
    for i, (im, m) in enumerate(zip(imgs, masks)):
        Image.fromarray((im * 255).astype(np.uint8)).save(tmp_path / "images" / f"s{i}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / "masks_disc" / f"s{i}_mask.png")
        Image.fromarray(np.zeros_like(m, np.uint8)).save(tmp_path / "masks_empty" / f"s{i}.png")


def test_cli_writes_table_overlays_and_refuses_bad_input(tmp_path, capsys):
    from ld_ext.cli import build_parser

    _write_pairs(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ld.pt", LDNet(**TINY))
    out = tmp_path / "out"
    base = ["probe", "--checkpoint", str(tmp_path / "ld.pt"), "--images", str(tmp_path / "images"),
            "--out", str(out), "--seeds", "2", "--shots", "1", "2"]
    args = build_parser().parse_args(base + ["--masks", str(tmp_path / "masks_disc")])
    assert probe.run(args) == 0
    printed = capsys.readouterr().out
    assert "training images used" in printed and "points against" in printed
    res = json.loads((out / "results.json").read_text())
    r = res["results"][0]
    assert r["label"] == "masks_disc" and set(r["dice"]) == set(probe.FEATURE_SETS)
    assert all(0.0 <= d <= 1.0 for m in r["dice"].values() for v in m.values() for d in v)
    assert "| masks_disc | 2 |" in (out / "results.md").read_text()
    assert (out / "overlays.png").stat().st_size > 0
    # a structure absent from every image cannot be probed
    args = build_parser().parse_args(base + ["--masks", str(tmp_path / "masks_empty")])
    with pytest.raises(ValueError, match="contain the structure"):
        probe.run(args)
    args = build_parser().parse_args(base + ["--masks", str(tmp_path / "masks_disc"), "--weight-decay", "-1"])
    with pytest.raises(ValueError, match="--weight-decay"):
        probe.run(args)
    args = build_parser().parse_args(base + ["--masks", str(tmp_path / "masks_disc"), "--test-fraction", "1"])
    with pytest.raises(ValueError, match="--test-fraction"):
        probe.run(args)


def test_cli_uses_the_checkpoints_training_size_or_warns(tmp_path, caplog):
    """Without --size the images are resized to the size the checkpoint was pre-trained at (recorded in
    its train_config); a --size other than it is used, with a warning naming both sizes."""
    from ld_ext.cli import build_parser

    _write_pairs(tmp_path)
    torch.manual_seed(0)
    net = LDNet(**TINY)
    ck = tmp_path / "ld.pt"
    save_checkpoint(ck, {"config": net.config, "model": net.state_dict(), "train_config": {"size": 24}})
    out = tmp_path / "out"
    base = ["probe", "--checkpoint", str(ck), "--images", str(tmp_path / "images"), "--masks",
            str(tmp_path / "masks_disc"), "--out", str(out), "--seeds", "1", "--shots", "1"]
    with caplog.at_level("INFO", logger="ld_ext"):
        assert probe.run(build_parser().parse_args(base)) == 0
    assert json.loads((out / "results.json").read_text())["size"] == 24
    assert "images resized to 24x24, the size" in caplog.text
    with pytest.warns(UserWarning, match=r"--size 32 differs from the size .*ld.pt was pre-trained at \(24\)"):
        assert probe.run(build_parser().parse_args(base + ["--size", "32"])) == 0
    assert json.loads((out / "results.json").read_text())["size"] == 32
    # a checkpoint that does not record its size: the images' own size, no warning
    save_checkpoint(ck, net)
    assert probe.run(build_parser().parse_args(base)) == 0
    assert json.loads((out / "results.json").read_text())["size"] is None
