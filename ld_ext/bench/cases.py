"""Measuring one op spec at one case: every implementation, forward and forward+backward, timed
interleaved (``timing``), peak memory (``memory``), floor from the measured device rates; one
CSV row per (mode, implementation). The headline adds the RSS of a subprocess on the CPU.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Sequence

import torch

import ld_ext

from .memory import measure_peak_memory, peak_rss_increase
from .report import CSV_COLUMNS
from .specs import IMPLS, MODES, OPS, Case, OpSpec, make_generator
from .timing import Machine, measure_group, time_once

__all__ = ["Settings", "run_case", "run_headline", "rss_probe", "RSS_METHOD"]


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


def log(settings: Settings, msg: str) -> None:
    """A progress line on stderr (unless ``settings.verbose`` is off)."""
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
    sets, cotangents = _input_sets(spec, case, settings)
    in_bytes = sum(t.numel() * t.element_size() for t in sets[0])
    rows = []
    for mode in modes:
        runs, status = _runners(spec, case, settings, impls, sets, cotangents, mode)
        timings = {}
        if runs:
            timings = measure_group(
                runs,
                len(sets),
                device,
                warmup=settings.warmup,
                repeats=settings.repeats,
                target_sample_s=settings.target_sample_s,
            )
        mems = {}
        if settings.memory:
            for impl, runner in runs.items():
                mems[impl] = measure_peak_memory(lambda: runner(0), device)
        measured = _Measured(impls, status, timings, mems, in_bytes, len(sets))
        rows += _mode_rows(spec, case, settings, machine, mode, measured, section, sweep)
    return rows


def _input_sets(spec: OpSpec, case: Case, settings: Settings) -> tuple[list[tuple], list | None]:
    """``settings.sets`` input sets (requiring grad) and, for a non-scalar op, a random cotangent of
    the output's shape per set."""
    device = settings.device
    g = make_generator(device, settings.seed)
    sets = []
    for _ in range(settings.sets):
        sets.append(tuple(t.requires_grad_() for t in spec.make_inputs(case, device, g)))
    cotangents = None
    if spec.scalar is None:  # a random cotangent of the output's shape, one per set
        with torch.no_grad():
            out = spec.impls["eager"]()(*sets[0])
        cotangents = [torch.randn(out.shape, generator=g, device=device).to(out.dtype) for _ in sets]
    return sets, cotangents


def _runners(spec: OpSpec, case: Case, settings: Settings, impls: list[str], sets, cotangents, mode: str):
    """(runner per implementation that runs here within the limits, status per implementation)."""
    runs, status = {}, {}
    for impl in impls:
        est = spec.big_bytes(case, impl, mode)
        if est > settings.max_bytes:
            status[impl] = f"skipped: needs ~{est / 2**30:.1f} GiB > --max-mem-gb {settings.max_bytes / 2**30:.1f}"
            continue
        try:
            fn = _prepare(spec, impl, settings)
            runner = _make_runner(spec, fn, sets, cotangents, mode)
            # first call: compiles (torch.compile), allocates lazily, checks it runs
            dt = time_once(lambda: runner(0), settings.device)
            if impl == "compile":
                log(settings, f"    compile {spec.name} {mode}: {dt:.1f} s (not timed)")
                dt = time_once(lambda: runner(1 % len(sets)), settings.device)
            if dt > settings.max_call_s:
                status[impl] = f"skipped: one call took {dt:.1f} s > --max-call-s {settings.max_call_s:g}"
                log(settings, f"    {spec.name} {mode} {impl}: {status[impl]}")
                continue
            runs[impl] = runner
            status[impl] = "ok"
        except Exception as exc:  # an impl that cannot run this case is reported, not fatal
            status[impl] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(settings, f"    {spec.name} {mode} {impl}: {status[impl]}")
    return runs, status


@dataclass
class _Measured:
    """What one mode of a case measured: status, timings and peak memory per implementation."""

    impls: list[str]
    status: dict
    timings: dict
    mems: dict
    in_bytes: int
    n_sets: int


def _floor(case: Case, machine: Machine | None, nbytes: int, flops: int) -> tuple[float | None, str | None]:
    """(floor in ms, "memory" or "compute") from the machine's measured rates; (None, None) without one."""
    if machine is None:
        return None, None
    t_mem = nbytes / machine.bandwidth * 1e3
    t_flop = flops / machine.rate(case.torch_dtype) * 1e3
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


def _base_row(
    spec: OpSpec,
    case: Case,
    settings: Settings,
    mode: str,
    impl: str,
    m: _Measured,
    section: str,
    sweep: str,
    nbytes: int,
    flops: int,
) -> dict:
    """A CSV row with what is known before measuring: the case, the mode, the implementation, its status."""
    row = {c: "" for c in CSV_COLUMNS}
    row.update(
        section=section,
        sweep=sweep,
        op=spec.name,
        mode=mode,
        impl=impl,
        device=settings.device.type,
        dtype=case.dtype,
        N=case.N,
        D=case.D,
        K=case.K,
        H=case.H,
        W=case.W,
        P=case.P,
        M=case.M,
        bytes=nbytes,
        flops=flops,
        input_sets=m.n_sets,
        status=m.status[impl],
        compile=("dynamic" if settings.compile_dynamic else "static") if impl == "compile" else "",
    )
    if spec.name == "patch_discrimination":
        for k in ("N", "K", "H", "W", "P"):
            row[k] = ""
    else:
        row["M"] = ""
    return row


