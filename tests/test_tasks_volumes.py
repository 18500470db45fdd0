"""Tests of ld-ext probe and ld-ext finetune on volumes (a 3-D checkpoint): sliding windows, 3-D Dice,
patches, the baselines' features, both commands on tiny NIfTI volumes, and the 2-D/3-D mismatch errors."""

import json

import numpy as np
import pytest
import torch

from ld_ext.checkpoint import save_checkpoint
from ld_ext.cli import build_parser, main
from ld_ext.models import LDNet
from ld_ext.normalization import normalize_embeddings
from ld_ext.tasks import common, probe, probe_volumes, segmentation, volumes

nib = pytest.importorskip("nibabel")

TINY3 = dict(in_channels=1, emb_dim=4, n_clusters=4, widths=(4, 4, 4, 4, 4), depths=(1, 1, 1, 1, 1), spatial_dims=3)
TINY2 = dict(in_channels=1, emb_dim=4, n_clusters=4, widths=(4, 4, 4, 4, 4), depths=(1, 1, 1, 1, 1))


def _save_net(path, config, size=16, **train_config):
    torch.manual_seed(0)
    net = LDNet(**config)
    tc = {"size": size, **train_config}
    save_checkpoint(path, {"config": net.config, "model": net.state_dict(), "train_config": tc})
    return net


