"""The lock that lets one process build an image cache while others wait for it.

An exclusive advisory lock (``fcntl.flock``) on a lock file beside the cache. The holder writes
who it is into the file (pid, host, start time, what it is doing and how far it got) and keeps
that up to date while it builds; a waiting process says once for whom it waits, and stops with
``CacheLockTimeout`` (one line naming the lock file and the holder) when the holder has shown no
progress for ``timeout`` seconds (a frozen or stuck builder), instead of waiting forever. A slow
builder that makes progress is waited for as long as it needs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

__all__ = ["CacheLock", "CacheLockTimeout", "DEFAULT_LOCK_TIMEOUT_S"]

#: how long a process waits for a cache builder that shows no progress (seconds)
DEFAULT_LOCK_TIMEOUT_S = 600.0
_POLL_S = 0.25
_BEAT_S = 1.0

logger = logging.getLogger("ld_ext.data")


class CacheLockTimeout(ValueError):
    """The process holding an image cache's build lock showed no progress for the timeout."""


def check_timeout(timeout) -> float:
    """``timeout`` as a positive float (None: ``DEFAULT_LOCK_TIMEOUT_S``); ValueError otherwise."""
    if timeout is None:
        return DEFAULT_LOCK_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"lock_timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class CacheLock:
    """``with CacheLock(path, timeout, log) as lock: ... lock.beat("building", done, total)``."""

    def __init__(self, path: Path, timeout: float | None = None, log=None) -> None:
        self.path = Path(path)
        self.timeout = check_timeout(timeout)
        self._log = log if log is not None else logger.info
        self._fd: int | None = None
        self._info: dict = {}
        self._last_beat = 0.0

    def __enter__(self) -> "CacheLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return self
        self._fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(fcntl)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        self.beat("checking the cache", force=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def beat(self, doing: str, done: int | None = None, total: int | None = None, force: bool = False) -> None:
        """Record what the holder is doing (at most once a second unless ``force``): the waiters'
        sign of progress."""
        now = time.monotonic()
        if self._fd is None or (not force and now - self._last_beat < _BEAT_S):
            return
        self._last_beat = now
        info = dict(self._info, doing=doing, updated=_now())
        if total is not None:
            info.update(done=done, total=total)
        data = json.dumps(info).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:  # a full disk must not stop the build; the waiters then see no progress
            pass

    def _try_lock(self, fcntl) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _acquire(self, fcntl) -> None:
        if self._try_lock(fcntl):
            return
        seen = self._holder_text()
        self._log(f"waiting for the image cache lock {self.path}, held by {describe_holder(seen)}")
        last_change = time.monotonic()
        while True:
            time.sleep(_POLL_S)
            if self._try_lock(fcntl):
                return
            text = self._holder_text()
            if text and text != seen:
                seen, last_change = text, time.monotonic()
            if time.monotonic() - last_change > self.timeout:
                raise CacheLockTimeout(
                    f"image cache lock {self.path}: held by {describe_holder(seen)}, with no progress for "
                    f"{self.timeout:g} s; that process may be frozen or stuck: stop it, then run again"
                )

    def _holder_text(self) -> str:
        try:
            return os.pread(self._fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            return ""


def describe_holder(text: str) -> str:
    """The holder recorded in a lock file, in words ("an unknown process" when it wrote nothing)."""
    try:
        info = json.loads(text)
        who = f"pid {int(info['pid'])} on host {info['host']} since {info['since']}"
    except (ValueError, TypeError, KeyError):
        return "an unknown process (it recorded nothing in the lock file)"
    doing = info.get("doing")
    if isinstance(doing, str):
        who += f" ({doing}"
        if isinstance(info.get("done"), int) and isinstance(info.get("total"), int):
            who += f", {info['done']}/{info['total']} files"
        who += f", last update {info.get('updated')})"
    return who


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
