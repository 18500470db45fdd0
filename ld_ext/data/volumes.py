"""Reading 3-D volumes: NIfTI files, DICOM series and 3-D ``.npy`` arrays, in one convention.

* NIfTI (``.nii``/``.nii.gz``, needs ``nibabel``): the file's affine gives orientation and spacing;
  a 4-D file is accepted when its extra dimensions have size 1.
* DICOM series (needs ``pydicom`` and ``nibabel``): a folder holding the ``.dcm``/``.dicom`` slices of
  one series (one SeriesInstanceUID). The slices are ordered by the projection of their
  ImagePositionPatient on the slice normal (the cross product of the two ImageOrientationPatient
  directions), never by file name or InstanceNumber, and must be evenly spaced (a missing slice is
  an error). Each slice is mapped to modality units (RescaleSlope/RescaleIntercept, or a Modality
  LUT); a MONOCHROME1 series is inverted. The affine comes from ImageOrientationPatient,
  ImagePositionPatient and PixelSpacing (DICOM's LPS coordinates turned into RAS).
* ``.npy``: a 3-D array of real numbers, taken as it is (spacing 1 mm, identity affine).

Every volume comes back as a ``Volume``: ``array``, float32 (X, Y, Z), C-contiguous, in the closest
canonical orientation (``nibabel.as_closest_canonical``: index 0 grows towards the patient's Right,
1 towards Anterior, 2 towards Superior; RAS+); ``spacing`` (mm per voxel along X, Y, Z), ``affine``
(4x4, voxel index to RAS mm) and ``path``. ``spacing=`` resamples to that voxel size (trilinear,
nearest for labels) keeping the volume's extent; ``window=(lo, hi)`` clips to a window (CT, in
Hounsfield units) and maps it to [0, 1]; otherwise the ``percentiles`` of the volume's own values
are mapped to [0, 1] (MR). ``label=True`` reads a label map: no intensity mapping, nearest-neighbour
resampling, integer values checked and kept (as float32).

Bad input (NaN or infinite voxels, an empty or 2-D array, several volumes in one file, a DICOM
folder holding two series or unevenly spaced slices) raises one ``ValueError`` naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .readers import (
    DICOM_EXTENSIONS,
    NIFTI_EXTENSIONS,
    NUMPY_EXTENSIONS,
    FileScan,
    NonFiniteImageError,
    as_path_list,
    check_regular,
    modality_lut,
    require_reader,
    scan_image_files,
    warn_not_regular,
)

__all__ = [
    "Volume",
    "VolumeScan",
    "VOLUME_KINDS",
    "read_volume",
    "list_volume_files",
    "scan_volume_files",
    "check_volume_settings",
    "resample_volume",
    "normalise_intensity",
]

#: what counts as one volume, in words (for messages and docs)
VOLUME_KINDS = ".nii, .nii.gz, 3-D .npy, or a folder holding the .dcm/.dicom slices of one DICOM series"
_LABEL_EXACT = 2**24  # float32 holds every integer up to this exactly
_SLICE_GAP_RTOL, _SLICE_GAP_ATOL = 0.01, 1e-3  # even slice spacing: 1% of the gap + 1 micrometre


@dataclass(frozen=True, eq=False)
class Volume:
    """One volume: ``array`` float32 (X, Y, Z) in RAS+ index order, ``spacing`` (mm along X, Y, Z),
    ``affine`` (4x4 float64, voxel index to RAS mm), ``path`` (the file, or the DICOM series folder)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


# ----------------------------------------------------------------------------- settings


