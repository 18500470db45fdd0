"""Image reading for every ld_ext command, and the preprocessed on-disk cache of pre-training.

One reader (``load_arrays``) serves ``ld-ext pretrain`` and the downstream commands
(``ld_ext.tasks.common``):

* 2D images (PNG, JPEG, TIFF, BMP): 8- or 16-bit, float TIFF, gray or RGB (alpha dropped).
* DICOM (``.dcm``/``.dicom``, needs ``pydicom``): pydicom's modality LUT (rescale slope and
  intercept, or a Modality LUT Sequence) applied, MONOCHROME1 inverted, multi-frame files give one
  image per frame.
* NIfTI (``.nii``/``.nii.gz``, needs ``nibabel``): reoriented to the closest canonical (RAS+)
  orientation, then 2D slices along the chosen axes; slices whose foreground (pixels above 10% of
  the volume's robust range) covers less than ``min_foreground`` of the slice are skipped.
* NumPy ``.npy``: a 2D array, or (H, W, 1) / (H, W, 3).

Folders are searched recursively; names starting with a dot are ignored; entries that are not
regular files (FIFOs, sockets, devices) are skipped without being opened, and counted. Images
holding NaN or infinite pixels are skipped and counted (``n_nonfinite``), never turned into blank
images. ``IMAGE_EXTENSIONS`` is the one list of supported extensions.

For pre-training every image is scaled robustly to [0, 1] (clip at the ``percentiles`` of its
own intensities), converted to the requested channel count (RGB -> gray by luma, gray -> RGB by
replication), padded to a square (``fit="pad"``; ``"crop"`` centre-crops) and resized to
``size`` x ``size``. ``open_or_build_cache`` does this once, in worker processes, into a flat
float32 array file plus an index (``CachedImageDataset``); training then reads mini-batches from
it by offset, so nothing of the size of the data set is held in memory. ``ImageFolderDataset``
is the same preprocessing held in memory (small data sets, tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTENSIONS",
    "RASTER_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "NUMPY_EXTENSIONS",
    "FileScan",
    "scan_image_files",
    "list_image_files",
    "read_image",
    "read_dicom",
    "read_nifti_slices",
    "read_npy",
    "load_arrays",
    "scale_intensity",
    "to_channels",
    "resize_square",
    "prepare_image",
    "Preprocessing",
    "ImageFolderDataset",
    "CachedImageDataset",
    "open_or_build_cache",
    "MissingReaderError",
    "NonFiniteImageError",
]

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
NUMPY_EXTENSIONS = (".npy",)
#: every extension any ld_ext command reads (lower case; matched case-insensitively)
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS + NUMPY_EXTENSIONS


class MissingReaderError(ImportError):
    """A medical format was found but its optional reader package is not installed."""


class NonFiniteImageError(ValueError):
    """An image holds NaN or infinite pixels (it is skipped and counted, never blanked)."""


def _kind(path: Path | str) -> str | None:
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if name.endswith(DICOM_EXTENSIONS):
        return "dicom"
    if name.endswith(RASTER_EXTENSIONS):
        return "image"
    if name.endswith(NUMPY_EXTENSIONS):
        return "npy"
    return None


# ----------------------------------------------------------------------------- finding files


@dataclass
class FileScan:
    """The supported files under some paths: ``files`` (sorted), their ``sizes`` and ``mtimes``
    (ns), and ``not_regular``: entries with a supported name that are not regular files (FIFOs,
    sockets, devices, broken links), skipped without being opened."""

    files: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    not_regular: list[Path] = field(default_factory=list)


def _as_path_list(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        out = [Path(p) for p in paths]
    except TypeError as exc:
        raise TypeError(f"data paths must be a path or a list of paths, got {type(paths).__name__}") from exc
    if not out:
        raise ValueError("data paths must not be empty")
    return out


def scan_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: str = "data") -> FileScan:
    """All supported files under ``paths`` (files or folders, searched recursively), sorted.

    Nothing is opened: entries that are not regular files are listed in ``not_regular``.
    Raises ``ValueError`` (naming ``name``) if a path does not exist, a given file is not a regular
    file or has an unsupported extension, a folder cannot be read, or nothing supported is found.
    """
    plist = _as_path_list(paths)
    found: dict[Path, tuple[int, int]] = {}
    not_regular: list[Path] = []
    exts = ", ".join(IMAGE_EXTENSIONS)
    for p in plist:
        if not os.path.lexists(p):
            raise ValueError(f"{name} path does not exist: {p}")
        if not p.is_dir():
            try:
                st = os.stat(p)
            except OSError as exc:
                raise ValueError(f"{name} path cannot be read: {p} ({exc})") from exc
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name} path is not a regular file or a folder: {p}")
            if _kind(p) is None:
                raise ValueError(f"unsupported file type: {p} (expected {exts})")
            found[p.absolute()] = (st.st_size, st.st_mtime_ns)
            continue
        if not os.access(p, os.R_OK | os.X_OK):
            raise ValueError(f"{name} folder cannot be read (permission denied): {p}")
        errors: list[OSError] = []
        n_before = len(found)
        for root, dirs, files in os.walk(p, onerror=errors.append):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith(".") or _kind(f) is None:
                    continue
                fp = Path(root) / f
                try:
                    st = os.stat(fp)  # follows links; never opens the file
                except OSError:
                    not_regular.append(fp)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    not_regular.append(fp)
                    continue
                found[fp.absolute()] = (st.st_size, st.st_mtime_ns)
        if errors and len(found) == n_before:
            raise ValueError(f"{name} folder cannot be read: {p} ({errors[0]})")
    if not found:
        extra = f"; {len(not_regular)} entr(y/ies) that are not regular files were skipped" if not_regular else ""
        raise ValueError(
            f"no supported image files found in {', '.join(str(p) for p in plist)} (looked for {exts}, recursively{extra})"
        )
    files = sorted(found)
    return FileScan(files, [found[f][0] for f in files], [found[f][1] for f in files], sorted(not_regular))


def list_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files of ``scan_image_files`` (a warning counts entries skipped as not regular files)."""
    scan = scan_image_files(paths)
    _warn_not_regular(scan, stacklevel=3)
    return scan.files


