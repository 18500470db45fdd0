"""Finding and reading image files: the one reader of every ld_ext command.

* 2D images (PNG, JPEG, TIFF, BMP): 8- or 16-bit, float TIFF, gray or RGB (alpha dropped).
* DICOM (``.dcm``/``.dicom``, needs ``pydicom``): pydicom's modality LUT (rescale slope and
  intercept, or a Modality LUT Sequence) applied, MONOCHROME1 inverted, multi-frame files give one
  image per frame.
* NIfTI (``.nii``/``.nii.gz``, needs ``nibabel``): reoriented to the closest canonical (RAS+)
  orientation, then 2D slices along the chosen axes; slices whose foreground (pixels above 10% of
  the volume's robust range) covers less than ``min_foreground`` of the slice are skipped.
* NumPy ``.npy``: a 2D array, or (H, W, 1) / (H, W, 3).

Folders are searched recursively; names starting with a dot are ignored; entries that are not
regular files (FIFOs, sockets, devices) are skipped without being opened, and counted; folders and
files passed as ``exclude`` (a run's outputs, the image cache) and folders that ld_ext marked as
its outputs (``mark_output_folder``) are never discovered.
``IMAGE_EXTENSIONS`` is the one list of supported extensions.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "RASTER_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "NUMPY_EXTENSIONS",
    "FileScan",
    "scan_image_files",
    "OUTPUT_MARKER",
    "mark_output_folder",
    "list_image_files",
    "file_stem",
    "read_image",
    "read_dicom",
    "read_nifti_slices",
    "read_npy",
    "load_arrays",
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
    """The supported files under some paths: ``files`` (sorted), their ``sizes``, ``mtimes`` (ns),
    ``ctimes`` (ns) and ``inodes`` (what identifies a file's content without reading it: a file
    replaced by another of the same size and mtime has a new ctime, and a new inode when it was
    moved into place), and ``not_regular``: entries with a supported name that are not regular
    files (FIFOs, sockets, devices, broken links), skipped without being opened."""

    files: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    not_regular: list[Path] = field(default_factory=list)
    ctimes: list[int] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)

    def identity(self, i: int) -> list[int]:
        """[size, mtime_ns, ctime_ns, inode] of ``files[i]``."""
        return [self.sizes[i], self.mtimes[i], self.ctimes[i], self.inodes[i]]


def as_path_list(paths) -> list[Path]:
    """One path or an iterable of paths as a list of Paths (TypeError naming what was given)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        out = [Path(p) for p in paths]
    except TypeError as exc:
        raise TypeError(f"data paths must be a path or a list of paths, got {type(paths).__name__}") from exc
    if not out:
        raise ValueError("data paths must not be empty")
    return out


def scan_image_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    name: str = "data",
    exclude: Sequence[str | os.PathLike] = (),
) -> FileScan:
    """All supported files under ``paths`` (files or folders, searched recursively), sorted.

    Nothing is opened: entries that are not regular files are listed in ``not_regular``.
    ``exclude``: folders and files never discovered (e.g. a run's output folder and the image cache
    when they lie inside a data folder, so that outputs are never read back as inputs); an excluded
    path that is one of ``paths`` or contains it is not applied to that path (what is given is read).
    Folders marked by ``mark_output_folder`` below a given folder are skipped whole; a given folder
    that is marked itself is read without the output entries its marker lists.
    Raises ``ValueError`` (naming ``name``) if a path does not exist, a given file is not a regular
    file or has an unsupported extension, a folder cannot be read, or nothing supported is found.
    """
    plist = as_path_list(paths)
    excluded = _existing_paths(exclude)
    found: dict[Path, os.stat_result] = {}
    not_regular: list[Path] = []
    exts = ", ".join(IMAGE_EXTENSIONS)
    for p in plist:
        if not os.path.lexists(p):
            raise ValueError(f"{name} path does not exist: {p}")
        if not p.is_dir():
            found[p.absolute()] = _given_file(p, name, exts)
            continue
        if not os.access(p, os.R_OK | os.X_OK):
            raise ValueError(f"{name} folder cannot be read (permission denied): {p}")
        n_before = len(found)
        errors = _walk(p, _applicable(excluded, p) | _marked_entries(p), found, not_regular)
        if errors and len(found) == n_before:
            raise ValueError(f"{name} folder cannot be read: {p} ({errors[0]})")
    if not found:
        extra = f"; {len(not_regular)} entr(y/ies) that are not regular files were skipped" if not_regular else ""
        raise ValueError(
            f"no supported image files found in {', '.join(str(p) for p in plist)} (looked for {exts}, "
            f"recursively{extra})"
        )
    files = sorted(found)
    st = [found[f] for f in files]
    return FileScan(
        files,
        [s.st_size for s in st],
        [s.st_mtime_ns for s in st],
        sorted(not_regular),
        [s.st_ctime_ns for s in st],
        [s.st_ino for s in st],
    )


