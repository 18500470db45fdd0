"""The preprocessed on-disk cache of pre-training: a flat float32 array file plus an index,
built once (in worker processes) and read by offset, so nothing of the size of the data set is
held in memory.

Integrity: every image has a CRC-32 (``images.crc32``) written when the cache is built, and
``meta.json`` holds a seal (SHA-256 of itself, ``index.json`` and the checksums), so that an
edited count or index is seen at open. At open the images are checked against their checksums
(all of them for a cache of up to 256 MiB, an even sample of 64 otherwise) and every image is
checked again on its first read in each process. A cache that fails at open is rebuilt with a
warning; an image that fails during training stops the run with one error naming the cache file
and marks the cache (a ``DAMAGED`` file) so that the next run rebuilds it. The cache's folder is
named by the settings and each source file's path, size, mtime, ctime and inode, so a file
replaced by another of the same size and mtime gives a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..atomic import atomic_directory
from .cachelock import CacheLock, CacheLockTimeout, DEFAULT_LOCK_TIMEOUT_S, check_timeout
from .preprocess import Preprocessing, file_progress_bar, processed_files, SkipTally, default_workers
from .readers import FileScan, as_path_list, warn_not_regular, scan_image_files

__all__ = [
    "CachedImageDataset",
    "open_or_build_cache",
    "CACHE_VERSION",
    "CacheIntegrityError",
    "CacheLockTimeout",
    "DEFAULT_LOCK_TIMEOUT_S",
]

CACHE_VERSION = 2  # 2: per-image CRC-32, the seal, the source files' ctime and inode
logger = logging.getLogger("ld_ext.data")

_IMAGES_FILE = "images.f32"
_META_FILE = "meta.json"
_INDEX_FILE = "index.json"
_CRC_FILE = "images.crc32"  # one little-endian uint32 per image
_DAMAGED_FILE = "DAMAGED"  # written when an image fails its checksum during training
_FULL_VERIFY_BYTES = 256 * 2**20  # up to this size every image is checked at open
_SAMPLE_VERIFY = 64  # beyond it, this many evenly spread images


class CacheIntegrityError(ValueError):
    """An image of the cache does not match the checksum written when the cache was built."""

    def __init__(self, message: str) -> None:
        # re-raised by a DataLoader from a worker process, the message holds the worker's traceback:
        # kept to the last line, the error itself
        if "Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.partition("CacheIntegrityError: ")[2] or last
        super().__init__(message)


def _cache_key(scan: FileScan, prep: Preprocessing) -> str:
    """The data set's fingerprint: settings and every file's path, size and mtime (the same on
    every node that holds a copy of the data, so processes of one run can compare it)."""
    h = hashlib.sha256()
    h.update(
        json.dumps({"version": CACHE_VERSION, "settings": prep.as_dict(), "dtype": "float32"}, sort_keys=True).encode()
    )
    for f, s, m in zip(scan.files, scan.sizes, scan.mtimes):
        h.update(f"\n{f}\0{s}\0{m}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _folder_name(key: str, scan: FileScan) -> str:
    """The cache folder: the key plus each file's ctime and inode (a file replaced by one of the same
    size and mtime has a new ctime, so it gets a new cache)."""
    h = hashlib.sha256(key.encode())
    for c, i in zip(scan.ctimes, scan.inodes):
        h.update(f"\n{c}\0{i}".encode())
    return f"ld_ext-cache-{h.hexdigest()[:24]}"


def cache_seal(meta: dict, index_bytes: bytes, crc_bytes: bytes) -> str:
    """SHA-256 over ``meta`` (without its seal), the index and the checksums: what ``meta["seal"]`` holds."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "seal"}, sort_keys=True).encode())
    h.update(b"\0" + hashlib.sha256(index_bytes).digest() + hashlib.sha256(crc_bytes).digest())
    return h.hexdigest()