def _warn_not_regular(scan: FileScan, stacklevel: int = 2) -> None:
    if scan.not_regular:
        warnings.warn(
            f"skipped {len(scan.not_regular)} entr(y/ies) that are not regular files (FIFO, socket, device or broken "
            f"link), without opening them; first: {scan.not_regular[0]}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


# ----------------------------------------------------------------------------- readers


def _check_regular(path) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"image file cannot be read: {path} ({exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"not a regular file (FIFO, socket or device), not opened: {path}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as float32 (H, W) (gray) or (H, W, 3) (RGB); alpha dropped, palette expanded."""
    from PIL import Image

    _check_regular(path)
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
            mode = im.mode
        if mode in ("LA", "La"):
            im = im.getchannel(0)
            mode = im.mode
        if mode == "1":
            im = im.convert("L")
        if mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    arr = arr.astype(np.float32)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"unsupported image layout {arr.shape} in {path}")
    return arr


def _require(module: str, fmt: str, path) -> object:
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingReaderError(
            f"reading {fmt} file {path} needs the optional package '{module}' "
            f"(pip install {module}, or pip install 'ld_ext[medical]')"
        ) from exc


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(arr, ds)


def read_dicom(path: str | os.PathLike) -> list[np.ndarray]:
    """A DICOM file as a list of float32 (H, W) or (H, W, 3) frames.

    pydicom's ``apply_modality_lut`` maps stored values to modality units (rescale slope and
    intercept, or a Modality LUT Sequence); MONOCHROME1 images are inverted.
    """
    pydicom = _require("pydicom", "DICOM", path)
    _check_regular(path)
    ds = pydicom.dcmread(str(path))
    raw = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    arr = np.asarray(_modality_lut(raw, ds) if samples == 1 else raw, dtype=np.float32)
    if photometric == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    if samples == 3:
        return [arr] if arr.ndim == 3 else list(arr)
    return [arr] if arr.ndim == 2 else list(arr)


def read_nifti_slices(
    path: str | os.PathLike, axes: Sequence[int] = (2,), min_foreground: float = 0.05
) -> list[tuple[str, np.ndarray]]:
    """2D slices of a NIfTI volume (closest canonical orientation) along ``axes`` as (label, float32 (H, W)).

    Near-empty slices (foreground below ``min_foreground``) are dropped; slices holding NaN or
    infinite values are returned as they are, so that the caller counts them.
    """
    nib = _require("nibabel", "NIfTI", path)
    for ax in axes:
        if ax not in (0, 1, 2):
            raise ValueError(f"NIfTI slice axes must be 0, 1 or 2, got {ax}")
    _check_regular(path)
    img = nib.load(str(path))
    if len(img.shape) >= 3:
        img = nib.as_closest_canonical(img)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim == 4:  # time series: first volume
        vol = vol[..., 0]
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.ndim != 3:
        raise ValueError(f"NIfTI file {path} has {vol.ndim} dimensions, expected 2 to 4")
    finite_mask = np.isfinite(vol)
    finite = vol[finite_mask]
    if finite.size:
        lo, hi = np.percentile(finite, [1.0, 99.0])
    else:
        lo = hi = 0.0
    thr = lo + 0.1 * (hi - lo)
    out = []
    for ax in axes:
        for i in range(vol.shape[ax]):
            sl = np.take(vol, i, axis=ax)
            if min(sl.shape) < 2:
                continue
            if not np.take(finite_mask, i, axis=ax).all():
                out.append((f"axis{ax}:{i}", np.ascontiguousarray(sl)))  # counted by the caller
                continue
            fg = float(np.mean(sl > thr)) if hi > lo else 0.0
            if min_foreground > 0 and fg < min_foreground:
                continue
            out.append((f"axis{ax}:{i}", np.ascontiguousarray(sl)))
    return out


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` image: (H, W), (H, W, 1) or (H, W, 3) of a real number type -> float32."""
    _check_regular(path)
    arr = np.load(str(path), allow_pickle=False)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{path}: a .npy image must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"{path}: a .npy image must be 2-D (H, W) or (H, W, 1|3), got shape {tuple(arr.shape)}")
    return np.asarray(arr, dtype=np.float32)


