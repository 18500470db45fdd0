"""The landmark evaluation protocol (docs/tasks.md, "Landmarks: evaluation protocol").

Settings are selected on some images and reported on others, none of them used for pre-training:
slices of the MNI152 2009a T1 template shipped in nilearn, cut into 8 mm blocks of axial slices
(voxel index k, 1 mm): block k // 8 with (k // 8) % 3 == 0 -> pre-training, == 1 -> selection,
== 2 -> report; plus coronal slices (another orientation, never used for pre-training or
selection) for the report. Template slices are block centres (k % 8 == 4); cross-slice targets
come from the slices 2 mm away (the same block).

  python protocols/landmark_protocol.py export --out DIR      # DIR/pretrain/*.png (pre-training images)
  ld-ext pretrain --data DIR/pretrain --out DIR/run ...         # the network under test
  python protocols/landmark_protocol.py eval --checkpoint DIR/run/model.pt --split select|report --out R.json

Landmarks of a template slice: the 20 strongest corners (Shi-Tomasi: the smaller eigenvalue of the
structure tensor, Gaussian sigma 1.5 px) inside the brain, at least 6 px apart and 6 px from the
border; a rule that ignores every method (corners favour intensity matching: conservative for LD).
Targets per template: N random affine + elastic warps (rotation up to 30 deg, scale 0.85-1.15,
elastic 3 px, 20 % bias field, gamma, noise) of the template itself (``warp``, exact ground truth)
and of the slices 2 mm above or below (``cross-slice``; ground truth: the same in-plane position,
carried through the warp).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

BLOCK = 8
STRONG = dict(bias=0.2, max_rotation_deg=30.0, scale_range=(0.85, 1.15), elastic_px=3.0)


def _volume_slices(size: int, axis: int) -> tuple[np.ndarray, list[int]]:
    from ld_ext.demos.mni import load_mni_slices

    d = load_mni_slices(size, axis=axis)
    return d["images"][:, 0].numpy().astype(np.float32), d["index"].tolist()


def split_of(k: int) -> str:
    return ("pretrain", "select", "report")[(k // BLOCK) % 3]


def templates(size: int, split: str) -> list[dict]:
    """Template slices of a split: axial block centres; the report split adds coronal ones."""
    out = []
    axes = [(2, "axial")] + ([(1, "coronal")] if split == "report" else [])
    for axis, name in axes:
        imgs, index = _volume_slices(size, axis)
        pos = {k: i for i, k in enumerate(index)}
        for k in index:
            if k % BLOCK != BLOCK // 2 or k - 2 not in pos or k + 2 not in pos:
                continue
            if axis == 2 and split_of(k) != split:
                continue
            if axis == 1 and (k // BLOCK) % 3 != 2:  # a third of the coronal block centres
                continue
            img = imgs[pos[k]]
            if (img > 0.1).mean() < 0.25:  # mostly background: too few landmarks
                continue
            out.append({"orientation": name, "k": k, "template": img,
                        "neighbours": [imgs[pos[k - 2]], imgs[pos[k + 2]]]})
    return out


def corner_landmarks(img: np.ndarray, n: int = 20, spacing: int = 6, sigma: float = 1.5) -> np.ndarray:
    """The ``n`` strongest Shi-Tomasi corners (x, y) of ``img`` inside the brain (see the docstring)."""
    import torch.nn.functional as F

    t = torch.as_tensor(img, dtype=torch.float64)[None, None]
    gy, gx = torch.gradient(t[0, 0])
    r = int(3 * sigma)
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-ax**2 / (2 * sigma**2))
    k = (g[:, None] * g[None]) / (g.sum() ** 2)

    def smooth(a):
        return F.conv2d(F.pad(a[None, None], (r,) * 4, mode="reflect"), k[None, None])[0, 0]

    sxx, syy, sxy = smooth(gx * gx), smooth(gy * gy), smooth(gx * gy)
    lam = 0.5 * (sxx + syy - torch.sqrt((sxx - syy) ** 2 + 4 * sxy**2))
    h, w = img.shape
    ok = torch.zeros_like(lam, dtype=torch.bool)
    ok[spacing : h - spacing, spacing : w - spacing] = True
    brain = torch.as_tensor(img > 0.1)
    brain = -F.max_pool2d(-brain.double()[None, None], 5, 1, 2)[0, 0] > 0.5  # eroded: not on the skull edge
    score = torch.where(ok & brain, lam, torch.full_like(lam, -1.0)).numpy()
    pts = []
    for idx in np.argsort(score.ravel())[::-1]:
        if score.ravel()[idx] <= 0 or len(pts) == n:
            break
        y, x = divmod(int(idx), w)
        if all((x - a) ** 2 + (y - b) ** 2 >= spacing**2 for a, b in pts):
            pts.append((x, y))
    return np.array(pts, dtype=np.float64)


def export(args) -> int:
    from PIL import Image

    out = Path(args.out) / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    imgs, index = _volume_slices(args.size, 2)
    n = 0
    for img, k in zip(imgs, index):
        if split_of(k) == "pretrain":
            Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out / f"axial_{k:03d}.png")
            n += 1
    print(f"wrote {n} axial pre-training slices to {out}")
    return 0


def stage3(args) -> int:
    """``ld-ext pretrain --resume --centre-steps N`` on a finished run, in this process, keeping
    snapshots of stage 3 after the steps in ``--snapshots`` (exactly the networks of shorter
    stage-3 runs: constant learning rate, same draws), for selecting N."""
    from ld_ext import train
    from ld_ext.checkpoint import save_checkpoint
    from ld_ext.tasks.landmarks import pretrain_stage

    run_dir = Path(args.run)
    real = pretrain_stage.train_centre_sensitive
    keep = set(args.snapshots)

    def snapshots(*a, **k):
        def on_step(i, net):
            if i in keep:
                st = {n: v.detach().cpu().clone() for n, v in net.state_dict().items()}
                save_checkpoint(run_dir / f"snap_{i:04d}.pt", {"config": net.config, "model": st,
                                                             "centre_term": {"steps": i, "seed": k.get("seed", 0)}})
        return real(*a, on_step=on_step, **k)

    pretrain_stage.train_centre_sensitive = snapshots
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = ["--data", *args.data, "--out", str(run_dir), "--resume", "--centre-steps", str(args.steps), "--no-progress",
            *args.extra]
    t0 = time.time()
    rc = train.run(parser.parse_args(argv))
    print(f"stage 3 ({args.steps} steps) in {time.time() - t0:.0f} s", flush=True)
    return rc


def build_cases(size: int, split: str, n_targets: int, seed: int) -> list[dict]:
    from ld_ext.tasks import landmarks as lm

    cases = []
    for t in templates(size, split):
        pts = corner_landmarks(t["template"])
        for setting, sources in (("warp", None), ("cross-slice", t["neighbours"])):
            tg, gt = lm.make_eval_targets(t["template"], pts, n_targets, seed=seed + t["k"] + (1000 if sources else 0),
                                          sources=sources, **STRONG)
            cases.append({**t, "setting": setting, "points": pts, "targets": tg, "gts": gt})
    return cases


def evaluate(args) -> int:
    from ld_ext.models import LDNet
    from ld_ext.tasks import common
    from ld_ext.tasks import landmarks as lm

    torch.set_num_threads(args.threads)
    cases = build_cases(args.size, args.split, args.targets, args.seed)
    nets = {}
    for spec in args.checkpoint:
        label, _, path = spec.rpartition("=")
        nets[label or "LD"] = common.load_ld_model(path, part="landmark")  # stage 3 of model.pt, when it has one
    if args.random_init:
        torch.manual_seed(0)
        some = next(iter(nets.values()))
        nets["random-init"] = LDNet(**some.config).eval()
    ld_methods = json.loads(args.ld_methods) if args.ld_methods else {"default": {}}
    ncc = {int(h): dict(lm.SELECTED_NCC.get(int(h), {})) for h in args.ncc_halves}
    errors: dict[str, list] = {}
    timing: dict[str, float] = {}
    tids = []
    offset = 0
    per_case = []
    for ci, c in enumerate(cases):
        t0 = time.time()
        ev = lm.evaluate_methods(nets, c["template"], c["points"], c["targets"], c["gts"], ld_methods=ld_methods,
                                 ncc_methods=ncc, progress=False)
        for r in ev["rows"]:
            errors.setdefault(r["method"], []).append(ev["errors"][r["method"]])
            timing[r["method"]] = timing.get(r["method"], 0.0) + r["sec_per_image"] * len(c["targets"])
        tids.append(ev["target"] + offset)
        offset += len(c["targets"])
        per_case.append({"orientation": c["orientation"], "k": c["k"], "setting": c["setting"],
                         "rows": [{k: r[k] for k in ("method", "mre_px", "sr@2px")} for r in ev["rows"]]})
        best = min(ev["rows"], key=lambda r: r["mre_px"])
        print(f"[{ci + 1}/{len(cases)}] {c['orientation']} k={c['k']} {c['setting']}: "
              + "  ".join(f"{r['method']} {r['mre_px']:.2f}/{r['sr@2px']:.2f}" for r in ev["rows"])
              + f"  ({time.time() - t0:.0f} s, best {best['method']})", flush=True)
    keys = [f"{c['orientation']} {c['setting']}" for c in cases]
    np.savez(Path(args.out).with_suffix(".npz"), tid=np.concatenate(tids),
             case=np.concatenate([np.full(len(t), keys[i]) for i, t in enumerate(tids)]),
             **{f"err:{m}": np.concatenate(v) for m, v in errors.items()},
             **{f"sec:{m}": np.array(t / offset) for m, t in timing.items()})
    return summarise([Path(args.out).with_suffix(".npz")], args.out, {"split": args.split, "size": args.size,
                     "ld_methods": ld_methods, "threads": args.threads, "per_case": per_case})


def summarise(npz_files, out, extra: dict | None = None) -> int:
    """Table, paired differences against the best NCC (best on these very targets) and per
    orientation/setting tables, from the per-landmark errors of one or more eval runs on the
    same split (same targets: the cases are deterministic)."""
    from ld_ext.tasks import landmarks as lm

    errs, secs, tid, case = {}, {}, None, None
    for f in npz_files:
        z = np.load(f)
        if tid is None:
            tid, case = z["tid"], z["case"]
        elif not (np.array_equal(tid, z["tid"]) and np.array_equal(case, z["case"])):
            raise ValueError(f"{f}: other targets than {npz_files[0]}")
        for k in z.files:
            if k.startswith("err:"):
                errs[k[4:]] = z[k]
            elif k.startswith("sec:"):
                secs[k[4:]] = float(z[k])
    offset = len(np.unique(tid))
    errors = {m: [e] for m, e in errs.items()}
    rows = lm.radial_errors_table(errs)
    for r in rows:
        r["sec_per_image"] = secs[r["method"]]
    ncc_rows = [r for r in rows if r["method"].startswith("NCC")]
    best_ncc = min(ncc_rows, key=lambda r: r["mre_px"])["method"] if ncc_rows else None
    paired = {}
    if best_ncc:
        for r in rows:
            if not r["method"].startswith("NCC"):
                paired[f"{r['method']} - {best_ncc}"] = lm.paired_difference(errs[r["method"]], errs[best_ncc], tid)
    subsets = {}
    for key in sorted(set(case.tolist())):
        sel = case == key
        subsets[key] = lm.radial_errors_table({m: e[sel] for m, e in errs.items()})
    del errors
    res = {**(extra or {}), "n_targets": offset, "rows": rows, "best_ncc": best_ncc, "paired_vs_best_ncc": paired,
           "subsets": subsets}
    print(lm.table_markdown(rows))
    for k, v in paired.items():
        print(f"{k}: {v['mean_diff_px']:+.3f} px, 95% CI {v['ci95_px'][0]:+.3f}..{v['ci95_px'][1]:+.3f}")
    for k, v in subsets.items():
        print(f"\n{k}\n" + lm.table_markdown(v))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--size", type=int, default=128)
    v = sub.add_parser("eval")
    v.add_argument("--checkpoint", nargs="*", default=[], help="LABEL=PATH ... (LD networks)")
    v.add_argument("--split", choices=("select", "report"), required=True)
    v.add_argument("--size", type=int, default=128)
    v.add_argument("--targets", type=int, default=8, help="targets per template and setting")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--random-init", action="store_true", help="add a random-init network of the same shape")
    v.add_argument("--ld-methods", default=None,
                   help='JSON {row suffix: LandmarkLocator keywords}; default {"default": {}} '
                   "(the locator's defaults = ld-ext landmark's)")
    v.add_argument("--ncc-halves", type=int, nargs="*", default=[4, 8, 12])
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="one table from the .npz files of eval runs on the same split")
    m.add_argument("npz", nargs="+")
    m.add_argument("--out", required=True)
    t = sub.add_parser("stage3")
    t.add_argument("--run", required=True)
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--snapshots", type=int, nargs="*", default=[])
    t.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more ld-ext pretrain flags (as the run's)")
    args = p.parse_args(argv)
    if args.cmd == "merge":
        return summarise(args.npz, args.out)
    return {"export": export, "eval": evaluate, "stage3": stage3}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