def _float_tuple(value, n: int, name: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if len(vals) != n or any(isinstance(v, bool) or not math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return vals


def check_volume_settings(spacing=None, window=None, percentiles=(0.5, 99.5)) -> dict:
    """The reading settings checked and normalised: ``spacing`` None or 3 floats > 0 (a single
    number means the same along X, Y, Z), ``window`` None or (lo, hi) with lo < hi, ``percentiles``
    (low, high) with 0 <= low < high <= 100. Returns them as a dict of tuples (or None)."""
    if spacing is not None:
        if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
            spacing = (spacing,) * 3
        spacing = _float_tuple(spacing, 3, "spacing", "None or three voxel sizes in mm, each > 0")
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be None or three voxel sizes in mm, each > 0, got {spacing!r}")
    if window is not None:
        window = _float_tuple(window, 2, "window", "None or (low, high) with low < high")
        if window[0] >= window[1]:
            raise ValueError(f"window must be None or (low, high) with low < high, got {window!r}")
    percentiles = _float_tuple(percentiles, 2, "percentiles", "(low, high) with 0 <= low < high <= 100")
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}")
    return {"spacing": spacing, "window": window, "percentiles": percentiles}


# ----------------------------------------------------------------------------- finding volumes


@dataclass
class VolumeScan:
    """The volumes under some paths: ``paths`` (one per volume: a file, or a DICOM series folder,
    sorted), ``members`` (for each volume the indices of its source files in ``files``), ``files``
    (the ``FileScan`` of every source file: sizes, mtimes, ctimes, inodes) and ``skipped``
    ((path, reason) of ``.npy`` files that are not 3-D)."""

    paths: list[Path]
    members: list[list[int]]
    files: FileScan
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape in a ``.npy`` header (None when it cannot be read: the reader says why later)."""
    try:
        return tuple(np.load(str(path), mmap_mode="r", allow_pickle=False).shape)  # maps, reads only the header
    except Exception:  # unreadable: listed, and reported when it is read
        return None


def _check_given(p: Path, name: str) -> None:
    """A file given by name must be a volume file (a DICOM slice is read through its folder)."""
    if not os.path.lexists(p) or p.is_dir():
        return  # scan_image_files names a missing path
    low = p.name.lower()
    if low.endswith(DICOM_EXTENSIONS):
        raise ValueError(f"{name} path {p} is one DICOM slice: give the folder that holds its series")
    if not low.endswith(NIFTI_EXTENSIONS + NUMPY_EXTENSIONS):
        raise ValueError(f"{name} path {p} is not a volume (expected {VOLUME_KINDS})")


def scan_volume_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    name: str = "data",
    exclude: Sequence[str | os.PathLike] = (),
) -> VolumeScan:
    """The volumes under ``paths`` (files or folders, searched recursively; dot-names, ``exclude``
    and folders marked as ld_ext outputs skipped, as for images): every NIfTI file, every ``.npy``
    file holding a 3-D array (others are skipped with a warning) and every folder holding
    ``.dcm``/``.dicom`` files (one series each). Nothing but ``.npy`` headers is opened.
    Raises ``ValueError`` naming ``name`` when a path is missing or not a volume, or nothing is found."""
    plist = as_path_list(paths)
    for p in plist:
        _check_given(p, name)
    try:
        scan = scan_image_files(plist, name=name, exclude=exclude)
    except ValueError as exc:
        if not str(exc).startswith("no supported image files"):
            raise
        scan = FileScan()
    groups: dict[Path, list[int]] = {}
    skipped: list[tuple[str, str]] = []
    for i, f in enumerate(scan.files):
        low = f.name.lower()
        if low.endswith(DICOM_EXTENSIONS):
            groups.setdefault(f.parent, []).append(i)
        elif low.endswith(NIFTI_EXTENSIONS):
            groups[f] = [i]
        elif low.endswith(NUMPY_EXTENSIONS):
            shape = _npy_shape(f)
            if shape is None or len(shape) == 3:
                groups[f] = [i]
            else:
                skipped.append((str(f), f"a {len(shape)}-D array of shape {shape}, not a volume"))
    if not groups:
        where = ", ".join(str(p) for p in plist)
        raise ValueError(f"no volumes found in {where} (looked for {VOLUME_KINDS}, recursively)")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} .npy file(s) that do not hold a 3-D array; first: {skipped[0][0]} "
            f"({skipped[0][1]})",
            RuntimeWarning,
            stacklevel=3,
        )
    return _volume_scan(scan, groups, skipped)


def _volume_scan(scan: FileScan, groups: dict[Path, list[int]], skipped) -> VolumeScan:
    """``scan`` cut down to the files of the volumes in ``groups`` (volume path -> file indices)."""
    keep = sorted(i for members in groups.values() for i in members)
    new_index = {old: new for new, old in enumerate(keep)}
    files = FileScan(
        [scan.files[i] for i in keep],
        [scan.sizes[i] for i in keep],
        [scan.mtimes[i] for i in keep],
        list(scan.not_regular),
        [scan.ctimes[i] for i in keep],
        [scan.inodes[i] for i in keep],
    )
    paths = sorted(groups)
    return VolumeScan(paths, [[new_index[i] for i in groups[p]] for p in paths], files, skipped)


def list_volume_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, exclude: Sequence[str | os.PathLike] = ()
) -> list[Path]:
    """One path per volume under ``paths`` (see ``scan_volume_files``): NIfTI and 3-D ``.npy`` files,
    and folders of DICOM slices, sorted; a warning counts entries that are not regular files."""
    scan = scan_volume_files(paths, exclude=exclude)
    warn_not_regular(scan.files, stacklevel=3)
    return scan.paths


# ----------------------------------------------------------------------------- reading


def read_volume(
    path: str | os.PathLike, *, spacing=None, window=None, percentiles=(0.5, 99.5), label: bool = False
) -> Volume:
    """One volume (a NIfTI or 3-D ``.npy`` file, or a folder of DICOM slices), reoriented to RAS+,
    resampled to ``spacing`` (mm; None keeps the file's) and, unless ``label``, mapped to [0, 1] by
    ``window`` (CT) or by the volume's ``percentiles`` (MR). See the module's docstring."""
    settings = check_volume_settings(spacing, window, percentiles)
    path = Path(path)
    if path.is_dir():
        data, affine = _read_dicom_series(path)
    else:
        low = path.name.lower()
        if low.endswith(NIFTI_EXTENSIONS):
            data, affine = _read_nifti(path)
        elif low.endswith(NUMPY_EXTENSIONS):
            data, affine = _read_npy_volume(path), np.eye(4)
        elif low.endswith(DICOM_EXTENSIONS):
            raise ValueError(f"{path} is one DICOM slice: read its series through the folder that holds it")
        else:
            raise ValueError(f"{path} is not a volume (expected {VOLUME_KINDS})")
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise NonFiniteImageError(f"volume {path} holds {bad} NaN or infinite voxel(s)")
    if settings["spacing"] is not None:
        data, affine = resample_volume(data, affine, settings["spacing"], label=label)
    if label:
        _check_labels(data, path)
    else:
        normalise_intensity(data, window=settings["window"], percentiles=settings["percentiles"])
    return Volume(data, _voxel_sizes(affine), affine, path)


def _voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _check_shape(shape: Sequence[int], path) -> None:
    """A 3-D volume: no zero-size and no single-slice axis."""
    if len(shape) != 3:
        raise ValueError(f"volume {path} has shape {tuple(shape)}: expected a 3-D volume (X, Y, Z)")
    if min(shape) == 0:
        raise ValueError(f"volume {path} is empty (shape {tuple(shape)})")
    if min(shape) < 2:
        raise ValueError(f"volume {path} has shape {tuple(shape)}: a 2-D image, not a volume (every axis needs >= 2)")


def _to_canonical(data: np.ndarray, affine: np.ndarray, path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` and ``affine`` in nibabel's closest canonical (RAS+) orientation; at most one copy."""
    nib = require_reader("nibabel", "NIfTI", path)
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.ascontiguousarray(np.asarray(img.dataobj), dtype=np.float32), np.asarray(img.affine, np.float64)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    nib = require_reader("nibabel", "NIfTI", path)
    check_regular(path)
    try:
        img = nib.load(str(path), mmap=False)
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:
        raise ValueError(f"NIfTI file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if len(shape) > 3 and math.prod(shape[3:]) != 1:
        raise ValueError(f"NIfTI file {path} holds {math.prod(shape[3:])} volumes (shape {shape}): expected one")
    _check_shape(shape[:3], path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:3])
    except Exception as exc:
        raise ValueError(f"NIfTI file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    return _to_canonical(data, img.affine, path)


def _read_npy_volume(path: Path) -> np.ndarray:
    check_regular(path)
    try:
        arr = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ValueError(f".npy file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(
        arr.dtype, np.complexfloating
    ):
        raise ValueError(f".npy file {path} must hold real numbers, got dtype {arr.dtype}")
    _check_shape(arr.shape, path)
    return np.array(arr, dtype=np.float32, order="C")  # a copy: normalised in place later


# ----------------------------------------------------------------------------- DICOM series


def _dicom_attr(ds, name: str, f: Path, n: int | None = None) -> list[float] | float:
    value = getattr(ds, name, None)
    if value is None:
        raise ValueError(f"DICOM slice {f} has no {name}: a volume needs it to place its slices")
    try:
        vals = [float(v) for v in value] if n is not None else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"DICOM slice {f}: {name} is not numeric ({value!r})") from None
    if n is not None and len(vals) != n:
        raise ValueError(f"DICOM slice {f}: {name} has {len(vals)} values, expected {n}")
    return vals


def _series_geometry(folder: Path, files: list[Path], headers: list) -> tuple[np.ndarray, np.ndarray]:
    """The slice order (indices into ``files``, along the slice normal) and the RAS affine of the
    (X = column, Y = row, Z = slice) array of a DICOM series."""
    uids = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(uids) > 1:
        raise ValueError(
            f"DICOM folder {folder} holds slices of {len(uids)} series (SeriesInstanceUID): put each series in a "
            "folder of its own"
        )
    if len(files) < 2:
        raise ValueError(f"DICOM series {folder} has one slice: a 2-D image, not a volume")
    iop = np.asarray(_dicom_attr(headers[0], "ImageOrientationPatient", files[0], 6))
    for h, f in zip(headers, files):
        if not np.allclose(_dicom_attr(h, "ImageOrientationPatient", f, 6), iop, atol=1e-4):
            raise ValueError(f"DICOM series {folder}: slice {f} has another ImageOrientationPatient than {files[0]}")
        if (int(h.Rows), int(h.Columns)) != (int(headers[0].Rows), int(headers[0].Columns)):
            raise ValueError(f"DICOM series {folder}: slice {f} has another size (Rows, Columns) than {files[0]}")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if not 0.9 < np.linalg.norm(normal) < 1.1:
        raise ValueError(f"DICOM series {folder}: ImageOrientationPatient {iop.tolist()} is not two unit directions")
    pos = np.asarray([_dicom_attr(h, "ImagePositionPatient", f, 3) for h, f in zip(headers, files)])
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    gaps = np.diff(proj[order])
    if gaps.min() < _SLICE_GAP_ATOL:
        k = int(np.argmin(gaps))
        raise ValueError(
            f"DICOM series {folder}: slices {files[order[k]].name} and {files[order[k + 1]].name} lie at the same "
            "position (ImagePositionPatient)"
        )
    mid = float(np.median(gaps))
    if np.abs(gaps - mid).max() > _SLICE_GAP_RTOL * mid + _SLICE_GAP_ATOL:
        raise ValueError(
            f"DICOM series {folder}: slice spacing is uneven ({gaps.min():.4g} to {gaps.max():.4g} mm along the "
            "slice normal); is a slice missing?"
        )
    d_row, d_col = _dicom_attr(headers[0], "PixelSpacing", files[0], 2)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * d_col, col * d_row  # X runs along a row (columns), Y down a column
    lps[:3, 2] = (pos[order[-1]] - pos[order[0]]) / (len(files) - 1)
    lps[:3, 3] = pos[order[0]]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    pydicom = require_reader("pydicom", "DICOM", folder)
    files = sorted(
        f for f in folder.iterdir() if not f.name.startswith(".") and f.name.lower().endswith(DICOM_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"{folder} is a folder without .dcm/.dicom slices, not a volume (expected {VOLUME_KINDS})")
    headers = []
    for f in files:
        check_regular(f)
        try:
            headers.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:
            raise ValueError(f"DICOM slice {f} cannot be read ({type(exc).__name__}: {exc})") from None
    order, affine = _series_geometry(folder, files, headers)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if int(getattr(headers[0], "SamplesPerPixel", 1)) != 1:
        raise ValueError(f"DICOM series {folder} is in colour (SamplesPerPixel > 1), expected one value per voxel")
    _check_shape((cols, rows, len(files)), folder)
    data = np.empty((cols, rows, len(files)), np.float32)
    for k, i in enumerate(order):  # one slice decoded at a time
        try:
            ds = pydicom.dcmread(str(files[i]))
            pixels = modality_lut(ds.pixel_array, ds)
        except Exception as exc:
            raise ValueError(f"DICOM slice {files[i]} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if pixels.shape != (rows, cols):
            raise ValueError(f"DICOM slice {files[i]} has pixels of shape {pixels.shape}, expected ({rows}, {cols})")
        data[:, :, k] = pixels.T
    if str(getattr(headers[0], "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        np.subtract(data.max() + data.min(), data, out=data)
    return _to_canonical(data, affine, folder)


# ----------------------------------------------------------------------------- resampling, intensity


def resample_volume(
    array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *, label: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) resampled to voxels of ``spacing`` mm (trilinear; ``label``: nearest),
    keeping its extent (the grid's outer corners stay where they are): the new shape is the old
    extent over ``spacing``, rounded, and the new affine's voxel size is the extent over that shape
    (within rounding of ``spacing``). Returns (float32 array, affine); the same objects when the
    shape would not change."""
    affine = np.asarray(affine, np.float64)
    shape = np.asarray(array.shape[:3])
    old = np.asarray(_voxel_sizes(affine))
    new_shape = tuple(int(v) for v in np.maximum(1, np.round(shape * old / np.asarray(spacing, np.float64))))
    if new_shape == tuple(shape):
        return array, affine
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if label:
        y = F.interpolate(x, size=new_shape, mode="nearest-exact")
    else:
        y = F.interpolate(x, size=new_shape, mode="trilinear", align_corners=False)
    del x
    scale = shape / np.asarray(new_shape)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1) / 2  # new voxel i sits at old index (i + 0.5) * scale - 0.5
    return np.ascontiguousarray(y[0, 0].numpy()), affine @ step


def normalise_intensity(array: np.ndarray, *, window=None, percentiles=(0.5, 99.5)) -> np.ndarray:
    """Map float32 ``array`` to [0, 1] in place and return it: ``window=(lo, hi)`` clips to the window;
    otherwise the values at ``percentiles`` of the array (as ``scale_intensity`` does for 2-D
    images: min/max when the percentiles coincide, zeros for a constant array)."""
    if array.dtype != np.float32:
        raise TypeError(f"array must be float32 (normalised in place), got {array.dtype}")
    if window is not None:
        lo, hi = (float(v) for v in window)
    else:
        lo, hi = (float(v) for v in np.percentile(array, percentiles))
        if hi <= lo:
            lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        array.fill(0.0)
        return array
    array -= np.float32(lo)
    array *= np.float32(1.0 / (hi - lo))
    np.clip(array, 0.0, 1.0, out=array)
    return array


def _check_labels(data: np.ndarray, path) -> None:
    """A label map holds integers (float32 holds them exactly up to 2^24)."""
    frac = np.count_nonzero(data != np.round(data))
    if frac:
        raise ValueError(f"label volume {path} holds {frac} non-integer voxel(s): expected an integer label map")
    if data.size and float(np.abs(data).max()) > _LABEL_EXACT:
        raise ValueError(f"label volume {path} holds labels beyond +-{_LABEL_EXACT}, which float32 cannot hold exactly")