class CachedImageDataset(torch.utils.data.Dataset):
    """A preprocessed data set on disk: ``images.f32`` (N x C x S x S float32, C order) + index.

    ``read(indices)`` reads just those images by offset (``os.pread``), so memory use does not
    depend on N and pages cached by the OS are not part of the process. Safe to use from
    DataLoader worker processes (each process opens its own descriptor). ``array()`` gives a
    read-only ``np.memmap`` of the whole file (every image checked first).

    Opening checks the files (counts, sizes, the seal in ``meta.json``) and the images against their
    checksums: ``verify="auto"`` all of them up to 256 MiB, an even sample beyond; ``"full"`` all;
    ``"sample"`` the sample. Every image not checked at open is checked on its first read in each
    process (``CacheIntegrityError``, and the cache is marked so that ``open_or_build_cache``
    rebuilds it). A damaged cache raises ``ValueError``.

    Attributes: ``root``, ``size``, ``channels``, ``fingerprint`` (the data set's key: settings, file
    list, sizes and mtimes), ``meta`` (the small index: settings, counts, build time);
    ``names``, ``skipped``, ``nonfinite`` from ``index.json``.
    """

    def __init__(self, root: str | os.PathLike, *, verify: str = "auto") -> None:
        if verify not in ("auto", "full", "sample"):
            raise ValueError(f"verify must be 'auto', 'full' or 'sample', got {verify!r}")
        self.root = Path(root)
        self._path = self.root / _IMAGES_FILE
        self.meta = _read_meta(self.root)
        try:
            self.n = _count(self.meta, "n")
            self.channels, self.size = _count(self.meta, "channels"), _count(self.meta, "size")
            self.fingerprint = str(self.meta["key"])
            self.n_upsampled = _count(self.meta, "n_upsampled", 0)
            seal = str(self.meta["seal"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"image cache {self.root}: {_META_FILE} is malformed ({exc})") from None
        self._item = self.channels * self.size * self.size
        expected = self.n * self._item * 4
        actual = self._path.stat().st_size if self._path.exists() else -1
        if actual != expected:
            raise ValueError(
                f"image cache {self._path} has {actual} bytes, expected {expected}; delete {self.root} to rebuild it"
            )
        self._fd: int | None = None
        self._pid: int | None = None
        self._index, crc_bytes = self._read_index_and_checksums(seal)
        self._crc = np.frombuffer(crc_bytes, "<u4")
        self._verified = np.zeros(self.n, np.bool_)
        self._verify(verify)

    def _read_index_and_checksums(self, seal: str) -> tuple[dict, bytes]:
        """index.json and images.crc32, checked against meta.json's count and seal."""
        try:
            index_bytes = (self.root / _INDEX_FILE).read_bytes()
            index = json.loads(index_bytes)
        except (OSError, ValueError) as exc:
            raise ValueError(f"image cache {self.root}: {_INDEX_FILE} cannot be read ({exc})") from None
        if not isinstance(index, dict):
            raise ValueError(f"image cache {self.root}: {_INDEX_FILE} holds a {type(index).__name__}, not a dict")
        items = index.get("items")
        if not isinstance(items, list) or len(items) != self.n:
            count = len(items) if isinstance(items, list) else "no"
            raise ValueError(
                f"image cache {self.root}: {_META_FILE} says {self.n} images, {_INDEX_FILE} lists {count}; "
                f"delete {self.root} to rebuild it"
            )
        try:
            crc_bytes = (self.root / _CRC_FILE).read_bytes()
        except OSError as exc:
            raise ValueError(f"image cache {self.root}: {_CRC_FILE} cannot be read ({exc})") from None
        if len(crc_bytes) != 4 * self.n:
            raise ValueError(f"image cache {self.root}: {_CRC_FILE} has {len(crc_bytes)} bytes, expected {4 * self.n}")
        if cache_seal(self.meta, index_bytes, crc_bytes) != seal:
            raise ValueError(
                f"image cache {self.root}: {_META_FILE}, {_INDEX_FILE} and {_CRC_FILE} do not match the seal "
                "written when it was built (edited or damaged since)"
            )
        return index, crc_bytes

    def _verify(self, mode: str) -> None:
        """Check images against their checksums at open: all, or an even sample (see the class)."""
        if mode == "full" or (mode == "auto" and self.n * self._item * 4 <= _FULL_VERIFY_BYTES):
            todo = np.arange(self.n)
        else:
            todo = np.unique(np.linspace(0, self.n - 1, min(self.n, _SAMPLE_VERIFY)).round().astype(np.int64))
        nbytes = self._item * 4
        per_block = max(1, (16 * 2**20) // max(1, nbytes))
        fd = self._descriptor()
        k = 0
        while k < len(todo):  # runs of consecutive images are read as one block
            first = int(todo[k])
            run = 1
            while k + run < len(todo) and run < per_block and todo[k + run] == first + run:
                run += 1
            buf = memoryview(os.pread(fd, run * nbytes, first * nbytes))
            if len(buf) != run * nbytes:
                raise ValueError(f"short read from {self._path} at image {first}; delete {self.root} to rebuild it")
            for j in range(run):
                self._check_image(first + j, buf[j * nbytes : (j + 1) * nbytes], at_open=True)
            k += run

    def _check_image(self, i: int, buf, at_open: bool = False) -> None:
        """``buf`` (image ``i``) against its checksum; a mismatch after open marks the cache damaged."""
        if zlib.crc32(buf) != int(self._crc[i]):
            msg = (
                f"image cache file {self._path}: image {i} does not match the checksum written when the cache was "
                "built (changed or damaged since)"
            )
            if at_open:  # open_or_build_cache rebuilds it now
                raise CacheIntegrityError(msg)
            marked = self._mark_damaged(f"image {i} does not match its checksum")
            then = "the cache is marked damaged and the next run rebuilds it" if marked else f"delete {self.root}"
            raise CacheIntegrityError(f"{msg}; {then}")
        self._verified[i] = True

    def _mark_damaged(self, reason: str) -> bool:
        return mark_damaged(self.root, reason)

    # the descriptor is per process (DataLoader workers are forked or spawned)
    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(str(self._path), os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = d["_pid"] = None
        d["_index"] = None  # read again where needed (names), not sent to every DataLoader worker
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
        """The images at ``indices`` as a new (k, C, S, S) float32 tensor (each checked against its
        checksum on its first read in this process: ``CacheIntegrityError``)."""
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
            if not self._verified[i]:
                self._check_image(i, buf)
            out[j] = np.frombuffer(buf, np.float32)
        return torch.from_numpy(out).view(len(idx), self.channels, self.size, self.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read([i])[0]

    def array(self) -> np.memmap:
        """The whole cache as a read-only memory map (N, C, S, S), every image checked first."""
        if not self._verified.all():
            self._verify("full")
        return np.memmap(self._path, np.float32, "r", shape=(self.n, self.channels, self.size, self.size))

    def _index_dict(self) -> dict:
        if self._index is None:  # after unpickling
            self._index = json.loads((self.root / _INDEX_FILE).read_bytes())
        return self._index

    def sources(self) -> list[list]:
        """[path, size, mtime_ns, ctime_ns, inode] of every source file, as recorded at build."""
        files = self._index_dict().get("files")
        return [list(f) for f in files] if isinstance(files, list) else []

    @property
    def names(self) -> list[str]:
        ix = self._index_dict()
        return [f"{ix['files'][fi][0]}:{lab}" if lab else ix["files"][fi][0] for fi, lab in ix["items"]]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(x) for x in self._index_dict()["skipped"]]

    @property
    def nonfinite(self) -> list[str]:
        return list(self._index_dict()["nonfinite"])


def mark_damaged(root: Path, reason: str) -> bool:
    """Write the DAMAGED marker into the cache folder ``root`` (a file that failed its checksum during
    a run), so that the next run rebuilds the cache; False when it cannot be written. Shared by the
    image cache and the volume cache (``data/volume_cache.py``)."""
    try:
        (Path(root) / _DAMAGED_FILE).write_text(f"{reason} ({time.strftime('%Y-%m-%d %H:%M:%S %z')})\n")
        return True
    except OSError:
        return False


def refuse_if_marked_damaged(root: Path, what: str) -> None:
    """ValueError (the caller rebuilds) when ``root`` carries the DAMAGED marker of ``mark_damaged``."""
    damaged = Path(root) / _DAMAGED_FILE
    if damaged.exists():
        try:
            why = damaged.read_text().strip()
        except OSError as exc:
            why = str(exc)
        raise ValueError(f"{what} {root} was marked damaged during a run: {why}")


def _read_meta(root: Path) -> dict:
    """meta.json of the cache in ``root``: a dict of this cache version, not marked damaged."""
    refuse_if_marked_damaged(root, "image cache")
    try:
        meta = json.loads((root / _META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"not an ld_ext image cache (no readable {_META_FILE}): {root} ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"image cache {root}: {_META_FILE} holds a {type(meta).__name__}, not a dict")
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"image cache {root} has version {meta.get('version')!r}, expected {CACHE_VERSION}")
    return meta


def open_or_build_cache(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    prep: Preprocessing,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: bool = True,
    log=None,
    exclude: Sequence[str | os.PathLike] = (),
    lock_timeout: float | None = None,
) -> CachedImageDataset:
    """The preprocessed cache of ``paths`` under ``cache_dir``, built on first use.

    The cache is named by a hash of the preprocessing settings and of every file's path, size,
    mtime, ctime and inode: a changed folder or setting gives a new cache, an unchanged one is
    reused (by later runs and by every process of a multi-process run). It is built in ``workers``
    processes (default: the CPUs, at most 8) into a temporary folder that is renamed into place
    when complete. A damaged cache (see ``CachedImageDataset``) is rebuilt with a warning.
    ``exclude``: folders and files under ``paths`` never read as images (the run's ``--out``; the
    cache folder itself is always excluded). Concurrent builders wait for each other through a lock
    file; a waiter stops with ``CacheLockTimeout`` when the builder shows no progress for
    ``lock_timeout`` seconds (default ``DEFAULT_LOCK_TIMEOUT_S``).
    """
    if not isinstance(prep, Preprocessing):
        raise TypeError(f"prep must be a Preprocessing, got {type(prep).__name__}")
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    lock_timeout = check_timeout(lock_timeout)
    cache_dir = Path(cache_dir)
    excluded = [exclude] if isinstance(exclude, (str, os.PathLike)) else list(exclude)
    scan = scan_image_files(paths, exclude=[*excluded, cache_dir])
    key = _cache_key(scan, prep)
    root = cache_dir / _folder_name(key, scan)
    ds = _open_intact(root, scan)
    if ds is not None:
        warn_not_regular(scan, stacklevel=3)
        return ds
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cache folder cannot be created: {cache_dir} ({exc})") from exc
    with CacheLock(cache_dir / f".{root.name}.lock", lock_timeout, log) as lock:
        ds = _open_intact(root, scan, quiet=True)  # built by another process meanwhile?
        if ds is not None:
            return ds
        for stale in cache_dir.glob(f".{root.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # damaged (checked above): rebuilt from the source files
            shutil.rmtree(root)
        _build_cache(scan, prep, key, root, paths, workers, progress, log, lock)
    return CachedImageDataset(root)


def _open_intact(root: Path, scan: FileScan, quiet: bool = False) -> CachedImageDataset | None:
    """The cache in ``root`` when it is complete, consistent and made from the files of ``scan``;
    None when there is none or it is damaged (said as a warning unless ``quiet``, so that the
    rebuild that follows is not silent)."""
    if not root.exists():
        return None
    try:
        ds = CachedImageDataset(root)
        recorded = ds.sources()
        current = [[str(f), *scan.identity(i)] for i, f in enumerate(scan.files)]
        if recorded != current:
            first = next((c[0] for r, c in zip(recorded, current) if r != c), None)
            raise ValueError(
                f"it lists {len(recorded)} source file(s), the data folder holds {len(current)}"
                + (f"; first that differs: {first}" if first else "")
            )
        return ds
    except ValueError as exc:
        if not quiet:
            logger.warning("the image cache %s is damaged and is rebuilt: %s", root, exc)
        return None


def _count(meta: dict, key: str, default=None) -> int:
    v = meta[key] if default is None else meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} must be an int >= 0, got {v!r}")
    return v


def _build_cache(
    scan: FileScan, prep: Preprocessing, key: str, root: Path, paths, workers: int, progress: bool, log, lock
) -> None:
    t0 = time.time()
    tally = SkipTally(len(scan.files), scan.not_regular)
    items: list[tuple[int, str]] = []
    crcs: list[int] = []
    with atomic_directory(root) as tmp:  # renamed to root when complete, deleted on any error
        if log is not None:
            log(f"building the image cache {root} from {len(scan.files)} file(s) with {max(1, workers)} process(es)")
        lock.beat("building the cache", 0, len(scan.files), force=True)
        with open(tmp / _IMAGES_FILE, "wb") as fh, processed_files(scan.files, prep, workers) as results:
            bar = file_progress_bar(results, len(scan.files), "caching images", progress)
            for fi, res in enumerate(bar):
                tally.add(scan.files[fi], res)
                for label, x in res.images:
                    b = np.ascontiguousarray(x, np.float32).tobytes()
                    crcs.append(zlib.crc32(b))
                    fh.write(b)
                    items.append((fi, label))
                lock.beat("building the cache", fi + 1, len(scan.files))
            fh.flush()
            os.fsync(fh.fileno())
        tally.warn(prep.size, stacklevel=4)
        if not items:
            tally.fail(paths)
        _write_index_and_meta(tmp, scan, prep, key, paths, workers, tally, items, crcs, t0)


def _write_index_and_meta(tmp: Path, scan: FileScan, prep, key, paths, workers, tally, items, crcs, t0) -> None:
    index = {
        "files": [[str(f), *scan.identity(i)] for i, f in enumerate(scan.files)],
        "items": items,
        "skipped": tally.skipped,
        "nonfinite": tally.nonfinite,
    }
    index_bytes = json.dumps(index).encode()
    crc_bytes = np.asarray(crcs, "<u4").tobytes()
    (tmp / _INDEX_FILE).write_bytes(index_bytes)
    (tmp / _CRC_FILE).write_bytes(crc_bytes)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "n": len(items),
        "size": prep.size,
        "channels": prep.channels,
        "dtype": "float32",
        "checksums": f"CRC-32 of each image in {_CRC_FILE} (little-endian uint32)",
        "settings": prep.as_dict(),
        "paths": [str(p) for p in as_path_list(paths)],
        "n_files": len(scan.files),
        "n_skipped": len(tally.skipped),
        "n_nonfinite": len(tally.nonfinite),
        "n_upsampled": tally.n_upsampled,
        "build_seconds": round(time.time() - t0, 3),
        "workers": workers,
    }
    meta["seal"] = cache_seal(meta, index_bytes, crc_bytes)
    (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
