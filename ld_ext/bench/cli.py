"""``ld-ext bench`` / ``python -m ld_ext.bench`` / ``python benchmarks/run.py``: arguments, the run
over the sections (headline, ops, sweeps, e2e) and its outputs (results.csv, results.md,
bench_sweep_*.png in ``--out``, written after every section).

What it prints: one progress line per measured case on stderr (every implementation's time with
``-v``), then a short summary on stdout (``report.summary_lines``: per op, fused time and the
other implementations' time ratios, the end-to-end ratio beside them, the headline's targets).
The full tables are in results.md (``--full`` prints them too).

``--quick``: the headline, every op forward+backward against eager and compile (no published
formulation, no per-op memory; the region loss's row is the headline's), and the end-to-end
step; no sweeps unless ``--sections`` names them.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Sequence

import torch

from ..ops import build_info
from .cases import Settings, log, run_case, run_headline
from .end_to_end import run_e2e
from .head3d import run_head3d
from .memory import CPU_MEM_METHOD, CUDA_MEM_METHOD
from .report import e2e_markdown, headline_markdown, markdown_table, plot_sweep, summary_lines, sweep_label, write_csv
from .specs import BASE, IMPLS, OPS, Case
from .timing import Machine

__all__ = ["SECTIONS", "SWEEPS", "add_arguments", "run", "main"]

SECTIONS = ("headline", "ops", "sweeps", "e2e")
QUICK_SECTIONS = ("headline", "ops", "e2e")
QUICK_IMPLS = ("fused", "eager", "compile")  # --quick: the ops against these, forward+backward only
SWEEPS = ("P", "K", "D", "N", "dtype")

FULL_SWEEPS = {
    "P": [32, 64, 128, 256, 448, 512],  # image side; P = side^2
    "K": [4, 8, 16, 32, 64],
    "D": [8, 16, 32, 64, 128],
    "N": [2, 4, 8, 16, 32],
}
QUICK_SWEEPS = {"P": [32, 64, 128, 256], "K": [4, 16, 64], "D": [8, 32, 128], "N": [2, 8, 16]}
TINY_SWEEPS = {"P": [8, 12], "K": [2, 3], "D": [4, 5], "N": [2, 3]}
DTYPES = {"cpu": ["float32", "float64"], "cuda": ["float32", "float16", "bfloat16", "float64"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="headline, every op (forward+backward: fused, eager, compile) and end to end; no sweeps unless "
        "--sections names them (about 2 min on an idle 2-core CPU; longer under load)",
    )
    parser.add_argument(
        "--full", action="store_true", help="print the full tables at the end (always written to OUT/results.md)"
    )
    parser.add_argument(
        "--out", default="bench_out", help="output folder for results.csv, results.md, bench_*.png (default: bench_out)"
    )
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; with --quick {','.join(QUICK_SECTIONS)})",
    )
    parser.add_argument("--sweeps", default=None, help=f"comma-separated subset of {','.join(SWEEPS)} (default: all)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per implementation (>= 5; default 7, 5 with --quick; with --head3d >= 1, default 3)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up calls per implementation (default 2; 1 with --head3d)"
    )
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated through (fresh random data; default 3)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument(
        "--max-mem-gb",
        type=float,
        default=None,
        help="skip implementations whose estimated peak exceeds this (default 8 on CPU, 2 with --quick; half the GPU); "
        "with --head3d the memory guard of every case (default 12 on CPU, 3/4 of the GPU)",
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="skip an implementation whose single call takes longer than this many seconds (default 8 on CPU, "
        "5 with --quick; none on CUDA; never in the headline)",
    )
    parser.add_argument(
        "--compile-static",
        action="store_true",
        help="compile every sweep point (and every --head3d case) with static shapes (default: dynamic=True in "
        "sweeps and --head3d, static in headline/ops)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out everywhere")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--e2e-steps",
        type=int,
        default=None,
        help="timed training steps per loss implementation (default 7, 5 with --quick)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smoke-test sizes, 1 thread (for tests of the harness, not for figures)"
    )
    parser.add_argument(
        "--head3d",
        action="store_true",
        help="instead of the sections: the LD head on 3-D embeddings (region loss, pixel-cluster similarity) at "
        "64^3 and 96^3, N=2,4,8, K=16, D=32, fused vs broadcast (published) vs eager bmm vs compile, "
        "forward+backward time and peak memory, every case in its own process under the --max-mem-gb guard "
        "(OUT/head3d.md, OUT/head3d.json)",
    )
    parser.add_argument("--head3d-sizes", default=None, help="with --head3d: cubic patch edges (default 64,96)")
    parser.add_argument("--head3d-batches", default=None, help="with --head3d: batch sizes N (default 2,4,8)")


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
    if args.sections is None:
        sections = list(QUICK_SECTIONS if args.quick else SECTIONS)
    else:
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
    return dict(
        device=device,
        sections=sections,
        sweeps=sweeps,
        impls=tuple(impls),
        repeats=repeats,
        e2e_steps=e2e_steps,
        max_bytes=max_bytes,
        max_call_s=max_call_s,
    )


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
        info = build_info()
        parts.append(f"ld_ext cpu_isa={info.get('cpu_isa')} cuda_compiled={info.get('cuda_compiled')}")
    except Exception as exc:  # the fused ops may be missing; the rest of the run says so per row
        parts.append(f"ld_ext build info unavailable ({type(exc).__name__})")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "head3d", False):
        return run_head3d(args)
    if args.warmup is None:
        args.warmup = 2
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
    _raise_dynamo_cache_limit()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    tiny = args.tiny
    settings = Settings(
        device=device,
        warmup=args.warmup,
        repeats=v["repeats"],
        sets=args.sets,
        seed=seed,
        impls=v["impls"],
        max_bytes=v["max_bytes"],
        max_call_s=v["max_call_s"],
        memory=not args.no_memory,
        compile_dynamic=False,
        target_sample_s=0.002 if tiny else (0.02 if device.type == "cpu" else 0.01),
        verbose=bool(getattr(args, "verbose", False)),
    )
    base = Case(N=2, D=4, K=3, H=8, W=8, M=16) if tiny else Case(**BASE)
    machine = Machine(device, tiny=tiny)
    env = _env_line(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"ld-ext bench on {device}: {env}; seed {seed}; {'quick' if args.quick else 'full'} run", flush=True)
    report = _Report(args.out, _report_header(args, v, stamp, env, seed))
    measured: dict = {}  # region-loss case -> (impls, rows): a sweep point equal to one already measured is reused
    if "headline" in v["sections"]:
        _progress(t_start, "headline: region loss fwd+bwd, fused vs eager vs compile")
        _headline_section(report, settings, machine, base, tiny)
    report.save_partial()
    if "ops" in v["sections"]:
        _ops_section(report, args, settings, machine, base, measured, t_start)
    report.save_partial()
    if "sweeps" in v["sections"]:
        _sweeps_section(report, args, v, settings, machine, base, measured, t_start)
    report.save_partial()
    if "e2e" in v["sections"]:
        _progress(t_start, "end to end: LD training steps, fused vs plain-PyTorch losses")
        _e2e_section(report, settings, v, tiny)
    report.save_partial()
    _finish_report(report, args, machine, t_start, base)
    return 0


def _progress(t_start: float, what: str) -> None:
    """One progress line on stderr: the time since the start and what is measured next."""
    print(f"bench [{time.perf_counter() - t_start:4.0f} s] {what}", file=sys.stderr, flush=True)


def _raise_dynamo_cache_limit() -> None:
    for knob in ("cache_size_limit", "recompile_limit"):  # the name differs across torch versions
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))


class _Report:
    """The rows (results.csv) and the markdown lines (results.md) of a run, with its notes."""

    def __init__(self, out: str, md: list[str]) -> None:
        self.rows: list[dict] = []
        self.md = md
        self.notes: list[str] = []
        self.csv_path = os.path.join(out, "results.csv")
        self.md_path = os.path.join(out, "results.md")

    def save_partial(self) -> None:  # after every section, so that an interrupted run keeps what it measured
        write_csv(self.rows, self.csv_path)
        with open(self.md_path, "w") as f:
            f.write("\n".join(self.md + ["(partial: the run has not finished)"]) + "\n")

    def save(self) -> None:
        write_csv(self.rows, self.csv_path)
        with open(self.md_path, "w") as f:
            f.write("\n".join(self.md) + "\n")


def _report_header(args: argparse.Namespace, v: dict, stamp: str, env: str, seed: int) -> list[str]:
    device, tiny = v["device"], args.tiny
    return [
        f"# ld_ext benchmark ({device.type}{', quick' if args.quick else ''}{', tiny' if tiny else ''})",
        "",
        f"{stamp}; {env}; seed {seed}; median of {v['repeats']} interleaved samples after {args.warmup} warm-up "
        f"calls, {args.sets} rotating input sets of fresh random data"
        + ("; CUDA events" if device.type == "cuda" else "; time.perf_counter")
        + ". Ratios are implementation time / fused time, measured in the same run. Peak memory: "
        + (CUDA_MEM_METHOD if device.type == "cuda" else CPU_MEM_METHOD)
        + " (outputs and gradients included).",
        "",
    ]


def _headline_section(report: _Report, settings: Settings, machine: Machine, base: Case, tiny: bool) -> None:
    rows, extra = run_headline(settings, machine, base, rss=not tiny)
    report.rows += rows
    text = headline_markdown(rows, extra, base)
    report.md += [
        "## Headline: fused RegionDiscriminationLoss forward+backward",
        "",
        f'`RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)` at '
        f"N={base.N} D={base.D} K={base.K} {base.H}x{base.W} {base.dtype}, backward of 10*L_rd + 0.1*L_ent, vs "
        "`reference.region_discrimination_loss` (eager) and `torch.compile` of it (static shapes; compile "
        "time excluded).",
        "",
        text,
        "",
    ]


def _ops_section(
    report: _Report, args, settings: Settings, machine: Machine, base: Case, measured: dict, t_start: float
) -> None:
    """Every op at the base case: forward and forward+backward against every implementation, or
    with --quick forward+backward against eager and compile, without the per-op memory, the region
    loss taken from the headline when it ran."""
    ops_settings, modes = settings, ("fwd", "fwd+bwd")
    if args.quick:
        ops_settings = replace(settings, impls=tuple(i for i in settings.impls if i in QUICK_IMPLS), memory=False)
        modes = ("fwd+bwd",)
        report.notes.append(
            "--quick: the ops forward+backward only, against eager and compile (no published formulation, no "
            "per-op memory); the region loss's row is the headline's."
        )
    headline = [r for r in report.rows if r["section"] == "headline"]
    rows = []
    for n, spec in enumerate(OPS.values(), 1):
        if args.quick and spec.name == "region_loss" and headline:
            rows += [dict(r, section="ops") for r in headline]
            continue
        _progress(t_start, f"ops {n}/{len(OPS)}: {spec.name} {', '.join(modes)}")
        torch._dynamo.reset()
        op_rows = run_case(spec, base, ops_settings, machine, modes=modes, section="ops")
        if spec.name == "region_loss" and "compile" not in ops_settings.impls:
            measured[base] = (ops_settings.impls, op_rows)  # the sweeps reuse it for their base point
        rows += op_rows
    report.rows += rows
    report.md += ["## Every op at the base configuration", ""]
    report.md += [f"- `{s.name}`: {s.config}" for s in OPS.values()]
    report.md += ["", markdown_table(rows), ""]


def _sweep_settings(report: _Report, args, settings: Settings) -> Settings:
    """The sweeps' settings: dynamic compile unless --compile-static; --quick narrows them."""
    sw_settings = replace(settings, compile_dynamic=not args.compile_static)
    if args.quick and args.max_mem_gb is None and settings.device.type == "cpu":
        sw_settings = replace(sw_settings, max_bytes=min(settings.max_bytes, 1 << 30))
        report.notes.append(
            "--quick on CPU: sweeps skip implementations estimated above 1 GiB (the published formulation "
            "from the base size up)."
        )
    if args.quick and "compile" in settings.impls:
        sw_settings = replace(sw_settings, impls=tuple(i for i in settings.impls if i != "compile"))
    return sw_settings


