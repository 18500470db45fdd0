"""Fine-tuning protocol of docs/tasks.md section 1: LD init vs random init, paired by seed.

    python protocols/finetune_protocol.py run  --checkpoint CKPT --split dev|eval --seeds 3 \
        [--first-seed 0] [--inits LD,random] [--setting '{"head_init": "probe"}'] --out RESULT.json
    python protocols/finetune_protocol.py summary RESULT.json [BASELINE.json]
    python protocols/finetune_protocol.py drift --checkpoint CKPT [--split dev] [--seeds 3] --out DRIFT.json

Data: MNI152 T1 slices at 64 x 64 from ``ld_ext.demos.tasks.probe_data`` (needs nilearn and
nibabel); structures ventricles, thalamus, striatum (slices with >= 3 mask pixels); development
slices ``PROBE_DEV_Z`` (odd z) for choosing settings, evaluation slices ``PROBE_EVAL_Z`` (even z)
for reporting. For each structure half of its slices are held out (``split_indices``, fixed), and
seed s draws 5 training slices among the rest that contain the structure; the same seed draws the
same slices, network initialisation and data order for every setting and both inits, so runs are
compared in pairs. ``--setting`` holds keyword arguments of ``train_segnet`` (e.g. ``lr``,
``head_init``, ``freeze_steps``) and ``head`` (for ``build_segnet``). One torch thread per process;
results are written after every run (an interrupted run resumes where it stopped).

``drift`` fine-tunes the LD-initialised network from each head start (``zero``, ``probe``) and
measures how far the body moved: the relative L2 change of its weights and the mean cosine
between the embedding z of the held-out images before and after (1 = unchanged features).

``summary`` prints per structure mean +- std over seeds for each init and the paired difference
LD - random; with a second file, the paired difference of the first file's runs against the
second's (same init), e.g. a new setting against the default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

STRUCTURES = ("ventricles", "thalamus", "striatum")


def _structures(split: str, n_seeds: int):
    """(name, images, bool masks, held-out indices, training indices per seed) per structure."""
    from ld_ext.demos.tasks import PROBE_DEV_Z, PROBE_EVAL_Z, probe_data
    from ld_ext.tasks.common import split_indices

    data = probe_data(PROBE_DEV_Z if split == "dev" else PROBE_EVAL_Z, 64, structures=STRUCTURES)
    for name, (imgs, msks, _) in data.items():
        msks = msks.astype(bool)
        test, trains = split_indices(len(imgs), 5, n_seeds, 0.5, msks.reshape(len(msks), -1).any(1))
        yield name, imgs, msks, test, trains


def run(args) -> int:
    import torch

    torch.set_num_threads(1)
    from ld_ext.atomic import atomic_write_json
    from ld_ext.checkpoint import load_checkpoint
    from ld_ext.tasks import common
    from ld_ext.tasks.segmentation import build_segnet, predict, train_segnet

    setting = json.loads(args.setting)
    head = setting.pop("head", "z")
    steps = setting.pop("steps", 100)
    cfg = dict(load_checkpoint(args.checkpoint)["config"])
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.setdefault("_meta", {"checkpoint": str(args.checkpoint), "split": args.split, "setting": args.setting})
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for name, imgs, msks, test, trains in _structures(args.split, seeds.stop):
        for s in seeds:
            for init in args.inits.split(","):
                key = f"{name}|{s}|{init}"
                if key in res:
                    continue
                t0 = time.time()
                net = build_segnet(args.checkpoint if init == "LD" else None, config=cfg, seed=s, head=head)
                train_segnet(net, imgs[trains[s]], msks[trains[s]], steps=steps, seed=s, batch=5, **setting)
                res[key] = common.dice(predict(net, imgs[test]) > 0.5, msks[test])
                print(f"{args.split} {key} dice {res[key]:.3f} ({time.time() - t0:.0f} s)", flush=True)
                atomic_write_json(out, res)
    return 0


def drift(args) -> int:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from ld_ext.atomic import atomic_write_json
    from ld_ext.tasks import common
    from ld_ext.tasks.segmentation import build_segnet, train_segnet

    def body_state(net, x):
        """The body's weights (flat) and its embedding z of ``x`` in eval mode."""
        net.eval()
        with torch.no_grad():
            return torch.cat([p.detach().flatten() for p in net.body.parameters()]), net.body(x)[0]

    res: dict = {}
    for name, imgs, msks, test, trains in _structures(args.split, args.seeds):
        x = common.model_input(imgs[test])
        w0, z0 = body_state(build_segnet(args.checkpoint), x)  # the seed only draws the head
        for s in range(args.seeds):
            for head_init in ("zero", "probe"):
                net = build_segnet(args.checkpoint, seed=s)
                train_segnet(net, imgs[trains[s]], msks[trains[s]], steps=100, seed=s, head_init=head_init)
                w1, z1 = body_state(net, x)
                rec = {"weight_drift": ((w1 - w0).norm() / w0.norm()).item(),
                       "z_cosine": F.cosine_similarity(z0, z1, dim=1).mean().item()}
                res[f"{name}|{s}|{head_init}"] = rec
                print(f"{name} seed {s} head {head_init}: weight drift {rec['weight_drift']:.3f}, "
                      f"mean cos(z before, z after) {rec['z_cosine']:.3f}", flush=True)
                atomic_write_json(args.out, res)
    for head_init in ("zero", "probe"):
        v = [r for k, r in res.items() if k.endswith("|" + head_init)]
        print(f"head {head_init}: mean weight drift {np.mean([r['weight_drift'] for r in v]):.3f}, "
              f"mean cosine {np.mean([r['z_cosine'] for r in v]):.3f} ({len(v)} runs)")
    return 0


