"""3-D volumes: NIfTI orientation, DICOM-series ordering and rescale, .npy, spacing resampling,
window and percentile intensity, label maps, bad input; the volume cache (build, reopen, patch
reads equal to the arrays, damage rebuilt, source identity, exclude, lock) and its memory use."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ld_ext import data
from ld_ext.data import cachelock
from ld_ext.data import volume_cache as vc_mod

from helpers_dicom import write_dicom

REPO = Path(__file__).resolve().parents[1]


def _nifti(path, arr, affine):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.asarray(arr), np.asarray(affine, np.float64)), str(path))
    return path


def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, msg


# ----------------------------------------------------------------------------- NIfTI orientation

RAS_AFFINE = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 7], [0, 0, 0, 1]])


def _flip_perm(shape, perm, flips):
    """The voxel map M (stored index -> RAS index) of a volume stored with its RAS axes permuted
    (stored axis a holds RAS axis perm[a]) and flipped (flips[a])."""
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for a, (r, f) in enumerate(zip(perm, flips)):
        m[r, a] = -1.0 if f else 1.0
        m[r, 3] = shape[r] - 1 if f else 0.0
    return m


@pytest.mark.parametrize(
    "perm,flips",
    [((0, 1, 2), (True, True, False)), ((2, 0, 1), (False, False, False)), ((1, 2, 0), (True, False, True))],
    ids=["LPS", "permuted", "permuted-flipped"],
)
def test_a_nifti_stored_lps_or_permuted_reads_as_the_ras_one_voxel_by_voxel(tmp_path, perm, flips):
    ras = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    m = _flip_perm(ras.shape, perm, flips)
    stored_shape = tuple(ras.shape[r] for r in perm)
    idx = np.indices(stored_shape).reshape(3, -1)
    ras_idx = (m[:3, :3] @ idx + m[:3, 3:]).round().astype(int)
    stored = ras[tuple(ras_idx)].reshape(stored_shape)  # stored[i] = ras[M i]
    _nifti(tmp_path / "ras.nii.gz", ras, RAS_AFFINE)
    _nifti(tmp_path / "other.nii.gz", stored, RAS_AFFINE @ m)  # the same voxels in the same world places
    for kw in ({"label": True}, {}):
        a = data.read_volume(tmp_path / "ras.nii.gz", **kw)
        b = data.read_volume(tmp_path / "other.nii.gz", **kw)
        assert b.array.shape == (6, 7, 5) and b.array.dtype == np.float32 and b.array.flags.c_contiguous
        np.testing.assert_array_equal(b.array, a.array)
        np.testing.assert_allclose(b.affine, RAS_AFFINE, atol=1e-6)
        assert b.spacing == pytest.approx((2.0, 3.0, 4.0))
    np.testing.assert_array_equal(data.read_volume(tmp_path / "other.nii.gz", label=True).array, ras)


def test_nifti_4d_with_one_volume_is_read_and_with_several_refused(tmp_path):
    vol = np.random.default_rng(0).random((5, 6, 4, 1)).astype(np.float32)
    _nifti(tmp_path / "one.nii", vol, np.eye(4))
    assert data.read_volume(tmp_path / "one.nii").shape == (5, 6, 4)
    _nifti(tmp_path / "two.nii", np.concatenate([vol, vol], -1), np.eye(4))
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "two.nii")
    _one_line(e, "two.nii", "2 volumes")


# ----------------------------------------------------------------------------- DICOM series


def _write_slice(path, pixels, *, iop, ipp, spacing, series, instance, slope=2.0, intercept=-1024.0):
    write_dicom(path, pixels, sop_class="CTImageStorage", slope=slope, intercept=intercept, Modality="CT",
                SeriesInstanceUID=series, InstanceNumber=instance, ImageOrientationPatient=[float(v) for v in iop],
                ImagePositionPatient=[float(v) for v in ipp], PixelSpacing=[float(v) for v in spacing])


# (row direction, column direction), first position, step between slices (mm, LPS)
ORIENTATIONS = {
    "axial": ((1, 0, 0, 0, 1, 0), (-20.0, -30.0, 40.0), (0.0, 0.0, 2.5)),
    "sagittal-descending": ((0, 1, 0, 0, 0, -1), (12.0, -20.0, 30.0), (-3.0, 0.0, 0.0)),
}
SPACING = (0.8, 0.6)  # PixelSpacing: between rows, between columns


def _write_series(folder, orientation, n=5, rows=6, cols=7, series="1.2.3.4"):
    """A series whose file names and InstanceNumbers are shuffled against the slice positions.
    Returns the stored pixels in position order (n, rows, cols) and the positions."""
    pytest.importorskip("pydicom")
    folder.mkdir(parents=True, exist_ok=True)
    iop, first, step = ORIENTATIONS[orientation]
    stored = (np.arange(n)[:, None, None] * 100 + np.arange(rows)[:, None] * 10 + np.arange(cols)).astype(np.uint16)
    names = np.array([(2 * k + 1) % n for k in range(n)])  # n odd: neither position order nor its reverse
    numbers = names[::-1]
    assert n % 2 and (len(set(names)) == n and (names != np.arange(n)).any() and (names != np.arange(n)[::-1]).any())
    positions = np.asarray(first) + np.arange(n)[:, None] * np.asarray(step)
    for k in range(n):
        _write_slice(
            folder / f"im{names[k]:03d}.dcm",
            stored[k],
            iop=iop,
            ipp=positions[k],
            spacing=SPACING,
            series=series,
            instance=int(numbers[k]) + 1,
        )
    return stored, positions


def _dicom_values_at(vol, stored, positions, iop):
    """What the series holds at each voxel's world position (the oracle: geometry, not order)."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    idx = np.indices(vol.array.shape).reshape(3, -1)
    ras = vol.affine[:3, :3] @ idx + vol.affine[:3, 3:]
    lps = ras * np.array([[-1.0], [-1.0], [1.0]])
    proj = positions @ normal
    k = np.abs((normal @ lps)[:, None] - proj[None]).argmin(1)
    rel = lps - positions[k].T
    c, r = row @ rel / SPACING[1], col @ rel / SPACING[0]
    assert np.allclose(c, c.round(), atol=1e-4) and np.allclose(r, r.round(), atol=1e-4)
    return (stored[k, r.round().astype(int), c.round().astype(int)] * 2.0 - 1024.0).reshape(vol.array.shape)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_dicom_series_is_ordered_by_position_not_name_or_instance_number_and_rescaled(tmp_path, orientation):
    stored, positions = _write_series(tmp_path / "s", orientation)
    vol = data.read_volume(tmp_path / "s", label=True)  # label: the modality values as they are
    assert vol.path == tmp_path / "s" and sorted(vol.shape) == [5, 6, 7]
    a = vol.affine[:3, :3]
    assert np.allclose(a, np.diag(np.diag(a))) and (np.diag(a) > 0).all()  # RAS+
    assert sorted(vol.spacing) == pytest.approx(sorted([0.6, 0.8, float(np.abs(ORIENTATIONS[orientation][2]).sum())]))
    np.testing.assert_array_equal(vol.array, _dicom_values_at(vol, stored, positions, ORIENTATIONS[orientation][0]))
    assert vol.array.min() == -1024.0 and vol.array.max() == stored.max() * 2.0 - 1024.0  # slope 2, intercept -1024