def _add_timing_columns(
    row: dict, t, nbytes: int, fused_ms: float | None, floor: tuple, machine: Machine | None
) -> None:
    """Fill ``row``'s timing columns from the timing ``t``: speed-up of fused, distance to the floor."""
    floor_ms, bound = floor
    row.update(
        median_ms=t.median_ms,
        q1_ms=t.q1_ms,
        q3_ms=t.q3_ms,
        min_ms=t.min_ms,
        max_ms=t.max_ms,
        repeats=t.repeats,
        calls_per_sample=t.number,
        achieved_GBps=nbytes / (t.median_ms * 1e-3) / 1e9,
    )
    if fused_ms is not None:
        row["speedup_of_fused"] = t.median_ms / fused_ms
    if floor_ms is not None:
        row.update(
            floor_ms=floor_ms,
            floor_bound=bound,
            x_floor=t.median_ms / floor_ms,
            pct_copy_bw=100.0 * nbytes / (t.median_ms * 1e-3) / machine.bandwidth,
        )


def _add_memory_columns(row: dict, mem: tuple, in_bytes: int, out_bytes: int) -> None:
    """Fill ``row``'s memory columns from ``mem`` = (peak bytes or None, method)."""
    peak, method = mem
    row["mem_method"] = method
    if peak is not None:
        row["peak_mem_bytes"] = peak
        row["extra_mem_pct"] = 100.0 * (peak - out_bytes) / in_bytes


def _mode_rows(
    spec: OpSpec,
    case: Case,
    settings: Settings,
    machine: Machine | None,
    mode: str,
    m: _Measured,
    section: str,
    sweep: str,
) -> list[dict]:
    """The CSV rows of one mode, one per implementation (floor from the machine's measured rates)."""
    nbytes, flops = spec.bytes(case, mode), spec.flops(case, mode)
    floor = _floor(case, machine, nbytes, flops)
    fused_ms = m.timings["fused"].median_ms if "fused" in m.timings else None
    out_bytes = m.in_bytes if mode == "fwd+bwd" else 0
    rows = []
    for impl in m.impls:
        row = _base_row(spec, case, settings, mode, impl, m, section, sweep, nbytes, flops)
        if impl in m.timings:
            _add_timing_columns(row, m.timings[impl], nbytes, fused_ms, floor, machine)
        if impl in m.mems:
            _add_memory_columns(row, m.mems[impl], m.in_bytes, out_bytes)
        rows.append(row)
        if impl in m.timings:
            log(
                settings,
                f"    {spec.name:24s} {mode:7s} {impl:9s} {m.timings[impl].median_ms:10.3f} ms"
                + (f"  (fused x{row['speedup_of_fused']:.2f})" if row["speedup_of_fused"] != "" else ""),
            )
    return rows


def _rss_probe_main(argv: list[str]) -> int:
    """Subprocess body: peak RSS increase of one fwd+bwd call (after warm-up). Prints JSON."""
    impl, n, d, k, h, w, dtype, seed = argv
    case = Case(N=int(n), D=int(d), K=int(k), H=int(h), W=int(w), dtype=dtype)
    spec = OPS["region_loss"]
    settings = Settings(device=torch.device("cpu"), seed=int(seed), verbose=False)
    g = make_generator(settings.device, settings.seed)
    inputs = tuple(t.requires_grad_() for t in spec.make_inputs(case, settings.device, g))
    fn = _prepare(spec, impl, settings)
    runner = _make_runner(spec, fn, [inputs], None, "fwd+bwd")
    for _ in range(2):
        runner(0)
    gc.collect()

    increase = peak_rss_increase(lambda: runner(0))
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    print(json.dumps({"impl": impl, "peak_rss_increase": increase, "input_bytes": in_bytes}))
    return 0


RSS_METHOD = (
    "peak RSS (VmHWM after a clear_refs reset) of a subprocess running one fwd+bwd after warm-up, "
    "MALLOC_MMAP_THRESHOLD_=65536"
)


def rss_probe(impl: str, case: Case, seed: int) -> dict | None:
    """Run ``_rss_probe_main`` in a fresh interpreter; None where it cannot run (non-Linux, error)."""
    if not sys.platform.startswith("linux"):
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(ld_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    code = "import sys; from ld_ext.bench.cases import _rss_probe_main; sys.exit(_rss_probe_main(sys.argv[1:]))"
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
        settings,
        impls=tuple(i for i in ("fused", "eager", "compile") if i in settings.impls),
        compile_dynamic=False,
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
