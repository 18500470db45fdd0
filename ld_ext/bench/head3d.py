"""``ld-ext bench --head3d``: the LD head on 3-D embeddings, time and peak memory of forward+backward.

The head is the region loss (region features + region discrimination + the entropy term,
``RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)``, backward
of 10*L_rd + 0.1*L_ent) and the pixel-cluster similarity (per-image prototypes, normalize=True,
backward of a random cotangent), on embeddings (N, D, S, S, S) and assignments (N, K, S, S, S) at
S = 64 and 96, N = 2, 4, 8, K = 16, D = 32. Implementations (those of ``specs.OPS``):

* ``fused``: the ld_ext ops, as a user calls them;
* ``published``: the published code's broadcast, ``e[:, None] * a[:, :, None]``, an (N, K, D, P)
  tensor (region loss only: the published code has no broadcast for the similarity);
* ``eager``: the batched-matmul formulation of ``ld_ext.reference``;
* ``compile``: ``torch.compile`` of ``eager`` (dynamic shapes unless --compile-static).

On the CPU every (op, size, N, implementation) runs in its own fresh interpreter, so that one
case's peak is not another's (an RSS high-water mark is per process), and its address space may
grow by at most the guard (``RLIMIT_AS``, default 12 GiB); on CUDA the cases run in this process
(``max_memory_allocated`` is per call, an out-of-memory error is caught), their allocations capped
by ``torch.cuda.set_per_process_memory_fraction`` (default guard 3/4 of the GPU). A case that hits
the guard is reported as failed, it cannot take the machine down. A case whose declared size
(for the broadcast: the (N, K, D, P) tensor and its gradient, from the shapes) exceeds the guard
is not run and its declared size is reported. Peak memory: CPU, the peak RSS of one
forward+backward call after the warm-up above the RSS before it (VmHWM after a clear_refs reset,
glibc told to mmap every block >= 64 KiB so that freed memory leaves the RSS; the gradients of
the inputs are included); CUDA,
``torch.cuda.max_memory_allocated`` above what was held before the call. Time: the median of
``--repeats`` synchronised wall-clock calls after ``--warmup`` untimed ones, one implementation at
a time (not interleaved: a load change during a run hits the implementations unequally).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

import ld_ext

from .memory import cuda_peak_memory, peak_rss_increase
from .specs import OPS, make_generator
from .timing import sync, time_once

__all__ = [
    "HEAD3D_OPS",
    "HEAD3D_IMPLS",
    "SIZES",
    "BATCHES",
    "Case3D",
    "declared_bytes",
    "make_runner",
    "run_case3d",
    "head3d_markdown",
    "run_head3d",
]

HEAD3D_OPS = ("region_loss", "pixel_cluster_similarity")
HEAD3D_IMPLS = ("fused", "published", "eager", "compile")
IMPL_TITLE = {"fused": "fused", "published": "broadcast (published)", "eager": "eager bmm", "compile": "compile"}
SIZES = (64, 96)
BATCHES = (2, 4, 8)
K_3D, D_3D = 16, 32
TINY = dict(sizes=(16,), batches=(2,), K=4, D=8)
DEFAULT_GUARD_GB = 12.0
MEM_METHOD_CPU = "peak RSS of one fwd+bwd call above the RSS before it (VmHWM after clear_refs), own process"
MEM_METHOD_CUDA = "torch.cuda.max_memory_allocated above the memory held before the call, own process"


@dataclass(frozen=True)
class Case3D:
    """One 3-D case: op, cubic patch edge ``size``, batch ``N``, clusters ``K``, channels ``D``."""

    op: str
    size: int
    N: int
    K: int = K_3D
    D: int = D_3D

    @property
    def P(self) -> int:
        return self.size**3

    def input_bytes(self) -> int:
        """float32 bytes of the inputs (their gradients are as large)."""
        if self.op == "region_loss":
            return 4 * self.N * (self.D + self.K) * self.P
        return 4 * (self.N * self.D * self.P + self.N * self.K * self.D)


def declared_bytes(case: Case3D, impl: str) -> int | None:
    """What the shapes declare an implementation needs, where it is known: the broadcast's
    (N, K, D, P) float32 tensor and its gradient; None for the others (their inputs' size)."""
    if impl == "published":
        return 2 * 4 * case.N * case.K * case.D * case.P
    return None


def _inputs(case: Case3D, device: torch.device, seed: int) -> tuple[tuple, torch.Tensor | None]:
    g = make_generator(device, seed)
    shape = (case.size,) * 3

    def randn(*s):
        return torch.randn(s, generator=g, device=device)

    e = randn(case.N, case.D, *shape)
    if case.op == "region_loss":
        return (e.requires_grad_(), randn(case.N, case.K, *shape).requires_grad_()), None
    proto = randn(case.N, case.K, case.D)
    proto = proto / proto.norm(dim=-1, keepdim=True)
    return (e.requires_grad_(), proto.requires_grad_()), randn(case.N, case.K, *shape)


def make_runner(case: Case3D, impl: str, device: torch.device, seed: int, *, compile_dynamic=True, backend="inductor"):
    """A callable running one forward+backward of ``impl`` at ``case`` (inputs made here), and the inputs."""
    spec = OPS[case.op]
    if impl not in spec.impls:
        raise ValueError(f"{case.op} has no {impl} implementation")
    fn = spec.impls[impl]()
    if impl == "compile":
        fn = torch.compile(fn, dynamic=compile_dynamic, backend=backend)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)
    inputs, cot = _inputs(case, device, seed)

    def run():
        out = fn(*inputs)
        if spec.scalar is not None:
            return torch.autograd.grad(spec.scalar(out), inputs)
        return torch.autograd.grad(out, inputs, grad_outputs=cot)

    return run, inputs


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _set_guard(device: torch.device, guard: int) -> str:
    """Cap this process's further memory at ``guard`` bytes; returns how."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        frac = min(1.0, (torch.cuda.memory_allocated(device) + guard) / total)
        torch.cuda.set_per_process_memory_fraction(frac, device)
        return f"torch.cuda.set_per_process_memory_fraction({frac:.3f})"
    import resource

    limit = _vm_size() + guard
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return f"RLIMIT_AS = address space now + {guard / 2**30:.1f} GiB"


def _measure(run, device: torch.device, warmup: int, repeats: int) -> dict:
    """Warm-up calls, then ``repeats`` timed calls; the first timed call's peak memory."""
    for _ in range(warmup):
        time_once(run, device)
    gc.collect()
    times = []
    if device.type == "cuda":
        t0 = time.perf_counter()
        peak = cuda_peak_memory(run, device)[0]
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    elif os.path.exists("/proc/self/clear_refs"):
        t0 = time.perf_counter()
        peak = peak_rss_increase(run)
        times.append((time.perf_counter() - t0) * 1e3)
    else:  # pragma: no cover - non-Linux: no peak, the times only
        peak = None
    while len(times) < repeats:
        times.append(time_once(run, device) * 1e3)
    return dict(median_ms=statistics.median(times), times_ms=times, peak_bytes=peak)