def test_axial_dicom_series_in_ras_index_order(tmp_path):
    # stated directly for the common case: LPS axial slices -> X and Y flipped, Z ascending
    stored, _ = _write_series(tmp_path / "s", "axial")
    vol = data.read_volume(tmp_path / "s", label=True)
    expected = np.transpose(stored, (2, 1, 0))[::-1, ::-1, :] * 2.0 - 1024.0  # (col, row, slice)
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.spacing == pytest.approx((0.6, 0.8, 2.5))
    # voxel (0, 0, 0) is the last column of the last row of the lowest slice, in RAS mm
    corner = np.array([-20.0 + 6 * 0.6, -30.0 + 5 * 0.8, 40.0]) * [-1, -1, 1]
    np.testing.assert_allclose(vol.affine[:3, 3], corner, atol=1e-6)


def test_dicom_series_errors_name_the_folder(tmp_path):
    _write_series(tmp_path / "two", "axial", n=3)
    _write_series(tmp_path / "b", "axial", n=3, series="1.2.3.5")
    for f in (tmp_path / "b").iterdir():
        shutil.copy(f, tmp_path / "two" / f"b_{f.name}")
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "two")
    _one_line(e, tmp_path / "two", "2 series")
    _write_series(tmp_path / "one", "axial", n=3)
    for name in sorted(os.listdir(tmp_path / "one"))[:2]:
        os.unlink(tmp_path / "one" / name)
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "one")
    _one_line(e, tmp_path / "one", "2-D")
    with pytest.raises(ValueError) as e:
        data.read_volume(next((tmp_path / "one").iterdir()))
    _one_line(e, "one DICOM slice")