def _write_volumes(root, n=4, shape=(16, 16, 16), seed=0):
    """NIfTI volumes with a bright ball (label 1) and a dim box (label 2); label volumes named NAME_seg."""
    rng = np.random.default_rng(seed)
    (root / "vols").mkdir(parents=True)
    (root / "labels").mkdir()
    xx, yy, zz = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n):
        c = rng.uniform(5, np.array(shape) - 5)
        ball = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 < 12
        box = (xx < 5) & (yy < 5) & (zz >= 2 + i % 3) & (zz < 10)
        img = 100 + 400 * ball + 200 * box + rng.normal(0, 5, shape)
        lab = np.where(ball, 1, np.where(box, 2, 0)).astype(np.int16)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), str(root / "vols" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labels" / f"case{i}_seg.nii.gz"))
    return root / "vols", root / "labels"


# ----------------------------------------------------------------------------- sliding window


def test_window_starts_cover_the_axis_with_half_overlap():
    assert volumes.window_starts(16, 16) == [0]
    assert volumes.window_starts(10, 16) == [0]
    assert volumes.window_starts(40, 16) == [0, 8, 16, 24]
    assert volumes.window_starts(41, 16) == [0, 8, 16, 24, 25]  # the last window flush with the end
    with pytest.raises(ValueError, match="overlap"):
        volumes.window_starts(40, 16, 1.0)


def test_sliding_window_equals_a_direct_forward_when_the_volume_fits_one_window():
    torch.manual_seed(0)
    net = LDNet(**TINY3).eval()
    vol = torch.rand(1, 16, 20, 24)
    fn = probe_volumes.volume_network_features
    got = fn(net, vol[0].numpy(), "z+decoder", (16, 20, 24))
    with torch.no_grad():
        x = common.model_input(vol[None])
        h = net.decoder.features(net.encoder(x))
        want = torch.cat([normalize_embeddings(net.decoder.emb_head(h)), h], 1)[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", volumes.WINDOW_WEIGHTS)
def test_sliding_window_averages_overlapping_windows_and_pads_small_volumes(weight):
    vol = torch.rand(2, 40, 17, 30)
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return torch.cat([x * 2 + 1, x[:, :1] ** 2], 1)  # voxel-wise: every window agrees on a voxel

    out = volumes.sliding_window(fn, vol, 24, weight=weight, batch=3)
    torch.testing.assert_close(out, torch.cat([vol * 2 + 1, vol[:1] ** 2]))
    assert {c[2:] for c in calls} == {(24, 24, 24)}  # never the whole volume at once; 17 padded to 24
    assert sum(c[0] for c in calls) == 3 * 1 * 2  # x: 0, 12, 16; y: one padded window; z: 0, 6
    # windows that disagree are averaged: a constant per window gives a value between them
    k = iter(range(100))
    out = volumes.sliding_window(lambda x: torch.full((1, 1, 24, 24, 24), float(next(k))), vol[:1, :, :24, :24], 24)
    # x starts 0, 12, 16: voxel 0 is in window 0 only, voxel 39 in window 2 only, voxel 20 in all three
    assert out[0, 0, 0, 0] == 0.0 and out[0, -1, 0, 0] == 2.0 and 0.0 < float(out[0, 20, 0, 0]) < 2.0


def test_window_weight_is_a_centred_gaussian_or_uniform():
    w = volumes.window_weight((16, 16, 16))
    assert w.shape == (16, 16, 16) and float(w.min()) > 0
    assert float(w[7, 7, 7]) == float(w.max()) and float(w[0, 0, 0]) < 1e-3
    assert bool((volumes.window_weight((4, 5, 6), "uniform") == 1).all())
    with pytest.raises(ValueError, match="weight"):
        volumes.window_weight((4, 4, 4), "cosine")


# ----------------------------------------------------------------------------- Dice, patches, features


def test_dice_per_volume_and_pooled_on_known_volumes():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b = np.zeros((4, 4, 4), bool)
    b[1:3] = True  # 32 voxels, 16 shared with a
    empty = np.zeros((4, 4, 4), bool)
    fp = empty.copy()
    fp[0, 0, :] = True  # 4 false positives on a volume without the structure
    assert volumes.dice_per_volume([a, b], [a, a]) == pytest.approx((1.0 + 0.5) / 2)
    # the volume without the structure is left out per volume, counted pooled
    assert volumes.dice_per_volume([b, fp], [a, empty]) == pytest.approx(0.5)
    assert volumes.pooled_dice([b, fp], [a, empty]) == pytest.approx(2 * 16 / (32 + 4 + 32))
    assert np.isnan(volumes.dice_per_volume([fp], [empty]))
    assert volumes.pooled_dice([empty], [empty]) == 1.0
    with pytest.raises(ValueError, match="as many"):
        volumes.pooled_dice([a], [a, a])


def test_patch_sampler_patches_hold_foreground_and_zeros_outside():
    vol = np.full((20, 12, 30), 0.5, np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[15:18, 2:4, 25:28] = True
    s = volumes.PatchSampler([vol], [mask], 16, batch=4, fg_fraction=1.0)
    x, y = s(torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 1, 16, 16, 16)
    assert all(bool(y[i].any()) for i in range(4))  # every patch holds foreground
    assert float(x.min()) == float(common.model_input(torch.zeros(1)))  # the 12-voxel axis padded with zeros
    fx, fy = s.fixed(torch.Generator().manual_seed(1), 3)
    assert fx.shape == (3, 1, 16, 16, 16) and fy.dtype == bool and fy.reshape(3, -1).any(1).all()


def test_position_and_intensity_features_of_a_volume():
    v = np.random.default_rng(0).random((4, 6, 8)).astype(np.float32)
    p = probe_volumes.volume_position_features(v)
    assert p.shape == (10, 4, 6, 8)
    torch.testing.assert_close(p[1, :, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x: voxel centres
    torch.testing.assert_close(p[3, 0, 0], (torch.arange(8) + 0.5) / 8 * 2 - 1)  # z
    torch.testing.assert_close(p[8], p[1] * p[3])  # x*z
    f = probe_volumes.volume_intensity_features(v, (3, 17))  # a cube larger than the volume
    assert f.shape == (3, 4, 6, 8)
    torch.testing.assert_close(f[1, 1, 1, 1], torch.from_numpy(v[:3, :3, :3]).mean())
    torch.testing.assert_close(f[1, 0, 0, 0], torch.from_numpy(v[:2, :2, :2]).mean())  # the corner: voxels inside
    torch.testing.assert_close(f[2, 3, 5, 7], torch.from_numpy(v).mean())


# ----------------------------------------------------------------------------- the commands on volumes


def test_probe_cli_on_volumes_with_integer_labels(tmp_path, capsys):
    vols, labels = _write_volumes(tmp_path)
    _save_net(tmp_path / "ld3.pt", TINY3, size=16)
    out = tmp_path / "out"
    argv = ["probe", "--checkpoint", str(tmp_path / "ld3.pt"), "--images", str(vols), "--masks", str(labels),
            "--labels", "1", "2", "--shots", "1", "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "training volumes used: case" in printed and "Dice per volume" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["dims"] == 3 and res["sliding_window"] == [16, 16, 16]
    assert [r["label"] for r in res["results"]] == ["labels=1", "labels=2"]
    for r in res["results"]:
        assert r["unit"] == "volume" and set(r["dice"]) == {"LD", "random-init", "intensity", "position"}
        assert all(0.0 <= d <= 1.0 for m in r["dice"].values() for v in m.values() for d in v)
        assert len(r["dice"]["LD"]["1"]) == 2
    # the bright ball is linearly readable from the intensity
    assert np.mean(res["results"][0]["dice"]["intensity"]["1"]) > 0.5
    assert "| labels=1 | 1 |" in (out / "results.md").read_text()
    assert (out / "overlays.png").stat().st_size > 0


def test_finetune_cli_on_volumes(tmp_path, capsys):
    vols, labels = _write_volumes(tmp_path)
    _save_net(tmp_path / "ld3.pt", TINY3, size=16, spacing=[1.0, 1.0, 2.0], window=[50.0, 600.0],
              percentiles=[0.5, 99.5])
    out = tmp_path / "out"
    argv = ["finetune", "--checkpoint", str(tmp_path / "ld3.pt"), "--images", str(vols), "--masks", str(labels),
            "--labels", "1", "--shots", "1", "--seeds", "1", "--steps", "2", "--batch", "2", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    assert "labels=1: seed 0: trained on case" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    r = res["results"][0]
    assert res["dims"] == 3 and r["settings"]["sliding_window"] == [16, 16, 16]
    assert r["settings"]["head"] == "z" and r["settings"]["warmup_steps"] == 10  # volumes keep the head on z
    # the volumes are read as pre-training read them (recorded in the checkpoint)
    assert res["spacing"] == [1.0, 1.0, 2.0] and res["intensity_window"] == [50.0, 600.0]
    assert res["percentiles"] == [0.5, 99.5]
    for key in ("dice", "dice_per_volume"):
        assert set(r[key]) == {"LD", "random"} and all(0.0 <= d <= 1.0 for v in r[key].values() for d in v)
    md = (out / "results.md").read_text()
    assert "| labels=1 |" in md and "| labels=1 (Dice per volume) |" in md
    assert (out / "overlays.png").stat().st_size > 0


def test_finetune_on_volumes_learns_a_bright_ball(tmp_path):
    """The 3-D fine-tuning reads out a bright ball: its linear-probe start on the training patches already
    finds it on the held-out volumes (one optimiser step after it)."""
    vols, labels = _write_volumes(tmp_path, n=3)
    _save_net(tmp_path / "ld3.pt", TINY3)
    pairs = volumes.pair_volumes(vols, labels)
    v, lab = volumes.load_volume_pairs(pairs)
    r = segmentation.transfer_experiment_volumes(
        v, [x == 1 for x in lab], tmp_path / "ld3.pt", window=16, shots=1, seeds=1, steps=1, progress=False,
        head="decoder", batch=2, lr=1e-4,
    )
    assert r["dice"]["LD"][0] > 0.3 and r["dice_per_volume"]["LD"][0] > 0.3, r  # chance: about 0.08


def test_volume_commands_refuse_the_other_kind_of_input(tmp_path, capsys):
    vols, labels = _write_volumes(tmp_path)
    _save_net(tmp_path / "ld3.pt", TINY3)
    _save_net(tmp_path / "ld2.pt", TINY2, size=24)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        np.save(flat / f"img{i}.npy", np.random.default_rng(i).random((24, 24)).astype(np.float32))
    for cmd in ("probe", "finetune"):
        # a 3-D checkpoint with 2-D images
        assert main([cmd, "--checkpoint", str(tmp_path / "ld3.pt"), "--images", str(flat), "--masks", str(flat),
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ld-ext: error: checkpoint") and "ld3.pt is a 3-D network" in err and f"--images {flat} holds 2-D" in err
        # a 2-D checkpoint with volumes
        assert main([cmd, "--checkpoint", str(tmp_path / "ld2.pt"), "--images", str(vols), "--masks", str(labels),
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ld-ext: error: checkpoint") and "ld2.pt is a 2-D network" in err and f"--images {vols} holds 3-D" in err
        assert "case0.nii.gz: 16x16x16" in err
        # options of volumes with a 2-D checkpoint
        assert main([cmd, "--checkpoint", str(tmp_path / "ld2.pt"), "--images", str(flat), "--masks", str(flat),
                     "--labels", "1", "--out", str(tmp_path / "o")]) == 2
        assert "--labels applies to volumes (a 3-D checkpoint)" in capsys.readouterr().err
    # a one-slice NIfTI is a 2-D image for a 3-D checkpoint
    one = tmp_path / "one"
    one.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 1), np.float32), np.eye(4)), str(one / "s.nii.gz"))
    with pytest.raises(ValueError, match=r"is a 3-D network .* holds 2-D images \(s.nii.gz: 24x24x1\)"):
        volumes.check_images_match(3, one, "ld3.pt")


def test_volume_pairing_and_label_errors(tmp_path):
    vols, labels = _write_volumes(tmp_path, n=3)
    pairs = volumes.pair_volumes(vols, labels)
    assert [(a.name, b.name) for a, b in pairs] == [(f"case{i}.nii.gz", f"case{i}_seg.nii.gz") for i in range(3)]
    (labels / "case1_seg.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"--masks: no label volume found for 1 volume\(s\): case1.nii.gz"):
        volumes.pair_volumes(vols, labels)
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 21), np.int16), np.eye(4)), str(labels / "case1.nii.gz"))
    with pytest.raises(ValueError, match=r"label volume case1.nii.gz has shape 20x18x21 but its volume case1.nii.gz has 16"):
        volumes.load_volume_pairs(volumes.pair_volumes(vols, labels))
    lab = [np.array([[[0, 1], [2, 2]]] * 2)]
    assert [n for n, _ in volumes.structure_masks(lab, None, "seg")] == ["seg"]
    (name, masks), = volumes.structure_masks(lab, [2], "seg")
    assert name == "seg=2" and int(masks[0].sum()) == 4
    with pytest.raises(ValueError, match=r"--labels 7: no label volume of 'seg' holds the value 7 \(values found: 0, 1"):
        volumes.structure_masks(lab, [7], "seg")


def test_volume_window_comes_from_the_checkpoint_or_size(tmp_path):
    assert volumes.volume_window(None, 24, "a.pt") == (24, 24, 24)
    assert volumes.volume_window(32, 24, "a.pt") == (32, 32, 32)
    with pytest.raises(ValueError, match=r"--size: checkpoint a.pt does not record"):
        volumes.volume_window(None, None, "a.pt")
    args = build_parser().parse_args(["probe", "--checkpoint", "c", "--images", "i", "--masks", "m", "--out", "o",
                                      "--spacing", "1", "1", "0", "--window", "5", "1"])
    with pytest.raises(ValueError, match="--spacing must be"):
        volumes.reading_options(args)
    args.spacing = None
    with pytest.raises(ValueError, match="--window must be LOW HIGH"):
        volumes.reading_options(args)


def test_volume_probe_computes_each_feature_set_once_for_every_structure():
    rng = np.random.default_rng(0)
    masks = [rng.random((6, 5, 4)) < 0.3 for _ in range(4)]
    other = [~m for m in masks]
    feats = [torch.from_numpy(np.stack([m, rng.random(m.shape)]).astype(np.float32)) for m in masks]
    calls = []
    fixed = probe_volumes.LazyFeatures(lambda seed: calls.append(("fixed", seed)) or feats)
    drawn = probe_volumes.LazyFeatures(lambda seed: calls.append(("drawn", seed)) or feats, per_seed=True)
    rs = probe_volumes.volume_probe_experiments({"a": fixed, "b": drawn}, [("s", masks), ("t", other)], shots=[1, 2],
                                                seeds=2)
    assert calls == [("fixed", 0), ("drawn", 0), ("drawn", 1)]
    assert [r["label"] for r in rs] == ["s", "t"]
    for r in rs:  # channel 0 is the mask itself: a perfect probe on every held-out volume
        assert r["unit"] == "volume" and r["summary"]["a"]["2"]["mean"] == 1.0 and r["summary_pooled"]["b"]["1"]["mean"] == 1.0
        assert len(r["dice"]["b"]["1"]) == 2
    # one of two volumes holds the structure: it cannot be both held out and trained on
    with pytest.raises(ValueError, match="contains? the structure"):
        probe_volumes.volume_probe_experiment({"a": feats[:2]}, [np.zeros((6, 5, 4), bool), masks[0]], shots=[1],
                                              seeds=1, label="s")


def test_overlays_show_the_held_out_volume_and_slice_with_the_most_foreground():
    masks = [np.zeros((4, 4, 6), bool) for _ in range(3)]
    masks[0][:2, :2, 1] = True
    masks[2][:, :, 4] = True
    masks[2][0, 0, 0] = True
    assert volumes.shown_slice(masks, [0, 2]) == (2, 4)
    assert volumes.shown_slice(masks, [0, 1]) == (0, 1)


def test_reading_follows_the_checkpoint_unless_given(tmp_path):
    _save_net(tmp_path / "a.pt", TINY3, spacing=[2, 2, 2], window=None, percentiles=[1, 99])
    rec = volumes.recorded_reading(tmp_path / "a.pt")
    assert rec == {"spacing": (2.0, 2.0, 2.0), "percentiles": (1.0, 99.0)}
    base = ["probe", "--checkpoint", "c", "--images", "i", "--masks", "m", "--out", "o"]
    args = build_parser().parse_args(base + ["--window", "0", "300"])
    assert volumes.reading_options(args, rec) == {"percentiles": (1.0, 99.0), "spacing": (2.0, 2.0, 2.0),
                                                  "window": (0.0, 300.0)}
    args = build_parser().parse_args(base + ["--spacing", "1", "1", "3"])
    assert volumes.reading_options(args, rec)["spacing"] == (1.0, 1.0, 3.0)
    _save_net(tmp_path / "b.pt", TINY3)
    assert volumes.recorded_reading(tmp_path / "b.pt") == {}


def test_linear_probe_fits_volume_features():
    f = torch.zeros(2, 1, 4, 4, 4)
    f[:, 0, :2] = 1.0
    m = f[:, 0] > 0.5
    p = probe.LinearProbe().fit(f, m.numpy()).predict_proba(f)
    assert p.shape == (2, 4, 4, 4) and (p[m.numpy()] > 0.9).all() and (p[~m.numpy()] < 0.1).all()


def _axial_series(folder, pixels):
    """A DICOM series of axial slices (pixels (n, rows, cols), 1 mm, positions along z), one file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    for k, sl in enumerate(pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.SeriesInstanceUID, ds.InstanceNumber = "1.2.3", k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = sl.astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
        ds.save_as(str(folder / f"s{k:02d}.dcm"), enforce_file_format=True)


def test_a_dicom_series_folder_pairs_with_the_label_volume_named_like_it(tmp_path):
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(0)
    for name in ("pt.1", "pt.2"):  # a series is named by its whole folder name, dots included
        _axial_series(tmp_path / "images" / name, rng.integers(0, 1000, (5, 6, 7)))
    (tmp_path / "labels").mkdir()
    shape = volumes.load_volume_pairs([(tmp_path / "images" / "pt.1", tmp_path / "images" / "pt.1")])[0][0].shape
    np.save(tmp_path / "labels" / "pt.1.npy", np.ones(shape, np.int16))
    np.save(tmp_path / "labels" / "pt.2_label.npy", np.zeros(shape, np.int16))
    pairs = volumes.pair_volumes(tmp_path / "images", tmp_path / "labels")
    assert [(a.name, b.name) for a, b in pairs] == [("pt.1", "pt.1.npy"), ("pt.2", "pt.2_label.npy")]
    vols, labs = volumes.load_volume_pairs(pairs)
    assert vols[0].shape == labs[0].shape == shape and labs[0].min() == 1 and labs[1].max() == 0


def test_probe_and_finetune_read_a_checkpoint_of_pretrain_dims_3(tmp_path, capsys):
    """The chain of issue 23: pre-training on a folder of NIfTI volumes (--dims 3), then both commands on
    volumes + label volumes with its model.pt (window, spacing and intensity as pre-training recorded)."""
    from ld_ext import train

    vols, labels = _write_volumes(tmp_path)
    cfg = train.TrainConfig(data=[str(vols)], out=str(tmp_path / "run"), dims=3, size=16, emb_dim=4, n_clusters=4,
                            widths=(4, 4, 4, 4, 4), batch_size=2, epochs1=1, epochs2=1, steps_per_epoch=1,
                            val_images=0, progress=False, device="cpu", spacing=(1.0, 1.0, 1.0))
    train.pretrain(cfg)
    ck = tmp_path / "run" / "model.pt"
    base = ["--checkpoint", str(ck), "--images", str(vols), "--masks", str(labels), "--shots", "1", "--seeds", "1"]
    assert main(["probe", *base, "--out", str(tmp_path / "p")]) == 0
    assert main(["finetune", *base, "--steps", "1", "--batch", "2", "--no-progress", "--out", str(tmp_path / "f")]) == 0
    for out in ("p", "f"):
        res = json.loads((tmp_path / out / "results.json").read_text())
        assert res["dims"] == 3 and res["sliding_window"] == [16, 16, 16] and res["spacing"] == [1.0, 1.0, 1.0]
        assert res["percentiles"] == [0.5, 99.5] and res["results"][0]["label"] == "labels"


@pytest.mark.parametrize("command", ["landmark", "shape-guided"])
def test_2d_only_tasks_refuse_a_3d_checkpoint_in_one_line(tmp_path, capsys, command):
    """ld-ext landmark and ld-ext shape-guided work on images only: a 3-D checkpoint was refused only
    by the network's first forward ("x must have shape (B, 1, X, Y, Z)"), naming neither the file nor
    the cause; now one line names the checkpoint and says it is a 3-D network."""
    from PIL import Image

    ckpt = tmp_path / "ld3.pt"
    _save_net(ckpt, TINY3)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(imgs / f"i{i}.png")
    if command == "landmark":
        (tmp_path / "pts.json").write_text("[[10, 10]]")
        argv = ["landmark", "--checkpoint", str(ckpt), "--template", str(imgs / "i0.png"), "--points",
                str(tmp_path / "pts.json"), "--targets", str(imgs / "i1.png"), "--out", str(tmp_path / "o.json")]
    else:
        argv = ["shape-guided", "--checkpoint", str(ckpt), "--images", str(imgs), "--priors", str(imgs),
                "--out", str(tmp_path / "sg"), "--steps", "1"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith(f"ld-ext: error: checkpoint {ckpt} is a 3-D network"), err
    assert "2-D images only" in err[-1]
