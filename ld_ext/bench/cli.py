"""Benchmarks: the fused ops against plain PyTorch (time, memory, scaling), CPU and CUDA.

Entry points: ``ld-ext bench`` and ``python benchmarks/run.py`` (same arguments). Sections:

* ``headline``: fused forward+backward of
  ``RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)`` at
  N=16, D=32, K=16, 128x128 (total = 10*L_rd + 0.1*L_ent) against the efficient eager
  formulation (``reference.region_discrimination_loss``) and ``torch.compile`` of it, with the
  floor (bytes / copy bandwidth, FLOPs / matmul rate, both measured in the same run) and the
  peak extra memory of the fused step.
* ``ops``: every fused op, forward and forward+backward, at the base configuration against
  ``published`` (the published code's formulation: the broadcast product e[:, None] * a[:, :, None]
  for region features, exp-then-normalise for the criteria), ``eager`` (the efficient plain-PyTorch
  formulation of ``ld_ext.reference``) and ``compile`` (``torch.compile`` of ``eager``).
* ``sweeps``: the region loss over P (pixels), K, D, N and dtype.
* ``e2e``: training steps per second of the LD network with the fused vs the plain-PyTorch losses.

Method: every implementation gets warm-up calls, then samples are taken round-robin over the
implementations (so load changes on a shared machine hit all of them alike); each sample times
``number`` consecutive calls over rotating input sets (fresh random data, several sets, so that
caches do not flatter), and the median of the samples is reported with its quartiles. CUDA
samples are timed with CUDA events. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
above the memory held before the call; on CPU the running total of the ATen allocation events
recorded by ``torch.profiler.profile(profile_memory=True)`` (every tensor allocation and free on
the CPU allocator, in time order); the headline adds the peak RSS of a subprocess (glibc told to
mmap every block >= 64 KiB, so that freed memory leaves the RSS and the high-water mark tracks
allocations made outside ATen too).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from . import reference as ref

__all__ = [
    "Case",
    "OpSpec",
    "OPS",
    "IMPLS",
    "MODES",
    "CSV_COLUMNS",
    "measure_group",
    "measure_peak_memory",
    "copy_bandwidth",
    "matmul_rate",
    "run_case",
    "write_csv",
    "markdown_table",
    "add_arguments",
    "run",
    "main",
]

IMPLS = ("fused", "eager", "compile", "published")
MODES = ("fwd", "fwd+bwd")
SECTIONS = ("headline", "ops", "sweeps", "e2e")
SWEEPS = ("P", "K", "D", "N", "dtype")

# The headline configuration (core issue) and the base of every sweep.
BASE = dict(N=16, D=32, K=16, H=128, W=128)
RD_WEIGHT, ENT_WEIGHT = 10.0, 0.1  # docs/method.md section 6: 10*L_rd + 0.1*L_ent
HEADLINE_KW = dict(normalize=True, assignment="sigmoid", return_entropy=True)

FULL_SWEEPS = {
    "P": [32, 64, 128, 256, 448, 512],  # image side; P = side^2
    "K": [4, 8, 16, 32, 64],
    "D": [8, 16, 32, 64, 128],
    "N": [2, 4, 8, 16, 32],
}
QUICK_SWEEPS = {
    "P": [32, 64, 128, 256],
    "K": [4, 16, 64],
    "D": [8, 32, 128],
    "N": [2, 8, 16],
}
TINY_SWEEPS = {"P": [8, 12], "K": [2, 3], "D": [4, 5], "N": [2, 3]}
DTYPES = {"cpu": ["float32", "float64"], "cuda": ["float32", "float16", "bfloat16", "float64"]}

CSV_COLUMNS = [
    "section", "sweep", "op", "mode", "impl", "device", "dtype", "N", "D", "K", "H", "W", "P", "M",
    "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats", "calls_per_sample", "input_sets",
    "speedup_of_fused", "bytes", "flops", "floor_ms", "floor_bound", "x_floor", "achieved_GBps",
    "pct_copy_bw", "peak_mem_bytes", "extra_mem_pct", "mem_method", "compile", "status",
]


# ============================================================================ cases and ops


@dataclass(frozen=True)
class Case:
    """One problem size. For ``patch_discrimination`` only M (rows) and D are used."""

    N: int = 16
    D: int = 32
    K: int = 16
    H: int = 128
    W: int = 128
    M: int = 1024  # 4*B*G*G rows of the PD criterion, B=4, G=8 (docs/method.md section 5)
    dtype: str = "float32"

    @property
    def P(self) -> int:
        return self.H * self.W

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, c: Case, device, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(c.torch_dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _rd_published(feats: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """L_rd as the published code writes it: exp of the logits, normalise, -log of the diagonal."""
    c = feats.mean(dim=0)
    c = c / (torch.norm(c, p=2, dim=1, keepdim=True) + ref.NORM_EPS)
    logits = torch.exp(torch.einsum("nkd,jd->nkj", feats, c) / temperature)
    prob = logits / logits.sum(dim=2, keepdim=True)
    return -torch.log(torch.diagonal(prob, dim1=1, dim2=2)).mean()


@dataclass
class OpSpec:
    """How to benchmark one op: inputs, implementations, backward, floor and memory estimate."""

    name: str
    title: str
    make_inputs: Callable  # (case, device, generator) -> tuple of tensors (all differentiable)
    impls: dict  # impl name -> factory() -> callable(*inputs) -> output(s)
    scalar: Callable | None  # outputs -> scalar loss for backward; None: use a random cotangent
    bytes: Callable  # (case, mode) -> minimum bytes moved
    flops: Callable  # (case, mode) -> FLOPs (the matmul-like products)
    big_bytes: Callable  # (case, impl, mode) -> rough peak bytes of the impl (to skip what cannot fit)
    config: str = ""
    sweepable: bool = False


def _fused():
    import ld_ext  # imported late: the engine is usable (and importable) while kernels are rebuilt

    return ld_ext


def _loss_scalar(out):
    rd, ent = out
    return RD_WEIGHT * rd + ENT_WEIGHT * ent


def _rl_inputs(c: Case, device, g):
    e = _randn((c.N, c.D, c.H, c.W), c, device, g)
    s = _randn((c.N, c.K, c.H, c.W), c, device, g)
    return e, s


def _rl_bytes(c: Case, mode: str) -> int:
    inp = (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize
    # forward reads both inputs once; the backward reads them again and writes their gradients
    return inp if mode == "fwd" else 3 * inp


def _rl_flops(c: Case, mode: str) -> int:
    f = 2 * c.N * c.K * c.D * c.P  # r~ = a e^T
    return f if mode == "fwd" else 3 * f  # + grad_e = a^T g, grad_a = g e


def _rl_big(c: Case, impl: str, mode: str) -> int:
    inp = (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize
    prod = c.N * c.K * c.D * c.P * c.itemsize
    if impl == "published":
        return prod + 2 * inp if mode == "fwd" else 3 * prod + 4 * inp
    return 3 * inp if mode == "fwd" else 8 * inp


def _region_loss_spec() -> OpSpec:
    kw = HEADLINE_KW

    def fused():
        return _fused().RegionDiscriminationLoss(temperature=0.2, **kw)

    def eager():
        return lambda e, s: ref.region_discrimination_loss(e, s, temperature=0.2, **kw)

    def published():
        return lambda e, s: ref.region_discrimination_loss_broadcast(e, s, temperature=0.2, **kw)

    return OpSpec(
        name="region_loss",
        title="RegionDiscriminationLoss (10*L_rd + 0.1*L_ent)",
        make_inputs=_rl_inputs,
        impls={"fused": fused, "eager": eager, "compile": eager, "published": published},
        scalar=_loss_scalar,
        bytes=_rl_bytes,
        flops=_rl_flops,
        big_bytes=_rl_big,
        config='normalize=True, assignment="sigmoid", return_entropy=True, tau=0.2',
        sweepable=True,
    )


def _region_features_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        e = _randn((c.N, c.D, c.H, c.W), c, device, g)
        a = torch.softmax(_randn((c.N, c.K, c.H, c.W), c, device, g).float(), dim=1).to(c.torch_dtype)
        return e, a

    return OpSpec(
        name="region_features",
        title="region_features",
        make_inputs=inputs,
        impls={
            "fused": lambda: (lambda e, a: _fused().region_features(e, a)),
            "eager": lambda: (lambda e, a: ref.region_features_bmm(e, a)),
            "compile": lambda: (lambda e, a: ref.region_features_bmm(e, a)),
            "published": lambda: (lambda e, a: ref.region_features_broadcast(e, a)),
        },
        scalar=None,
        bytes=_rl_bytes,
        flops=_rl_flops,
        big_bytes=_rl_big,
        config='normalize=False, assignment="probs"',
    )


def _region_discrimination_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        return (_unit(_randn((c.N, c.K, c.D), c, device, g)),)

    def nbytes(c: Case, mode: str) -> int:
        b = c.N * c.K * c.D * c.itemsize
        return b if mode == "fwd" else 3 * b

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.N * c.K * c.K * c.D
        return f if mode == "fwd" else 3 * f

    return OpSpec(
        name="region_discrimination",
        title="region_discrimination",
        make_inputs=inputs,
        impls={
            "fused": lambda: (lambda r: _fused().region_discrimination(r, 0.2)),
            "eager": lambda: (lambda r: ref.region_discrimination(r, 0.2)),
            "compile": lambda: (lambda r: ref.region_discrimination(r, 0.2)),
            "published": lambda: (lambda r: _rd_published(r, 0.2)),
        },
        scalar=lambda out: out,
        bytes=nbytes,
        flops=flops,
        big_bytes=lambda c, impl, mode: 64 * c.N * c.K * max(c.K, c.D) * c.itemsize,
        config="tau=0.2, (N, K, D) unit rows",
    )


def _pixel_cluster_similarity_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        e = _randn((c.N, c.D, c.H, c.W), c, device, g)
        proto = _unit(_randn((c.N, c.K, c.D), c, device, g))
        return e, proto

    def nbytes(c: Case, mode: str) -> int:
        e, o, p = c.N * c.D * c.P, c.N * c.K * c.P, c.N * c.K * c.D
        fwd = (e + p + o) * c.itemsize
        # backward: read grad_out and e again (S recomputed or re-read: counted once), write grad_e
        return fwd if mode == "fwd" else fwd + (o + e + e + p) * c.itemsize

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.N * c.K * c.D * c.P
        return f if mode == "fwd" else 3 * f

    def big(c: Case, impl: str, mode: str) -> int:
        return 8 * (c.N * c.D * c.P + c.N * c.K * c.P) * c.itemsize

    return OpSpec(
        name="pixel_cluster_similarity",
        title="pixel_cluster_similarity",
        make_inputs=inputs,
        impls={
            "fused": lambda: (lambda e, p: _fused().pixel_cluster_similarity(e, p, 0.2, normalize=True)),
            "eager": lambda: (lambda e, p: ref.pixel_cluster_similarity(e, p, 0.2, normalize=True)),
            "compile": lambda: (lambda e, p: ref.pixel_cluster_similarity(e, p, 0.2, normalize=True)),
        },
        scalar=None,
        bytes=nbytes,
        flops=flops,
        big_bytes=big,
        config="per-image prototypes (N, K, D), normalize=True, tau=0.2",
    )


def _patch_discrimination_spec() -> OpSpec:
    def inputs(c: Case, device, g):
        return (_unit(_randn((c.M, c.D), c, device, g)),)

    def nbytes(c: Case, mode: str) -> int:
        b = c.M * c.D * c.itemsize
        return b if mode == "fwd" else 3 * b

    def flops(c: Case, mode: str) -> int:
        f = 2 * c.M * c.M * c.D
        return f if mode == "fwd" else 2 * f

    return OpSpec(
        name="patch_discrimination",
        title="patch_discrimination",
        make_inputs=inputs,
        impls={
            "fused": lambda: _fused().PatchDiscriminationLoss(temperature=0.1),
            "eager": lambda: (lambda x: ref.patch_discrimination(x, 0.1)),
            "compile": lambda: (lambda x: ref.patch_discrimination(x, 0.1)),
            "published": lambda: (lambda x: ref.patch_discrimination_published(x, 0.1)),
        },
        scalar=lambda out: out,
        bytes=nbytes,
        flops=flops,
        big_bytes=lambda c, impl, mode: 12 * c.M * c.M * c.itemsize,
        config="T=0.1, M=4*B*G*G rows (B=4, G=8)",
    )


OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        _region_loss_spec(),
        _region_features_spec(),
        _region_discrimination_spec(),
        _pixel_cluster_similarity_spec(),
        _patch_discrimination_spec(),
    )
}


# ============================================================================ measurement


def _sync(device: torch.device) -> None:
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
    ``repeats`` rounds take one sample of every implementation in turn. Calls rotate over the ``n_sets`` input sets. Returns name -> Timing (per-call times).
    """
    numbers, counters = {}, {}
    for name, fn in runs.items():
        # warm-up calls, the last of which is timed to size the samples; a call slower than
        # slow_call_s needs no further warm-up (its fixed costs are already negligible)
        calls = 0
        while True:
            _sync(device)
            t0 = time.perf_counter()
            fn(calls % n_sets)
            _sync(device)
            dt = time.perf_counter() - t0
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


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated during ``fn()`` above what was held before it (outputs included).

    Returns (bytes or None when the method is unavailable, the method's description).
    """
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), CUDA_MEM_METHOD
    try:
        return int(_profiler_peak(fn)), CPU_MEM_METHOD
    except Exception as exc:  # pragma: no cover - profiler API differences across torch versions
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 27, repeats: int = 7) -> float:
    """Measured copy bandwidth in bytes/s: ``dst.copy_(src)`` moves 2*nbytes (read + write)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure_group({"copy": lambda i: dst.copy_(src)}, 1, device, warmup=2, repeats=repeats, target_sample_s=0.05)
    return 2 * nbytes / (t["copy"].median_ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 7) -> float:
    """Measured matmul rate in FLOP/s of an n x n x n product (2 n^3 FLOPs)."""
    g = _gen(device, 1234)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = measure_group({"mm": lambda i: torch.mm(a, b, out=out)}, 1, device, warmup=2, repeats=repeats, target_sample_s=0.05)
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
            self._bw = copy_bandwidth(self.device, nbytes=(1 << 20) if self.tiny else (1 << 27 if self.device.type == "cpu" else 1 << 30))
        return self._bw

    def rate(self, dtype: torch.dtype) -> float:
        if dtype not in self._rate:
            n = 128 if self.tiny else (1024 if self.device.type == "cpu" else 4096)
            self._rate[dtype] = matmul_rate(self.device, dtype, n=n)
        return self._rate[dtype]


# ============================================================================ one case


@dataclass
class Settings:
    device: torch.device
    warmup: int = 2
    repeats: int = 7
    sets: int = 3
    seed: int = 0
    impls: tuple = IMPLS
    max_bytes: int = 8 << 30
    max_call_s: float = math.inf
    memory: bool = True
    compile_dynamic: bool | None = False
    compile_backend: str = "inductor"
    target_sample_s: float = 0.02
    verbose: bool = True


def _prepare(spec: OpSpec, impl: str, settings: Settings):
    fn = spec.impls[impl]()
    if impl == "compile":
        fn = torch.compile(fn, dynamic=settings.compile_dynamic, backend=settings.compile_backend)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(settings.device)
    return fn


def _make_runner(spec: OpSpec, fn, sets, cotangents, mode: str):
    if mode == "fwd":

        def run_fwd(i):
            with torch.no_grad():
                return fn(*sets[i])

        return run_fwd

    def run_fwd_bwd(i):
        inputs = sets[i]
        out = fn(*inputs)
        if spec.scalar is not None:
            return torch.autograd.grad(spec.scalar(out), inputs)
        return torch.autograd.grad(out, inputs, grad_outputs=cotangents[i])

    return run_fwd_bwd


def _log(settings: Settings, msg: str) -> None:
    if settings.verbose:
        print(msg, file=sys.stderr, flush=True)


def run_case(
    spec: OpSpec,
    case: Case,
    settings: Settings,
    machine: Machine | None,
    *,
    modes: Sequence[str] = MODES,
    section: str = "ops",
    sweep: str = "",
) -> list[dict]:
    """Benchmark every implementation of ``spec`` at ``case`` in the given modes; one row each."""
    device = settings.device
    impls = [i for i in settings.impls if i in spec.impls]
    g = _gen(device, settings.seed)
    sets = []
    for _ in range(settings.sets):
        sets.append(tuple(t.requires_grad_() for t in spec.make_inputs(case, device, g)))
    cotangents = None
    if spec.scalar is None:  # a random cotangent of the output's shape, one per set
        with torch.no_grad():
            out = spec.impls["eager"]()(*sets[0])
        cotangents = [torch.randn(out.shape, generator=g, device=device).to(out.dtype) for _ in sets]
    in_bytes = sum(t.numel() * t.element_size() for t in sets[0])
    rows = []
    for mode in modes:
        runs, status = {}, {}
        for impl in impls:
            est = spec.big_bytes(case, impl, mode)
            if est > settings.max_bytes:
                status[impl] = f"skipped: needs ~{est / 2**30:.1f} GiB > --max-mem-gb {settings.max_bytes / 2**30:.1f}"
                continue
            try:
                fn = _prepare(spec, impl, settings)
                runner = _make_runner(spec, fn, sets, cotangents, mode)
                t0 = time.perf_counter()
                runner(0)  # first call: compiles (torch.compile), allocates lazily, checks it runs
                _sync(device)
                dt = time.perf_counter() - t0
                if impl == "compile":
                    _log(settings, f"    compile {spec.name} {mode}: {dt:.1f} s (not timed)")
                    t0 = time.perf_counter()
                    runner(1 % len(sets))
                    _sync(device)
                    dt = time.perf_counter() - t0
                if dt > settings.max_call_s:
                    status[impl] = f"skipped: one call took {dt:.1f} s > --max-call-s {settings.max_call_s:g}"
                    _log(settings, f"    {spec.name} {mode} {impl}: {status[impl]}")
                    continue
                runs[impl] = runner
                status[impl] = "ok"
            except Exception as exc:  # an impl that cannot run this case is reported, not fatal
                status[impl] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                _log(settings, f"    {spec.name} {mode} {impl}: {status[impl]}")
        timings = {}
        if runs:
            timings = measure_group(
                runs, len(sets), device, warmup=settings.warmup, repeats=settings.repeats,
                target_sample_s=settings.target_sample_s,
            )
        mems = {}
        if settings.memory:
            for impl, runner in runs.items():
                mems[impl] = measure_peak_memory(lambda: runner(0), device)
        nbytes, flops = spec.bytes(case, mode), spec.flops(case, mode)
        floor_ms = bound = None
        if machine is not None:
            t_mem = nbytes / machine.bandwidth * 1e3
            t_flop = flops / machine.rate(case.torch_dtype) * 1e3
            floor_ms, bound = (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")
        fused_ms = timings["fused"].median_ms if "fused" in timings else None
        out_bytes = in_bytes if mode == "fwd+bwd" else 0
        for impl in impls:
            row = {c: "" for c in CSV_COLUMNS}
            row.update(
                section=section, sweep=sweep, op=spec.name, mode=mode, impl=impl, device=device.type,
                dtype=case.dtype, N=case.N, D=case.D, K=case.K, H=case.H, W=case.W, P=case.P, M=case.M,
                bytes=nbytes, flops=flops, input_sets=len(sets), status=status[impl],
                compile=("dynamic" if settings.compile_dynamic else "static") if impl == "compile" else "",
            )
            if spec.name == "patch_discrimination":
                for k in ("N", "K", "H", "W", "P"):
                    row[k] = ""
            else:
                row["M"] = ""
            if impl in timings:
                t = timings[impl]
                row.update(
                    median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, min_ms=t.min_ms, max_ms=t.max_ms,
                    repeats=t.repeats, calls_per_sample=t.number,
                    achieved_GBps=nbytes / (t.median_ms * 1e-3) / 1e9,
                )
                if fused_ms is not None:
                    row["speedup_of_fused"] = t.median_ms / fused_ms
                if floor_ms is not None:
                    row.update(
                        floor_ms=floor_ms, floor_bound=bound, x_floor=t.median_ms / floor_ms,
                        pct_copy_bw=100.0 * nbytes / (t.median_ms * 1e-3) / machine.bandwidth,
                    )
            if impl in mems:
                peak, method = mems[impl]
                row["mem_method"] = method
                if peak is not None:
                    row["peak_mem_bytes"] = peak
                    row["extra_mem_pct"] = 100.0 * (peak - out_bytes) / in_bytes
            rows.append(row)
            if impl in timings:
                _log(
                    settings,
                    f"    {spec.name:24s} {mode:7s} {impl:9s} {timings[impl].median_ms:10.3f} ms"
                    + (f"  (fused x{row['speedup_of_fused']:.2f})" if row["speedup_of_fused"] != "" else ""),
                )
    return rows


# ============================================================================ headline


def _rss_probe_main(argv: list[str]) -> int:
    """Subprocess body: peak RSS increase of one fwd+bwd call (after warm-up). Prints JSON."""
    impl, n, d, k, h, w, dtype, seed = argv
    case = Case(N=int(n), D=int(d), K=int(k), H=int(h), W=int(w), dtype=dtype)
    spec = OPS["region_loss"]
    settings = Settings(device=torch.device("cpu"), seed=int(seed), verbose=False)
    g = _gen(settings.device, settings.seed)
    inputs = tuple(t.requires_grad_() for t in spec.make_inputs(case, settings.device, g))
    fn = _prepare(spec, impl, settings)
    runner = _make_runner(spec, fn, [inputs], None, "fwd+bwd")
    for _ in range(2):
        runner(0)
    gc.collect()

    def status():
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    vals[key] = int(val.split()[0]) * 1024
        return vals

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark (Linux >= 4.0)
    base = status()["VmRSS"]
    out = runner(0)
    peak = status()["VmHWM"]
    del out
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    print(json.dumps({"impl": impl, "peak_rss_increase": peak - base, "input_bytes": in_bytes}))
    return 0


RSS_METHOD = (
    "peak RSS (VmHWM after a clear_refs reset) of a subprocess running one fwd+bwd after warm-up, "
    "MALLOC_MMAP_THRESHOLD_=65536"
)


def rss_probe(impl: str, case: Case, seed: int) -> dict | None:
    """Run ``_rss_probe_main`` in a fresh interpreter; None where it cannot run (non-Linux, error)."""
    if not sys.platform.startswith("linux"):
        return None
    import ld_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(ld_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    code = "import sys; from ld_ext.bench import _rss_probe_main; sys.exit(_rss_probe_main(sys.argv[1:]))"
    args = [impl, case.N, case.D, case.K, case.H, case.W, case.dtype, seed]
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "unreadable probe output"}


def run_headline(settings: Settings, machine: Machine, case: Case, rss: bool = True) -> tuple[list[dict], dict]:
    """The core issue's figure: fused vs eager vs compile, fwd+bwd, with floor and memory."""
    hs = replace(
        settings, impls=tuple(i for i in ("fused", "eager", "compile") if i in settings.impls), compile_dynamic=False,
        max_call_s=math.inf,
    )
    torch._dynamo.reset()
    rows = run_case(OPS["region_loss"], case, hs, machine, modes=("fwd+bwd",), section="headline")
    extra = {"bandwidth": machine.bandwidth, "rate": machine.rate(case.torch_dtype), "rss": {}}
    if rss and settings.device.type == "cpu" and settings.memory:
        for impl in ("fused", "eager"):
            if impl in hs.impls:
                extra["rss"][impl] = rss_probe(impl, case, settings.seed)
    return rows, extra


# ============================================================================ end to end


def _e2e_step_fallback(model, loss_impl: str, batch_size: int, size: int, device, seed: int):
    """A stage-2 LD training step built here (used only when ld_ext.train.make_training_step is absent).

    5B images (4B views + B mixups, docs/method.md section 6) go through the network; the loss is
    10*L_rd + 0.1*L_ent on the 4B views plus the PD criterion on their 8x8 patch cells.
    """
    import torch.nn.functional as F

    g = _gen(device, seed)
    x = torch.randn(5 * batch_size, model.in_channels, size, size, generator=g, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if loss_impl == "fused":
        ld = _fused()
        rd_loss = ld.RegionDiscriminationLoss(**HEADLINE_KW)
        pd_loss = ld.PatchDiscriminationLoss(0.1)
    else:
        rd_loss = lambda z, s: ref.region_discrimination_loss(z, s, **HEADLINE_KW)  # noqa: E731
        pd_loss = lambda r: ref.patch_discrimination(r, 0.1)  # noqa: E731

    def step():
        z, s = model(x)
        views = 4 * batch_size
        rd, ent = rd_loss(z[:views], s[:views])
        e = ref.normalize_embeddings(z[:views])
        cells = F.adaptive_avg_pool2d(e, 8).flatten(2).transpose(1, 2).reshape(-1, e.shape[1])
        cells = cells / (cells.norm(dim=1, keepdim=True) + ref.NORM_EPS)
        loss = pd_loss(cells) + RD_WEIGHT * rd + ENT_WEIGHT * ent
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run_e2e(settings: Settings, batch_size: int = 4, size: int = 128, steps: int = 7, warmup: int = 2) -> tuple[list[dict], str]:
    """Training steps per second with the fused vs the plain-PyTorch losses (same model init, same data)."""
    try:
        from .models import LDNet
    except ImportError as exc:
        return [], f"not measured: ld_ext.models unavailable ({exc})"
    try:
        from .train import make_training_step  # the pipeline helper's step
        how = "ld_ext.train.make_training_step"
    except ImportError:
        make_training_step = None
        how = "fallback step built in ld_ext.bench (ld_ext.train.make_training_step not available)"
    device = settings.device
    torch.manual_seed(settings.seed)
    base = LDNet(in_channels=1, emb_dim=32, n_clusters=16)
    steps_fn = {}
    for impl in ("fused", "reference"):
        model = LDNet(in_channels=1, emb_dim=32, n_clusters=16)
        model.load_state_dict(base.state_dict())
        model.to(device).train()
        torch.manual_seed(settings.seed)  # same data for both
        if make_training_step is not None:
            step = make_training_step(
                model, loss_impl=impl, batch_size=batch_size, size=size, device=device, seed=settings.seed
            )
        else:
            step = _e2e_step_fallback(model, impl, batch_size, size, device, settings.seed)
        steps_fn[impl] = (lambda s: (lambda i: s()))(step)
    t = measure_group(steps_fn, 1, device, warmup=warmup, repeats=steps, target_sample_s=0.0, max_number=1)
    rows = []
    for impl, tm in t.items():
        row = {c: "" for c in CSV_COLUMNS}
        row.update(
            section="e2e", op=f"LD training step (B={batch_size}, {5 * batch_size} images, {size}x{size})",
            mode="step", impl=impl, device=device.type, dtype="float32", H=size, W=size, P=size * size,
            median_ms=tm.median_ms, q1_ms=tm.q1_ms, q3_ms=tm.q3_ms, min_ms=tm.min_ms, max_ms=tm.max_ms,
            repeats=tm.repeats, calls_per_sample=1, input_sets=1, status="ok",
            speedup_of_fused=tm.median_ms / t["fused"].median_ms,
        )
        rows.append(row)
    return rows, how


# ============================================================================ outputs


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_val(r.get(k, "")) for k in CSV_COLUMNS})


def _csv_val(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt_ms(v) -> str:
    if v == "" or v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_x(v) -> str:
    if v == "" or v is None:
        return "-"
    return f"{v:.0f}x" if v >= 100 else f"{v:.2f}x"


def _fmt_mb(v) -> str:
    return "-" if v == "" or v is None else f"{v / 2**20:.1f}"


def _label(row: dict, sweep: str) -> str:
    if sweep == "P":
        return f"{row['H']}x{row['W']}"
    if sweep in ("K", "D", "N"):
        return f"{sweep}={row[sweep]}"
    if sweep == "dtype":
        return row["dtype"]
    if row["op"] == "patch_discrimination":
        return f"M={row['M']} D={row['D']}"
    if row["op"] == "region_discrimination":
        return f"N={row['N']} K={row['K']} D={row['D']}"
    return f"N={row['N']} D={row['D']} K={row['K']} {row['H']}x{row['W']}"


MD_COLUMNS = [
    "case", "mode", "fused ms", "eager ms", "compile ms", "published ms",
    "eager/fused", "compile/fused", "published/fused", "fused % copy bw", "fused x floor",
    "fused peak MB", "eager peak MB", "published peak MB",
]


def markdown_table(rows: list[dict], sweep: str = "") -> str:
    """One line per (op, case, mode); implementations side by side; ratios = impl time / fused time.

    An ``op`` column comes first when the rows hold more than one op."""
    groups: dict = {}
    for r in rows:
        key = (_label(r, sweep), r["mode"], r["op"])
        groups.setdefault(key, {})[r["impl"]] = r
    several_ops = len({r["op"] for r in rows}) > 1
    cols = (["op"] if several_ops else []) + MD_COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (label, mode, op), by in groups.items():
        def get(impl, col):
            r = by.get(impl)
            return "" if r is None else r.get(col, "")

        def ms(impl):
            r = by.get(impl)
            if r is None:
                return "n/a"
            if r["status"] != "ok":
                return "skip" if str(r["status"]).startswith("skipped") else "error"
            return _fmt_ms(r["median_ms"])

        f = by.get("fused", {})
        pct = f.get("pct_copy_bw", "")
        cells = [
            label, mode, ms("fused"), ms("eager"), ms("compile"), ms("published"),
            _fmt_x(get("eager", "speedup_of_fused")), _fmt_x(get("compile", "speedup_of_fused")),
            _fmt_x(get("published", "speedup_of_fused")),
            "-" if pct == "" else f"{pct:.0f}%", _fmt_x(f.get("x_floor", "")),
            _fmt_mb(get("fused", "peak_mem_bytes")), _fmt_mb(get("eager", "peak_mem_bytes")),
            _fmt_mb(get("published", "peak_mem_bytes")),
        ]
        if several_ops:
            cells.insert(0, op)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_markdown(rows: list[dict], extra: dict, case: Case) -> str:
    by = {r["impl"]: r for r in rows}
    f = by.get("fused")
    lines = [
        "| impl | median ms | IQR ms | time / fused | x floor | peak MB (profiler) | extra beyond grads, % of inputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in ("fused", "eager", "compile"):
        r = by.get(impl)
        if r is None:
            continue
        if r["status"] != "ok":
            lines.append(f"| {impl} | {r['status']} | | | | | |")
            continue
        pct = r.get("extra_mem_pct", "")
        lines.append(
            f"| {impl} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['q1_ms'])}-{_fmt_ms(r['q3_ms'])} | "
            f"{_fmt_x(r['speedup_of_fused'])} | {_fmt_x(r.get('x_floor', ''))} | {_fmt_mb(r.get('peak_mem_bytes', ''))} | "
            f"{'-' if pct == '' else f'{pct:.1f}%'} |"
        )
    out = ["\n".join(lines), ""]
    if f is not None and f.get("floor_ms", "") != "":
        in_bytes = (case.N * case.D * case.P + case.N * case.K * case.P) * case.itemsize
        out.append(
            f"Floor {f['floor_ms']:.2f} ms ({f['floor_bound']}-bound): {f['bytes'] / 1e6:.0f} MB must move "
            f"(inputs {in_bytes / 1e6:.0f} MB read in forward and backward, gradients written) at the measured copy "
            f"bandwidth {extra['bandwidth'] / 1e9:.1f} GB/s = {f['bytes'] / extra['bandwidth'] * 1e3:.2f} ms; "
            f"{f['flops'] / 1e9:.2f} GFLOP at the measured matmul rate {extra['rate'] / 1e9:.0f} GFLOP/s = "
            f"{f['flops'] / extra['rate'] * 1e3:.2f} ms."
        )
    for impl, res in extra.get("rss", {}).items():
        if res is None:
            continue
        if "error" in res:
            out.append(f"RSS probe ({impl}): failed: {res['error']}")
        else:
            grads = res["input_bytes"]
            out.append(
                f"RSS probe ({impl}): peak RSS increase {res['peak_rss_increase'] / 2**20:.1f} MB, i.e. "
                f"{100.0 * (res['peak_rss_increase'] - grads) / res['input_bytes']:.1f}% of the inputs beyond the gradients."
            )
    if f is not None and f["status"] == "ok":
        checks = []
        e, c = by.get("eager"), by.get("compile")
        if e is not None and e["status"] == "ok":
            checks.append(f"fused >= 6x eager: {'met' if e['speedup_of_fused'] >= 6 else 'NOT met'} ({e['speedup_of_fused']:.2f}x)")
        if c is not None and c["status"] == "ok":
            checks.append(f"fused faster than compile: {'met' if c['speedup_of_fused'] > 1 else 'NOT met'} ({c['speedup_of_fused']:.2f}x)")
        if f.get("extra_mem_pct", "") != "":
            checks.append(f"extra memory < 10% of inputs: {'met' if f['extra_mem_pct'] < 10 else 'NOT met'} ({f['extra_mem_pct']:.1f}%)")
        out.append("Targets: " + "; ".join(checks) + ".")
    return "\n".join(out)


def e2e_markdown(rows: list[dict], how: str) -> str:
    lines = ["| losses | median step ms | IQR ms | steps/s | step-rate ratio fused/reference |", "|---|---|---|---|---|"]
    by = {r["impl"]: r for r in rows}
    for impl in ("fused", "reference"):
        r = by.get(impl)
        if r is None:
            continue
        ratio = by["reference"]["median_ms"] / by["fused"]["median_ms"] if impl == "fused" else 1.0
        lines.append(
            f"| {impl} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['q1_ms'])}-{_fmt_ms(r['q3_ms'])} | "
            f"{1e3 / r['median_ms']:.2f} | {ratio:.2f}x |"
        )
    return "\n".join(lines) + f"\n\nStep: {how}; {rows[0]['repeats'] if rows else 0} timed steps each, interleaved."


SWEEP_XLABEL = {"P": "pixels P = H*W", "K": "clusters K", "D": "embedding channels D", "N": "batch N"}


def plot_sweep(rows: list[dict], sweep: str, path: str) -> str | None:
    """Log-log time vs size, one line per implementation, one panel per mode. Returns a note on failure."""
    try:
        import matplotlib.figure  # noqa: F401  (only to know whether matplotlib is there)

        from .viz import new_figure
    except ImportError:
        return "matplotlib is not installed: plots skipped"
    fig = new_figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    styles = {"fused": "o-", "eager": "s-", "compile": "^-", "published": "x-"}
    for ax, mode in zip(axes, MODES):
        mrows = [r for r in rows if r["mode"] == mode]
        if sweep == "dtype":
            dtypes = list(dict.fromkeys(r["dtype"] for r in mrows))
            impls = [i for i in IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in mrows)]
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                ys = []
                for dt in dtypes:
                    r = next((r for r in mrows if r["impl"] == impl and r["dtype"] == dt and r["status"] == "ok"), None)
                    ys.append(r["median_ms"] if r else float("nan"))
                ax.bar([i + j * width for i in range(len(dtypes))], ys, width, label=impl)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(dtypes))], dtypes)
            ax.set_yscale("log")
        else:
            key = "P" if sweep == "P" else sweep
            for impl in IMPLS:
                pts = sorted((r[key], r["median_ms"]) for r in mrows if r["impl"] == impl and r["status"] == "ok")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[impl], label=impl)
            floor = sorted({(r[key], r["floor_ms"]) for r in mrows if r.get("floor_ms", "") != ""})
            if floor:
                ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", lw=1, label="floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(SWEEP_XLABEL[sweep])
        ax.set_ylabel("time per call (ms)")
        ax.set_title(f"region loss, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"sweep {sweep} ({dev}; others at N=16 D=32 K=16 128x128 float32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


# ============================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="smaller sweeps, compile timed only in the headline (< 3 min on a 2-core CPU)")
    parser.add_argument("--out", default="bench_out", help="output folder for results.csv, results.md, bench_*.png (default: bench_out)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--sweeps", default=None, help=f"comma-separated subset of {','.join(SWEEPS)} (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per implementation (>= 5; default 7, 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per implementation (default 2)")
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated through (fresh random data; default 3)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--max-mem-gb", type=float, default=None, help="skip implementations whose estimated peak exceeds this (default 8 on CPU, 2 with --quick; half the GPU)")
    parser.add_argument("--max-call-s", type=float, default=None, help="skip an implementation whose single call takes longer than this many seconds (default 8 on CPU, 5 with --quick; none on CUDA; never in the headline)")
    parser.add_argument("--compile-static", action="store_true", help="compile every sweep point with static shapes (default: dynamic=True in sweeps, static in headline/ops)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out everywhere")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--e2e-steps", type=int, default=None, help="timed training steps per loss implementation (default 7, 5 with --quick)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes, 1 thread (for tests of the harness, not for figures)")


class BenchError(ValueError):
    pass


def _parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise BenchError(f"--{what} must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return items


def _validate(args: argparse.Namespace) -> dict:
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as exc:
        raise BenchError(f"--device must be cpu or cuda[:index], got {args.device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda requested but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    sections = _parse_list(args.sections, SECTIONS, "sections")
    sweeps = _parse_list(args.sweeps, SWEEPS, "sweeps") if args.sweeps is not None else list(SWEEPS)
    impls = _parse_list(args.impls, IMPLS, "impls")
    if "fused" not in impls:
        raise BenchError("--impls must include fused (every ratio is against it)")
    if args.no_compile and "compile" in impls:
        impls.remove("compile")
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 7)
    if args.tiny and args.repeats is None:
        repeats = 5
    if repeats < 5:
        raise BenchError(f"--repeats must be >= 5 (medians of at least 5 samples), got {repeats}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.sets < 1:
        raise BenchError(f"--sets must be >= 1, got {args.sets}")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    e2e_steps = args.e2e_steps if args.e2e_steps is not None else (5 if args.quick or args.tiny else 7)
    if e2e_steps < 5:
        raise BenchError(f"--e2e-steps must be >= 5, got {e2e_steps}")
    if args.max_mem_gb is not None:
        if not (args.max_mem_gb > 0 and math.isfinite(args.max_mem_gb)):
            raise BenchError(f"--max-mem-gb must be a positive number, got {args.max_mem_gb}")
        max_bytes = int(args.max_mem_gb * 2**30)
    elif device.type == "cuda":
        max_bytes = torch.cuda.get_device_properties(device).total_memory // 2
    else:
        max_bytes = (2 << 30) if args.quick else (8 << 30)
    if args.max_call_s is not None:
        if not (args.max_call_s > 0):
            raise BenchError(f"--max-call-s must be a positive number of seconds, got {args.max_call_s}")
        max_call_s = args.max_call_s
    elif device.type == "cuda":
        max_call_s = math.inf
    else:
        max_call_s = 5.0 if args.quick else 8.0
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BenchError(f"--out {args.out!r} exists and is not a folder")
    return dict(device=device, sections=sections, sweeps=sweeps, impls=tuple(impls), repeats=repeats,
                e2e_steps=e2e_steps, max_bytes=max_bytes, max_call_s=max_call_s)


def _env_line(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}", f"{platform.machine()}"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    else:
        parts.append(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
        try:
            parts.append(f"load average {os.getloadavg()[0]:.2f}")
        except OSError:
            pass
    try:
        import ld_ext

        info = ld_ext.build_info()
        parts.append(f"ld_ext cpu_isa={info.get('cpu_isa')} cuda_compiled={info.get('cuda_compiled')}")
    except Exception as exc:  # the fused ops may be missing; the rest of the run says so per row
        parts.append(f"ld_ext build info unavailable ({type(exc).__name__})")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        v = _validate(args)
    except BenchError as exc:
        print(f"ld-ext bench: error: {exc}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if args.tiny else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args, v)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, v: dict) -> int:
    device = v["device"]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    for knob in ("cache_size_limit", "recompile_limit"):  # the name differs across torch versions
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    tiny = args.tiny
    settings = Settings(
        device=device, warmup=args.warmup, repeats=v["repeats"], sets=args.sets, seed=seed, impls=v["impls"],
        max_bytes=v["max_bytes"], max_call_s=v["max_call_s"], memory=not args.no_memory, compile_dynamic=False,
        target_sample_s=0.002 if tiny else (0.02 if device.type == "cpu" else 0.01),
    )
    base = Case(N=2, D=4, K=3, H=8, W=8, M=16) if tiny else Case(**BASE)
    machine = Machine(device, tiny=tiny)
    env = _env_line(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"ld-ext bench on {device}: {env}; seed {seed}; {'quick' if args.quick else 'full'} run", flush=True)
    all_rows: list[dict] = []
    md = [
        f"# ld_ext benchmark ({device.type}{', quick' if args.quick else ''}{', tiny' if tiny else ''})",
        "",
        f"{stamp}; {env}; seed {seed}; median of {v['repeats']} interleaved samples after {args.warmup} warm-up "
        f"calls, {args.sets} rotating input sets of fresh random data"
        + ("; CUDA events" if device.type == "cuda" else "; time.perf_counter")
        + f". Ratios are implementation time / fused time, measured in the same run. Peak memory: "
        + (CUDA_MEM_METHOD if device.type == "cuda" else CPU_MEM_METHOD)
        + " (outputs and gradients included).",
        "",
    ]
    notes: list[str] = []
    csv_path = os.path.join(args.out, "results.csv")
    md_path = os.path.join(args.out, "results.md")

    def save_partial() -> None:  # after every section, so that an interrupted run keeps what it measured
        write_csv(all_rows, csv_path)
        with open(md_path, "w") as f:
            f.write("\n".join(md + ["(partial: the run has not finished)"]) + "\n")

    measured: dict = {}  # region-loss case -> (impls, rows): a sweep point equal to one already measured is reused

    if "headline" in v["sections"]:
        print("== headline", file=sys.stderr, flush=True)
        rows, extra = run_headline(settings, machine, base, rss=not tiny)
        all_rows += rows
        text = headline_markdown(rows, extra, base)
        md += [
            "## Headline: fused RegionDiscriminationLoss forward+backward",
            "",
            f"`RegionDiscriminationLoss(normalize=True, assignment=\"sigmoid\", return_entropy=True)` at "
            f"N={base.N} D={base.D} K={base.K} {base.H}x{base.W} {base.dtype}, backward of 10*L_rd + 0.1*L_ent, vs "
            f"`reference.region_discrimination_loss` (eager) and `torch.compile` of it (static shapes; compile time excluded).",
            "",
            text,
            "",
        ]
        print("\n" + text + "\n", flush=True)

    save_partial()
    if "ops" in v["sections"]:
        print("== ops", file=sys.stderr, flush=True)
        ops_settings = settings
        if args.quick and "compile" in settings.impls:
            ops_settings = replace(settings, impls=tuple(i for i in settings.impls if i != "compile"))
            notes.append("--quick: torch.compile is timed only in the headline (compile time dominates a quick run).")
        rows = []
        for spec in OPS.values():
            torch._dynamo.reset()
            op_rows = run_case(spec, base, ops_settings, machine, section="ops")
            if spec.name == "region_loss" and "compile" not in ops_settings.impls:
                measured[base] = (ops_settings.impls, op_rows)  # the sweeps reuse it for their base point
            rows += op_rows
        all_rows += rows
        md += ["## Every op at the base configuration", ""]
        md += [f"- `{s.name}`: {s.config}" for s in OPS.values()]
        md += ["", markdown_table(rows), ""]

    save_partial()
    if "sweeps" in v["sections"]:
        sweep_sets = TINY_SWEEPS if tiny else (QUICK_SWEEPS if args.quick else FULL_SWEEPS)
        sw_settings = replace(settings, compile_dynamic=not args.compile_static)
        if args.quick and args.max_mem_gb is None and device.type == "cpu":
            sw_settings = replace(sw_settings, max_bytes=min(settings.max_bytes, 1 << 30))
            notes.append("--quick on CPU: sweeps skip implementations estimated above 1 GiB (the published formulation from the base size up).")
        if args.quick and "compile" in settings.impls:
            sw_settings = replace(sw_settings, impls=tuple(i for i in settings.impls if i != "compile"))
        spec = OPS["region_loss"]
        md += [
            "## Sweeps of the region loss",
            "",
            f"`RegionDiscriminationLoss({spec.config})`; one parameter varied, the others at the base "
            f"configuration. compile: {'static shapes per point' if args.compile_static else 'dynamic=True (one graph per mode and dtype)'}. "
            "The base point, common to all sweeps, is measured once and repeated in each table.",
            "",
        ]
        torch._dynamo.reset()
        for sweep in v["sweeps"]:
            print(f"== sweep {sweep}", file=sys.stderr, flush=True)
            rows = []
            if sweep == "dtype":
                points = [replace(base, dtype=dt) for dt in DTYPES[device.type]]
            elif sweep == "P":
                points = [replace(base, H=s, W=s) for s in sweep_sets["P"]]
            else:
                points = [replace(base, **{sweep: val}) for val in sweep_sets[sweep]]
            for case in points:
                if args.compile_static:
                    torch._dynamo.reset()
                label = _label(dict(H=case.H, W=case.W, N=case.N, D=case.D, K=case.K, dtype=case.dtype, op="", M=case.M), sweep)
                if case in measured and measured[case][0] == sw_settings.impls:
                    _log(settings, f"  {label}: same case as measured before, rows reused")
                    rows += [dict(r, section="sweeps", sweep=sweep) for r in measured[case][1]]
                    continue
                _log(settings, f"  {label}")
                case_rows = run_case(spec, case, sw_settings, machine, section="sweeps", sweep=sweep)
                measured[case] = (sw_settings.impls, case_rows)
                rows += case_rows
            all_rows += rows
            md += [f"### Sweep {sweep}", "", markdown_table(rows, sweep), ""]
            save_partial()
            if not args.no_plots:
                png = os.path.join(args.out, f"bench_sweep_{sweep}.png")
                note = plot_sweep(rows, sweep, png)
                if note:
                    if note not in notes:
                        notes.append(note)
                        print(f"note: {note}", flush=True)
                else:
                    md += [f"![sweep {sweep}](bench_sweep_{sweep}.png)", ""]

    save_partial()
    if "e2e" in v["sections"]:
        print("== e2e", file=sys.stderr, flush=True)
        bs, size = (1, 16) if tiny else (4, 128)
        rows, how = run_e2e(settings, batch_size=bs, size=size, steps=v["e2e_steps"], warmup=1 if tiny else 2)
        all_rows += rows
        md += ["## End to end: LD training steps per second", ""]
        md += [e2e_markdown(rows, how) if rows else how, ""]

    save_partial()
    if machine._bw is not None:
        md.append(
            f"Measured on this device in this run: copy bandwidth {machine.bandwidth / 1e9:.1f} GB/s (dst.copy_(src), "
            f"read + write counted); matmul rate "
            + ", ".join(f"{str(k).replace('torch.', '')} {r / 1e9:.0f} GFLOP/s" for k, r in machine._rate.items())
            + ". Floor = max(bytes that must move / copy bandwidth, matmul FLOPs / matmul rate)."
        )
        md.append("")
    elapsed = time.perf_counter() - t_start
    md += [f"Run time {elapsed:.0f} s (compile time included)."] + [f"Note: {n}" for n in notes]
    write_csv(all_rows, csv_path)
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    print(f"\nwrote {csv_path}, {md_path}" + ("" if args.no_plots else " and bench_sweep_*.png where plotted"), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ld-ext bench", description="Benchmark the fused ops against plain PyTorch.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