def test_a_missing_middle_slice_and_two_slices_at_one_place_are_refused(tmp_path):
    stored, positions = _write_series(tmp_path / "s", "axial", n=5)
    iop = ORIENTATIONS["axial"][0]
    for name, ks in (("gap", [0, 1, 3, 4]), ("dup", [0, 1, 1, 2])):
        folder = tmp_path / name
        folder.mkdir()
        for j, k in enumerate(ks):
            _write_slice(
                folder / f"{j}.dcm", stored[k], iop=iop, ipp=positions[k], spacing=SPACING, series="1", instance=j
            )
        with pytest.raises(ValueError) as e:
            data.read_volume(folder)
        _one_line(e, folder, "uneven" if name == "gap" else "same position")


# ----------------------------------------------------------------------------- .npy, resampling, intensity


def test_npy_volume_identity_geometry_and_bad_arrays(tmp_path):
    arr = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float64)
    np.save(tmp_path / "v.npy", arr)
    vol = data.read_volume(tmp_path / "v.npy", window=(-10, 10))
    np.testing.assert_allclose(vol.array, (arr.astype(np.float32) + 10) / 20, atol=1e-6)
    assert vol.spacing == (1.0, 1.0, 1.0) and np.array_equal(vol.affine, np.eye(4))
    cases = {
        "flat.npy": (np.zeros((8, 9)), "expected a 3-D volume"),
        "slice.npy": (np.zeros((8, 9, 1)), "2-D"),
        "empty.npy": (np.zeros((0, 9, 4)), "empty"),
        "complex.npy": (np.zeros((3, 3, 3), np.complex64), "real numbers"),
    }
    for name, (a, what) in cases.items():
        np.save(tmp_path / name, a)
        with pytest.raises(ValueError) as e:
            data.read_volume(tmp_path / name)
        _one_line(e, tmp_path / name, what)
    bad = arr.copy()
    bad[1, 2, 3], bad[0, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(data.NonFiniteImageError) as e:
        data.read_volume(tmp_path / "nan.npy")
    _one_line(e, tmp_path / "nan.npy", "2 NaN or infinite")


def test_spacing_resampling_keeps_the_extent_and_the_world_positions(tmp_path):
    shape, spacing = (20, 10, 8), (1.0, 2.0, 3.0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (5.0, -7.0, 11.0)
    idx = np.indices(shape).astype(np.float64)
    world = np.einsum("ij,jxyz->ixyz", affine[:3, :3], idx) + affine[:3, 3, None, None, None]
    ramp = (0.5 * world[0] - 0.25 * world[1] + 0.125 * world[2]).astype(np.float32)  # linear in mm
    _nifti(tmp_path / "r.nii.gz", ramp, affine)
    vol = data.read_volume(tmp_path / "r.nii.gz", spacing=(2, 2, 2), window=(-100, 100))
    assert vol.shape == (10, 10, 12) and vol.spacing == pytest.approx((2.0, 2.0, 2.0))
    # the grid's outer corner stays: voxel -0.5 of both grids is the same point
    np.testing.assert_allclose(vol.affine @ [-0.5, -0.5, -0.5, 1], affine @ [-0.5, -0.5, -0.5, 1], atol=1e-9)
    idx = np.indices(vol.shape).astype(np.float64)
    w = np.einsum("ij,jxyz->ixyz", vol.affine[:3, :3], idx) + vol.affine[:3, 3, None, None, None]
    expect = ((0.5 * w[0] - 0.25 * w[1] + 0.125 * w[2]) + 100) / 200
    inner = (slice(1, -1), slice(1, -1), slice(1, -1))  # trilinear is exact on a linear ramp away from the border
    np.testing.assert_allclose(vol.array[inner], expect[inner], atol=1e-5)
    assert data.read_volume(tmp_path / "r.nii.gz", spacing=2).shape == (10, 10, 12)  # one number: all axes
    assert data.read_volume(tmp_path / "r.nii.gz", spacing=(1, 2, 3)).shape == shape


def test_label_volumes_keep_integers_through_nearest_resampling(tmp_path):
    lab = np.zeros((12, 12, 12), np.int16)
    lab[2:8, 2:8, 2:8], lab[8:, 8:, 8:] = 3, 7
    _nifti(tmp_path / "lab.nii.gz", lab, np.diag([1.0, 1.0, 1.0, 1.0]))
    vol = data.read_volume(tmp_path / "lab.nii.gz", label=True, spacing=(0.5, 2.0, 1.0))
    assert vol.shape == (24, 6, 12) and vol.array.dtype == np.float32
    assert set(np.unique(vol.array)) == {0.0, 3.0, 7.0}
    assert vol.array[10, 2, 5] == 3 and vol.array[20, 5, 10] == 7 and vol.array[0, 0, 0] == 0
    plain = data.read_volume(tmp_path / "lab.nii.gz", label=True)
    np.testing.assert_array_equal(plain.array, lab)  # no intensity mapping
    _nifti(tmp_path / "prob.nii.gz", lab.astype(np.float32) * 0.3, np.eye(4))
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "prob.nii.gz", label=True)
    _one_line(e, tmp_path / "prob.nii.gz", "non-integer")


def test_window_and_percentile_normalisation(tmp_path):
    ct = np.linspace(-2000, 1000, 30 * 10 * 10, dtype=np.float32).reshape(30, 10, 10)
    np.save(tmp_path / "ct.npy", ct)
    v = data.read_volume(tmp_path / "ct.npy", window=(-1000, 400)).array
    expect = np.clip((ct + 1000) / 1400, 0, 1)
    np.testing.assert_allclose(v, expect, atol=1e-6)
    assert v.min() == 0.0 and v.max() == 1.0
    mr = np.random.default_rng(0).uniform(0, 100, (20, 20, 20)).astype(np.float32)
    mr[0, 0, 0] = 1e6  # one outlier does not squash the rest
    np.save(tmp_path / "mr.npy", mr)
    v = data.read_volume(tmp_path / "mr.npy").array
    lo, hi = np.percentile(mr, (0.5, 99.5))
    np.testing.assert_allclose(v, np.clip((mr - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.median(v) == pytest.approx(0.5, abs=0.02)
    v2 = data.read_volume(tmp_path / "mr.npy", percentiles=(0, 100)).array
    assert v2.max() == 1.0 and np.median(v2) < 0.01
    np.save(tmp_path / "const.npy", np.full((4, 4, 4), 7.0))
    assert (data.read_volume(tmp_path / "const.npy").array == 0).all()


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"spacing": (1, 0, 1)}, "spacing"),
        ({"spacing": (1, 1)}, "spacing"),
        ({"spacing": "1mm"}, "spacing"),
        ({"window": (400, -1000)}, "window"),
        ({"window": (0, float("nan"))}, "window"),
        ({"percentiles": (99, 1)}, "percentiles"),
        ({"percentiles": (0, 101)}, "percentiles"),
    ],
)
def test_bad_settings_are_one_error_naming_the_argument(tmp_path, kw, name):
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "v.npy", **kw)
    _one_line(e, name)
    with pytest.raises(ValueError) as e:
        data.open_or_build_volume_cache(tmp_path, cache=tmp_path / "c", **kw)
    _one_line(e, name)