def _given_file(p: Path, name: str, exts: str) -> os.stat_result:
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ValueError(f"{name} path cannot be read: {p} ({exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{name} path is not a regular file or a folder: {p}")
    if _kind(p) is None:
        raise ValueError(f"unsupported file type: {p} (expected {exts})")
    return st


def _existing_paths(exclude) -> dict[tuple[int, int], str]:
    """(device, inode) -> real path of each excluded path that exists (others exclude nothing)."""
    if isinstance(exclude, (str, os.PathLike)):
        exclude = [exclude]
    out = {}
    for e in exclude:
        try:
            st = os.stat(e)
        except (OSError, TypeError, ValueError):
            continue
        out[(st.st_dev, st.st_ino)] = os.path.realpath(e)
    return out


def _applicable(excluded: dict[tuple[int, int], str], root: Path) -> set[tuple[int, int]]:
    """The excluded paths that apply under the data folder ``root``: not ``root`` or a folder above it."""
    real = os.path.realpath(root)
    return {k for k, e in excluded.items() if not (real == e or real.startswith(e.rstrip(os.sep) + os.sep))}


#: the file by which ``mark_output_folder`` marks a folder of ld_ext outputs (a dot-name: never read)
OUTPUT_MARKER = ".ld_ext-outputs"


def mark_output_folder(folder: str | os.PathLike, entries: Sequence[str] = ()) -> None:
    """Mark ``folder`` (created if missing) as holding ld_ext outputs, so that no later scan reads
    images from it: it is skipped whole when it lies inside a data folder, and its ``entries``
    (names relative to it, e.g. ``overlays``) are skipped when it is a data folder itself."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    text = json.dumps({"ld_ext_outputs": sorted(set(entries))}) + "\n"
    if not marker.exists() or marker.read_text() != text:
        marker.write_text(text)


def _marked_entries(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of the output entries listed by a marker in the data folder ``root`` itself."""
    try:
        listed = json.loads((root / OUTPUT_MARKER).read_text())["ld_ext_outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(listed, list):
        return set()
    return set(_existing_paths([root / str(e) for e in listed]))


def _walk(p: Path, excluded: set[tuple[int, int]], found: dict, not_regular: list[Path]) -> list[OSError]:
    """Add the supported regular files under folder ``p`` to ``found`` (path -> stat), skipping
    dot-names, the ``excluded`` (device, inode) pairs and folders marked as outputs; returns the
    folder read errors."""
    errors: list[OSError] = []
    for root, dirs, files in os.walk(p, onerror=errors.append):
        kept = []
        for d in sorted(dirs):
            if d.startswith(".") or os.path.lexists(os.path.join(root, d, OUTPUT_MARKER)):
                continue
            if excluded:
                try:
                    st = os.stat(os.path.join(root, d))
                except OSError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) in excluded:
                    continue
            kept.append(d)
        dirs[:] = kept
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
            if (st.st_dev, st.st_ino) not in excluded:
                found[fp.absolute()] = st
    return errors


def list_image_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files of ``scan_image_files`` (a warning counts entries skipped as not regular files)."""
    scan = scan_image_files(paths)
    warn_not_regular(scan, stacklevel=3)
    return scan.files


def warn_not_regular(scan: FileScan, stacklevel: int = 2) -> None:
    """One RuntimeWarning for the entries of ``scan`` that are not regular files (none: silent)."""
    if scan.not_regular:
        warnings.warn(
            f"skipped {len(scan.not_regular)} entr(y/ies) that are not regular files (FIFO, socket, device or broken "
            f"link), without opening them; first: {scan.not_regular[0]}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def file_stem(path) -> str:
    """File name without its image extension (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


# ----------------------------------------------------------------------------- readers


def check_regular(path) -> None:
    """ValueError naming ``path`` unless it is a regular file (FIFOs and devices are never opened)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"image file cannot be read: {path} ({exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"not a regular file (FIFO, socket or device), not opened: {path}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as float32 (H, W) (gray) or (H, W, 3) (RGB); alpha dropped, palette expanded."""
    from PIL import Image

    check_regular(path)
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


def require_reader(module: str, fmt: str, path) -> object:
    """The optional reader package ``module``; ``MissingReaderError`` naming ``path`` when it is missing."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingReaderError(
            f"reading {fmt} file {path} needs the optional package '{module}' "
            f"(pip install {module}, or pip install 'ld_ext[medical]')"
        ) from exc


def modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """``arr`` of DICOM dataset ``ds`` in modality units (rescale slope/intercept or Modality LUT)."""
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
    pydicom = require_reader("pydicom", "DICOM", path)
    check_regular(path)
    ds = pydicom.dcmread(str(path))
    raw = ds.pixel_array
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    arr = np.asarray(modality_lut(raw, ds) if samples == 1 else raw, dtype=np.float32)
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
    nib = require_reader("nibabel", "NIfTI", path)
    for ax in axes:
        if ax not in (0, 1, 2):
            raise ValueError(f"NIfTI slice axes must be 0, 1 or 2, got {ax}")
    check_regular(path)
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
    check_regular(path)
    arr = np.load(str(path), allow_pickle=False)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(
        arr.dtype, np.complexfloating
    ):
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
