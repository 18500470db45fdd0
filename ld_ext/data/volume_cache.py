"""The on-disk cache of 3-D volumes: every volume read once (``read_volume``: RAS+, resampled,
normalised), stored as float32 (X, Y, Z) back to back in one file, and read by patch.

The same design as the image cache, through the same code (``ld_ext.data.cache.CacheFormat``, here
``VOLUME_CACHE``): the folder is named by the settings and every source file's path, size, mtime,
ctime and inode (a DICOM series counts each of its slices); each volume has a CRC-32
(``volumes.crc32``) and ``meta.json`` a seal (SHA-256 of itself, the index and the checksums,
``cache_seal``); volumes are checked at open (all of them up to 256 MiB, an even sample within that
budget beyond, at least one) and every other volume on its first read in each process, by reading
its bytes in 4 MiB pieces; a cache that fails at open is rebuilt with a warning, a volume that fails
during training stops the run with ``CacheIntegrityError`` and marks the cache (``DAMAGED``) for the
next run to rebuild. The build holds the cache's lock (``CacheLock``: holder info, waiters give up
when it shows no progress for ``lock_timeout``), fills a temporary folder that is renamed into place
when complete, and decodes one volume at a time; volumes that cannot be read are skipped with a
warning.

``VolumePatchDataset.read_patch`` reads only the bytes of the patch (one ``os.pread`` per X-plane of
the patch, covering its rows of Z values), so a training step never holds a whole volume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..atomic import atomic_directory
from .cache import CacheFormat, PerProcessFile, even_sample, nonneg_int, synced_file
from .cachelock import DEFAULT_LOCK_TIMEOUT_S, check_timeout
from .preprocess import file_progress_bar
from .readers import MissingReaderError, as_path_list, warn_not_regular
from .volumes import VolumeScan, check_volume_settings, read_volume, scan_volume_files

__all__ = ["VolumePatchDataset", "open_or_build_volume_cache", "VOLUME_CACHE_VERSION"]

VOLUME_CACHE_VERSION = 1

_VOLUMES_FILE = "volumes.f32"
_META_FILE = "meta.json"
_INDEX_FILE = "index.json"
_CRC_FILE = "volumes.crc32"  # one little-endian uint32 per volume
_VERIFY_AT_OPEN_BYTES = 256 * 2**20  # volumes checked at open: up to this many bytes (at least one volume)
_CHUNK_BYTES = 4 * 2**20  # a volume is checked in pieces of this size, never held whole


VOLUME_CACHE = CacheFormat(
    "volume cache", "volume", _VOLUMES_FILE, _CRC_FILE, VOLUME_CACHE_VERSION, "ld_ext-volumes", kind="volumes"
)


def _cache_key(scan: VolumeScan, settings: dict) -> str:
    """The data set's fingerprint: settings, every source file's path, size and mtime, and how the
    files group into volumes."""
    return VOLUME_CACHE.cache_key(settings, scan.files, groups=scan.members)


def _folder_name(key: str, scan: VolumeScan) -> str:
    return VOLUME_CACHE.folder_name(key, scan.files)


class VolumePatchDataset(PerProcessFile):
    """A volume cache on disk: ``volumes.f32`` (the volumes' float32 (X, Y, Z) arrays, C order, back
    to back), ``index.json`` (source files; each volume's path, shape, spacing, affine and byte
    offset), ``volumes.crc32`` and ``meta.json`` (settings, counts, seal).

    ``len(ds)`` volumes; ``shapes``, ``spacings``, ``affines``, ``names`` (the volume paths);
    ``read_patch(i, start, size)`` a (1, *size) float32 tensor, zeros where the patch leaves the
    volume, from only the patch's bytes; ``read_volume(i)`` the whole (1, X, Y, Z) volume (for
    evaluation). Each volume is checked against its checksum at open or on its first read in each
    process (``CacheIntegrityError``; the cache is then marked damaged). Safe to send to DataLoader
    worker processes (each opens its own descriptor). ``verify``: ``"auto"`` (see the module) or
    ``"full"`` (every volume at open). A malformed cache raises ``ValueError``.
    """

    def __init__(self, root: str | os.PathLike, *, verify: str = "auto") -> None:
        if verify not in ("auto", "full"):
            raise ValueError(f"verify must be 'auto' or 'full', got {verify!r}")
        self.root = Path(root)
        self._path = self.root / _VOLUMES_FILE
        self.meta = VOLUME_CACHE.read_meta(self.root)
        with VOLUME_CACHE.fields_of(self.root, _META_FILE):
            self.n = nonneg_int(self.meta["n"], "n")
            self.fingerprint = str(self.meta["key"])
            seal = str(self.meta["seal"])
        index, crc_bytes = self._read_index_and_checksums(seal)
        self._crc = np.frombuffer(crc_bytes, "<u4")
        files = index.get("files")
        self._sources = [list(f) for f in files] if isinstance(files, list) else []
        self._parse_volumes(index)
        VOLUME_CACHE.check_data_size(self.root, self._end)
        self._verified = np.zeros(self.n, np.bool_)
        self._verify_at_open(verify)

    def _read_index_and_checksums(self, seal: str) -> tuple[dict, bytes]:
        try:
            index_bytes = (self.root / _INDEX_FILE).read_bytes()
            index = json.loads(index_bytes)
            crc_bytes = (self.root / _CRC_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise ValueError(f"volume cache {self.root}: {_INDEX_FILE} or {_CRC_FILE} cannot be read ({exc})") from None
        VOLUME_CACHE.check_seal(self.root, self.meta, seal, index_bytes, crc_bytes)
        listed = index.get("volumes") if isinstance(index, dict) else None
        if not isinstance(listed, list) or len(listed) != self.n:
            raise ValueError(f"volume cache {self.root}: {_INDEX_FILE} does not list the {self.n} volumes of the meta")
        VOLUME_CACHE.check_checksum_count(self.root, crc_bytes, self.n)
        return index, crc_bytes

    def _parse_volumes(self, index: dict) -> None:
        """Shapes, spacings, affines, names and byte offsets from the index (offsets must follow
        each other: the volumes lie back to back)."""
        self.shapes: list[tuple[int, int, int]] = []
        self.spacings: list[tuple[float, float, float]] = []
        self.affines: list[np.ndarray] = []
        self.names: list[str] = []
        self._offsets: list[int] = []
        end = 0
        with VOLUME_CACHE.fields_of(self.root, _INDEX_FILE):
            for v in index["volumes"]:
                shape = tuple(nonneg_int(s, "shape") for s in v["shape"])
                if len(shape) != 3 or nonneg_int(v["offset"], "offset") != end:
                    raise ValueError(f"{v['path']}: shape {shape} at offset {v['offset']}, expected 3-D at {end}")
                self.shapes.append(shape)
                self.spacings.append(tuple(float(s) for s in v["spacing"]))
                self.affines.append(np.asarray(v["affine"], np.float64).reshape(4, 4))
                self.names.append(str(v["path"]))
                self._offsets.append(end)
                end += 4 * math.prod(shape)
        self._end = end
        self.skipped = [tuple(s) for s in index.get("skipped", [])]

    def _nbytes(self, i: int) -> int:
        return 4 * math.prod(self.shapes[i])

    def _verify_at_open(self, mode: str) -> None:
        """Every volume (``"full"``, or a cache within the budget), else an even sample within the budget."""
        if mode == "full" or self._end <= _VERIFY_AT_OPEN_BYTES:
            todo = list(range(self.n))
        else:  # evenly spread volumes, as many as the budget allows (at least one)
            todo, spent = [], 0
            for i in even_sample(self.n, 64).tolist():
                if todo and spent + self._nbytes(i) > _VERIFY_AT_OPEN_BYTES:
                    continue
                todo.append(i)
                spent += self._nbytes(i)
        for i in todo:
            self._check_volume(i, at_open=True)

    def _check_volume(self, i: int, at_open: bool = False, crc: int | None = None) -> None:
        """Volume ``i`` against its checksum (its bytes read in pieces, unless its ``crc`` is given)."""
        if crc is None:
            fd, start, n, crc = self._descriptor(), self._offsets[i], self._nbytes(i), 0
            for off in range(0, n, _CHUNK_BYTES):
                buf = os.pread(fd, min(_CHUNK_BYTES, n - off), start + off)
                if not buf:
                    raise self._short_read(i)
                crc = zlib.crc32(buf, crc)
                del buf  # freed before the next piece is read: one piece in memory at a time
        if crc != int(self._crc[i]):
            raise VOLUME_CACHE.checksum_error(self.root, i, at_open, detail=f" ({self.names[i]})")
        self._verified[i] = True

    def _short_read(self, i: int) -> OSError:
        return OSError(f"short read from {self._path} in volume {i}: the cache was truncated, delete {self.root}")

    def __len__(self) -> int:
        return self.n

    def _index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n:
            raise IndexError(f"volume index must be an int in [0, {self.n}), got {i!r}")
        return int(i)

    def sources(self) -> list[list]:
        """[path, size, mtime_ns, ctime_ns, inode] of every source file, as recorded at build."""
        return [list(s) for s in self._sources]

    def read_patch(self, i: int, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """The patch of volume ``i`` at voxel ``start`` (X, Y, Z; may be negative) of ``size`` (each
        >= 1) as a new (1, *size) float32 tensor; voxels outside the volume are 0. Reads only the
        rows of the patch from disk."""
        i = self._index(i)
        start, size = _triple(start, "start"), _triple(size, "size")
        if min(size) < 1:
            raise ValueError(f"size must be three ints >= 1, got {size}")
        out = np.zeros(size, np.float32)
        lo = [max(0, s) for s in start]
        hi = [min(n, s + k) for n, s, k in zip(self.shapes[i], start, size)]
        if any(a >= b for a, b in zip(lo, hi)):
            return torch.from_numpy(out)[None]
        if not self._verified[i]:
            self._check_volume(i)
        (_, ny, nz), fd = self.shapes[i], self._descriptor()
        rows = hi[1] - lo[1]
        for x in range(lo[0], hi[0]):  # one read per X-plane: its rows y in [lo, hi), all of Z
            offset = self._offsets[i] + 4 * (x * ny + lo[1]) * nz
            buf = os.pread(fd, 4 * rows * nz, offset)
            if len(buf) != 4 * rows * nz:
                raise self._short_read(i)
            plane = np.frombuffer(buf, np.float32).reshape(rows, nz)
            out[x - start[0], lo[1] - start[1] : hi[1] - start[1], lo[2] - start[2] : hi[2] - start[2]] = plane[
                :, lo[2] : hi[2]
            ]
        return torch.from_numpy(out)[None]

    def read_volume(self, i: int) -> torch.Tensor:
        """The whole volume ``i`` as a new (1, X, Y, Z) float32 tensor (for evaluation: it is held in
        memory), checked against its checksum."""
        i = self._index(i)
        arr = np.fromfile(self._path, np.float32, count=math.prod(self.shapes[i]), offset=self._offsets[i])
        if arr.size != math.prod(self.shapes[i]):
            raise self._short_read(i)
        if not self._verified[i]:
            self._check_volume(i, crc=zlib.crc32(arr))
        return torch.from_numpy(arr.reshape(self.shapes[i]))[None]


def _triple(v, name: str) -> tuple[int, int, int]:
    try:
        t = tuple(v)
    except TypeError:
        t = ()
    if len(t) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in t):
        raise ValueError(f"{name} must be three ints (X, Y, Z), got {v!r}")
    return tuple(int(x) for x in t)


# ----------------------------------------------------------------------------- open or build


def open_or_build_volume_cache(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    cache: str | os.PathLike | None = None,
    spacing=None,
    window=None,
    percentiles=(0.5, 99.5),
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_S,
    exclude: Sequence[str | os.PathLike] = (),
    progress: bool = False,
    log=None,
) -> VolumePatchDataset:
    """The volume cache of ``paths`` (see ``scan_volume_files``) under the folder ``cache``, built
    on first use with ``read_volume(spacing=, window=, percentiles=)``; an unchanged data set and
    settings reuse it (later runs, every process of a multi-process run), a damaged one is rebuilt
    with a warning. ``cache=None``: a temporary folder, deleted when the returned dataset is
    garbage-collected in this process. ``exclude``: folders and files never read as volumes (the
    run's ``--out``; the cache folder is always excluded). Concurrent builders wait for each other;
    a waiter stops with ``CacheLockTimeout`` when the builder shows no progress for ``lock_timeout``
    seconds. ``progress``: a bar counting volumes; ``log``: called with one line when a build starts."""
    settings = check_volume_settings(spacing, window, percentiles)
    lock_timeout = check_timeout(lock_timeout)
    excluded = [exclude] if isinstance(exclude, (str, os.PathLike)) else list(exclude)
    if cache is not None:
        return _open_or_build(paths, Path(cache), settings, lock_timeout, excluded, progress, log)
    folder = Path(tempfile.mkdtemp(prefix="ld_ext-volumes-"))
    try:
        ds = _open_or_build(paths, folder, settings, lock_timeout, excluded, progress, log)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(ds, _remove_temporary, folder, os.getpid())
    return ds


def _open_or_build(paths, cache_dir: Path, settings: dict, lock_timeout: float, excluded, progress, log):
    scan = scan_volume_files(paths, exclude=[*excluded, cache_dir])
    warn_not_regular(scan.files, stacklevel=3)
    key = _cache_key(scan, settings)
    root = cache_dir / _folder_name(key, scan)
    ds = _open_intact(root, scan)
    if ds is not None:
        return ds
    return VOLUME_CACHE.build_under_lock(
        cache_dir,
        root,
        lock_timeout,
        log,
        open_intact=lambda: _open_intact(root, scan, quiet=True),
        build=lambda lock: _build(scan, settings, key, root, paths, progress, log, lock),
        open_cache=VolumePatchDataset,
    )


def _remove_temporary(folder: Path, pid: int) -> None:
    if os.getpid() == pid:  # never from a forked DataLoader worker's copy
        shutil.rmtree(folder, ignore_errors=True)


def _open_intact(root: Path, scan: VolumeScan, quiet: bool = False) -> VolumePatchDataset | None:
    """The cache in ``root`` when complete, consistent and made from the files of ``scan``; None when
    there is none or it is damaged (a warning unless ``quiet``, so that the rebuild is not silent)."""

    def made_from_the_scanned_files(ds: VolumePatchDataset) -> None:
        current = [[str(f), *scan.files.identity(i)] for i, f in enumerate(scan.files.files)]
        if ds.sources() != current:
            raise ValueError(f"it lists {len(ds.sources())} source file(s), the data holds {len(current)} (or others)")

    return VOLUME_CACHE.open_intact(root, VolumePatchDataset, made_from_the_scanned_files, quiet)


def _build(scan: VolumeScan, settings: dict, key: str, root: Path, paths, progress: bool, log, lock) -> None:
    """Read every volume (one at a time) into ``volumes.f32`` of a temporary folder renamed to ``root``."""
    t0 = time.time()
    skipped: list[tuple[str, str]] = list(scan.skipped)
    volumes: list[dict] = []
    crcs: list[int] = []
    missing: MissingReaderError | None = None
    offset = 0
    with atomic_directory(root) as tmp:
        if log is not None:
            log(f"building the volume cache {root} from {len(scan.paths)} volume(s)")
        lock.beat("building the volume cache", 0, len(scan.paths), force=True)
        with synced_file(tmp / _VOLUMES_FILE) as fh:
            for vi, vpath in enumerate(file_progress_bar(scan.paths, len(scan.paths), "caching volumes", progress)):
                try:
                    vol = read_volume(vpath, **settings)
                except Exception as exc:  # unreadable, non-finite, 2-D...: skipped and counted
                    missing = exc if isinstance(exc, MissingReaderError) else missing
                    skipped.append((str(vpath), f"{type(exc).__name__}: {exc}"))
                    continue
                crcs.append(zlib.crc32(vol.array))
                fh.write(memoryview(vol.array).cast("B"))
                volumes.append(_volume_entry(vol, scan.members[vi], offset))
                offset += vol.array.nbytes
                del vol  # one decoded volume at a time
                lock.beat("building the volume cache", vi + 1, len(scan.paths))
        _warn_skipped(skipped, len(scan.skipped), len(scan.paths))
        if not volumes:
            if missing is not None:
                raise MissingReaderError(str(missing))
            where = ", ".join(str(p) for p in as_path_list(paths))
            raise ValueError(f"no readable volumes in {where} ({len(skipped)} skipped; first: {skipped[0][0]})")
        _write_index_and_meta(tmp, scan, settings, key, paths, volumes, crcs, skipped, t0)


def _volume_entry(vol, members: list[int], offset: int) -> dict:
    return {
        "path": str(vol.path),
        "files": members,
        "shape": list(vol.shape),
        "spacing": list(vol.spacing),
        "affine": np.asarray(vol.affine).tolist(),
        "offset": offset,
    }


def _warn_skipped(skipped: list[tuple[str, str]], n_not_volumes: int, n: int) -> None:
    unreadable = skipped[n_not_volumes:]  # the .npy files that are not 3-D were warned about by the scan
    if unreadable:
        warnings.warn(
            f"skipped {len(unreadable)} volume(s) of {n} that could not be read; first: {unreadable[0][0]} "
            f"({unreadable[0][1]})",
            RuntimeWarning,
            stacklevel=4,
        )


def _write_index_and_meta(tmp: Path, scan: VolumeScan, settings, key, paths, volumes, crcs, skipped, t0) -> None:
    index = {
        "files": [[str(f), *scan.files.identity(i)] for i, f in enumerate(scan.files.files)],
        "volumes": volumes,
        "skipped": skipped,
    }
    meta = {
        "version": VOLUME_CACHE_VERSION,
        "kind": "volumes",
        "key": key,
        "n": len(volumes),
        "bytes": sum(4 * math.prod(v["shape"]) for v in volumes),
        "dtype": "float32",
        "layout": "each volume (X, Y, Z) in C order, RAS+, back to back at its index offset",
        "checksums": f"CRC-32 of each volume in {_CRC_FILE} (little-endian uint32)",
        "settings": {k: (list(v) if v is not None else None) for k, v in settings.items()},
        "paths": [str(p) for p in as_path_list(paths)],
        "n_sources": len(scan.files.files),
        "n_skipped": len(skipped),
        "build_seconds": round(time.time() - t0, 3),
    }
    VOLUME_CACHE.write_index_and_meta(tmp, index, crcs, meta)
