"""Fine-tuning protocol of docs/tasks.md section 1: LD init vs random init, paired by seed.

    python protocols/finetune_protocol.py run  --checkpoint CKPT --split dev|eval --seeds 3 \
        [--first-seed 0] [--inits LD,random] [--shots 5] [--size N] [--structures a,b,c] \
        [--setting '{"lr": 3e-4}'] --out RESULT.json
    python protocols/finetune_protocol.py summary RESULT.json[,MORE.json] [BASELINE.json[,MORE.json]] \
        [--random RANDOM.json[,MORE.json]]
    python protocols/finetune_protocol.py drift --checkpoint CKPT [--split dev] [--seeds 3] --out DRIFT.json

Data: MNI152 T1 slices from ``ld_ext.demos.tasks.probe_data`` (needs nilearn and nibabel) at
``--size`` (default: the size the checkpoint records as its pre-training size, else 64, the size
of the first measurements); structures ``--structures`` (default ventricles, thalamus, striatum;
``corpus_callosum`` is the fourth that ``probe_data`` has), slices with >= 3 mask pixels;
development slices ``PROBE_DEV_Z`` (odd z) for choosing settings, evaluation slices
``PROBE_EVAL_Z`` (even z) for reporting. For each structure half of its slices are held out
(``split_indices``, fixed), and seed s draws ``--shots`` (5) training slices among the rest that
contain the structure; the same seed draws the same slices, network initialisation and data order
for every setting and both inits, so runs are compared in pairs.

Each run is what ``ld-ext finetune`` does for one seed and one init: ``build_segnet``,
``train_segnet`` with the command's defaults (``ld_ext.tasks.segmentation.DEFAULT_*``: 100 steps,
lr 1e-3, batch 5, head on the hypercolumn, 10 warm-up steps; head start ``DEFAULT_HEAD_INIT`` for LD init and
``DEFAULT_RANDOM_HEAD_INIT`` for random init), ``predict``, Dice at 0.5 pooled over the held-out
slices. ``--setting`` overrides them: keyword arguments of ``train_segnet`` (``lr``, ``steps``,
``freeze_steps``, ``warmup_steps``, ``body_lr_factor``, ``head_init`` for the LD-initialised network,
``random_head_init`` for the random one), ``head`` (for ``build_segnet``) and ``body_bn`` /
``random_body_bn`` (``"eval"``: the body's BatchNorm layers of the LD / random network keep their
pre-trained / initial statistics while fine-tuning, a protocol-only experiment; default ``"train"``
for both). One torch thread per process; results are written after every run (an interrupted run
resumes where it stopped; a file made with other shots, size, structures or schedule is refused).

``drift`` fine-tunes the LD-initialised network from each head start (``zero``, ``probe``) and
measures how far the body moved: the relative L2 change of its weights and the mean cosine
between the embedding z of the held-out images before and after (1 = unchanged features).

``summary`` prints per structure mean +- std over seeds for each init and the paired difference
LD - random (with ``--random``: the LD runs of the first file against the random-init runs of
another, when each init has its own schedule); with a second file, the paired difference of the first file's runs against the
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


def _structures(split: str, n_seeds: int, size: int = 64, shots: int = 5, structures=STRUCTURES):
    """(name, images, bool masks, held-out indices, training indices per seed) per structure."""
    from ld_ext.demos.tasks import PROBE_DEV_Z, PROBE_EVAL_Z, probe_data
    from ld_ext.tasks.common import split_indices

    data = probe_data(PROBE_DEV_Z if split == "dev" else PROBE_EVAL_Z, size, structures=tuple(structures))
    for name, (imgs, msks, _) in data.items():
        msks = msks.astype(bool)
        test, trains = split_indices(len(imgs), shots, n_seeds, 0.5, msks.reshape(len(msks), -1).any(1))
        yield name, imgs, msks, test, trains


def _defaults() -> dict:
    """The schedule of ``ld-ext finetune`` without options (``transfer_experiment``'s defaults)."""
    from ld_ext.tasks import segmentation as seg

    return {
        "head": seg.DEFAULT_HEAD,
        "steps": seg.DEFAULT_STEPS,
        "lr": 1e-3,
        "batch": 5,
        "body_lr_factor": seg.DEFAULT_BODY_LR_FACTOR,
        "freeze_steps": seg.DEFAULT_FREEZE_STEPS,
        "warmup_steps": seg.DEFAULT_WARMUP_STEPS,
        "head_init": seg.DEFAULT_HEAD_INIT,
        "random_head_init": seg.DEFAULT_RANDOM_HEAD_INIT,
        "body_bn": "train",
        "random_body_bn": "train",
    }


def _keep_body_bn_in_eval(net) -> None:
    """Every BatchNorm layer of the body stays in eval mode (its running statistics, not the batch's,
    normalise, and they are not updated) whatever ``net.train()`` asks."""
    import torch

    for m in net.body.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, m=m: m  # nn.Module.train() of a parent calls this: ignored


def _one_run(checkpoint, cfg: dict, init: str, seed: int, st: dict, imgs, msks, test, train) -> float:
    """Fine-tune the ``init`` network of ``seed`` on the ``train`` slices; held-out pooled Dice."""
    from ld_ext.tasks import common
    from ld_ext.tasks.segmentation import build_segnet, predict, train_segnet

    net = build_segnet(checkpoint if init == "LD" else None, config=cfg, seed=seed, head=st["head"])
    if st["body_bn" if init == "LD" else "random_body_bn"] == "eval":
        _keep_body_bn_in_eval(net)
    keys = ("steps", "lr", "batch", "body_lr_factor", "freeze_steps", "warmup_steps")
    head_init = st["head_init"] if init == "LD" else st["random_head_init"]
    train_segnet(net, imgs[train], msks[train], seed=seed, head_init=head_init, **{k: st[k] for k in keys})
    return common.dice(predict(net, imgs[test]) > 0.5, msks[test])


def run(args) -> int:
    import torch

    torch.set_num_threads(1)
    from ld_ext.atomic import atomic_write_json
    from ld_ext.tasks.common import checkpoint_train_size
    from ld_ext.checkpoint import infer_config, load_checkpoint

    st = _defaults()
    extra = set(json.loads(args.setting)) - set(st)
    if extra:
        raise SystemExit(f"--setting: unknown key(s) {sorted(extra)}; expected some of {sorted(st)}")
    st.update(json.loads(args.setting))
    size = args.size or checkpoint_train_size(args.checkpoint) or 64
    structures = args.structures.split(",")
    ck = load_checkpoint(args.checkpoint)
    cfg = dict(ck.get("config") or {}) or infer_config(ck["model"])  # as ld-ext finetune reads it
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    meta = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "setting": args.setting,
        "shots": args.shots,
        "size": size,
        "structures": structures,
        "schedule": st,
    }
    old = res.setdefault("_meta", meta)
    if any(old.get(k) != meta[k] for k in ("split", "shots", "size", "structures", "schedule")):
        raise SystemExit(f"--out {out}: made with another split/shots/size/structures/setting ({old}); give a new file")
    print(f"{args.split} slices at {size} x {size}, {args.shots} shot(s), schedule {st}", flush=True)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for name, imgs, msks, test, trains in _structures(args.split, seeds.stop, size, args.shots, structures):
        for s in seeds:
            for init in args.inits.split(","):
                key = f"{name}|{s}|{init}"
                if key in res:
                    continue
                t0 = time.time()
                res[key] = _one_run(args.checkpoint, cfg, init, s, st, imgs, msks, test, trains[s])
                res.setdefault("_seconds", {})[key] = round(time.time() - t0, 1)
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
                rec = {
                    "weight_drift": ((w1 - w0).norm() / w0.norm()).item(),
                    "z_cosine": F.cosine_similarity(z0, z1, dim=1).mean().item(),
                }
                res[f"{name}|{s}|{head_init}"] = rec
                print(
                    f"{name} seed {s} head {head_init}: weight drift {rec['weight_drift']:.3f}, "
                    f"mean cos(z before, z after) {rec['z_cosine']:.3f}",
                    flush=True,
                )
                atomic_write_json(args.out, res)
    for head_init in ("zero", "probe"):
        v = [r for k, r in res.items() if k.endswith("|" + head_init)]
        print(
            f"head {head_init}: mean weight drift {np.mean([r['weight_drift'] for r in v]):.3f}, "
            f"mean cosine {np.mean([r['z_cosine'] for r in v]):.3f} ({len(v)} runs)"
        )
    return 0


