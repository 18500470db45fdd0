"""End-to-end LD training steps: fused ld_ext losses vs the plain-PyTorch losses, with and without AMP.

One training step = the LD recipe's stage-2 step (``ld_ext.bench.end_to_end.make_training_step``): B pairs of
source images, 5B views made on the device (4B aligned views + B mixups), forward through the LD
network (VGG16-BN-tiny encoder, U-Net decoder, D = 32, K = 16), the full objective
L_pd + L_mixup + 10 L_rd + 0.1 L_ent, backward and an Adam update. The two loss implementations
("fused": the ld_ext loss modules; "reference": their plain-PyTorch twins, ``ld_ext.plain_losses``) run on
identical networks and data; the variants are timed interleaved in one process (``ld_ext.bench
.timing.measure_group``: warm-up, then rounds that take one sample of every variant in turn; CUDA events
on a GPU), so load changes hit all of them alike. AMP: the step runs under
``torch.autocast(dtype=bfloat16)`` (the fused ops compute in fp32 internally and return fp32 losses).

Reported per variant: ms per step (median, quartiles), steps/s, images/s (5B images per step), and
the peak memory of one step (``ld_ext.bench.memory``; CUDA: ``torch.cuda.max_memory_allocated``
during the step, absolute and above what was held before it). The headline is fused / reference step rate at each precision.

Defaults are the paper's scale: 448x448, B = 4 (20 images per step), 3-channel input.

    python benchmarks/gpu_train.py                              # on a GPU: writes gpu_train.{json,md}
    python benchmarks/gpu_train.py --device cpu --size 64 --repeats 2   # logic check on a CPU

Without a GPU and without ``--device cpu`` it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

IMPLS = ("fused", "reference")


def _peak_of_one_step(step, device: torch.device) -> dict:
    """Peak memory of one step, with the benchmark engine's probes (ld_ext.bench.memory)."""
    from ld_ext.bench.memory import cuda_peak_memory, measure_peak_memory

    if device.type != "cuda":
        extra, method = measure_peak_memory(step, device)
        return {"peak_extra_mib": None if extra is None else extra / 2**20, "peak_total_mib": None, "memory_method": method}
    extra, peak = cuda_peak_memory(step, device)
    return {
        "peak_extra_mib": extra / 2**20,
        "peak_total_mib": peak / 2**20,
        "memory_method": "torch.cuda.max_memory_allocated during one step (total, and above what was held before it)",
    }


def measure(device: torch.device, size: int, batch_size: int, channels: int, repeats: int, amp_modes, seed: int = 0) -> dict:
    from ld_ext.bench.end_to_end import make_training_step
    from ld_ext.bench.timing import measure_group
    from ld_ext.models import LDNet

    steps, rows = {}, []
    for amp in amp_modes:
        for impl in IMPLS:
            torch.manual_seed(seed)  # the same initial network for every variant
            model = LDNet(channels, 32, 16).to(device)
            raw = make_training_step(model, impl, batch_size=batch_size, size=size, device=device, seed=seed)
            if amp == "bf16":
                def step(raw=raw):
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                        return raw()
            else:
                step = raw
            steps[(impl, amp)] = step
    # Check the steps run and give finite losses before timing anything.
    first = {}
    for key, step in steps.items():
        losses = step()
        if not all(map(lambda v: v == v and abs(v) != float("inf"), losses.values())):
            raise RuntimeError(f"non-finite loss in variant {key}: {losses}")
        first[key] = losses
    names = {f"{impl}/{amp}": steps[(impl, amp)] for impl, amp in steps}
    timings = measure_group(
        {name: (lambda i, f=fn: f()) for name, fn in names.items()}, 1, device,
        warmup=2, repeats=repeats, target_sample_s=0.0, max_number=1, slow_call_s=10.0,
    )
    images = 5 * batch_size
    for (impl, amp), step in steps.items():
        t = timings[f"{impl}/{amp}"]
        mem = _peak_of_one_step(step, device)
        rows.append({
            "impl": impl, "amp": amp, "ms_per_step": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms,
            "steps_per_s": 1e3 / t.median_ms, "images_per_s": images * 1e3 / t.median_ms,
            "first_loss": first[(impl, amp)]["loss"], **mem,
        })
    ratios = {}
    for amp in amp_modes:
        f = next(r for r in rows if r["impl"] == "fused" and r["amp"] == amp)
        p = next(r for r in rows if r["impl"] == "reference" and r["amp"] == amp)
        ratios[f"fused_vs_reference_{amp}"] = p["ms_per_step"] / f["ms_per_step"]
    return {"rows": rows, "ratios": ratios}


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        f"End-to-end LD training step, {c['size']}x{c['size']}, B={c['batch_size']} ({5 * c['batch_size']} images/step), "
        f"{c['channels']}-channel input, D=32, K=16, {c['device_name']}, torch {c['torch']}, {c['date']}",
        "",
        "| losses | AMP | ms/step (median) | steps/s | images/s | peak memory (MiB, total / step) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        tot = "-" if r["peak_total_mib"] is None else f"{r['peak_total_mib']:.0f}"
        ext = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        lines.append(
            f"| {r['impl']} | {r['amp']} | {r['ms_per_step']:.1f} ({r['q1_ms']:.1f}-{r['q3_ms']:.1f}) | "
            f"{r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | {tot} / {ext} |"
        )
    lines.append("")
    for k, v in res["ratios"].items():
        lines.append(f"- {k.replace('_', ' ')}: **{v:.2f}x** (target >= 1.3x)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (logic check)")
    p.add_argument("--size", type=int, default=448, help="image size (the paper's crop)")
    p.add_argument("--batch-size", type=int, default=4, help="B pairs per step (5B images)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels (the paper: 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per variant")
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"), help="precisions")
    p.add_argument("--out", default=None, help="folder for gpu_train.json and gpu_train.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_train: no CUDA device (use --device cpu for a logic check)", file=sys.stderr)
        return 2
    t0 = time.time()
    res = measure(device, args.size, args.batch_size, args.channels, args.repeats, args.amp)
    res["config"] = {
        "size": args.size, "batch_size": args.batch_size, "channels": args.channels, "repeats": args.repeats,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
    }
    md = markdown(res)
    print(md)
    if args.out:
        from ld_ext.atomic import atomic_write_bytes

        os.makedirs(args.out, exist_ok=True)
        atomic_write_bytes(os.path.join(args.out, "gpu_train.json"), json.dumps(res, indent=2).encode())
        atomic_write_bytes(os.path.join(args.out, "gpu_train.md"), md.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
