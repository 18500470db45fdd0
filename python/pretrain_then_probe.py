#!/usr/bin/env python
"""Pre-train LD on unlabelled images, then measure what it learned with a linear probe: the
Python API of ``ld_ext.pretrain`` and ``ld_ext.tasks.probe``.

    python python/pretrain_then_probe.py --out runs/ptp                      # MNI152 data from nilearn (about 2 minutes)
    python python/pretrain_then_probe.py --data UNLABELLED_DIR --images DIR --masks DIR [DIR ...] --out runs/ptp
    python python/pretrain_then_probe.py --out runs/ptp --size 32 --epochs1 1 --epochs2 1 --steps-per-epoch 1 --seeds 1   # smoke run

1. ``TrainConfig`` + ``pretrain``: both LD stages on the images of ``--data`` (no labels), the
   published recipe at a small step budget; the run folder holds ``model.pt``, metrics, overlays.
2. ``common.pair_images_masks`` / ``common.load_pairs``: the labelled images and one folder of
   binary masks per structure (a mask is named like its image).
3. ``probe.baseline_feature_sets`` + ``probe.probe_experiment``: a class-balanced per-pixel
   linear classifier on frozen features, trained on ``--shots`` images that contain the
   structure, Dice on the held-out half; the same probe on the untrained network, on intensity
   + local means and on a position control. ``probe.write_results`` writes the table, a sentence
   saying what it means and overlays.

Without ``--data``, the data come from the MNI152 template shipped in nilearn
(``ld_ext.demos.mni``), written as PNG folders first so that the rest is exactly the path your
own folders take: the training slices (unlabelled; every 5th slice held out) for
pre-training, and every slice that shows the ventricles and the thalamus, with their masks, for
the probe (which holds out half of them). The last line of the output is a JSON
summary (mean held-out Dice per feature set, seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:  # a source checkout: make the in-place package importable
    import ld_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ld_ext.atomic import atomic_write_png  # noqa: E402
from ld_ext.tasks import common, probe  # noqa: E402
from ld_ext.pretrain import TrainConfig, pretrain  # noqa: E402


def write_mni_folders(root: Path, size: int, structures=("ventricles", "thalamus")) -> tuple[Path, Path, list[Path]]:
    """The MNI152 demo data as folders: ``pretrain/`` (the training slices, every 5th slice held
    out), ``images/`` (every slice that contains all the structures) and ``masks/<structure>/``.
    Pre-training sees no labels; the probe's images include training slices, as in the usual
    setting where the labelled images are part of the unlabelled pool."""
    from ld_ext.demos.mni import load_mni_slices

    d = load_mni_slices(size, structures=structures)
    for i in range(len(d["images"])):
        z = int(d["index"][i])
        if d["train"][i]:
            atomic_write_png(root / "pretrain" / f"slice_{z:03d}.png", d["images"][i, 0].numpy())
        if all(int(d["structures"][s][i].sum()) >= 3 for s in structures):
            atomic_write_png(root / "images" / f"slice_{z:03d}.png", d["images"][i, 0].numpy())
            for s in structures:
                atomic_write_png(root / "masks" / s / f"slice_{z:03d}.png", d["structures"][s][i].numpy())
    return root / "pretrain", root / "images", [root / "masks" / s for s in structures]


def mean_dice(results, method: str) -> float:
    """Held-out Dice of one feature set, averaged over structures, shot counts and seeds."""
    per = [sum(v) / len(v) for r in results for v in r["dice"][method].values()]
    return round(sum(per) / len(per), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=None, help="unlabelled images for pre-training (default: MNI152 slices)")
    p.add_argument("--images", default=None, help="labelled images for the probe (with --masks)")
    p.add_argument("--masks", nargs="+", default=None, help="one folder of masks per structure")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, help="image size for both steps (default 64)")
    p.add_argument("--epochs1", type=int, default=2, help="stage-1 epochs (default 2)")
    p.add_argument("--epochs2", type=int, default=4, help="stage-2 epochs (default 4)")
    p.add_argument("--steps-per-epoch", type=int, default=5, help="steps per epoch (default 5)")
    p.add_argument("--batch-size", type=int, default=4, help="B pairs per step, 5B images (default 4)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="labelled training images (default 1 5)")
    p.add_argument("--seeds", type=int, default=3, help="probe repetitions (default 3)")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    if (args.images is None) != (args.masks is None):
        p.error("--images and --masks go together")
    if args.data is None or args.images is None:
        mni_pre, mni_images, mni_masks = write_mni_folders(out / "data", args.size)
        data = args.data or [str(mni_pre)]
        images, masks = (args.images, args.masks) if args.images else (mni_images, mni_masks)
    else:
        data, images, masks = args.data, args.images, args.masks

    # 1. pre-training (both stages) on unlabelled images
    cfg = TrainConfig(
        data=list(data), out=str(out / "pretrain"), size=args.size, batch_size=args.batch_size,
        epochs1=args.epochs1, epochs2=args.epochs2, steps_per_epoch=args.steps_per_epoch,
        lr_step=max(1, (args.epochs1 + args.epochs2) // 2), device="cpu", progress=False,
        overwrite=True,  # this script's own run folder: a rerun replaces it
    )
    summary = pretrain(cfg)
    model = summary["final_model"].cpu().eval()  # also saved: summary["model"] (out/pretrain/model.pt)
    print(f"pre-trained on {summary['n_images']} images in {summary['seconds']:.0f} s -> {summary['model']}")

    # 2 + 3. the probe, one structure per mask folder
    results = []
    for mask_dir in masks:
        imgs, msks = common.load_pairs(common.pair_images_masks(images, mask_dir), size=args.size)
        features = probe.baseline_feature_sets(model, imgs)  # LD, random-init, intensity, position
        r = probe.probe_experiment(features, msks, shots=args.shots, seeds=args.seeds, label=Path(mask_dir).name)
        r["_images"], r["_masks"] = imgs, msks
        results.append(r)
    md = probe.write_results(out / "probe", results, imgs)
    print(md)
    mean = {m: mean_dice(results, m) for m in results[0]["methods"]}
    print(json.dumps({"structures": [r["label"] for r in results], "mean_dice": mean,
                      "model": summary["model"], "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