def _sweeps_section(
    report: _Report, args, v: dict, settings: Settings, machine: Machine, base: Case, measured: dict, t_start: float
) -> None:
    sweep_sets = TINY_SWEEPS if args.tiny else (QUICK_SWEEPS if args.quick else FULL_SWEEPS)
    sw_settings = _sweep_settings(report, args, settings)
    spec = OPS["region_loss"]
    report.md += [
        "## Sweeps of the region loss",
        "",
        f"`RegionDiscriminationLoss({spec.config})`; one parameter varied, the others at the base "
        "configuration. compile: "
        f"{'static shapes per point' if args.compile_static else 'dynamic=True (one graph per mode and dtype)'}. "
        "The base point, common to all sweeps, is measured once and repeated in each table.",
        "",
    ]
    torch._dynamo.reset()
    for sweep in v["sweeps"]:
        _progress(t_start, f"sweep {sweep}")
        points = _sweep_points(sweep, base, sweep_sets, settings.device)
        rows = _sweep_rows(sweep, points, args, settings, sw_settings, machine, measured)
        report.rows += rows
        report.md += [f"### Sweep {sweep}", "", markdown_table(rows, sweep), ""]
        report.save_partial()
        if not args.no_plots:
            _plot_sweep(report, rows, sweep, args.out)


