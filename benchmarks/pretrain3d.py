"""3-D pre-training on the CPU: memory and speed of ``ld-ext pretrain --dims 3`` (issue 23).

    python benchmarks/pretrain3d.py step [--size 96] [--batch 2] [--steps 2] [--threads N] [--out DIR]
    python benchmarks/pretrain3d.py ct [--shape 512 512 300] [--size 32] [--steps 2] [--out DIR]

``step``: pre-training steps at cubic patches of edge ``--size`` (default 96), ``--batch`` pairs (5B
network inputs per step), stage 2 (PD + mixup + the LD terms), on two synthetic volumes; in a child
process, which reports its peak RSS (``VmHWM``, whole process: start-up, cache build and the steps;
also ``ru_maxrss`` seen by the parent), the time of each step (the first one counts as warm-up),
images/s (5B network inputs per step) and the LD head's share: the head (region discrimination +
entropy through the fused ops, ``LDObjective.region_loss`` as a step calls it) timed forward +
backward alone on embeddings and logits of the step's shape (the 4B views), computed by the trained
network from patches of the same volumes.

``ct``: a synthetic CT-like volume (``--shape``, default 512 x 512 x 300, int16 HU in a .nii.gz;
float32 once decoded) is written by one child process, then ``ld-ext pretrain --dims 3 --size S
--window -1000 400`` runs a few steps on it in another (cache build included); the parent (the
standard library only, so that none of its memory is counted) reports the child's peak RSS
(``ru_maxrss`` by ``os.wait4``) against the decoded volume's size + 1.5 GB.

Results are printed as markdown and written to ``OUT/pretrain3d_<part>.json``. Timings on a shared
machine are noisy: give the load average (printed) with any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 1024**3


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_measured(cmd: list[str]) -> tuple[int, int, float, str]:
    """Run ``cmd``; (return code, peak RSS in bytes by ``os.wait4``, seconds, the tail of its stderr)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - t0, tail


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------------------- step (child)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def step_child(args: argparse.Namespace) -> None:
    """In the child: volumes, the steps, the head alone; writes ``args.json``."""
    import numpy as np
    import torch

    from ld_ext.augment import VolumeViewGenerator
    from ld_ext.objective import RD_TEMPERATURE, LDObjective
    from ld_ext.train import TrainConfig, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    edge = VolumeViewGenerator(args.size).read_size + 8
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # smooth random volumes, a little larger than a patch read
        v = torch.nn.functional.interpolate(
            torch.rand((1, 1, 8, 8, 8), generator=g), size=(edge,) * 3, mode="trilinear"
        )
        np.save(work / f"vol{i}.npy", v[0, 0].numpy().astype(np.float32))
    stamps = []
    cfg = TrainConfig(
        data=[str(work)], out=str(work / "run"), dims=3, size=args.size, batch_size=args.batch, epochs1=0, epochs2=1,
        steps_per_epoch=args.steps, device="cpu", progress=False, overwrite=True, val_images=1,
    )  # fmt: skip
    t_start = time.perf_counter()
    summary = pretrain(cfg, on_step_end=lambda rec: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([t_start] + stamps[:-1], stamps)]
    model = summary["final_model"].cpu().train()
    n4 = 4 * args.batch
    x = torch.from_numpy(np.load(work / "vol0.npy")[: args.size, : args.size, : args.size].copy())[None, None]
    with torch.no_grad():
        z, s = model(x.expand(n4, 1, -1, -1, -1).contiguous())
    head = LDObjective(rd_temperature=RD_TEMPERATURE, assignment=model.assignment).region_loss
    head_s = []
    for _ in range(2):
        zz, ss = z.clone().requires_grad_(), s.clone().requires_grad_()
        t = time.perf_counter()
        rd, ent = head(zz, ss)
        (10 * rd + 0.1 * ent).backward()
        head_s.append(time.perf_counter() - t)
    del z, s, zz, ss
    out = {
        "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(), "step_seconds": steps,
        "head_seconds": head_s, "vm_hwm_bytes": _vm_hwm(), "volume_edge": edge,
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(out, indent=2))


def run_step(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="ld3d_step_") as tmp:
        js = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_step-child", "--work", tmp, "--json", str(js)]
        cmd += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads or 0)]
        load_before = _load()
        rc, rss, secs, err = run_measured(cmd)
        if rc != 0:
            raise SystemExit(f"pretrain3d step: the child failed (exit {rc}):\n{err}")
        res = json.loads(js.read_text())
    steady = res["step_seconds"][1:] or res["step_seconds"]
    step_s = sum(steady) / len(steady)
    head_s = min(res["head_seconds"])
    res.update(
        ru_maxrss_bytes=rss, child_seconds=round(secs, 1), load_before=load_before, load_after=_load(),
        step_seconds_steady=step_s, images_per_s=5 * args.batch / step_s, head_share=head_s / step_s,
    )  # fmt: skip
    return res


def step_markdown(r: dict) -> str:
    return "\n".join(
        [
            "| patch | batch (pairs, inputs) | threads | step s (steady) | images/s | LD head fwd+bwd s | head share "
            "| peak RSS (VmHWM) | ru_maxrss |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {r['size']}^3 | {r['batch']}, {5 * r['batch']} | {r['threads']} | {r['step_seconds_steady']:.1f} "
            f"| {r['images_per_s']:.3f} | {min(r['head_seconds']):.2f} | {100 * r['head_share']:.1f} % "
            f"| {r['vm_hwm_bytes'] / GIB:.2f} GiB | {r['ru_maxrss_bytes'] / GIB:.2f} GiB |",
            "",
            f"every step (s): {', '.join(f'{s:.1f}' for s in r['step_seconds'])}; load average before "
            f"{r['load_before']}, after {r['load_after']}",
        ]
    )