def test_missing_or_unsupported_paths(tmp_path):
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "nope.nii.gz")
    _one_line(e, "nope.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "x.png")
    _one_line(e, "x.png", "not a volume")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError) as e:
        data.read_volume(tmp_path / "broken.nii.gz")
    _one_line(e, "broken.nii.gz", "cannot be read")


# ----------------------------------------------------------------------------- finding volumes


def _data_folder(root):
    """Two NIfTI volumes, a 3-D .npy, a 2-D .npy, a DICOM series, a PNG and an output folder."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    _nifti(root / "a.nii.gz", rng.normal(size=(12, 10, 9)).astype(np.float32), np.diag([1.5, 1, 2, 1]))
    _nifti(root / "sub" / "b.nii", rng.normal(size=(9, 12, 10)).astype(np.float32), np.diag([-1, 1, 1, 1]))
    np.save(root / "c.npy", rng.normal(size=(10, 11, 12)).astype(np.float32))
    np.save(root / "flat.npy", np.zeros((10, 11), np.float32))
    _write_series(root / "series", "axial")
    (root / "notes.png").write_bytes(b"x")
    (root / "out").mkdir()
    np.save(root / "out" / "pred.npy", np.zeros((4, 4, 4), np.float32))
    return root


def test_list_volume_files_one_entry_per_volume(tmp_path):
    root = _data_folder(tmp_path / "d")
    with pytest.warns(RuntimeWarning, match="flat.npy"):
        found = data.list_volume_files(root, exclude=[root / "out"])
    assert found == sorted([root / "a.nii.gz", root / "c.npy", root / "series", root / "sub" / "b.nii"])
    with pytest.warns(RuntimeWarning):
        assert root / "out" / "pred.npy" in data.list_volume_files(root)
    assert data.list_volume_files(root / "series") == [root / "series"]
    for bad, what in ((tmp_path / "missing", "does not exist"), (root / "notes.png", "not a volume")):
        with pytest.raises(ValueError) as e:
            data.list_volume_files(bad)
        _one_line(e, bad, what)
    with pytest.raises(ValueError) as e:
        data.list_volume_files(next((root / "series").iterdir()))
    _one_line(e, "give the folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        data.list_volume_files(tmp_path / "empty")
    _one_line(e, "no volumes found", tmp_path / "empty")


# ----------------------------------------------------------------------------- the cache


def _open(tmp_path, **kw):
    kw.setdefault("cache", tmp_path / "c")
    return data.open_or_build_volume_cache(tmp_path / "d", exclude=[tmp_path / "d" / "out"], **kw)


@pytest.fixture
def folder(tmp_path):
    root = _data_folder(tmp_path / "d")
    shutil.rmtree(root / "out")
    (root / "flat.npy").unlink()
    return root


def test_cache_build_reopen_and_patches_equal_the_arrays(tmp_path, folder):
    builds = []
    ds = _open(tmp_path, window=(-3, 3), log=builds.append)
    assert len(ds) == 4 and len(builds) == 1
    assert ds.names == [str(folder / n) for n in ("a.nii.gz", "c.npy", "series", "sub/b.nii")]
    rng = np.random.default_rng(1)
    for i, name in enumerate(ds.names):
        vol = data.read_volume(name, window=(-3, 3))
        assert ds.shapes[i] == vol.shape and ds.spacings[i] == pytest.approx(vol.spacing)
        np.testing.assert_allclose(ds.affines[i], vol.affine)
        assert torch.equal(ds.read_volume(i), torch.from_numpy(vol.array)[None])
        padded = np.pad(vol.array, 12)
        for _ in range(20):
            size = tuple(int(s) for s in rng.integers(1, 12, 3))
            start = tuple(int(s) for s in rng.integers(-8, np.asarray(vol.shape), 3))
            patch = ds.read_patch(i, start, size)
            assert patch.shape == (1, *size) and patch.dtype == torch.float32
            want = padded[tuple(slice(s + 12, s + 12 + k) for s, k in zip(start, size))]
            assert torch.equal(patch[0], torch.from_numpy(np.ascontiguousarray(want)))
    assert (ds.read_patch(0, (100, 0, 0), (4, 4, 4)) == 0).all()
    again = _open(tmp_path, window=(-3, 3), log=builds.append)
    assert again.root == ds.root and len(builds) == 1  # reused, not rebuilt
    other = _open(tmp_path, window=(-3, 3), spacing=(2, 2, 2), log=builds.append)
    assert other.root != ds.root and len(builds) == 2  # other settings: another cache
    clone = pickle.loads(pickle.dumps(ds))  # as a DataLoader worker gets it
    assert torch.equal(clone.read_patch(2, (1, 2, 3), (4, 4, 2)), ds.read_patch(2, (1, 2, 3), (4, 4, 2)))


def test_cache_bad_patch_arguments(tmp_path, folder):
    ds = _open(tmp_path)
    for args, exc, what in (
        ((4, (0, 0, 0), (2, 2, 2)), IndexError, "volume index"),
        ((0, (0, 0), (2, 2, 2)), ValueError, "start"),
        ((0, (0, 0, 0), (2, 0, 2)), ValueError, "size"),
        ((0, (0, 0, 0.5), (2, 2, 2)), ValueError, "start"),
    ):
        with pytest.raises(exc) as e:
            ds.read_patch(*args)
        _one_line(e, what)


def test_a_damaged_cache_is_rebuilt_at_open(tmp_path, folder, caplog):
    ds = _open(tmp_path)
    good = [ds.read_volume(i).clone() for i in range(len(ds))]
    root, f32 = ds.root, ds.root / "volumes.f32"
    del ds
    size = f32.stat().st_size
    f32.write_bytes(np.zeros(size // 4, np.float32).tobytes())  # same size, other content
    with pytest.raises(data.CacheIntegrityError) as e:
        data.VolumePatchDataset(root)
    _one_line(e, "volumes.f32", "checksum")
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        again = _open(tmp_path)
    assert any("is damaged and is rebuilt" in r.getMessage() for r in caplog.records)
    assert again.root == root and all(torch.equal(again.read_volume(i), g) for i, g in enumerate(good))
    # an edited index no longer matches the seal
    index = json.loads((root / "index.json").read_text())
    index["volumes"][0]["shape"] = [1, 1, 1]
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="seal"):
        data.VolumePatchDataset(root)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ld_ext"):
        assert torch.equal(_open(tmp_path).read_volume(0), good[0])
    assert any("seal" in r.getMessage() for r in caplog.records)


def test_a_volume_damaged_beyond_the_check_at_open_stops_at_its_first_read(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(vc_mod, "_VERIFY_AT_OPEN_BYTES", 0)  # only one volume is checked at open
    ds = _open(tmp_path)
    assert ds._verified.sum() == 1
    good = ds.read_patch(3, (0, 0, 0), (4, 4, 4)).clone()
    del ds
    f32 = next((tmp_path / "c").glob("ld_ext-volumes-*")) / "volumes.f32"
    raw = np.fromfile(f32, np.float32)
    raw[-1] += 1.0  # the last voxel of the last volume
    raw.tofile(f32)
    ds = _open(tmp_path)
    with pytest.raises(data.CacheIntegrityError) as e:
        ds.read_patch(3, (0, 0, 0), (2, 2, 2))  # a patch away from the damage: the whole volume is checked
    _one_line(e, "volume 3", "marked damaged")
    assert (ds.root / "DAMAGED").exists()
    again = _open(tmp_path)
    assert not (again.root / "DAMAGED").exists() and torch.equal(again.read_patch(3, (0, 0, 0), (4, 4, 4)), good)


def test_cache_follows_the_source_files_and_excludes_outputs(tmp_path, folder):
    ds = _open(tmp_path)
    np.save(folder / "c.npy", np.ones((10, 11, 12), np.float32))  # replaced: new size/mtime/ctime/inode
    other = _open(tmp_path)
    assert other.root != ds.root and other.read_volume(1).abs().sum() == 0  # constant volume -> zeros
    (folder / "out").mkdir()
    np.save(folder / "out" / "pred.npy", np.zeros((4, 4, 4), np.float32))
    assert _open(tmp_path).names == other.names  # the excluded folder is never read
    # one more slice in the series folder is another source identity
    shutil.copy(next((folder / "series").iterdir()), folder / "series" / "zz_copy.dcm")
    with pytest.warns(RuntimeWarning, match="could not be read"):  # now two slices share a position
        fourth = _open(tmp_path)
    assert fourth.root != other.root and len(fourth) == 3 and "same position" in fourth.skipped[0][1]


def test_unreadable_volumes_are_skipped_and_none_readable_is_one_error(tmp_path):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "ok.npy", np.random.default_rng(0).random((5, 5, 5)))
    (tmp_path / "d" / "bad.nii.gz").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning, match="skipped 1 volume"):
        ds = _open(tmp_path)
    assert len(ds) == 1 and ds.skipped[0][0].endswith("bad.nii.gz")
    (tmp_path / "d" / "ok.npy").unlink()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as e:
        _open(tmp_path)
    _one_line(e, "no readable volumes", tmp_path / "d")


def test_a_temporary_cache_is_removed_with_its_dataset(tmp_path, folder):
    ds = data.open_or_build_volume_cache(folder)
    parent = ds.root.parent
    assert parent.exists() and len(ds) == 4
    del ds
    import gc

    gc.collect()
    assert not parent.exists()


def test_a_builder_that_shows_no_progress_times_out_naming_the_lock(tmp_path, folder):
    root = _open(tmp_path).root
    shutil.rmtree(root)
    lock_path = tmp_path / "c" / f".{root.name}.lock"
    with cachelock.CacheLock(lock_path, 60):  # another builder, frozen
        with pytest.raises(data.CacheLockTimeout) as e:
            _open(tmp_path, lock_timeout=0.5)
    _one_line(e, lock_path, "no progress")


# ----------------------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent(
    """
    import re, sys
    import numpy as np
    from ld_ext import data

    def kib(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    ds = data.VolumePatchDataset(sys.argv[1])
    ds._verified[:] = False  # the first read checks the whole volume too, piece by piece
    rng = np.random.default_rng(0)
    starts = [tuple(int(v) for v in rng.integers(-8, [232, 232, 136])) for _ in range(50)]
    ds.read_patch(0, (300, 0, 0), (32, 32, 32))  # outside: allocators warmed, nothing read
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        key = "VmHWM"
    except OSError:
        key = "VmRSS"
    before = kib("VmRSS")
    total = 0.0
    for s in starts:
        total += float(ds.read_patch(0, s, (32, 32, 32)).sum())
    print(key, kib(key) - before, bool(ds._verified[0]), total)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_patches_never_holds_the_volume(tmp_path):
    vol = np.random.default_rng(0).random((256, 256, 160), dtype=np.float32)  # 40 MiB
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "big.npy", vol)
    ds = _open(tmp_path, window=(0, 1))
    root = ds.root
    del ds, vol
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(root)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    key, grown_kib, verified, total = out.stdout.split()
    assert verified == "True" and float(total) > 0
    volume_kib = 256 * 256 * 160 * 4 // 1024
    assert int(grown_kib) < volume_kib // 4, (
        f"{key} grew by {grown_kib} KiB reading 50 patches of a {volume_kib} KiB volume"
    )


_BUILD_RSS_SCRIPT = textwrap.dedent(
    """
    import re, sys
    from ld_ext import data

    def kib(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        key = "VmHWM"
    except OSError:
        key = "VmRSS"
    before = kib("VmRSS")
    ds = data.open_or_build_volume_cache(sys.argv[1], cache=sys.argv[2])
    print(key, kib(key) - before, len(ds))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_building_the_cache_holds_one_decoded_volume_at_a_time(tmp_path):
    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(tmp_path / "d" / f"v{i}.npy", rng.random((128, 128, 320), dtype=np.float32))  # 20 MiB each
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _BUILD_RSS_SCRIPT, str(tmp_path / "d"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    key, grown_kib, n = out.stdout.split()
    volume_kib = 128 * 128 * 320 * 4 // 1024
    assert n == "4"
    # one volume decoded plus its copy while it is normalised (percentiles) is 2 volumes; holding all 4
    # would be at least 4
    assert int(grown_kib) < 3 * volume_kib, f"{key} grew by {grown_kib} KiB building 4 volumes of {volume_kib} KiB"
