"""Image datasets for LD pre-training: folders of PNG/JPEG/TIFF, DICOM and NIfTI files.

* 2D images (PNG, JPEG, TIFF, BMP): 8- or 16-bit (or float TIFF), gray or RGB (alpha dropped).
* DICOM (``.dcm``/``.dicom``, needs ``pydicom``): rescale slope/intercept applied, MONOCHROME1
  inverted, multi-frame files give one image per frame.
* NIfTI (``.nii``/``.nii.gz``, needs ``nibabel``): 2D slices along the chosen axes; slices whose
  foreground (pixels above 10% of the volume's robust range) covers less than ``min_foreground``
  of the slice are skipped.

Every image is scaled robustly to [0, 1] (clip at the ``percentiles`` of its own intensities),
converted to the requested channel count (RGB -> gray by luma, gray -> RGB by replication; so
folders mixing gray and RGB files are fine), padded to a square (our choice: nothing is cut off)
and resized to ``size`` x ``size``. Images smaller than ``size`` are upsampled and counted.
Unreadable files are skipped, counted and reported with a warning; a folder with no readable
image is an error.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "list_image_files",
    "read_image",
    "read_dicom",
    "read_nifti_slices",
    "load_arrays",
    "scale_intensity",
    "to_channels",
    "resize_square",
    "prepare_image",
    "ImageFolderDataset",
    "MissingReaderError",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


class MissingReaderError(ImportError):
    """A medical format was found but its optional reader package is not installed."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if name.endswith(DICOM_EXTENSIONS):
        return "dicom"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def list_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """All supported files under ``paths`` (files or folders, searched recursively), sorted.

    Raises ``ValueError`` if a path does not exist, a folder cannot be read, or nothing
    supported is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("data paths must not be empty")
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ValueError(f"data path does not exist: {p}")
        if p.is_file():
            if _kind(p) is None:
                raise ValueError(
                    f"unsupported file type: {p} (expected {', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS)})"
                )
            found.append(p)
            continue
        if not os.access(p, os.R_OK | os.X_OK):
            raise ValueError(f"data folder cannot be read (permission denied): {p}")
        errors: list[OSError] = []
        for root, dirs, files in os.walk(p, onerror=errors.append):
            dirs.sort()
            for f in sorted(files):
                fp = Path(root) / f
                if not f.startswith(".") and _kind(fp) is not None:
                    found.append(fp)
        if errors and not found:
            raise ValueError(f"data folder cannot be read: {p} ({errors[0]})")
    if not found:
        raise ValueError(
            "no supported image files found in "
            + ", ".join(str(p) for p in paths)
            + f" (looked for {', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS)}, recursively)"
        )
    return sorted(set(found))


# ----------------------------------------------------------------------------- readers


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as float32 (H, W) (gray) or (H, W, 3) (RGB); alpha dropped, palette expanded."""
    from PIL import Image

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


def read_dicom(path: str | os.PathLike) -> list[np.ndarray]:
    """A DICOM file as a list of float32 (H, W) or (H, W, 3) frames (MONOCHROME1 inverted)."""
    pydicom = _require("pydicom", "DICOM", path)
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if photometric == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    if samples == 3:
        frames = [arr] if arr.ndim == 3 else list(arr)
    else:
        frames = [arr] if arr.ndim == 2 else list(arr)
    return frames


def read_nifti_slices(
    path: str | os.PathLike, axes: Sequence[int] = (2,), min_foreground: float = 0.05
) -> list[tuple[str, np.ndarray]]:
    """2D slices of a NIfTI volume along ``axes`` as (label, float32 (H, W)) pairs, near-empty ones skipped."""
    nib = _require("nibabel", "NIfTI", path)
    img = nib.load(str(path))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    while vol.ndim > 3 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim == 4:  # time series: first volume
        vol = vol[..., 0]
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.ndim != 3:
        raise ValueError(f"NIfTI file {path} has {vol.ndim} dimensions, expected 2 to 4")
    finite = vol[np.isfinite(vol)]
    if finite.size == 0:
        return []
    lo, hi = np.percentile(finite, [1.0, 99.0])
    thr = lo + 0.1 * (hi - lo)
    out = []
    for ax in axes:
        if ax not in (0, 1, 2):
            raise ValueError(f"NIfTI slice axes must be 0, 1 or 2, got {ax}")
        for i in range(vol.shape[ax]):
            sl = np.take(vol, i, axis=ax)
            if min(sl.shape) < 2:
                continue
            fg = float(np.mean(sl > thr)) if hi > lo else 0.0
            if fg < min_foreground:
                continue
            out.append((f"axis{ax}:{i}", np.ascontiguousarray(sl)))
    return out