# ----------------------------------------------------------------------------------------- ct


def ct_writer(args: argparse.Namespace) -> None:
    """In a child: a CT-like int16 volume (air, a body ellipse of soft tissue with noise, two lungs, a
    spine) as .nii.gz, 0.7 x 0.7 x 1.5 mm."""
    import nibabel as nib
    import numpy as np

    x, y, z = args.shape
    rng = np.random.default_rng(0)
    vol = np.full((x, y, z), -1000, np.int16)
    i, j = np.ogrid[:x, :y]
    cx, cy = x / 2, y / 2
    body = ((i - cx) / (0.42 * x)) ** 2 + ((j - cy) / (0.32 * y)) ** 2 <= 1
    lungs = [((i - cx - s * 0.17 * x) / (0.12 * x)) ** 2 + ((j - cy) / (0.2 * y)) ** 2 <= 1 for s in (-1, 1)]
    spine = ((i - cx) / (0.05 * x)) ** 2 + ((j - cy - 0.22 * y) / (0.05 * y)) ** 2 <= 1
    for k in range(z):
        sl = np.where(body, 40 + rng.normal(0, 20, (x, y)), -1000)
        for lung in lungs:
            sl[lung] = -820 + 30 * np.sin(k / 9.0)
        sl[spine] = 700
        vol[:, :, k] = np.clip(sl, -1024, 3000).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.5, 1.0]))
    nib.save(img, args.path)


def run_ct(args: argparse.Namespace) -> dict:
    me = str(Path(__file__).resolve())
    x, y, z = args.shape
    decoded = 4 * x * y * z
    with tempfile.TemporaryDirectory(prefix="ld3d_ct_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        path = data / "ct.nii.gz"
        rc, _, wsecs, err = run_measured(
            [sys.executable, me, "_ct-writer", "--path", str(path), "--shape", *map(str, args.shape)]
        )
        if rc != 0:
            raise SystemExit(f"pretrain3d ct: writing the volume failed (exit {rc}):\n{err}")
        cmd = [sys.executable, "-m", "ld_ext", "pretrain", "--dims", "3", "--size", str(args.size), "--data", str(data)]
        cmd += ["--out", str(Path(tmp) / "run"), "--window", "-1000", "400", "--epochs1", "1", "--epochs2", "1"]
        cmd += ["--steps-per-epoch", str(args.steps), "--batch-size", "2", "--device", "cpu"]
        load_before = _load()
        rc, rss, secs, err = run_measured(cmd)
        if rc != 0:
            raise SystemExit(f"pretrain3d ct: ld-ext pretrain failed (exit {rc}):\n{err}")
        file_bytes = path.stat().st_size
    limit = decoded + 1.5 * GIB
    return {
        "shape": list(args.shape), "size": args.size, "steps": 2 * args.steps, "decoded_bytes": decoded,
        "file_bytes": file_bytes, "peak_rss_bytes": rss, "limit_bytes": limit, "below_limit": rss < limit,
        "seconds": round(secs, 1), "write_seconds": round(wsecs, 1), "load_before": load_before, "load_after": _load(),
        "command": " ".join(["ld-ext"] + cmd[3:]).replace(str(data), "DATA").replace(str(Path(tmp) / "run"), "OUT"),
    }  # fmt: skip


def ct_markdown(r: dict) -> str:
    mb = 1024**2
    return "\n".join(
        [
            "| volume | decoded (float32) | file (.nii.gz, int16) | patches | steps | peak RSS "
            "| limit (decoded + 1.5 GiB) | below | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {' x '.join(map(str, r['shape']))} | {r['decoded_bytes'] / mb:.0f} MiB "
            f"| {r['file_bytes'] / mb:.0f} MiB "
            f"| {r['size']}^3 | {r['steps']} | {r['peak_rss_bytes'] / mb:.0f} MiB | {r['limit_bytes'] / mb:.0f} MiB "
            f"| {'yes' if r['below_limit'] else 'NO'} | {r['seconds']} |",
            "",
            f"command: `{r['command']}`; load average before {r['load_before']}, after {r['load_after']}",
        ]
    )


# ----------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    st = sub.add_parser("step", help="a pre-training step at 96^3 (default): peak RSS, images/s, the head's share")
    st.add_argument("--size", type=int, default=96)
    st.add_argument("--batch", type=int, default=2)
    st.add_argument("--steps", type=int, default=2, help="steps (the first is warm-up; default 2)")
    st.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ct = sub.add_parser("ct", help="a 512 x 512 x 300 CT-like volume pre-trains: peak RSS against its size")
    ct.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ct.add_argument("--size", type=int, default=32)
    ct.add_argument("--steps", type=int, default=2, help="steps per epoch (2 epochs; default 2)")
    for q in (st, ct):
        q.add_argument("--out", default="bench_out", help="folder of the JSON result (default bench_out)")
    child = sub.add_parser("_step-child")
    child.add_argument("--work", required=True)
    child.add_argument("--json", required=True)
    for name in ("size", "batch", "steps", "threads"):
        child.add_argument(f"--{name}", type=int, required=True)
    writer = sub.add_parser("_ct-writer")
    writer.add_argument("--path", required=True)
    writer.add_argument("--shape", type=int, nargs=3, required=True)
    args = p.parse_args(argv)
    if args.part == "_step-child":
        step_child(args)
        return 0
    if args.part == "_ct-writer":
        ct_writer(args)
        return 0
    res = run_step(args) if args.part == "step" else run_ct(args)
    md = step_markdown(res) if args.part == "step" else ct_markdown(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    (out / f"pretrain3d_{args.part}.json").write_text(json.dumps(res, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
