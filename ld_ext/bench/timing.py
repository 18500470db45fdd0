"""The one timer of the benchmarks: interleaved samples, CUDA events on a GPU, and the device's
copy bandwidth and matmul rate (the floor of every figure).

``measure_group`` times several implementations of the same thing round-robin (so that load
changes on a shared machine hit all of them alike); ``time_call`` is the same for one callable;
``time_once`` is one synchronised wall-clock call (a compile, a first call).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["Timing", "measure_group", "time_call", "time_once", "copy_bandwidth", "matmul_rate", "Machine", "sync"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    number: int
    samples_ms: list = field(default_factory=list)


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _timing(samples_ms: list, number: int) -> Timing:
    q1, q3 = _quartiles(samples_ms)
    return Timing(
        median_ms=statistics.median(samples_ms),
        q1_ms=q1,
        q3_ms=q3,
        min_ms=min(samples_ms),
        max_ms=max(samples_ms),
        repeats=len(samples_ms),
        number=number,
        samples_ms=list(samples_ms),
    )


def measure_group(
    runs: dict,
    n_sets: int,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 7,
    target_sample_s: float = 0.02,
    max_number: int = 200,
    slow_call_s: float = 0.5,
) -> dict:
    """Time several implementations of the same thing, interleaved.

    ``runs[name](i)`` performs one call on input set ``i``. Each implementation gets ``warmup``
    calls (fewer when a call takes longer than ``slow_call_s``), then a timed call that fixes how
    many calls one sample holds (so that a sample lasts about ``target_sample_s``); then
    ``repeats`` rounds take one sample of every implementation in turn. Calls rotate over the
    ``n_sets`` input sets. Returns name -> Timing (per-call times).
    """
    numbers, counters = {}, {}
    for name, fn in runs.items():
        # warm-up calls, the last of which is timed to size the samples; a call slower than
        # slow_call_s needs no further warm-up (its fixed costs are already negligible)
        calls = 0
        while True:
            dt = time_once(lambda: fn(calls % n_sets), device)
            calls += 1
            if calls > warmup or dt > slow_call_s:
                break
        numbers[name] = max(1, min(max_number, int(target_sample_s / max(dt, 1e-9))))
        counters[name] = calls
    samples = {name: [] for name in runs}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in runs.items():
                number, k = numbers[name], counters[name]
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for j in range(number):
                        fn((k + j) % n_sets)
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    for j in range(number):
                        fn((k + j) % n_sets)
                    ms = (time.perf_counter() - t0) * 1e3
                counters[name] = k + number
                samples[name].append(ms / number)
    finally:
        if was_enabled:
            gc.enable()
    return {name: _timing(samples[name], numbers[name]) for name in runs}


def time_call(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 7, slow_call_s: float = 0.5
) -> Timing:
    """Per-call time of ``fn()``: ``measure_group`` of one implementation, one call per sample."""
    return measure_group(
        {"fn": lambda i: fn()},
        1,
        device,
        warmup=warmup,
        repeats=repeats,
        target_sample_s=0.0,
        max_number=1,
        slow_call_s=slow_call_s,
    )["fn"]


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn()``, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 27, repeats: int = 7) -> float:
    """Measured copy bandwidth in bytes/s: ``dst.copy_(src)`` moves 2*nbytes (read + write)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure_group({"copy": lambda i: dst.copy_(src)}, 1, device, warmup=2, repeats=repeats, target_sample_s=0.05)
    return 2 * nbytes / (t["copy"].median_ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 7) -> float:
    """Measured matmul rate in FLOP/s of an n x n x n product (2 n^3 FLOPs)."""
    g = torch.Generator(device=device)
    g.manual_seed(1234)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = measure_group(
        {"mm": lambda i: torch.mm(a, b, out=out)}, 1, device, warmup=2, repeats=repeats, target_sample_s=0.05
    )
    return 2 * n**3 / (t["mm"].median_ms * 1e-3)


class Machine:
    """Device facts measured once per run: copy bandwidth and matmul rate per dtype."""

    def __init__(self, device: torch.device, tiny: bool = False):
        self.device = device
        self.tiny = tiny
        self._bw = None
        self._rate = {}

    @property
    def bandwidth(self) -> float:
        if self._bw is None:
            self._bw = copy_bandwidth(
                self.device, nbytes=(1 << 20) if self.tiny else (1 << 27 if self.device.type == "cpu" else 1 << 30)
            )
        return self._bw

    def rate(self, dtype: torch.dtype) -> float:
        if dtype not in self._rate:
            n = 128 if self.tiny else (1024 if self.device.type == "cpu" else 4096)
            self._rate[dtype] = matmul_rate(self.device, dtype, n=n)
        return self._rate[dtype]
