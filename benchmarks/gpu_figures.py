"""The must-hold GPU figures of the fused LD ops, measured in one process on one device.

At N=16, D=32, K=16, 448x448 (P = 200704), forward + backward of
``RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)``
(loss = 10 * L_rd + 0.1 * L_ent, as in the recipe), and of ``pixel_cluster_similarity``:

| figure                                   | target     |
| ---------------------------------------- | ---------- |
| fp32 fused vs efficient eager (bmm)      | >= 5x      |
| fp32 fused vs torch.compile(eager)       | >= 2x      |
| fp32 fused vs published broadcast        | (or OOM)   |
| fused achieved bandwidth / copy bandwidth| >= 60 %    |
| bf16 fused vs fp32 fused                 | >= 1.6x    |
| peak extra memory of fused fwd+bwd       | <= 64 MiB  |
| pixel_cluster_similarity fused vs eager  | >= 3x      |

Timing and memory: the benchmark engine's own code (``ld_ext.bench.timing.time_call``: CUDA events
around each call after warm-up, median of the repeats; ``ld_ext.bench.memory.cuda_peak_memory``;
``ld_ext.bench.timing.copy_bandwidth``). Bytes counted for the
fused loss: forward reads e and s, backward reads them again and writes both gradients
(4 * N * (D + K) * P * itemsize). Copy bandwidth: a 1 GiB device-to-device copy, read + write.

Usage: ``python benchmarks/gpu_figures.py [--quick] [--out DIR]``. Without a CUDA device it says so
and exits with status 2 (it stays importable and its arguments parse on any machine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# Run from a checkout (python benchmarks/gpu_figures.py): make the in-place build importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

N, D, K, H, W = 16, 32, 16, 448, 448
TAU = 0.2
CUDA = torch.device("cuda")


def _time_ms(fn, warmup: int, iters: int) -> float:
    """Median ms per call of ``fn()`` (CUDA events, after ``warmup`` calls): the engine's timer."""
    from ld_ext.bench.timing import time_call

    return time_call(fn, CUDA, warmup=warmup, repeats=iters, slow_call_s=float("inf")).median_ms


def _copy_bandwidth(warmup: int, iters: int) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    from ld_ext.bench.timing import copy_bandwidth

    return copy_bandwidth(CUDA, nbytes=1 << 30, repeats=iters)


def _inputs(dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))
    e = torch.randn((N, D, H, W), device="cuda", generator=g).to(dtype).requires_grad_()
    s = (2 * torch.randn((N, K, H, W), device="cuda", generator=g)).to(dtype).requires_grad_()
    return e, s


def _loss_step(loss_fn, e, s):
    def step():
        e.grad = None
        s.grad = None
        l_rd, l_ent = loss_fn(e, s)
        (10 * l_rd + 0.1 * l_ent).backward()

    return step


def _peak_extra_bytes(step, e, s) -> int:
    """Peak memory of fwd+bwd above what was held before (the engine's probe) minus the gradients."""
    from ld_ext.bench.memory import cuda_peak_memory

    e.grad = None
    s.grad = None
    torch.cuda.empty_cache()
    extra, _ = cuda_peak_memory(step, CUDA)
    grads = e.numel() * e.element_size() + s.numel() * s.element_size()
    return extra - grads


