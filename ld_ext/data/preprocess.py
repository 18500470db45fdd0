"""Preprocessing for pre-training: every image scaled robustly to [0, 1] (clip at the
``percentiles`` of its own intensities), converted to the requested channel count (RGB -> gray by
luma, gray -> RGB by replication), padded to a square (``fit="pad"``; ``"crop"`` centre-crops) and
resized to ``size`` x ``size``; and reading a list of files that way in worker processes, with
the count of what was skipped (unreadable files, images holding NaN or infinite pixels: never
turned into blank images).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .readers import MissingReaderError, NonFiniteImageError, as_path_list, load_arrays

__all__ = ["scale_intensity", "to_channels", "resize_square", "prepare_image", "Preprocessing", "default_workers"]


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
        x = F.interpolate(
            x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
        )[0]
    return x.clamp(0, 1)


def prepare_image(
    arr: np.ndarray, size: int, channels: int = 1, percentiles: tuple[float, float] = (0.5, 99.5), fit: str = "pad"
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


class SkipTally:
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
                f"skipped {len(unreadable)} unreadable file(s) of {self.n_files}; first: {unreadable[0][0]} "
                f"({unreadable[0][1]})",
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
                f"{self.n_upsampled} image(s) are smaller than {size}x{size} and were upsampled",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def fail(self, paths) -> None:
        """Raise the error for a data set without a single usable image."""
        if self.missing_reader is not None:
            raise MissingReaderError(self.missing_reader)
        where = ", ".join(str(p) for p in as_path_list(paths))
        raise ValueError(
            f"no readable images in {where} ({len(self.skipped)} file(s) could not be read, "
            f"{len(self.nonfinite)} image(s) had NaN or infinite pixels)"
        )


def file_progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` wrapped in a tqdm bar counting files when ``enabled`` (and tqdm is there)."""
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
def processed_files(files: Sequence[Path], prep: Preprocessing, workers: int) -> Iterator[Iterable[_FileResult]]:
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
