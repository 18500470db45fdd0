"""Atomic file writes: every file ld_ext writes goes through this module.

A file is written to a temporary name beside its destination (``.<name>.<8 random
characters>.tmp``), flushed and fsynced, given the usual permissions (``0666 & ~umask``) and
renamed onto the destination, so a reader sees the old file or the new one, never a part.
A folder (the image cache) is filled under a temporary name and renamed into place the same way
(``atomic_directory``). ``remove_stale_temp_files`` deletes what a killed writer left behind.

Writers: ``atomic_write(path, write)`` (``write`` gets a binary file object), and on top of it
``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``, ``atomic_write_png`` (an
array as an 8-bit PNG) and ``atomic_savefig`` (a matplotlib figure as PNG).

A full disk (``ENOSPC``), an exceeded quota (``EDQUOT``), a read-only file system (``EROFS``) or a
file-size limit (``EFBIG``) met by a writer is raised as ``DiskWriteError`` (an ``OSError`` whose
message names the destination), also where the writer itself turned it into another exception
(``torch.save`` reports a failed write as a ``RuntimeError``); the temp file is removed as for any
error.

``lock_folder(path)`` holds an exclusive lock on an output folder (``fcntl.flock`` on
``<folder>/.ld_ext.lock``, which records the holder's pid, host and start time): a second process
is refused at once with a ``FolderInUseError`` naming the holder; the kernel releases the lock
when the holder dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_png",
    "atomic_savefig",
    "atomic_directory",
    "remove_stale_temp_files",
    "DISK_ERRNOS",
    "DiskWriteError",
    "disk_write_error",
    "FolderInUseError",
    "FolderLock",
    "lock_folder",
    "LOCK_NAME",
]

#: errno values of a write that failed for want of room or permission on the file system
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)

# The temp names of atomic_write: "." + final name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskWriteError(OSError):
    """A write that failed for want of room (``DISK_ERRNOS``); the message names the destination."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_write_error(exc: OSError, path: str | os.PathLike) -> DiskWriteError:
    """``exc`` (one of ``DISK_ERRNOS``) as a ``DiskWriteError`` naming ``path``."""
    why = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EFBIG: "the file is larger than allowed",
    }.get(exc.errno, exc.strerror or str(exc))
    err = DiskWriteError(
        exc.errno, f"cannot write {path}: {why}; no partial file was left (free some space or write elsewhere)"
    )
    err.filename = None  # the message names it
    return err


class _WatchedFile:
    """A binary file object that remembers the OSError of a failed write or flush (a writer such as
    torch.save turns it into another exception)."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open_temp(fd: int):
    """The temp file's file object (a seam for tests that simulate a full disk)."""
    return os.fdopen(fd, "wb")


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Write through ``write(file_object)`` (binary) to a temp file beside ``path``, then rename
    it onto ``path``; the parent folders are created. On any error (or Ctrl-C) the temp file is
    removed and ``path`` is left as it was; a full disk or quota, a read-only file system is
    raised as ``DiskWriteError`` naming ``path``. Returns ``path`` as a ``Path``."""
    path = Path(path)
    try:
        return _atomic_write(path, write)
    except DiskWriteError:
        raise
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_write_error(exc, path) from exc
        raise


def _atomic_write(path: Path, write: Callable) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    watched = None
    try:
        with _open_temp(fd) as f:
            watched = _WatchedFile(f)
            try:
                write(watched)
            except Exception as exc:
                if watched.error is not None and watched.error.errno in DISK_ERRNOS and exc is not watched.error:
                    raise disk_write_error(watched.error, path) from exc
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON (NumPy scalars and arrays and paths converted), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_png(path: str | os.PathLike, image) -> Path:
    """A 2D array as an 8-bit gray PNG, atomically: booleans -> 0/255, numbers in [0, 1] -> 0..255
    (rounded, clipped)."""
    import io

    from PIL import Image

    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"image must be a 2D array, got shape {a.shape}")
    a8 = (a.astype(np.uint8) * 255) if a.dtype == bool else np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a8).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically (figures come from ``viz.new_figure``, which
    pyplot does not manage, so there is nothing to close)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a folder atomically: yields a new temp folder ``.<name>.tmp-<pid>`` beside ``path``,
    renamed to ``path`` when the block ends without an error; on an error it is deleted.
    ``path`` must not exist yet (the caller holds a lock if several processes may build it)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temp files of interrupted atomic writes in ``folder`` (not recursive).

    Only names of this module's pattern (``.<name>.<8 random characters>.tmp``) are touched, and
    with ``names`` only those whose ``<name>`` is one of them. Call it when no writer is running
    in ``folder`` (a run's start or resume). Returns the deleted paths.
    """
    folder = Path(folder)
    allowed = set(names) if names is not None else None
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not _TEMP_RE.match(p.name) or not p.is_file() or p.is_symlink():
            continue
        final = p.name[1:-13]  # strip "." and ".XXXXXXXX.tmp"
        if allowed is not None and final not in allowed:
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


# ----------------------------------------------------------------------------- output-folder lock

LOCK_NAME = ".ld_ext.lock"


class FolderInUseError(ValueError):
    """Another live process holds the lock of an output folder."""


# the folders this process holds, by (device, inode) -> how many FolderLocks share the lock
_HELD: dict[tuple[int, int], int] = {}


class FolderLock:
    """The lock ``lock_folder`` took; ``release()`` (or the end of a ``with`` block) gives it back,
    removes the lock file and, when ``lock_folder`` created the folder and nothing else was put
    in it, the folder. A nested lock of a folder this process already holds only counts."""

    def __init__(self, folder: Path, fd: int | None, created: bool, key: tuple[int, int] | None = None) -> None:
        self.folder, self._fd, self._created, self._key = folder, fd, created, key
        if key is not None:
            _HELD[key] = _HELD.get(key, 0) + 1

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            _HELD[key] -= 1
            if _HELD[key] == 0:
                del _HELD[key]
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)  # still ours: removed while we hold it (see lock_folder)
        except OSError:
            pass
        os.close(fd)  # releases the flock
        if self._created:
            try:
                self.folder.rmdir()  # only if empty: a run that failed before writing anything
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"


def lock_folder(folder: str | os.PathLike, name: str = "--out") -> FolderLock:
    """Take the exclusive lock of ``folder`` (created with its parents if missing) without waiting.

    Raises ``FolderInUseError`` (a ``ValueError``; ``name`` is the option named in its message)
    when a live process holds it. The lock is a ``fcntl.flock`` on ``folder/.ld_ext.lock``, held
    until ``release()`` or the process ends, however it ends (a SIGKILL included); this process
    may lock a folder it holds again (``ld-ext demo`` holds its --out, and its pre-training locks
    the same folder). Where flock is not available (not POSIX) no lock is taken."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        return FolderLock(folder, None, False, key)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return FolderLock(folder, None, created)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderInUseError(
                f"{name}: {folder} is in use by another ld-ext run ({holder}); "
                f"wait for it to end or choose another {name}"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "argv": sys.argv[:20]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return FolderLock(folder, fd, created, key)