def _runs(res: dict, structure: str, init: str) -> dict:
    return {
        int(k.split("|")[1]): v
        for k, v in res.items()
        if not k.startswith("_") and k.startswith(structure + "|") and k.endswith("|" + init)
    }


def _paired(a: dict, ia: str, b: dict, ib: str, title: str) -> None:
    print(f"\n{title}\n")
    print("| structure | A | B | A - B (paired) | seeds A ahead |")
    print("|---|---|---|---|---|")
    per_seed: dict = {}
    ma, mb = [], []
    names = list(dict.fromkeys(k.split("|")[0] for d in (a, b) for k in d if not k.startswith("_")))
    for s in names:
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
        print(
            f"| {s} (n={len(seeds)}) | {x.mean():.3f} +- {sd(x):.3f} | {y.mean():.3f} +- {sd(y):.3f} "
            f"| {d.mean():+.3f} +- {sd(d):.3f} | {int((d > 0).sum())}/{len(d)} |"
        )
    if not ma:
        print("(no paired runs)")
        return
    full = np.array([np.mean(v) for _, v in sorted(per_seed.items()) if len(v) == len(ma)])
    line = f"| **mean** | **{np.mean(ma):.3f}** | **{np.mean(mb):.3f}** | **{np.mean(ma) - np.mean(mb):+.3f}** |"
    if len(full) > 1:
        se = full.std(ddof=1) / np.sqrt(len(full))
        line += f" per-seed mean {full.mean():+.3f} (SE {se:.3f}, n={len(full)}; {int((full > 0).sum())} ahead) |"
    print(line)