def load_arrays(path: Path, nifti_axes: Sequence[int] = (2,), min_foreground: float = 0.05) -> list[tuple[str, np.ndarray]]:
    """Every 2D image held by one file as (label, array) pairs."""
    kind = _kind(path)
    if kind == "nifti":
        return read_nifti_slices(path, nifti_axes, min_foreground)
    if kind == "dicom":
        frames = read_dicom(path)
        return [(f"frame{i}" if len(frames) > 1 else "", f) for i, f in enumerate(frames)]
    if kind == "image":
        return [("", read_image(path))]
    raise ValueError(f"unsupported file type: {path}")


# ----------------------------------------------------------------------------- preprocessing


def scale_intensity(arr: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip at the given percentiles of the image's finite values and map to [0, 1]."""
    arr = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, np.nan_to_num(arr[finite].min() if finite.any() else 0.0))
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


def _check_args(size, channels, percentiles, min_foreground, nifti_axes):
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    lo, hi = percentiles
    if not (0 <= lo < hi <= 100):
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    if not (0 <= min_foreground < 1):
        raise ValueError(f"min_foreground must be in [0, 1), got {min_foreground!r}")
    for a in nifti_axes:
        if a not in (0, 1, 2):
            raise ValueError(f"nifti_axes entries must be 0, 1 or 2, got {nifti_axes!r}")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every 2D image under ``paths``, preprocessed and held in memory as (N, C, size, size) in [0, 1].

    Attributes: ``images`` (the tensor), ``names`` (file[:slice] per image), ``skipped``
    ((path, reason) of unreadable files), ``n_upsampled`` (images smaller than ``size``).
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
    ) -> None:
        _check_args(size, channels, percentiles, min_foreground, nifti_axes)
        files = list_image_files(paths)
        self.size, self.channels = size, channels
        self.skipped: list[tuple[str, str]] = []
        self.n_upsampled = 0
        names: list[str] = []
        images: list[torch.Tensor] = []
        missing_reader: MissingReaderError | None = None
        try:
            from tqdm import tqdm

            it: Iterable = tqdm(files, desc="loading images", unit="file", disable=not progress, leave=False)
        except ImportError:  # pragma: no cover
            it = files
        for f in it:
            try:
                arrays = load_arrays(f, nifti_axes, min_foreground)
            except MissingReaderError as exc:
                missing_reader = exc
                self.skipped.append((str(f), str(exc)))
                continue
            except Exception as exc:  # unreadable / corrupt file: skip and count
                self.skipped.append((str(f), f"{type(exc).__name__}: {exc}"))
                continue
            for label, arr in arrays:
                if min(arr.shape[:2]) < size:
                    self.n_upsampled += 1
                images.append(prepare_image(arr, size, channels, percentiles, fit))
                names.append(f"{f}:{label}" if label else str(f))
                if max_images is not None and len(images) >= max_images:
                    break
            if max_images is not None and len(images) >= max_images:
                break
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable file(s) of {len(files)}; first: "
                f"{self.skipped[0][0]} ({self.skipped[0][1]})",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.n_upsampled:
            warnings.warn(
                f"{self.n_upsampled} image(s) are smaller than {size}x{size} and were upsampled", RuntimeWarning, stacklevel=2
            )
        if not images:
            if missing_reader is not None:
                raise missing_reader
            raise ValueError(
                f"no readable images in {', '.join(str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths))}"
                f" ({len(self.skipped)} file(s) could not be read)"
            )
        self.images = torch.stack(images)
        self.names = names

    @classmethod
    def from_tensor(cls, images: torch.Tensor, names: Sequence[str] | None = None) -> "ImageFolderDataset":
        """Wrap an in-memory (N, C, S, S) tensor in [0, 1] (e.g. the demo's MNI slices)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError("images must be a (N, C, S, S) tensor")
        self = cls.__new__(cls)
        self.images = images.float().contiguous()
        self.size, self.channels = images.shape[-1], images.shape[1]
        self.names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        self.skipped, self.n_upsampled = [], 0
        return self

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