def _runs(res: dict, structure: str, init: str) -> dict:
    return {int(k.split("|")[1]): v for k, v in res.items()
            if not k.startswith("_") and k.startswith(structure + "|") and k.endswith("|" + init)}


def _paired(a: dict, ia: str, b: dict, ib: str, title: str) -> None:
    print(f"\n{title}\n")
    print("| structure | A | B | A - B (paired) | seeds A ahead |")
    print("|---|---|---|---|---|")
    per_seed: dict = {}
    ma, mb = [], []
    for s in STRUCTURES:
        ra, rb = _runs(a, s, ia), _runs(b, s, ib)
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        x, y = np.array([ra[i] for i in seeds]), np.array([rb[i] for i in seeds])
        d = x - y
        for i, di in zip(seeds, d):
            per_seed.setdefault(i, []).append(di)
        ma.append(x.mean())
        mb.append(y.mean())
        sd = lambda v: v.std(ddof=1) if len(v) > 1 else float("nan")  # noqa: E731
        print(f"| {s} (n={len(seeds)}) | {x.mean():.3f} +- {sd(x):.3f} | {y.mean():.3f} +- {sd(y):.3f} "
              f"| {d.mean():+.3f} +- {sd(d):.3f} | {int((d > 0).sum())}/{len(d)} |")
    if not ma:
        print("(no paired runs)")
        return
    full = np.array([np.mean(v) for _, v in sorted(per_seed.items()) if len(v) == len(ma)])
    line = f"| **mean** | **{np.mean(ma):.3f}** | **{np.mean(mb):.3f}** | **{np.mean(ma) - np.mean(mb):+.3f}** |"
    if len(full) > 1:
        se = full.std(ddof=1) / np.sqrt(len(full))
        line += f" per-seed mean {full.mean():+.3f} (SE {se:.3f}, n={len(full)}; {int((full > 0).sum())} ahead) |"
    print(line)


def summary(args) -> int:
    a = json.loads(Path(args.result).read_text())
    _paired(a, "LD", a, "random", f"{args.result}: A = LD init, B = random init ({a.get('_meta', {}).get('setting')})")
    if args.baseline:
        b = json.loads(Path(args.baseline).read_text())
        for init in ("LD", "random"):
            _paired(a, init, b, init, f"{init} init: A = {args.result}, B = {args.baseline}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--split", choices=("dev", "eval"), required=True)
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--first-seed", type=int, default=0)
    r.add_argument("--inits", default="LD,random")
    r.add_argument("--setting", default="{}", help="JSON keyword arguments of train_segnet (+ head, steps)")
    r.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("result")
    s.add_argument("baseline", nargs="?")
    d = sub.add_parser("drift")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--split", choices=("dev", "eval"), default="dev")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return {"run": run, "summary": summary, "drift": drift}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
