"""Learning speed: linear-probe Dice of LD features against pre-training steps (and minutes).

    python protocols/learning_speed.py --out DIR [--size 128] [--epochs1 6 --epochs2 24]
        [--steps-per-epoch 40] [--lr-step 3] [--probe-minutes 2.5,5,10,20] [--splits dev,eval]
        [--reuse] [--plot FIG.png [--also OTHER_DIR ...]]

One `ld_ext.train.pretrain` run (B = 4 pairs = 20 views per step, lr 1e-3 halved every
``--lr-step`` epochs in each stage, K = 16, D = 32) on the MNI152 T1 axial slices at odd z (-39 to
71 mm, 56 slices, no labels; needs nilearn and nibabel). The network is snapshotted at the end of
every epoch; the first snapshot at or after each of ``--probe-minutes`` (wall time since the start)
and the last one go through the linear probe of docs/tasks.md
("Linear probe"): 4 small structures, 1 and 5 shots, 3 seeds, on the registered development
slices ``PROBE_DEV_Z`` (odd z: seen, unlabelled, in pre-training; for choosing a recipe) and
evaluation slices ``PROBE_EVAL_Z`` (even z, never seen in pre-training; for reporting), against
the random-init network, intensity features and the position control (probed once per split,
with the first snapshot: they do not depend on it). ``--reuse`` probes the snapshots of an earlier
run in DIR again (e.g. with other ``--splits``) without training. Minutes are wall time on the machine that runs it (run it alone: a loaded machine
stretches them); the steps of each snapshot are recorded too.

Writes DIR/learning_speed.json (records per probed snapshot) and, with ``--plot``, a figure.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def _probe(model, size, zs, seeds, methods):
    from ld_ext.demos.tasks import run_probe_protocol

    res = run_probe_protocol(model, size, zs, warped=False, seeds=seeds, methods=methods)
    overall = {}
    for method in methods:
        vals = [v for r in res for v in (r["summary"][method][str(k)]["mean"] for k in (1, 5))]
        overall[method] = sum(vals) / len(vals)
    per = {r["label"]: {str(k): r["summary"]["LD"][str(k)]["mean"] for k in (1, 5)} for r in res}
    return overall, per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs1", type=int, default=6)
    ap.add_argument("--epochs2", type=int, default=24)
    ap.add_argument("--steps-per-epoch", type=int, default=40)
    ap.add_argument("--lr-step", type=int, default=3)
    ap.add_argument("--probe-minutes", default="2.5,5,10,20")
    ap.add_argument("--splits", default="dev,eval")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reuse", action="store_true", help="probe the snapshots of an earlier run in --out")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--also", nargs="*", default=[], help="other runs' folders drawn in the same figure")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ld_ext.atomic import atomic_write_json
    from ld_ext.checkpoint import load_model
    from ld_ext.demos.tasks import PROBE_DEV_Z, PROBE_EVAL_Z
    from ld_ext.tasks.probe import FEATURE_SETS

    out = Path(args.out)
    snaps = out / "snapshots"
    zs = tuple(range(-39, 72, 2))
    if args.reuse:
        stored = json.loads((out / "epochs.json").read_text())
        eps, run_config = stored["epochs"], stored["config"]
    else:
        from ld_ext.data import ImageFolderDataset
        from ld_ext.demos.mni import mni_slices
        from ld_ext.train import TrainConfig, pretrain

        snaps.mkdir(parents=True, exist_ok=True)
        images = torch.from_numpy(mni_slices("t1", zs, args.size))[:, None].float()
        cfg = TrainConfig(out=str(out / "run"), size=args.size, channels=1, n_clusters=16, batch_size=4,
                          epochs1=args.epochs1, epochs2=args.epochs2, steps_per_epoch=args.steps_per_epoch,
                          lr_step=args.lr_step, seed=0, overwrite=True, progress=False, checkpoint_minutes=None,
                          centre_steps=0)
        t_start = time.time()
        eps = []

        def on_epoch_end(rec):
            n = len(eps) + 1
            shutil.copyfile(out / "run" / "checkpoint.pt", snaps / f"epoch{n:03d}.pt")
            eps.append({"epoch": n, "stage": rec["stage"], "steps": n * args.steps_per_epoch,
                        "seconds": round(time.time() - t_start, 1), "loss": rec["loss"]})
            print(f"epoch {n}: stage {rec['stage']} loss {rec['loss']:.3f} ({eps[-1]['seconds']:.0f} s)", flush=True)

        pretrain(cfg, dataset=ImageFolderDataset.from_tensor(images), on_epoch_end=on_epoch_end)
        run_config = vars(args)
        atomic_write_json(out / "epochs.json", {"config": run_config, "pretrain_z_mm": zs, "epochs": eps})
    marks = [float(v) * 60 for v in args.probe_minutes.split(",")]
    chosen = sorted({next((r["epoch"] for r in eps if r["seconds"] >= m), eps[-1]["epoch"]) for m in marks}
                    | {eps[-1]["epoch"]})
    result_path = out / "learning_speed.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update({"config": run_config, "pretrain_z_mm": zs, "epochs": eps})
    for split in args.splits.split(","):
        zs_probe = {"dev": PROBE_DEV_Z, "eval": PROBE_EVAL_Z}[split]
        records = []
        baselines = None
        for e in chosen:
            t0 = time.time()
            methods = ("LD",) if baselines else FEATURE_SETS
            overall, per = _probe(load_model(snaps / f"epoch{e:03d}.pt"), args.size, zs_probe, args.seeds, methods)
            baselines = baselines or {k: v for k, v in overall.items() if k != "LD"}
            overall.update(baselines)
            records.append({**eps[e - 1], "probe_LD": overall["LD"], "per_structure": per,
                            "baselines": baselines, "probe_seconds": round(time.time() - t0, 1)})
            print(f"{split}: epoch {e} ({records[-1]['steps']} steps, {records[-1]['seconds'] / 60:.1f} min): probe LD "
                  f"{overall['LD']:.3f} (random-init {overall['random-init']:.3f}, intensity {overall['intensity']:.3f}, "
                  f"position {overall['position']:.3f})", flush=True)
            result[split] = records
            atomic_write_json(result_path, result)
    if args.plot:
        _plot(args.plot, [out] + [Path(a) for a in args.also])
    return 0


def _plot(path, dirs) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["font.size"] = 9
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split in zip(axes, ("dev", "eval")):
        base = None
        for d in dirs:
            r = json.loads((Path(d) / "learning_speed.json").read_text())
            if split not in r:
                continue
            c = r["config"]
            label = (f"LD: {c['epochs1']}+{c['epochs2']} epochs of {c['steps_per_epoch']} steps, "
                     f"lr halved every {c['lr_step']}")
            line, = ax.plot([x["seconds"] / 60 for x in r[split]], [x["probe_LD"] for x in r[split]], "o-", label=label)
            stage2 = next((x["seconds"] / 60 for x in r["epochs"] if x["stage"] == 2), None)
            if stage2 is not None:
                ax.axvline(stage2, color=line.get_color(), lw=0.6, ls=(0, (2, 2)))
            base = base or r[split][0]["baselines"]
        for (name, v), ls in zip((base or {}).items(), (":", "--", "-.")):
            ax.axhline(v, color="gray", ls=ls, lw=1, label=name)
        ax.set_title({"dev": "development slices (odd z)", "eval": "evaluation slices (even z, held out)"}[split])
        ax.set_xlabel("minutes of pre-training, 2 CPU cores (dashed: stage 2 starts)")
    axes[0].set_ylabel("probe Dice (4 structures, 1 + 5 shots)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