def load_arrays(
    path: str | os.PathLike, nifti_axes: Sequence[int] = (2,), min_foreground: float = 0.05
) -> list[tuple[str, np.ndarray]]:
    """Every 2D image held by one file as (label, float32 array) pairs: the one reader of ld_ext.

    Arrays are (H, W) or (H, W, 3), in the file's own intensity units. NaN/Inf pixels are left
    in place (``prepare_image`` and ``tasks.common.load_image`` refuse them).
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "nifti":
        return read_nifti_slices(path, nifti_axes, min_foreground)
    if kind == "dicom":
        frames = read_dicom(path)
        return [(f"frame{i}" if len(frames) > 1 else "", f) for i, f in enumerate(frames)]
    if kind == "image":
        return [("", read_image(path))]
    if kind == "npy":
        return [("", read_npy(path))]
    raise ValueError(f"unsupported file type: {path} (expected {', '.join(IMAGE_EXTENSIONS)})")


# ----------------------------------------------------------------------------- preprocessing


def scale_intensity(arr: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip at the given percentiles of the image's values and map to [0, 1].

    A constant image maps to zeros. NaN or infinite pixels raise ``NonFiniteImageError``.
    """
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise NonFiniteImageError("image contains NaN or infinite values")
    lo, hi = np.percentile(arr, percentiles)
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (channels, H, W): RGB -> gray by luma, gray -> RGB by replication."""
    if arr.ndim == 2:
        x = arr[None]
    else:
        x = np.moveaxis(arr, -1, 0)
    if channels == 1 and x.shape[0] == 3:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    elif channels == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    elif x.shape[0] != channels:
        raise ValueError(f"cannot convert an image with {x.shape[0]} channels to {channels}")
    return np.ascontiguousarray(x, dtype=np.float32)


def resize_square(x: torch.Tensor, size: int, fit: str = "pad") -> torch.Tensor:
    """(C, H, W) -> (C, size, size): pad to a square ("pad") or centre-crop it ("crop"), then resize."""
    c, h, w = x.shape
    if fit == "pad":
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top))
    elif fit == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top : top + s, left : left + s]
    else:
        raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
    if x.shape[-1] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)[0]
    return x.clamp(0, 1)


def prepare_image(
    arr: np.ndarray,
    size: int,
    channels: int = 1,
    percentiles: tuple[float, float] = (0.5, 99.5),
    fit: str = "pad",
) -> torch.Tensor:
    """Robust scaling, channel conversion and resizing of one image -> float32 (C, size, size) in [0, 1]."""
    x = torch.from_numpy(to_channels(scale_intensity(arr, percentiles), channels))
    return resize_square(x, size, fit)


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn files into training images (part of the cache key)."""

    size: int = 128
    channels: int = 1
    nifti_axes: tuple[int, ...] = (2,)
    min_foreground: float = 0.05
    percentiles: tuple[float, float] = (0.5, 99.5)
    fit: str = "pad"

    def __post_init__(self):
        size, channels = self.size, self.channels
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        try:
            lo, hi = self.percentiles
        except (TypeError, ValueError) as exc:
            raise ValueError(f"percentiles must be a pair (low, high), got {self.percentiles!r}") from exc
        if not (0 <= lo < hi <= 100):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}")
        if not (0 <= self.min_foreground < 1):
            raise ValueError(f"min_foreground must be in [0, 1), got {self.min_foreground!r}")
        axes = tuple(self.nifti_axes)
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"nifti_axes entries must be 0, 1 or 2, got {self.nifti_axes!r}")
        if self.fit not in ("pad", "crop"):
            raise ValueError(f"fit must be 'pad' or 'crop', got {self.fit!r}")
        object.__setattr__(self, "nifti_axes", axes)
        object.__setattr__(self, "percentiles", (float(lo), float(hi)))
        object.__setattr__(self, "min_foreground", float(self.min_foreground))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["nifti_axes"] = list(self.nifti_axes)
        d["percentiles"] = list(self.percentiles)
        return d


