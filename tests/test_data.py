"""Folder datasets (PNG/JPEG/TIFF, DICOM, NIfTI), intensity scaling, and the LD view generator."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ld_ext import data
from ld_ext.augment import AugmentConfig, LDViewGenerator, NORM_MEAN, NORM_STD, _apply_v2, align_to_v1, item_generator

from helpers_dicom import write_dicom

S = 32


def _ramp(h=40, w=48, hi=255.0):
    y, x = np.mgrid[0:h, 0:w]
    return (x + y) / (h + w - 2) * hi


def _write_folder(root):
    (root / "a" / "b").mkdir(parents=True)
    Image.fromarray(_ramp().astype(np.uint8)).save(root / "gray8.png")
    Image.fromarray(_ramp(hi=60000).astype(np.uint16)).save(root / "a" / "gray16.png")
    rgb = np.stack([_ramp(), 255 - _ramp(), np.full((40, 48), 128.0)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "a" / "b" / "rgb.jpg")
    Image.fromarray(_ramp(hi=40000).astype(np.uint16)).save(root / "a" / "b" / "t16.tif")
    Image.fromarray(_ramp(hi=3.5).astype(np.float32)).save(root / "float.tiff")
    Image.fromarray(np.dstack([rgb, np.full((40, 48), 255, np.uint8)])).save(root / "rgba.png")
    (root / "notes.txt").write_text("ignored")


def test_folder_of_2d_images_recursive_mixed_gray_rgb(tmp_path):
    _write_folder(tmp_path)
    files = data.list_image_files(tmp_path)
    assert len(files) == 6 and all(f.suffix != ".txt" for f in files)
    for channels in (1, 3):
        ds = data.ImageFolderDataset(tmp_path, size=S, channels=channels, progress=False)
        assert ds.images.shape == (6, channels, S, S)
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert not ds.skipped
    # robust scaling maps every format's range to [0, 1]: the ramp's extremes survive
    for name in ("gray16.png", "t16.tif", "float.tiff", "gray8.png"):
        i = next(j for j, n in enumerate(ds.names) if n.endswith(name))
        assert ds.images[i].max() > 0.9 and ds.images[i].min() < 0.1, name


def test_16bit_png_keeps_precision():
    arr = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)  # 0 .. 61425, > 8 bits
    x = data.prepare_image(arr.astype(np.float32), 64, percentiles=(0, 100))
    assert len(torch.unique(x)) > 256


def test_percentile_clip_ignores_outliers():
    arr = np.tile(np.linspace(0, 100, 100, dtype=np.float32), (100, 1))
    arr[0, 0] = 1e6
    x = data.scale_intensity(arr, (0.5, 99.5))
    assert x.max() == 1.0 and x.min() == 0.0
    assert np.median(x) == pytest.approx(0.5, abs=0.02)  # not squashed to 0 by the outlier
    assert np.all(data.scale_intensity(np.full((4, 4), 7.0)) == 0)


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable"):
        ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    assert len(ds) == 1 and len(ds.skipped) == 2


def test_empty_missing_and_all_unreadable_folders(tmp_path):
    with pytest.raises(ValueError, match="no supported image files"):
        data.ImageFolderDataset(tmp_path, size=S)
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolderDataset(tmp_path / "missing", size=S)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no readable images"):
        data.ImageFolderDataset(tmp_path, size=S, progress=False)
    with pytest.raises(ValueError, match="size"):
        data.ImageFolderDataset(tmp_path, size=8)
    with pytest.raises(ValueError, match="channels"):
        data.ImageFolderDataset(tmp_path, size=S, channels=2)


def test_images_smaller_than_the_crop_are_upsampled_with_a_warning(tmp_path):
    Image.fromarray(_ramp(10, 12).astype(np.uint8)).save(tmp_path / "tiny.png")
    with pytest.warns(RuntimeWarning, match="smaller than"):
        ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    assert ds.images.shape == (1, 1, S, S) and ds.n_upsampled == 1


def test_dicom_monochrome1_is_inverted(tmp_path):
    pytest.importorskip("pydicom")
    arr = _ramp(48, 48, hi=4000)  # square: no padding, so inversion is exact everywhere
    write_dicom(tmp_path / "m2.dcm", arr, photometric="MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1")
    ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    m1 = ds.images[[n.endswith("m1.dcm") for n in ds.names].index(True)]
    m2 = ds.images[[n.endswith("m2.dcm") for n in ds.names].index(True)]
    torch.testing.assert_close(m1, 1 - m2, atol=1e-5, rtol=0)


def test_nifti_slices_along_axes_skip_empty(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.zeros((20, 24, 10), np.float32)
    vol[4:16, 5:19, 2:8] = np.random.default_rng(0).uniform(50, 100, (12, 14, 6))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    ds = data.ImageFolderDataset(tmp_path, size=S, nifti_axes=(2,), progress=False)
    assert len(ds) == 6  # slices 2..7 have content, the rest are empty
    ds = data.ImageFolderDataset(tmp_path, size=S, nifti_axes=(0, 2), progress=False)
    assert len(ds) == 6 + 12
    with pytest.raises(ValueError, match="nifti_axes"):
        data.ImageFolderDataset(tmp_path, size=S, nifti_axes=(3,))


def test_missing_medical_reader_gives_clear_message(tmp_path, monkeypatch):
    (tmp_path / "v.nii").write_bytes(b"\0" * 400)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.warns(RuntimeWarning), pytest.raises(data.MissingReaderError, match="pip install nibabel"):
        data.ImageFolderDataset(tmp_path, size=S, progress=False)
    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "ok.png")
    with pytest.warns(RuntimeWarning, match="nibabel"):
        ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    assert len(ds) == 1


# ----------------------------------------------------------------------------- view generator


def _sources(b, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, S, S, generator=g), torch.rand(b, c, S, S, generator=g)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("fh,fv", [(False, False), (True, False), (False, True), (True, True)])
def test_align_undoes_the_v2_transform(k, fh, fv):
    x = torch.randn(3, 5, 8, 8)
    v2 = torch.stack([_apply_v2(x[i], fh, fv, k) for i in range(3)])
    back = align_to_v1(v2, torch.tensor([fh] * 3), torch.tensor([fv] * 3), torch.tensor([k] * 3))
    torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_v2_patch_grid_realigns_onto_v1():
    """With per-view randomness switched off, v1 and v2 differ only by the recorded flips/rot90."""
    cfg = AugmentConfig(view_rotation=0.0, brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0)
    b = 6
    img1, img2 = _sources(b)
    vb = LDViewGenerator(S, cfg)(img1, img2, [item_generator(3, i) for i in range(b)])
    assert vb.rot_k.unique().numel() > 1  # the transforms really vary
    v1, v2 = vb.images[: 2 * b], vb.images[2 * b : 4 * b]
    assert not torch.allclose(v1, v2)
    grid = lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 4)  # noqa: E731
    torch.testing.assert_close(align_to_v1(grid(v2), vb.flip_h, vb.flip_v, vb.rot_k), grid(v1), rtol=1e-5, atol=1e-5)


def test_view_batch_layout_mixup_and_determinism():
    b = 3
    img1, img2 = _sources(b, c=3)
    gens = lambda: [item_generator(1, i) for i in range(b)]  # noqa: E731
    vb = LDViewGenerator(S)(img1, img2, gens())
    assert vb.images.shape == (5 * b, 3, S, S)
    assert torch.all((vb.mix_w >= 0.2) & (vb.mix_w <= 0.8))
    raw = vb.images * NORM_STD + NORM_MEAN
    w = vb.mix_w.view(-1, 1, 1, 1)
    torch.testing.assert_close(raw[4 * b :], w * raw[:b] + (1 - w) * raw[b : 2 * b], rtol=1e-5, atol=1e-5)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    again = LDViewGenerator(S)(img1, img2, gens())
    assert torch.equal(again.images, vb.images)
    # an item is augmented the same whichever batch it is in
    alone = LDViewGenerator(S)(img1[1:2], img2[1:2], [item_generator(1, 1)])
    torch.testing.assert_close(alone.images[0], vb.images[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone.images[4], vb.images[4 * b + 1], rtol=1e-6, atol=1e-6)


def test_view_generator_rejects_bad_input():
    img1, img2 = _sources(2)
    with pytest.raises(ValueError, match="generator"):
        LDViewGenerator(S)(img1, img2, [item_generator(0)])
    with pytest.raises(ValueError, match="img1 and img2"):
        LDViewGenerator(S)(img1, img2[:1], [item_generator(0)] * 2)
    with pytest.raises(ValueError, match="size"):
        LDViewGenerator(8)


# ----------------------------------------------------------------------------- FIFOs, NaN/Inf, other formats


class _Alarm:
    """Fail instead of hanging forever (a FIFO opened for reading blocks until a writer comes)."""

    def __init__(self, seconds=120):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def boom(*_):
            raise TimeoutError("hung: a FIFO was opened")

        self.old = signal.signal(signal.SIGALRM, boom)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_fifo_named_like_an_image_is_skipped_without_opening(tmp_path):
    import os

    from ld_ext.tasks import common

    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    with _Alarm():
        with pytest.warns(RuntimeWarning, match="not regular files"):
            ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
        assert len(ds) == 1 and ds.skipped == [(str(tmp_path / "pipe.png"), "not a regular file (not opened)")]
        with pytest.warns(RuntimeWarning, match="not regular files"):
            cache = data.open_or_build_cache(tmp_path, data.Preprocessing(S), tmp_path / "c", workers=0, progress=False)
        assert len(cache) == 1 and "pipe.png" in cache.skipped[0][0]
        with pytest.warns(RuntimeWarning, match="not regular files"):
            assert [p.name for p in common.list_images(tmp_path)] == ["ok.png"]
        with pytest.raises(ValueError, match="not a regular file"):
            data.scan_image_files(tmp_path / "pipe.png")
        with pytest.raises(ValueError, match="not a regular file"):
            common.load_image(tmp_path / "pipe.png")


def test_nan_and_inf_images_are_skipped_and_counted_never_blank(tmp_path):
    from ld_ext.tasks import common

    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.full((40, 48), np.nan, np.float32)).save(tmp_path / "all_nan.tiff")
    part = _ramp(hi=3.0).astype(np.float32)
    part[3, 4] = np.inf
    Image.fromarray(part).save(tmp_path / "one_inf.tif")
    with pytest.warns(RuntimeWarning, match="skipped 2 image.* NaN or infinite"):
        ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    assert len(ds) == 1 and ds.names[0].endswith("ok.png")
    assert sorted(n.rsplit("/", 1)[-1] for n in ds.nonfinite) == ["all_nan.tiff", "one_inf.tif"]
    with pytest.raises(ValueError, match="NaN or infinite"):
        common.load_image(tmp_path / "all_nan.tiff")
    with pytest.raises(data.NonFiniteImageError):
        data.prepare_image(np.full((8, 8), np.nan, np.float32), S)
    (tmp_path / "ok.png").unlink()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="2 image\\(s\\) had NaN or infinite"):
        data.ImageFolderDataset(tmp_path, size=S, progress=False)


def test_all_nan_nifti_is_counted(tmp_path):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.full((20, 24, 10), np.nan, np.float32), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    vol = np.zeros((20, 24, 10), np.float32)
    vol[4:16, 5:19, 2:8] = 80.0 + np.arange(12 * 14 * 6).reshape(12, 14, 6) % 7
    vol[10, 10, 3] = np.nan  # one bad voxel: only slice 3 of axis 2 is dropped (and counted)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.warns(RuntimeWarning, match="skipped 11 image.* NaN"):
        ds = data.ImageFolderDataset(tmp_path, size=S, progress=False)
    assert len(ds) == 5 and len(ds.nonfinite) == 11
    assert sum("nan.nii.gz" in n for n in ds.nonfinite) == 10 and any(n.endswith("v.nii.gz:axis2:3") for n in ds.nonfinite)


def test_nifti_is_read_in_canonical_orientation(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(1).uniform(10, 100, (20, 24, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ras.nii.gz"))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # x stored right-to-left: the same anatomy, first axis reversed
    nib.save(nib.Nifti1Image(vol[::-1].copy(), flipped), str(tmp_path / "las.nii.gz"))
    a = data.read_nifti_slices(tmp_path / "ras.nii.gz", (2,), 0.0)
    b = data.read_nifti_slices(tmp_path / "las.nii.gz", (2,), 0.0)
    assert len(a) == len(b) == 6
    for (la, xa), (lb, xb) in zip(a, b):
        assert la == lb and np.array_equal(xa, xb)


def test_npy_and_dicom_modality_lut_through_the_one_reader(tmp_path):
    from ld_ext.tasks import common

    np.save(tmp_path / "a.npy", _ramp().astype(np.float64))
    (x,) = [arr for _, arr in data.load_arrays(tmp_path / "a.npy")]
    assert x.dtype == np.float32 and x.shape == (40, 48) and np.allclose(x, _ramp())
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="must be 2-D"):
        data.load_arrays(tmp_path / "v.npy")
    pytest.importorskip("pydicom")
    arr = _ramp(32, 32, hi=1000)
    write_dicom(tmp_path / "r.dcm", arr, photometric="MONOCHROME2", slope=2.0, intercept=-100.0)
    (d,) = data.read_dicom(tmp_path / "r.dcm")
    np.testing.assert_allclose(d, 2.0 * np.floor(arr) - 100.0)
    np.testing.assert_allclose(common.load_image(tmp_path / "r.dcm"), d)  # the downstream commands read DICOM too
    assert set(data.IMAGE_EXTENSIONS) >= {".png", ".dcm", ".nii.gz", ".npy"} and common.IMAGE_EXTENSIONS is data.IMAGE_EXTENSIONS
    assert common.file_stem is data.file_stem and common.scale_intensity is data.scale_intensity  # one reader stack


def test_tasks_common_searches_recursively_and_pairs_by_subfolder(tmp_path):
    from ld_ext.tasks import common

    for sub in ("p1", "p2"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        (tmp_path / "masks" / sub).mkdir(parents=True)
        Image.fromarray(_ramp(20, 20).astype(np.uint8)).save(tmp_path / "images" / sub / "scan.png")
        Image.fromarray(np.full((20, 20), 255 if sub == "p2" else 0, np.uint8)).save(tmp_path / "masks" / sub / "scan_mask.png")
    pairs = common.pair_images_masks(tmp_path / "images", tmp_path / "masks")
    assert [(i.parent.name, m.parent.name) for i, m in pairs] == [("p1", "p1"), ("p2", "p2")]
    _, masks = common.load_pairs(pairs)
    assert not masks[0].any() and masks[1].all()


# ----------------------------------------------------------------------------- the on-disk cache


def test_cache_matches_the_in_memory_dataset_and_is_reused(tmp_path, monkeypatch):
    _write_folder(tmp_path / "d")
    prep = data.Preprocessing(S, 1)
    mem = data.ImageFolderDataset(tmp_path / "d", size=S, progress=False)
    c0 = data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c0", workers=0, progress=False)
    c2 = data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c2", workers=2, progress=False)
    assert len(c0) == len(c2) == len(mem) == 6 and c0.fingerprint == c2.fingerprint
    assert torch.equal(c0.read(range(6)), mem.images) and torch.equal(c2.read(range(6)), mem.images)
    assert c0.names == mem.names and np.array_equal(np.asarray(c0.array()), mem.images.numpy())
    assert torch.equal(c0.read([5, 0, 5]), mem.images[[5, 0, 5]])
    with pytest.raises(IndexError):
        c0.read([6])
    assert [p.name for p in (tmp_path / "c0").iterdir() if ".tmp-" in p.name] == []

    # reused as long as nothing changed: no file is read again
    def no_reading(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(data.preprocess, "_process_file", no_reading)
    again = data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c0", workers=0, progress=False)
    assert again.root == c0.root
    # a changed setting or a changed file gives a new cache
    with pytest.raises(AssertionError, match="rebuilt"):
        data.open_or_build_cache(tmp_path / "d", data.Preprocessing(S, 3), tmp_path / "c0", workers=0, progress=False)
    import os

    f = tmp_path / "d" / "gray8.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="rebuilt"):
        data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c0", workers=0, progress=False)
    # a failed build leaves neither a cache nor a temp folder behind
    assert sorted(p.name for p in (tmp_path / "c0").iterdir() if not p.name.endswith(".lock")) == [c0.root.name]


def test_cache_refuses_bad_arguments(tmp_path):
    Image.fromarray(_ramp().astype(np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(TypeError, match="prep"):
        data.open_or_build_cache(tmp_path, {"size": 32}, tmp_path / "c")
    with pytest.raises(ValueError, match="workers"):
        data.open_or_build_cache(tmp_path, data.Preprocessing(S), tmp_path / "c", workers=-1)
    with pytest.raises(ValueError, match="percentiles"):
        data.Preprocessing(S, percentiles=(50, 10))
    with pytest.raises(ValueError, match="not an ld_ext image cache"):
        data.CachedImageDataset(tmp_path)


@pytest.mark.parametrize("damage", ["meta deleted", "meta a list", "meta n lowered", "index a list", "images cut"])
def test_a_damaged_cache_is_rebuilt_with_a_warning_not_trained_on(tmp_path, damage, caplog):
    import json as _json
    import logging

    _write_folder(tmp_path / "d")  # 6 images
    prep = data.Preprocessing(S)
    cache = data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c", workers=0, progress=False)
    good = cache.read(torch.arange(6)).clone()
    root = cache.root
    del cache
    meta = root / "meta.json"
    if damage == "meta deleted":
        meta.unlink()
    elif damage == "meta a list":
        meta.write_text("[1, 2, 3]")
    elif damage == "meta n lowered":  # the array cut to match: only index.json still knows
        m = _json.loads(meta.read_text())
        m["n"] = 2
        meta.write_text(_json.dumps(m))
        with open(root / "images.f32", "r+b") as f:
            f.truncate(2 * S * S * 4)
    elif damage == "index a list":
        (root / "index.json").write_text("[]")
    else:
        with open(root / "images.f32", "r+b") as f:
            f.truncate(7)
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        again = data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c", workers=0, progress=False)
    assert any("is damaged and is rebuilt" in r.getMessage() for r in caplog.records), caplog.text
    assert len(again) == 6 and torch.equal(again.read(torch.arange(6)), good)
    # and the rebuilt cache is reused silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        data.open_or_build_cache(tmp_path / "d", prep, tmp_path / "c", workers=0, progress=False)
    assert not any("damaged" in r.getMessage() for r in caplog.records)
