"""Data-pipeline benchmark of ``ld-ext pretrain``: cache build rate, steady-state training
images/s streaming from the cache vs the in-memory path (same process, interleaved), the share
of step time spent waiting for data, and peak RSS of a tiny ``ld-ext pretrain`` against the
data-set size.

    python benchmarks/data_pipeline.py [--sizes 400 4000] [--out bench_out] [--quick]

Synthetic 16-bit 128x128 PNGs are written to a temporary folder (or ``--data-root``, reused when
it already holds them). Outputs: ``OUT/data_pipeline.json`` and ``OUT/data_pipeline.md``.
Timings on a shared machine are noisy: compare only figures of one run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if (ROOT / "ld_ext").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def write_pngs(root: Path, n: int, size: int = 128, seed: int = 0) -> Path:
    """n 16-bit gray PNGs (a bright blob on a noisy background), 1000 per sub-folder."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        sub = root / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        cx, cy, r = rng.uniform(0.25 * size, 0.75 * size, 3)
        img = 20000 + 30000 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.08 * size + r / 3) ** 2))
        img = img + rng.normal(0, 2000, (size, size))
        Image.fromarray(np.clip(img, 0, 65535).astype(np.uint16)).save(sub / f"img{i:06d}.png")
    done.write_text(str(n))
    return root


def cache_build_rate(data: Path, cache: Path, workers: int) -> dict:
    from ld_ext.data import Preprocessing, open_or_build_cache

    t = time.perf_counter()
    ds = open_or_build_cache(data, Preprocessing(128, 1), cache, workers=workers, progress=False)
    dt = time.perf_counter() - t
    return {"images": len(ds), "workers": workers, "seconds": round(dt, 3), "images_per_s": round(len(ds) / dt, 1)}


def training_rates(cache_ds, steps: int, batch: int, repeats: int, loader_workers: list[int], out: Path) -> dict:
    """Steady-state images/s (the second epoch of each run) of the in-memory path and of streaming
    with each DataLoader worker count; the runs are interleaved in a rotating order."""
    from ld_ext import train
    from ld_ext.data import ImageFolderDataset

    mem_ds = ImageFolderDataset.from_tensor(cache_ds.read(range(len(cache_ds))))
    kinds = [("in_memory", mem_ds, 0)] + [(f"streaming_w{w}", cache_ds, w) for w in loader_workers]
    rates: dict = {k: [] for k, _, _ in kinds}
    waits: dict = {k: [] for k, _, _ in kinds}
    for r in range(repeats):
        for kind, ds, w in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            cfg = train.TrainConfig(
                out=str(out / f"run_{kind}_{r}"), size=128, batch_size=batch, epochs1=2, epochs2=0, steps_per_epoch=steps,
                val_images=0, progress=False, device="cpu", loader_workers=w, checkpoint_minutes=None,
            )
            with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch JSON lines
                rec = train.pretrain(cfg, dataset=ds)["records"][-1]  # epoch 2: workers and caches warm
            rates[kind].append(rec["images_per_s"])
            waits[kind].append(rec["data_wait_s"] / rec["seconds"])
            print(f"  {kind}: {rec['images_per_s']} images/s, waiting for data {100 * waits[kind][-1]:.2f} %", flush=True)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    return {
        "steps_per_epoch": steps, "batch": batch, "repeats": repeats, "images_per_s": rates,
        "median_images_per_s": med,
        "over_in_memory": {k: round(v / med["in_memory"], 3) for k, v in med.items() if k != "in_memory"},
        # best of the repeats: the run least disturbed by other load (on a shared machine the
        # medians swing with it)
        "best_images_per_s": {k: max(v) for k, v in rates.items()},
        "best_over_in_memory": {k: round(max(v) / max(rates["in_memory"]), 3) for k, v in rates.items() if k != "in_memory"},
        "data_wait_share": {k: float(np.median(v)) for k, v in waits.items()},
    }