def _kernel_breakdown(step, reps: int = 3) -> list[dict]:
    """Per-kernel device time (microseconds per step) of `step`, from torch.profiler (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    from ld_ext.bench.timing import sync

    step()
    sync(CUDA)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        sync(CUDA)
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us and us > 0:
            rows.append({"kernel": evt.key[:110], "us_per_step": us / reps, "calls_per_step": evt.count / reps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:14]


def _fused_correctness(fused, e, s) -> dict:
    """Relative errors of the fused fp32 loss and gradients at the benchmark size vs float64."""
    from ld_ext import reference as R

    def run(fn, ee, ss):
        ee = ee.detach().clone().requires_grad_()
        ss = ss.detach().clone().requires_grad_()
        l_rd, l_ent = fn(ee, ss)
        (10 * l_rd + 0.1 * l_ent).backward()
        return [l_rd.detach(), l_ent.detach(), ee.grad, ss.grad]

    def ref(ee, ss):
        return R.region_discrimination_loss(ee, ss, temperature=TAU, normalize=True, assignment="sigmoid",
                                            return_entropy=True)

    got = run(fused, e, s)
    want = run(ref, e.double(), s.double())
    out = {}
    for name, g, w in zip(["loss_rd", "loss_ent", "grad_e", "grad_s"], got, want):
        g = g.double()
        out[name] = float("inf") if not torch.isfinite(g).all() else ((g - w).norm() / w.norm()).item()
    del want
    torch.cuda.empty_cache()
    return out


def _env_variants(step, variants, warm: int, iters: int) -> dict:
    """Median ms of `step` under each (label, {environment variable: value}) of `variants`: the
    register-blocked kernels' knobs LD_EXT_CUDA_RB_FWD_CP / LD_EXT_CUDA_RB_BWD_CP (chunk caps; 0 =
    the general kernels) and LD_EXT_CUDA_RB_PREFETCH (0 = no reads one chunk ahead)."""
    out = {}
    for label, env in variants:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            out[label] = _time_ms(step, warm, iters)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def _cp(fwd: int, bwd: int) -> tuple[str, dict]:
    return f"fwd{fwd}/bwd{bwd}", {"LD_EXT_CUDA_RB_FWD_CP": str(fwd), "LD_EXT_CUDA_RB_BWD_CP": str(bwd)}


NO_PREFETCH = ("no prefetch", {"LD_EXT_CUDA_RB_PREFETCH": "0"})


def measure(quick: bool = False) -> dict:
    import ld_ext
    from ld_ext import reference as R

    warm, iters = (2, 5) if quick else (3, 20)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": f"N={N} D={D} K={K} {H}x{W}",
        "build": ld_ext.build_info(),
    }
    res["copy_bw"] = _copy_bandwidth(warm, iters)

    fused = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)

    def eager(e, s):
        return R.region_discrimination_loss(e, s, temperature=TAU, normalize=True, assignment="sigmoid",
                                            return_entropy=True)

    def broadcast(e, s):
        return R.region_discrimination_loss_broadcast(e, s, temperature=TAU, normalize=True, assignment="sigmoid",
                                                      return_entropy=True)

    e, s = _inputs(torch.float32)
    res["fused_fp32_rel_err"] = _fused_correctness(fused, e, s)
    res["fused_fp32_ms"] = _time_ms(_loss_step(fused, e, s), warm, iters)
    res["fused_fp32_fwd_ms"] = _time_ms(lambda: fused(e.detach(), s.detach()), warm, iters)
    res["fused_fp32_kernels"] = _kernel_breakdown(_loss_step(fused, e, s))
    res["fused_fp32_extra_mib"] = _peak_extra_bytes(_loss_step(fused, e, s), e, s) / 2**20
    nbytes = 4 * N * (D + K) * H * W * e.element_size()
    res["fused_fp32_bw"] = nbytes / (res["fused_fp32_ms"] * 1e-3)
    res["eager_fp32_ms"] = _time_ms(_loss_step(eager, e, s), warm, iters)
    try:
        from ld_ext.bench.timing import time_once

        compiled = torch.compile(eager)
        res["compile_s"] = time_once(_loss_step(compiled, e, s), CUDA)
        res["compiled_fp32_ms"] = _time_ms(_loss_step(compiled, e, s), warm, iters)
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        res["compiled_fp32_ms"] = None
        res["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        torch.cuda.empty_cache()
        res["broadcast_fp32_ms"] = _time_ms(_loss_step(broadcast, e, s), 1, 3)
    except torch.cuda.OutOfMemoryError:
        res["broadcast_fp32_ms"] = "OOM"
    torch.cuda.empty_cache()

    # Chunk sizes of the register-blocked kernels (LD_EXT_CUDA_RB_*_CP; 0 = the general kernels),
    # fwd+bwd time of the same fp32 loss; the defaults are what the figures above use.
    res["fused_fp32_chunk_variants_ms"] = _env_variants(
        _loss_step(fused, e, s), [("default", {}), NO_PREFETCH, _cp(64, 64), _cp(128, 32), _cp(64, 32), _cp(0, 0)],
        warm, iters)

    # Same values in bf16: the fused kernels read half the bytes and accumulate in fp32.
    eb = e.detach().to(torch.bfloat16).requires_grad_()
    sb = s.detach().to(torch.bfloat16).requires_grad_()
    del e, s
    torch.cuda.empty_cache()
    res["fused_bf16_ms"] = _time_ms(_loss_step(fused, eb, sb), warm, iters)
    res["fused_bf16_kernels"] = _kernel_breakdown(_loss_step(fused, eb, sb))
    res["fused_bf16_variants_ms"] = _env_variants(_loss_step(fused, eb, sb), [NO_PREFETCH], warm, iters)
    del eb, sb
    torch.cuda.empty_cache()

    # pixel_cluster_similarity, per-image prototypes (the soft-segmentation use), normalize=True.
    e = torch.randn((N, D, H, W), device="cuda").requires_grad_()
    p = torch.nn.functional.normalize(torch.randn((N, K, D), device="cuda"), dim=2).requires_grad_()
    gout = torch.randn((N, K, H, W), device="cuda")

    def pcs_step(fn):
        def step():
            e.grad = None
            p.grad = None
            fn(e, p, TAU, normalize=True).backward(gout)

        return step

    res["pcs_fused_ms"] = _time_ms(pcs_step(ld_ext.pixel_cluster_similarity), warm, iters)
    res["pcs_eager_ms"] = _time_ms(pcs_step(R.pixel_cluster_similarity), warm, iters)
    res["pcs_fused_kernels"] = _kernel_breakdown(pcs_step(ld_ext.pixel_cluster_similarity))
    res["pcs_chunk_variants_ms"] = _env_variants(
        pcs_step(ld_ext.pixel_cluster_similarity),
        [("default", {}), NO_PREFETCH, _cp(128, 32), _cp(64, 64), _cp(64, 32), _cp(0, 0)], warm, iters)
    return res


def _targets(res: dict) -> list[tuple[str, str, str, bool | None]]:
    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None

    rows = []
    r = ratio(res["eager_fp32_ms"], res["fused_fp32_ms"])
    rows.append(("fp32 fused vs eager (bmm)", f"{r:.2f}x" if r else "n/a", ">= 5x", r is not None and r >= 5))
    r = ratio(res.get("compiled_fp32_ms"), res["fused_fp32_ms"])
    rows.append(("fp32 fused vs torch.compile", f"{r:.2f}x" if r else "n/a", ">= 2x", r is not None and r >= 2))
    b = res["broadcast_fp32_ms"]
    r = ratio(b, res["fused_fp32_ms"])
    rows.append(("fp32 fused vs published broadcast", "OOM" if b == "OOM" else f"{r:.1f}x", "(or OOM)", None))
    r = res["fused_fp32_bw"] / res["copy_bw"]
    rows.append(("fused bandwidth / copy bandwidth",
                 f"{100 * r:.0f}% ({res['fused_fp32_bw'] / 1e12:.2f}/{res['copy_bw'] / 1e12:.2f} TB/s)", ">= 60%",
                 r >= 0.6))
    r = ratio(res["fused_fp32_ms"], res["fused_bf16_ms"])
    rows.append(("bf16 fused vs fp32 fused", f"{r:.2f}x", ">= 1.6x", r is not None and r >= 1.6))
    x = res["fused_fp32_extra_mib"]
    rows.append(("peak extra memory (fused fp32 fwd+bwd)", f"{x:.1f} MiB", "<= 64 MiB", x <= 64))
    r = ratio(res["pcs_eager_ms"], res["pcs_fused_ms"])
    rows.append(("pixel_cluster_similarity fused vs eager", f"{r:.2f}x", ">= 3x", r is not None and r >= 3))
    return rows


def _short(kernel: str) -> str:
    """Kernel name without return type, namespaces and template arguments: rf_forward_rb_kernel."""
    name = kernel.split("(anonymous namespace)::")[-1].split("ld_ext::cuda::")[-1]
    name = name.split("<")[0].split("(")[0]
    return name.replace("void ", "")[:40]


def table(res: dict) -> str:
    lines = [
        f"GPU figures on {res['device']} (torch {res['torch']}), {res['shape']}, fwd+bwd, median of CUDA-event timings",
        f"times (ms): fused fp32 {res['fused_fp32_ms']:.3f} | fused bf16 {res['fused_bf16_ms']:.3f} | "
        f"eager {res['eager_fp32_ms']:.3f} | compiled {res['compiled_fp32_ms'] if res.get('compiled_fp32_ms') is None else round(res['compiled_fp32_ms'], 3)} | "
        f"broadcast {res['broadcast_fp32_ms'] if isinstance(res['broadcast_fp32_ms'], str) else round(res['broadcast_fp32_ms'], 3)} | "
        f"pcs fused {res['pcs_fused_ms']:.3f} / eager {res['pcs_eager_ms']:.3f}",
        "",
        "| figure | measured | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, got, target, ok in _targets(res):
        lines.append(f"| {name} | {got} | {target} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    errs = res.get("fused_fp32_rel_err", {})
    if errs:
        lines.append("fused fp32 at this size vs float64 reference (rel. error): "
                     + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    lines.append(f"fused fp32 forward only: {res['fused_fp32_fwd_ms']:.3f} ms")
    var = res.get("fused_fp32_chunk_variants_ms") or {}
    if var:
        lines.append("fused fp32 fwd+bwd by chunk (LD_EXT_CUDA_RB_FWD_CP/BWD_CP; 0 = general kernels), ms: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in var.items()))
    var = res.get("fused_bf16_variants_ms") or {}
    if var:
        lines.append("fused bf16 fwd+bwd variants, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in var.items()))
    var = res.get("pcs_chunk_variants_ms") or {}
    if var:
        lines.append("pcs fwd+bwd by chunk, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in var.items()))
    for key in ("fused_fp32_kernels", "fused_bf16_kernels", "pcs_fused_kernels"):
        rows = res.get(key) or []
        if rows:
            lines.append(f"{key} (us/step): " + "; ".join(f"{_short(r['kernel'])} {r['us_per_step']:.0f}" for r in rows[:6]))
    if res.get("compiled_error"):
        lines.append(f"torch.compile failed: {res['compiled_error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (for a short device lease)")
    ap.add_argument("--out", default=None, help="directory for gpu_figures.json and gpu_figures.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_figures: no CUDA device on this machine; nothing measured")
        return 2
    res = measure(quick=args.quick)
    text = table(res)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_figures.json"), "w") as f:
            json.dump(res, f, indent=2, default=str)
        with open(os.path.join(args.out, "gpu_figures.md"), "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
