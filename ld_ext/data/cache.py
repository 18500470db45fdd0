"""The preprocessed on-disk cache of pre-training: a flat float32 array file plus an index,
built once (in worker processes) and read by offset, so nothing of the size of the data set is
held in memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..atomic import atomic_directory
from .preprocess import Preprocessing, file_progress_bar, processed_files, SkipTally, default_workers
from .readers import FileScan, as_path_list, warn_not_regular, scan_image_files

__all__ = ["CachedImageDataset", "open_or_build_cache", "CACHE_VERSION"]

CACHE_VERSION = 1
logger = logging.getLogger("ld_ext.data")

_IMAGES_FILE = "images.f32"
_META_FILE = "meta.json"
_INDEX_FILE = "index.json"


def _cache_key(scan: FileScan, prep: Preprocessing) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps({"version": CACHE_VERSION, "settings": prep.as_dict(), "dtype": "float32"}, sort_keys=True).encode()
    )
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
        if not isinstance(self.meta, dict):
            raise ValueError(f"image cache {self.root}: {_META_FILE} holds a {type(self.meta).__name__}, not a dict")
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"image cache {self.root} has version {self.meta.get('version')!r}, expected {CACHE_VERSION}"
            )
        try:
            self.n = _count(self.meta, "n")
            self.channels, self.size = _count(self.meta, "channels"), _count(self.meta, "size")
            self.fingerprint = str(self.meta["key"])
            self.n_upsampled = _count(self.meta, "n_upsampled", 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"image cache {self.root}: {_META_FILE} is malformed ({exc})") from None
        self._item = self.channels * self.size * self.size
        self._path = self.root / _IMAGES_FILE
        expected = self.n * self._item * 4
        actual = self._path.stat().st_size if self._path.exists() else -1
        if actual != expected:
            raise ValueError(
                f"image cache {self._path} has {actual} bytes, expected {expected}; delete {self.root} to rebuild it"
            )
        self._fd: int | None = None
        self._pid: int | None = None
        self._index: dict | None = None
        items = self._load_index().get("items")
        if not isinstance(items, list) or len(items) != self.n:
            count = len(items) if isinstance(items, list) else "no"
            raise ValueError(
                f"image cache {self.root}: {_META_FILE} says {self.n} images, {_INDEX_FILE} lists {count}; "
                f"delete {self.root} to rebuild it"
            )

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
            try:
                index = json.loads((self.root / _INDEX_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"image cache {self.root}: {_INDEX_FILE} cannot be read ({exc})") from None
            if not isinstance(index, dict):
                raise ValueError(f"image cache {self.root}: {_INDEX_FILE} holds a {type(index).__name__}, not a dict")
            self._index = index
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
    ds = _open_intact(root)
    if ds is not None:
        warn_not_regular(scan, stacklevel=3)
        return ds
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cache folder cannot be created: {cache_dir} ({exc})") from exc
    with _file_lock(cache_dir / f".{root.name}.lock"):
        ds = _open_intact(root)  # built by another process meanwhile?
        if ds is not None:
            return ds
        for stale in cache_dir.glob(f".{root.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # damaged (checked above): rebuilt from the source files
            shutil.rmtree(root)
        _build_cache(scan, prep, key, root, paths, workers, progress, log)
    return CachedImageDataset(root)


def _open_intact(root: Path) -> CachedImageDataset | None:
    """The cache in ``root`` when it is complete and consistent; None when there is none or it is
    damaged (no or a malformed meta.json or index.json, a count or a file size that disagree),
    said as a warning so that the rebuild that follows is not silent."""
    if not root.exists():
        return None
    try:
        return CachedImageDataset(root)
    except ValueError as exc:
        logger.warning("the image cache %s is damaged and is rebuilt: %s", root, exc)
        return None


def _count(meta: dict, key: str, default=None) -> int:
    v = meta[key] if default is None else meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} must be an int >= 0, got {v!r}")
    return v


def _build_cache(
    scan: FileScan, prep: Preprocessing, key: str, root: Path, paths, workers: int, progress: bool, log
) -> None:
    t0 = time.time()
    tally = SkipTally(len(scan.files), scan.not_regular)
    items: list[tuple[int, str]] = []
    with atomic_directory(root) as tmp:  # renamed to root when complete, deleted on any error
        if log is not None:
            log(f"building the image cache {root} from {len(scan.files)} file(s) with {max(1, workers)} process(es)")
        with open(tmp / _IMAGES_FILE, "wb") as fh, processed_files(scan.files, prep, workers) as results:
            bar = file_progress_bar(results, len(scan.files), "caching images", progress)
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
            "paths": [str(p) for p in as_path_list(paths)],
            "n_files": len(scan.files),
            "n_skipped": len(tally.skipped),
            "n_nonfinite": len(tally.nonfinite),
            "n_upsampled": tally.n_upsampled,
            "build_seconds": round(time.time() - t0, 3),
            "workers": workers,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
