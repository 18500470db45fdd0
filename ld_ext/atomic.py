"""Atomic file writes: every file ld_ext writes goes through this module.

A file is written to a temporary name beside its destination (``.<name>.<8 random
characters>.tmp``), flushed and fsynced, given the usual permissions (``0666 & ~umask``) and
renamed onto the destination, so a reader sees the old file or the new one, never a part.
A folder (the image cache) is filled under a temporary name and renamed into place the same way
(``atomic_directory``). ``remove_stale_temp_files`` deletes what a killed writer left behind.

Writers: ``atomic_write(path, write)`` (``write`` gets a binary file object), and on top of it
``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``, ``atomic_write_png`` (an
array as an 8-bit PNG) and ``atomic_savefig`` (a matplotlib figure as PNG).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
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
]

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


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Write through ``write(file_object)`` (binary) to a temp file beside ``path``, then rename
    it onto ``path``; the parent folders are created. On any error (or Ctrl-C) the temp file is
    removed and ``path`` is left as it was. Returns ``path`` as a ``Path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