def _sweep_points(sweep: str, base: Case, sweep_sets: dict, device: torch.device) -> list[Case]:
    if sweep == "dtype":
        return [replace(base, dtype=dt) for dt in DTYPES[device.type]]
    if sweep == "P":
        return [replace(base, H=s, W=s) for s in sweep_sets["P"]]
    return [replace(base, **{sweep: val}) for val in sweep_sets[sweep]]


def _sweep_rows(
    sweep: str, points: list[Case], args, settings: Settings, sw_settings: Settings, machine: Machine, measured: dict
) -> list[dict]:
    """One sweep's rows; a point measured before with the same implementations is reused."""
    rows = []
    for case in points:
        if args.compile_static:
            torch._dynamo.reset()
        label = sweep_label(
            dict(H=case.H, W=case.W, N=case.N, D=case.D, K=case.K, dtype=case.dtype, op="", M=case.M), sweep
        )
        if case in measured and measured[case][0] == sw_settings.impls:
            log(settings, f"  {label}: same case as measured before, rows reused")
            rows += [dict(r, section="sweeps", sweep=sweep) for r in measured[case][1]]
            continue
        log(settings, f"  {label}")
        case_rows = run_case(OPS["region_loss"], case, sw_settings, machine, section="sweeps", sweep=sweep)
        measured[case] = (sw_settings.impls, case_rows)
        rows += case_rows
    return rows


