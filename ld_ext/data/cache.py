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

The volume cache (``data/volume_cache.py``) is built the same way; what both share (the folder's
name, ``meta.json`` and its seal, the checksums, the DAMAGED marker, the build under the lock into a
temporary folder, one file descriptor per process) is here, in ``CacheFormat`` and the functions
after it, and what differs (the files' names, the words of messages) is a ``CacheFormat``'s fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

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
    """An image (or volume) of a cache does not match the checksum written when the cache was built."""

    def __init__(self, message: str) -> None:
        # re-raised by a DataLoader from a worker process, the message holds the worker's traceback:
        # kept to the last line, the error itself
        if "Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.partition("CacheIntegrityError: ")[2] or last
        super().__init__(message)


def cache_seal(meta: dict, index_bytes: bytes, crc_bytes: bytes) -> str:
    """SHA-256 over ``meta`` (without its seal), the index and the checksums: what ``meta["seal"]`` holds."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "seal"}, sort_keys=True).encode())
    h.update(b"\0" + hashlib.sha256(index_bytes).digest() + hashlib.sha256(crc_bytes).digest())
    return h.hexdigest()


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


def nonneg_int(v, what: str) -> int:
    """``v`` when it is an int >= 0 (not a bool); ValueError naming ``what`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    return v


def even_sample(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices in [0, n) spread evenly, first and last included (what is checked at open)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


@dataclass(frozen=True)
class CacheFormat:
    """One kind of on-disk cache: the image cache (``IMAGE_CACHE``) or the volume cache
    (``data.volume_cache.VOLUME_CACHE``). Both hold float32 items back to back in ``data_file``,
    ``index.json``, one CRC-32 per item in ``crc_file`` and ``meta.json`` sealed over all three
    (``cache_seal``), in a folder named ``{prefix}-{hash}``; the methods are what they share."""

    what: str  # how messages name the cache: "image cache"
    item: str  # how they name one of its items: "image"
    data_file: str
    crc_file: str
    version: int
    prefix: str  # of the folder's name
    kind: str | None = None  # what meta.json's "kind" must say (None: it says nothing)

    def cache_key(self, settings: dict, files: FileScan, groups: Iterable = ()) -> str:
        """The data set's fingerprint: version, kind and settings, every file's path, size and mtime
        (the same on every node that holds a copy of the data), and ``groups`` (how files form items)."""
        header = {"version": self.version, "settings": settings, "dtype": "float32"}
        if self.kind is not None:
            header["kind"] = self.kind
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for f, s, m in zip(files.files, files.sizes, files.mtimes):
            h.update(f"\n{f}\0{s}\0{m}".encode("utf-8", "surrogateescape"))
        for group in groups:
            h.update(f"\n{group}".encode())
        return h.hexdigest()

    def folder_name(self, key: str, files: FileScan) -> str:
        """The cache folder: the key plus each file's ctime and inode (a file replaced by one of the
        same size and mtime has a new ctime, so it gets a new cache)."""
        h = hashlib.sha256(key.encode())
        for c, i in zip(files.ctimes, files.inodes):
            h.update(f"\n{c}\0{i}".encode())
        return f"{self.prefix}-{h.hexdigest()[:24]}"

    def read_meta(self, root: Path) -> dict:
        """meta.json of the cache in ``root``: a dict of this version (and kind), not marked damaged."""
        refuse_if_marked_damaged(root, self.what)
        try:
            meta = json.loads((root / _META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"not an ld_ext {self.what} (no readable {_META_FILE}): {root} ({exc})") from None
        if self.kind is not None and (not isinstance(meta, dict) or meta.get("kind") != self.kind):
            raise ValueError(f"not an ld_ext {self.what} ({_META_FILE} does not say kind {self.kind!r}): {root}")
        if not isinstance(meta, dict):
            raise ValueError(f"{self.what} {root}: {_META_FILE} holds a {type(meta).__name__}, not a dict")
        if meta.get("version") != self.version:
            raise ValueError(f"{self.what} {root} has version {meta.get('version')!r}, expected {self.version}")
        return meta

    @contextmanager
    def fields_of(self, root: Path, name: str):
        """A field of the file ``name`` missing or of the wrong type within the block: one ValueError
        naming the file."""
        try:
            yield
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.what} {root}: {name} is malformed ({exc})") from None

    def check_checksum_count(self, root: Path, crc_bytes: bytes, n: int) -> None:
        if len(crc_bytes) != 4 * n:
            raise ValueError(f"{self.what} {root}: {self.crc_file} has {len(crc_bytes)} bytes, expected {4 * n}")

    def check_seal(self, root: Path, meta: dict, seal: str, index_bytes: bytes, crc_bytes: bytes) -> None:
        if cache_seal(meta, index_bytes, crc_bytes) != seal:
            raise ValueError(
                f"{self.what} {root}: {_META_FILE}, {_INDEX_FILE} and {self.crc_file} do not match the seal "
                "written when it was built (edited or damaged since)"
            )

    def check_data_size(self, root: Path, expected: int) -> None:
        path = root / self.data_file
        actual = path.stat().st_size if path.exists() else -1
        if actual != expected:
            raise ValueError(f"{self.what} {path} has {actual} bytes, expected {expected}; delete {root} to rebuild it")

    def checksum_error(self, root: Path, i: int, at_open: bool, detail: str = "") -> CacheIntegrityError:
        """The error for item ``i`` not matching its checksum; found after open, the cache is also
        marked damaged (``mark_damaged``) so that the next run rebuilds it."""
        msg = (
            f"{self.what} file {root / self.data_file}: {self.item} {i}{detail} does not match the checksum written "
            "when the cache was built (changed or damaged since)"
        )
        if at_open:  # open_or_build rebuilds it now
            return CacheIntegrityError(msg)
        marked = mark_damaged(root, f"{self.item} {i} does not match its checksum")
        then = "the cache is marked damaged and the next run rebuilds it" if marked else f"delete {root}"
        return CacheIntegrityError(f"{msg}; {then}")

    def write_index_and_meta(self, tmp: Path, index: dict, crcs: list[int], meta: dict) -> None:
        """index.json, the checksums and meta.json (sealed over all three) into the folder ``tmp``."""
        index_bytes = json.dumps(index).encode()
        crc_bytes = np.asarray(crcs, "<u4").tobytes()
        (tmp / _INDEX_FILE).write_bytes(index_bytes)
        (tmp / self.crc_file).write_bytes(crc_bytes)
        meta["seal"] = cache_seal(meta, index_bytes, crc_bytes)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))

    def open_intact(self, root: Path, open_cache: Callable, check_sources: Callable, quiet: bool = False):
        """``open_cache(root)`` when the cache there is complete and consistent and ``check_sources(ds)``
        accepts it; None when there is none or it is damaged (said as a warning unless ``quiet``, so
        that the rebuild that follows is not silent)."""
        if not root.exists():
            return None
        try:
            ds = open_cache(root)
            check_sources(ds)
            return ds
        except ValueError as exc:  # CacheIntegrityError included
            if not quiet:
                logger.warning("the %s %s is damaged and is rebuilt: %s", self.what, root, exc)
            return None

    def build_under_lock(self, cache_dir: Path, root: Path, lock_timeout: float, log, open_intact, build, open_cache):
        """Build the cache ``root`` under ``cache_dir`` holding its lock (``build(lock)``, into a temporary
        folder renamed into place) and open it; a cache that another process built meanwhile
        (``open_intact()``) is opened instead. A damaged one, and what a killed build left, go first."""
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cache folder cannot be created: {cache_dir} ({exc})") from exc
        with CacheLock(cache_dir / f".{root.name}.lock", lock_timeout, log) as lock:
            ds = open_intact()  # built by another process meanwhile?
            if ds is not None:
                return ds
            for stale in cache_dir.glob(f".{root.name}.tmp-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            if root.exists():  # damaged (said above): rebuilt from the source files
                shutil.rmtree(root)
            build(lock)
            return open_cache(root)


@contextmanager
def synced_file(path: Path):
    """``path`` opened for writing, flushed and fsynced when the block ends without an error."""
    with open(path, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


class PerProcessFile:
    """A data set that reads ``self._path`` by offset through one descriptor per process (DataLoader
    workers are forked or spawned, and a pickled copy opens its own)."""

    _path: Path
    _fd: int | None = None
    _pid: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(str(self._path), os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = d["_pid"] = None
        return d

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


IMAGE_CACHE = CacheFormat("image cache", "image", _IMAGES_FILE, _CRC_FILE, CACHE_VERSION, "ld_ext-cache")


def _cache_key(scan: FileScan, prep: Preprocessing) -> str:
    """The data set's fingerprint: settings and every file's path, size and mtime (the same on
    every node that holds a copy of the data, so processes of one run can compare it)."""
    return IMAGE_CACHE.cache_key(prep.as_dict(), scan)


def _folder_name(key: str, scan: FileScan) -> str:
    return IMAGE_CACHE.folder_name(key, scan)


class CachedImageDataset(PerProcessFile, torch.utils.data.Dataset):
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
        self.meta = IMAGE_CACHE.read_meta(self.root)
        with IMAGE_CACHE.fields_of(self.root, _META_FILE):
            self.n = _count(self.meta, "n")
            self.channels, self.size = _count(self.meta, "channels"), _count(self.meta, "size")
            self.fingerprint = str(self.meta["key"])
            self.n_upsampled = _count(self.meta, "n_upsampled", 0)
            seal = str(self.meta["seal"])
        self._item = self.channels * self.size * self.size
        IMAGE_CACHE.check_data_size(self.root, self.n * self._item * 4)
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
        IMAGE_CACHE.check_checksum_count(self.root, crc_bytes, self.n)
        IMAGE_CACHE.check_seal(self.root, self.meta, seal, index_bytes, crc_bytes)
        return index, crc_bytes

    def _verify(self, mode: str) -> None:
        """Check images against their checksums at open: all, or an even sample (see the class)."""
        if mode == "full" or (mode == "auto" and self.n * self._item * 4 <= _FULL_VERIFY_BYTES):
            todo = np.arange(self.n)
        else:
            todo = even_sample(self.n, _SAMPLE_VERIFY)
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
            raise IMAGE_CACHE.checksum_error(self.root, i, at_open)
        self._verified[i] = True

    def __getstate__(self):
        d = super().__getstate__()
        d["_index"] = None  # read again where needed (names), not sent to every DataLoader worker
        return d

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
    return IMAGE_CACHE.build_under_lock(
        cache_dir,
        root,
        lock_timeout,
        log,
        open_intact=lambda: _open_intact(root, scan, quiet=True),
        build=lambda lock: _build_cache(scan, prep, key, root, paths, workers, progress, log, lock),
        open_cache=CachedImageDataset,
    )


def _open_intact(root: Path, scan: FileScan, quiet: bool = False) -> CachedImageDataset | None:
    """The cache in ``root`` when it is complete, consistent and made from the files of ``scan``;
    None when there is none or it is damaged (said as a warning unless ``quiet``, so that the
    rebuild that follows is not silent)."""

    def made_from_the_scanned_files(ds: CachedImageDataset) -> None:
        recorded = ds.sources()
        current = [[str(f), *scan.identity(i)] for i, f in enumerate(scan.files)]
        if recorded != current:
            first = next((c[0] for r, c in zip(recorded, current) if r != c), None)
            raise ValueError(
                f"it lists {len(recorded)} source file(s), the data folder holds {len(current)}"
                + (f"; first that differs: {first}" if first else "")
            )

    return IMAGE_CACHE.open_intact(root, CachedImageDataset, made_from_the_scanned_files, quiet)


def _count(meta: dict, key: str, default=None) -> int:
    return nonneg_int(meta[key] if default is None else meta.get(key, default), key)


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
        with synced_file(tmp / _IMAGES_FILE) as fh, processed_files(scan.files, prep, workers) as results:
            bar = file_progress_bar(results, len(scan.files), "caching images", progress)
            for fi, res in enumerate(bar):
                tally.add(scan.files[fi], res)
                for label, x in res.images:
                    b = np.ascontiguousarray(x, np.float32).tobytes()
                    crcs.append(zlib.crc32(b))
                    fh.write(b)
                    items.append((fi, label))
                lock.beat("building the cache", fi + 1, len(scan.files))
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
    IMAGE_CACHE.write_index_and_meta(tmp, index, crcs, meta)