@dataclass
class _FileResult:
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, (C, S, S) float32)
    error: str | None = None
    missing_reader: str | None = None
    nonfinite: list[str] = field(default_factory=list)
    upsampled: int = 0


def _process_file(path: Path, prep: Preprocessing) -> _FileResult:
    """Read one file and preprocess every image in it (never raises for a bad file)."""
    res = _FileResult()
    try:
        arrays = load_arrays(path, prep.nifti_axes, prep.min_foreground)
    except MissingReaderError as exc:
        res.error = res.missing_reader = str(exc)
        return res
    except Exception as exc:  # unreadable / corrupt file: skip and count
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    for label, arr in arrays:
        name = f"{path}:{label}" if label else str(path)
        if not np.isfinite(arr).all():
            res.nonfinite.append(name)
            continue
        try:
            x = prepare_image(arr, prep.size, prep.channels, prep.percentiles, prep.fit)
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            continue
        if min(arr.shape[:2]) < prep.size:
            res.upsampled += 1
        res.images.append((label, x.numpy()))
    return res


class _Tally:
    """Counts of what was skipped while reading a data set, and the warnings about it."""

    def __init__(self, n_files: int, not_regular: Sequence[Path]) -> None:
        self.n_files, self.n_not_regular = n_files, len(not_regular)
        self.skipped: list[tuple[str, str]] = [(str(p), "not a regular file (not opened)") for p in not_regular]
        self.nonfinite: list[str] = []
        self.n_upsampled = 0
        self.missing_reader: str | None = None

    def add(self, path: Path, res: _FileResult) -> None:
        if res.error is not None:
            self.skipped.append((str(path), res.error))
        if res.missing_reader is not None:
            self.missing_reader = res.missing_reader
        self.nonfinite.extend(res.nonfinite)
        self.n_upsampled += res.upsampled

    def warn(self, size: int, stacklevel: int = 3) -> None:
        if self.n_not_regular:
            warnings.warn(
                f"skipped {self.n_not_regular} entr(y/ies) that are not regular files (FIFO, socket, device or broken "
                f"link), without opening them; first: {self.skipped[0][0]}",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        unreadable = self.skipped[self.n_not_regular :]
        if unreadable:
            warnings.warn(
                f"skipped {len(unreadable)} unreadable file(s) of {self.n_files}; first: {unreadable[0][0]} ({unreadable[0][1]})",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        if self.nonfinite:
            warnings.warn(
                f"skipped {len(self.nonfinite)} image(s) with NaN or infinite pixels; first: {self.nonfinite[0]}",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        if self.n_upsampled:
            warnings.warn(
                f"{self.n_upsampled} image(s) are smaller than {size}x{size} and were upsampled", RuntimeWarning, stacklevel=stacklevel
            )

    def fail(self, paths) -> None:
        """Raise the error for a data set without a single usable image."""
        if self.missing_reader is not None:
            raise MissingReaderError(self.missing_reader)
        where = ", ".join(str(p) for p in _as_path_list(paths))
        raise ValueError(
            f"no readable images in {where} ({len(self.skipped)} file(s) could not be read, "
            f"{len(self.nonfinite)} image(s) had NaN or infinite pixels)"
        )


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="file", leave=False, dynamic_ncols=True)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _process_star(args):
    return _process_file(*args)


@contextlib.contextmanager
def _results(files: Sequence[Path], prep: Preprocessing, workers: int) -> Iterator[Iterable[_FileResult]]:
    """``_process_file`` over ``files`` in order, in ``workers`` processes (0 or 1: in this one)."""
    if workers <= 1 or len(files) < 2:
        yield (_process_file(f, prep) for f in files)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(min(workers, len(files)), initializer=_worker_init)
    try:
        chunk = max(1, min(16, len(files) // (4 * workers)))
        yield pool.imap(_process_star, ((f, prep) for f in files), chunksize=chunk)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def default_workers() -> int:
    """Processes used to build a cache: the usable CPUs, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(8, n))


# ----------------------------------------------------------------------------- in-memory data set


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every 2D image under ``paths``, preprocessed and held in memory as (N, C, size, size) in [0, 1].

    For small data sets and tests; ``ld-ext pretrain`` streams from ``open_or_build_cache``.
    Attributes: ``images`` (the tensor), ``names`` (file[:slice] per image), ``skipped``
    ((path, reason) of files not read), ``nonfinite`` (images skipped for NaN/Inf pixels),
    ``n_upsampled`` (images smaller than ``size``), ``fingerprint`` (hex digest of the pixels).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        size: int = 128,
        channels: int = 1,
        *,
        nifti_axes: Sequence[int] = (2,),
        min_foreground: float = 0.05,
        percentiles: tuple[float, float] = (0.5, 99.5),
        fit: str = "pad",
        progress: bool = True,
        max_images: int | None = None,
        workers: int = 0,
    ) -> None:
        prep = Preprocessing(size, channels, tuple(nifti_axes), min_foreground, tuple(percentiles), fit)
        scan = scan_image_files(paths)
        self.size, self.channels = size, channels
        tally = _Tally(len(scan.files), scan.not_regular)
        names: list[str] = []
        images: list[torch.Tensor] = []
        with _results(scan.files, prep, workers) as results:
            for f, res in zip(_progress(scan.files, len(scan.files), "loading images", progress), results):
                tally.add(f, res)
                for label, x in res.images:
                    images.append(torch.from_numpy(x))
                    names.append(f"{f}:{label}" if label else str(f))
                if max_images is not None and len(images) >= max_images:
                    images, names = images[:max_images], names[:max_images]
                    break
        tally.warn(size)
        if not images:
            tally.fail(paths)
        self.images = torch.stack(images)
        self.names = names
        self.skipped, self.nonfinite, self.n_upsampled = tally.skipped, tally.nonfinite, tally.n_upsampled
        self._fingerprint: str | None = None

    @classmethod
    def from_tensor(cls, images: torch.Tensor, names: Sequence[str] | None = None) -> "ImageFolderDataset":
        """Wrap an in-memory (N, C, S, S) tensor in [0, 1] (e.g. the demo's MNI slices)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError("images must be a (N, C, S, S) tensor")
        self = cls.__new__(cls)
        self.images = images.float().contiguous()
        self.size, self.channels = images.shape[-1], images.shape[1]
        self.names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        self.skipped, self.nonfinite, self.n_upsampled = [], [], 0
        self._fingerprint = None
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(str(tuple(self.images.shape)).encode())
            h.update(self.images.cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a new (k, C, S, S) tensor."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ----------------------------------------------------------------------------- on-disk cache

CACHE_VERSION = 1
_IMAGES_FILE = "images.f32"
_META_FILE = "meta.json"
_INDEX_FILE = "index.json"


def _cache_key(scan: FileScan, prep: Preprocessing) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "settings": prep.as_dict(), "dtype": "float32"}, sort_keys=True).encode())
    for f, s, m in zip(scan.files, scan.sizes, scan.mtimes):
        h.update(f"\n{f}\0{s}\0{m}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (fcntl.flock) held for the block; no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class CachedImageDataset(torch.utils.data.Dataset):
    """A preprocessed data set on disk: ``images.f32`` (N x C x S x S float32, C order) + index.

    ``read(indices)`` reads just those images by offset (``os.pread``), so memory use does not
    depend on N and pages cached by the OS are not part of the process. Safe to use from
    DataLoader worker processes (each process opens its own descriptor). ``array()`` gives a
    read-only ``np.memmap`` of the whole file.

    Attributes: ``root``, ``size``, ``channels``, ``fingerprint`` (the cache key: settings, file
    list, sizes and mtimes), ``meta`` (the small index: settings, counts, build time);
    ``names``, ``skipped``, ``nonfinite`` are read from ``index.json`` on first use.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        try:
            self.meta = json.loads((self.root / _META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"not an ld_ext image cache (no readable {_META_FILE}): {self.root} ({exc})") from exc
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"image cache {self.root} has version {self.meta.get('version')!r}, expected {CACHE_VERSION}")
        self.n = int(self.meta["n"])
        self.channels, self.size = int(self.meta["channels"]), int(self.meta["size"])
        self.fingerprint = str(self.meta["key"])
        self.n_upsampled = int(self.meta.get("n_upsampled", 0))
        self._item = self.channels * self.size * self.size
        self._path = self.root / _IMAGES_FILE
        expected = self.n * self._item * 4
        actual = self._path.stat().st_size if self._path.exists() else -1
        if actual != expected:
            raise ValueError(f"image cache {self._path} has {actual} bytes, expected {expected}; delete {self.root} to rebuild it")
        self._fd: int | None = None
        self._pid: int | None = None
        self._index: dict | None = None

    # the descriptor is per process (DataLoader workers are forked or spawned)
    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(str(self._path), os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = d["_pid"] = None
        d["_index"] = None
        return d

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return self.n

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a new (k, C, S, S) float32 tensor."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        out = np.empty((len(idx), self._item), np.float32)
        nbytes = self._item * 4
        fd = self._descriptor()
        for j, i in enumerate(idx):
            if not 0 <= i < self.n:
                raise IndexError(f"image index {i} out of range for a cache of {self.n} images")
            buf = os.pread(fd, nbytes, i * nbytes)
            if len(buf) != nbytes:
                raise OSError(f"short read from {self._path} at image {i}; the cache was truncated, delete {self.root}")
            out[j] = np.frombuffer(buf, np.float32)
        return torch.from_numpy(out).view(len(idx), self.channels, self.size, self.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read([i])[0]

    def array(self) -> np.memmap:
        """The whole cache as a read-only memory map (N, C, S, S)."""
        return np.memmap(self._path, np.float32, "r", shape=(self.n, self.channels, self.size, self.size))

    def _load_index(self) -> dict:
        if self._index is None:
            self._index = json.loads((self.root / _INDEX_FILE).read_text())
        return self._index

    @property
    def names(self) -> list[str]:
        ix = self._load_index()
        return [f"{ix['files'][fi][0]}:{lab}" if lab else ix["files"][fi][0] for fi, lab in ix["items"]]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(x) for x in self._load_index()["skipped"]]

    @property
    def nonfinite(self) -> list[str]:
        return list(self._load_index()["nonfinite"])


def open_or_build_cache(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    prep: Preprocessing,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: bool = True,
    log=None,
) -> CachedImageDataset:
    """The preprocessed cache of ``paths`` under ``cache_dir``, built on first use.

    The cache is named by a hash of the preprocessing settings and of every file's path, size and
    mtime: a changed folder or setting gives a new cache, an unchanged one is reused (by later
    runs and by every process of a multi-process run; concurrent builders on one file system wait
    for each other through a lock file). It is built in ``workers`` processes (default: the CPUs,
    at most 8) into a temporary folder that is renamed into place when complete.
    """
    if not isinstance(prep, Preprocessing):
        raise TypeError(f"prep must be a Preprocessing, got {type(prep).__name__}")
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    scan = scan_image_files(paths)
    key = _cache_key(scan, prep)
    cache_dir = Path(cache_dir)
    root = cache_dir / f"ld_ext-cache-{key[:24]}"
    if (root / _META_FILE).exists():
        ds = CachedImageDataset(root)
        _warn_not_regular(scan, stacklevel=3)
        return ds
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cache folder cannot be created: {cache_dir} ({exc})") from exc
    with _file_lock(cache_dir / f".{root.name}.lock"):
        if (root / _META_FILE).exists():  # built by another process meanwhile
            return CachedImageDataset(root)
        for stale in cache_dir.glob(f".{root.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        _build_cache(scan, prep, key, root, paths, workers, progress, log)
    return CachedImageDataset(root)


def _build_cache(scan: FileScan, prep: Preprocessing, key: str, root: Path, paths, workers: int, progress: bool, log) -> None:
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    t0 = time.time()
    tally = _Tally(len(scan.files), scan.not_regular)
    items: list[tuple[int, str]] = []
    try:
        if log is not None:
            log(f"building the image cache {root} from {len(scan.files)} file(s) with {max(1, workers)} process(es)")
        with open(tmp / _IMAGES_FILE, "wb") as fh, _results(scan.files, prep, workers) as results:
            bar = _progress(results, len(scan.files), "caching images", progress)
            for fi, res in enumerate(bar):
                tally.add(scan.files[fi], res)
                for label, x in res.images:
                    fh.write(np.ascontiguousarray(x, np.float32).tobytes())
                    items.append((fi, label))
            fh.flush()
            os.fsync(fh.fileno())
        tally.warn(prep.size, stacklevel=4)
        if not items:
            tally.fail(paths)
        index = {
            "files": [[str(f), s, m] for f, s, m in zip(scan.files, scan.sizes, scan.mtimes)],
            "items": items,
            "skipped": tally.skipped,
            "nonfinite": tally.nonfinite,
        }
        (tmp / _INDEX_FILE).write_text(json.dumps(index))
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "n": len(items),
            "size": prep.size,
            "channels": prep.channels,
            "dtype": "float32",
            "settings": prep.as_dict(),
            "paths": [str(p) for p in _as_path_list(paths)],
            "n_files": len(scan.files),
            "n_skipped": len(tally.skipped),
            "n_nonfinite": len(tally.nonfinite),
            "n_upsampled": tally.n_upsampled,
            "build_seconds": round(time.time() - t0, 3),
            "workers": workers,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