def _plot_sweep(report: _Report, rows: list[dict], sweep: str, out: str) -> None:
    png = os.path.join(out, f"bench_sweep_{sweep}.png")
    note = plot_sweep(rows, sweep, png)
    if note:
        if note not in report.notes:
            report.notes.append(note)
            print(f"note: {note}", flush=True)
    else:
        report.md += [f"![sweep {sweep}](bench_sweep_{sweep}.png)", ""]


def _e2e_section(report: _Report, settings: Settings, v: dict, tiny: bool) -> None:
    bs, size = (1, 16) if tiny else (4, 128)
    rows, how = run_e2e(settings, batch_size=bs, size=size, steps=v["e2e_steps"], warmup=1 if tiny else 2)
    report.rows += rows
    report.md += ["## End to end: LD training steps per second", ""]
    report.md += [e2e_markdown(rows, how) if rows else how, ""]


def _finish_report(report: _Report, args, machine: Machine, t_start: float, base: Case) -> None:
    """The measured device rates, run time and notes; results.csv and results.md written; the summary
    printed (and with --full the whole report)."""
    md = report.md
    if machine._bw is not None:
        md.append(
            f"Measured on this device in this run: copy bandwidth {machine.bandwidth / 1e9:.1f} GB/s (dst.copy_(src), "
            f"read + write counted); matmul rate "
            + ", ".join(f"{str(k).replace('torch.', '')} {r / 1e9:.0f} GFLOP/s" for k, r in machine._rate.items())
            + ". Floor = max(bytes that must move / copy bandwidth, matmul FLOPs / matmul rate)."
        )
        md.append("")
    elapsed = time.perf_counter() - t_start
    md += [f"Run time {elapsed:.0f} s (compile time included)."] + [f"Note: {n}" for n in report.notes]
    report.save()
    if args.full:
        print("\n".join(md) + "\n", flush=True)
    print(_summary_title(args, machine, elapsed, base), flush=True)
    print("\n".join(summary_lines(report.rows)), flush=True)
    plots = "" if args.no_plots or "sweeps" not in {r["section"] for r in report.rows} else ", bench_sweep_*.png"
    print(
        f"full tables: {report.md_path} (also {report.csv_path}{plots})"
        + ("" if args.full else "; --full prints them"),
        flush=True,
    )


def _summary_title(args, machine: Machine, elapsed: float, base: Case) -> str:
    load = ""
    if machine.device.type == "cpu":
        try:
            load = f", load average {os.getloadavg()[0]:.1f} at the end"
        except OSError:
            pass
    return (
        f"\nld-ext bench summary ({machine.device.type}{', quick' if args.quick else ''}; {elapsed:.0f} s{load}); "
        f"base case N={base.N} D={base.D} K={base.K} {base.H}x{base.W} {base.dtype}, ratios = time / fused time "
        "in this run:"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ld-ext bench", description="Benchmark the fused ops against plain PyTorch.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
