"""The one memory probe of the benchmarks: peak bytes allocated during a call.

* CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the call
  (``cuda_peak_memory`` also gives the absolute peak);
* CPU: the running total of the ATen allocation events recorded by
  ``torch.profiler.profile(profile_memory=True)`` (every tensor allocation and free on the CPU
  allocator, in time order);
* ``peak_rss_increase``: the peak RSS increase of a call in this process (Linux: VmHWM after a
  clear_refs reset), for a subprocess that also sees allocations made outside ATen;
  ``child_peak_rss``: the peak RSS of a whole command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import torch

from .timing import sync

__all__ = [
    "CPU_MEM_METHOD",
    "CUDA_MEM_METHOD",
    "measure_peak_memory",
    "cuda_peak_memory",
    "peak_rss_increase",
    "child_peak_rss",
]

CPU_MEM_METHOD = "profiler: running total of ATen CPU allocation events (torch.profiler profile_memory=True)"
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated above the memory held before the call"


class _QuietStderr:
    """Silence file descriptor 2 (kineto prints a line on every profiler start/stop)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False


def _profiler_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _QuietStderr():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    try:
        out = fn()
        del out
    finally:
        with _QuietStderr():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        if not str(e.device_type()).upper().endswith("CPU"):
            continue
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def cuda_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(peak bytes above what was held before ``fn()``, absolute peak bytes) on a CUDA device."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base), int(peak)


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated during ``fn()`` above what was held before it (outputs included).

    Returns (bytes or None when the method is unavailable, the method's description).
    """
    if device.type == "cuda":
        return cuda_peak_memory(fn, device)[0], CUDA_MEM_METHOD
    try:
        return int(_profiler_peak(fn)), CPU_MEM_METHOD
    except Exception as exc:  # pragma: no cover - profiler API differences across torch versions
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def _proc_status() -> dict:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                vals[key] = int(val.split()[0]) * 1024
    return vals


def peak_rss_increase(fn: Callable[[], object]) -> int:
    """Peak RSS of this process during ``fn()`` minus its RSS before (Linux >= 4.0 only)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark
    base = _proc_status()["VmRSS"]
    out = fn()
    peak = _proc_status()["VmHWM"]
    del out
    return peak - base


def child_peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, int, str]:
    """Run ``cmd``; (return code, its peak RSS in bytes, its stderr). Unix only (``os.wait4``).

    Linux carries the forking process's peak RSS into the child's across exec, so the figure is
    at least the caller's own peak: measure from a small driver process.
    """
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return p.returncode, usage.ru_maxrss * scale, err