def peak_rss_mb(data: Path, out: Path, extra: list[str] | None = None) -> float:
    """Peak RSS (MB) of a tiny `ld-ext pretrain` in a fresh process (cache built inside the run)."""
    cmd = [sys.executable, "-m", "ld_ext.cli", "pretrain", "--data", str(data), "--out", str(out), "--size", "128",
           "--epochs1", "1", "--epochs2", "0", "--steps-per-epoch", "2", "--batch-size", "2", "--val-images", "2",
           "--no-progress", *(extra or [])]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    from ld_ext.bench.memory import child_peak_rss

    rc, peak, err = child_peak_rss(cmd, env)
    if rc != 0:
        raise RuntimeError(f"pretrain failed ({rc}): {err[-2000:]}")
    return peak / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[400, 4000], help="data-set sizes for the RSS sweep (none: skip it)")
    ap.add_argument("--rss-repeats", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=400, help="data-set size of the training-rate comparison")
    ap.add_argument("--steps", type=int, default=6, help="steps per epoch in the training-rate comparison")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4, help="runs of each path (interleaved)")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts to compare")
    ap.add_argument("--workers", type=int, default=None, help="cache build processes (default: CPUs, at most 8)")
    ap.add_argument("--data-root", default=None, help="where the synthetic PNG folders are kept (default: a temp folder)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="--sizes 200 800 --repeats 2 --steps 3 --rss-repeats 1")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats, a.steps, a.rss_repeats, a.train_images = [200, 800], 2, 3, 1, 200
    workers = a.workers if a.workers is not None else max(1, min(8, len(os.sched_getaffinity(0))))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="ld_ext_data_bench_")
    data_root = Path(a.data_root) if a.data_root else Path(tmp.name) / "data"
    work = Path(tmp.name)
    result: dict = {"cpus": os.cpu_count()}

    # peak RSS first, while this process is small: a child's peak RSS includes what it shares
    # with this process when it is forked
    rss = []
    for n in a.sizes:
        d = write_pngs(data_root / f"png{n}", n)
        vals = [peak_rss_mb(d, work / f"rss_{n}_{r}") for r in range(a.rss_repeats)]
        rss.append({"images": n, "peak_rss_mb": [round(v, 1) for v in vals], "median_mb": round(float(np.median(vals)), 1)})
        print("peak RSS:", json.dumps(rss[-1]), flush=True)
    result["peak_rss"] = rss

    import torch

    result.update({"torch": torch.__version__, "threads": torch.get_num_threads()})
    train_data = write_pngs(data_root / f"png{a.train_images}", a.train_images)
    result["cache_build"] = cache_build_rate(train_data, work / "cache", workers)
    print("cache build:", json.dumps(result["cache_build"]), flush=True)
    from ld_ext.data import Preprocessing, open_or_build_cache

    cache_ds = open_or_build_cache(train_data, Preprocessing(128, 1), work / "cache", workers=workers, progress=False)
    result["training"] = training_rates(cache_ds, a.steps, a.batch, a.repeats, a.loader_workers, work)
    print("training:", json.dumps(result["training"]), flush=True)

    (out / "data_pipeline.json").write_text(json.dumps(result, indent=1))
    tr = result["training"]
    md = [
        "| measure | value |", "|---|---|",
        f"| cache build | {result['cache_build']['images']} images in {result['cache_build']['seconds']} s "
        f"= {result['cache_build']['images_per_s']} images/s ({workers} processes) |",
    ]
    for k, v in tr["median_images_per_s"].items():
        ratio = f" ({tr['over_in_memory'][k]:.3f}x in memory)" if k in tr["over_in_memory"] else ""
        best = f" ({tr['best_over_in_memory'][k]:.3f}x in memory)" if k in tr["best_over_in_memory"] else ""
        md.append(f"| training images/s, {k}: median / best of {tr['repeats']} | {v:.2f}{ratio} / "
                  f"{tr['best_images_per_s'][k]:.2f}{best}; waiting for data {100 * tr['data_wait_share'][k]:.2f} % of the epoch |")
    for r in rss:
        md.append(f"| peak RSS, tiny pretrain, {r['images']} images | {r['median_mb']} MB (runs: {r['peak_rss_mb']}) |")
    (out / "data_pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