def measure_case(cfg: dict) -> dict:
    """One case, one implementation, in this process: status, times, peak bytes (see ``run_case3d``)."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    case = Case3D(**cfg["case"])
    res: dict = {}
    try:
        run, _ = make_runner(
            case, cfg["impl"], device, cfg["seed"], compile_dynamic=cfg["compile_dynamic"], backend=cfg["backend"]
        )
        res["guard"] = _set_guard(device, cfg["guard_bytes"])
        warmup = cfg["warmup"] + (1 if cfg["impl"] == "compile" else 0)  # the first compiled call compiles
        res.update(_measure(run, device, warmup, cfg["repeats"]), status="ok")
    except (MemoryError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        oom = isinstance(exc, MemoryError) or "alloc" in msg.lower() or "out of memory" in msg.lower()
        gib = cfg["guard_bytes"] / 2**30
        res["status"] = f"failed: out of memory under the {gib:.1f} GiB guard" if oom else f"failed: {msg}"
        res["error"] = f"{type(exc).__name__}: {msg}"
    return res


def child_main(argv: list[str]) -> int:
    """Subprocess body: ``measure_case`` of the JSON settings in ``argv[0]``, printed as one JSON line."""
    print(json.dumps(measure_case(json.loads(argv[0]))), flush=True)
    return 0


def _in_process(cfg: dict) -> dict:
    """CUDA: the case in this process (max_memory_allocated is per call, an out-of-memory is caught);
    what it allocated is released before the next case."""
    try:
        return measure_case(cfg)
    finally:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(cfg["device"]))


def _child_env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(ld_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks leave the RSS: the high-water mark is the peak
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in the guarded process, no worker pool
    return env


def run_case3d(case: Case3D, impl: str, settings: dict) -> dict:
    """One row: ``impl`` at ``case`` under the guard (CPU: in a fresh interpreter; CUDA: in this
    process), or not run when its declared size exceeds the guard. ``settings``: device,
    guard_bytes, warmup, repeats, seed, threads, compile_dynamic, backend, timeout_s."""
    row = dict(asdict(case), P=case.P, impl=impl, device=str(settings["device"]), guard_bytes=settings["guard_bytes"])
    row.update(status="", median_ms=None, times_ms=[], peak_bytes=None, declared_bytes=declared_bytes(case, impl))
    if row["declared_bytes"] is not None and row["declared_bytes"] > settings["guard_bytes"]:
        row["status"] = f"not run (needs {_gib(row['declared_bytes'])} GiB)"
        return row
    keys = ("guard_bytes", "warmup", "repeats", "seed", "threads", "compile_dynamic", "backend")
    cfg = {k: settings[k] for k in keys}
    cfg.update(device=str(settings["device"]), case=asdict(case), impl=impl)
    if settings["device"].type == "cuda":
        row.update(_in_process(cfg))
        return row
    code = "import sys; from ld_ext.bench.head3d import child_main; sys.exit(child_main(sys.argv[1:]))"
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, json.dumps(cfg)],
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=settings.get("timeout_s", 1800),
        )
    except subprocess.TimeoutExpired:
        row["status"] = f"failed: no result within {settings.get('timeout_s', 1800):.0f} s"
        return row
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit status {res.returncode}"
        last = (res.stderr.strip().splitlines() or [""])[-1][:200]
        row["status"] = f"failed: {why}" + (f" ({last})" if last else "")
        return row
    row.update({k: out[k] for k in ("status", "median_ms", "times_ms", "peak_bytes", "error", "guard") if k in out})
    return row


def _mib(b) -> str:
    return "-" if b is None else (f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2g}")


def _gib(b: int) -> str:
    return f"{b / 2**30:.1f}" if b >= 2**30 // 10 else f"{b / 2**30:.2g}"


def _cell_ms(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r["status"] != "ok":
        return r["status"]
    ms = r["median_ms"]
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _cell_mem(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r["status"] != "ok":
        return "-" if r["status"].startswith("not run") else "failed"
    return _mib(r["peak_bytes"])


def _mem_ratio(f: dict | None, b: dict | None) -> str:
    """fused peak / broadcast peak (measured), or against the declared size where it was not run."""
    if f is None or f["status"] != "ok" or not f["peak_bytes"] or b is None:
        return "-"
    if b["status"] == "ok" and b["peak_bytes"]:
        r = f["peak_bytes"] / b["peak_bytes"]
        return f"1/{1 / r:.1f} ({'met' if r <= 0.1 else 'NOT met'})"
    if "out of memory under" in b["status"]:  # it needed more than the guard
        r = f["peak_bytes"] / b["guard_bytes"]
        return f"< 1/{1 / r:.1f} (broadcast > the guard; {'met' if r <= 0.1 else 'not shown'})"
    if b["declared_bytes"]:
        r = f["peak_bytes"] / b["declared_bytes"]
        return f"1/{1 / r:.1f} of the declared size ({'met' if r <= 0.1 else 'NOT met'})"
    return "-"


def _op_table(rows: list[dict], op: str, impls: tuple) -> list[str]:
    by: dict = {}
    for r in rows:
        if r["op"] == op:
            by.setdefault((r["size"], r["N"]), {})[r["impl"]] = r
    shown = [i for i in impls if i in OPS[op].impls]
    head = ["patch", "N"] + [f"{IMPL_TITLE[i]} ms" for i in shown] + [f"{IMPL_TITLE[i]} peak MiB" for i in shown]
    broadcast = "published" in shown
    if broadcast:
        head.append("fused / broadcast peak")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (size, n), rs in by.items():
        cells = [f"{size}^3", str(n)] + [_cell_ms(rs.get(i)) for i in shown] + [_cell_mem(rs.get(i)) for i in shown]
        if broadcast:
            cells.append(_mem_ratio(rs.get("fused"), rs.get("published")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def head3d_markdown(rows: list[dict], meta: dict) -> str:
    """The report: one table per op (time and peak memory per implementation), the guard, the load."""
    impls = tuple(meta["impls"])
    out = [
        f"# LD head in 3-D ({meta['device']})",
        "",
        f"{meta['stamp']}; {meta['env']}; seed {meta['seed']}. Forward+backward, K={meta['K']}, D={meta['D']}, "
        f"float32, cubic patches. Time: median of {meta['repeats']} calls after {meta['warmup']} warm-up "
        f"(compile: +1, the compiling call; {meta.get('compile', 'dynamic')} shapes), ms. "
        f"Peak memory: {meta['mem_method']} (the inputs' gradients "
        f"included). Guard: {meta['guard_gb']:.1f} GiB per case; broadcast cases declaring more (the "
        "(N, K, D, P) tensor and its gradient) are not run.",
        "",
    ]
    for op in HEAD3D_OPS:
        if any(r["op"] == op for r in rows):
            title = OPS[op].title + ("" if op == "region_loss" else " (no broadcast in the published code)")
            out += [f"## {title}", "", *_op_table(rows, op, impls), ""]
    fails = [r for r in rows if r["status"].startswith("failed")]
    for r in fails:
        out.append(f"- {r['op']} {r['size']}^3 N={r['N']} {r['impl']}: {r['status']} ({r.get('error', '')})")
    out.append(
        f"Load average (1 min): {meta['load_start']} at the start, {meta['load_end']} at the end; "
        f"run time {meta['seconds']:.0f} s."
    )
    return "\n".join(out) + "\n"


class Head3DError(ValueError):
    pass


def _int_list(value: str | None, default: tuple, what: str) -> tuple:
    if value is None:
        return default
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items or min(items) < 1:
        raise Head3DError(f"--{what} must be comma-separated positive integers, got {value!r}")
    return items


def _settings(args: argparse.Namespace) -> dict:
    """The run's settings from the ``ld-ext bench`` arguments; Head3DError names a bad one."""
    if args.quick or args.sections is not None or args.sweeps is not None:
        raise Head3DError("--head3d runs on its own: leave out --quick, --sections and --sweeps")
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        device = torch.device("meta")
    if device.type not in ("cpu", "cuda"):
        raise Head3DError(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Head3DError("--device cuda requested but torch.cuda.is_available() is False")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in HEAD3D_IMPLS for i in impls) or "fused" not in impls:
        raise Head3DError(f"--impls must be a comma-separated subset of {','.join(HEAD3D_IMPLS)} with fused")
    if args.no_compile and "compile" in impls:
        impls.remove("compile")
    tiny = TINY if args.tiny else dict(sizes=SIZES, batches=BATCHES, K=K_3D, D=D_3D)
    repeats = 3 if args.repeats is None else args.repeats
    warmup = 1 if args.warmup is None else args.warmup
    if repeats < 1 or warmup < 0:
        raise Head3DError(f"--repeats must be >= 1 and --warmup >= 0 with --head3d, got {repeats} and {warmup}")
    guard_gb = DEFAULT_GUARD_GB if args.max_mem_gb is None else args.max_mem_gb
    if device.type == "cuda" and args.max_mem_gb is None:
        guard_gb = 0.75 * torch.cuda.get_device_properties(device).total_memory / 2**30
    if not (guard_gb > 0 and math.isfinite(guard_gb)):
        raise Head3DError(f"--max-mem-gb must be a positive number, got {guard_gb}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise Head3DError(f"--out {args.out!r} exists and is not a folder")
    return dict(
        device=device,
        impls=tuple(i for i in HEAD3D_IMPLS if i in impls),
        sizes=_int_list(args.head3d_sizes, tiny["sizes"], "head3d-sizes"),
        batches=_int_list(args.head3d_batches, tiny["batches"], "head3d-batches"),
        K=tiny["K"],
        D=tiny["D"],
        repeats=repeats,
        warmup=warmup,
        guard_bytes=int(guard_gb * 2**30),
        guard_gb=guard_gb,
        seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF,
        threads=args.threads if args.threads is not None else (1 if args.tiny else None),
        compile_dynamic=not args.compile_static,
        backend="inductor",
    )


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _write(out: str, rows: list[dict], meta: dict) -> str:
    md_path = os.path.join(out, "head3d.md")
    with open(os.path.join(out, "head3d.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(md_path, "w") as f:
        f.write(head3d_markdown(rows, meta))
    return md_path


def run_head3d(args: argparse.Namespace) -> int:
    """``ld-ext bench --head3d``: every (op, size, N, implementation) in its own process; the tables
    in OUT/head3d.md (and OUT/head3d.json), rewritten after every case, printed at the end."""
    try:
        s = _settings(args)
    except Head3DError as exc:
        print(f"ld-ext bench: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    threads = s["threads"] or torch.get_num_threads()
    meta = dict(
        device=str(s["device"]),
        env=f"torch {torch.__version__}, {os.cpu_count()} CPUs, {threads} torch threads"
        + (f", {torch.cuda.get_device_name(s['device'])}" if s["device"].type == "cuda" else ""),
        stamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        mem_method=MEM_METHOD_CUDA if s["device"].type == "cuda" else MEM_METHOD_CPU,
        load_start=_load(),
        compile="dynamic" if s["compile_dynamic"] else "static",
        **{k: s[k] for k in ("seed", "K", "D", "repeats", "warmup", "guard_gb", "impls")},
    )
    print(f"ld-ext bench --head3d on {s['device']}: seed {s['seed']}, guard {s['guard_gb']:.1f} GiB", flush=True)
    rows: list[dict] = []
    for op in HEAD3D_OPS:
        for size in s["sizes"]:
            for n in s["batches"]:
                for impl in (i for i in s["impls"] if i in OPS[op].impls):
                    row = run_case3d(Case3D(op, size, n, s["K"], s["D"]), impl, s)
                    rows.append(row)
                    print(
                        f"bench [{time.perf_counter() - t0:4.0f} s] {op} {size}^3 N={n} {impl}: "
                        + (
                            f"{row['median_ms']:.1f} ms, peak {_mib(row['peak_bytes'])} MiB"
                            if row["status"] == "ok"
                            else row["status"]
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
                    _write(args.out, rows, dict(meta, load_end=_load(), seconds=time.perf_counter() - t0))
    md_path = _write(args.out, rows, dict(meta, load_end=_load(), seconds=time.perf_counter() - t0))
    print(open(md_path).read(), flush=True)
    print(f"tables: {md_path} (also {os.path.join(args.out, 'head3d.json')})", flush=True)
    return 0