def _load(files: str) -> dict:
    """One result, or several (comma-separated, e.g. seeds run in parallel processes) merged; they must share
    the split, shots, size, structures and schedule."""
    merged: dict = {}
    for f in files.split(","):
        r = json.loads(Path(f).read_text())
        meta = {k: v for k, v in r.get("_meta", {}).items() if k not in ("checkpoint", "setting")}
        if merged and meta != merged["_meta_cmp"]:
            raise SystemExit(f"{f}: made with another split/shots/size/structures/schedule than {files.split(',')[0]}")
        merged.setdefault("_meta_cmp", meta)
        merged.setdefault("_meta", r.get("_meta", {}))
        merged.update({k: v for k, v in r.items() if not k.startswith("_")})
        merged.setdefault("_seconds", {}).update(r.get("_seconds", {}))
    return merged


def summary(args) -> int:
    a = _load(args.result)
    meta = a.get("_meta", {})
    sec = list(a.get("_seconds", {}).values())
    if sec:
        print(
            f"{len(sec)} runs, {np.mean(sec):.0f} s per run on average "
            f"(shots {meta.get('shots')}, size {meta.get('size')})"
        )
    if args.random:  # each init with its own schedule: LD runs of this file, random runs of another
        r = _load(args.random)
        title = f"A = LD init of {args.result} ({meta.get('setting')}), B = random init of {args.random}"
        _paired(a, "LD", r, "random", title + f" ({r.get('_meta', {}).get('setting')})")
    else:
        _paired(a, "LD", a, "random", f"{args.result}: A = LD init, B = random init ({meta.get('setting')})")
    if args.baseline:
        b = _load(args.baseline)
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
    r.add_argument("--shots", type=int, default=5)
    r.add_argument("--size", type=int, default=None, help="image side (default: the training size, else 64)")
    r.add_argument("--structures", default=",".join(STRUCTURES), help="comma-separated; also corpus_callosum")
    r.add_argument("--setting", default="{}", help="JSON: overrides of the ld-ext finetune defaults (see above)")
    r.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("result", help="RESULT.json, or several comma-separated (merged)")
    s.add_argument("baseline", nargs="?", help="the same, to compare against (same init, paired by seed)")
    s.add_argument(
        "--random", help="RESULT.json[,MORE.json] whose random-init runs B are paired with this file's LD runs"
    )
    d = sub.add_parser("drift")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--split", choices=("dev", "eval"), default="dev")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return {"run": run, "summary": summary, "drift": drift}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
