"""``ld-ext demo --dims 3``: LD pre-trained on 3-D volumes and probed on held-out volumes, on the CPU.

The data are random warped copies of the MNI152 template that ships in nilearn
(``ld_ext.demos.warps3d``: affine + elastic warps and intensity changes, on a grid of ``--spacing``
mm), written as NIfTI volumes into ``OUT/volumes``:

* ``train/``: ``--warps`` unlabelled copies, the pre-training set;
* ``heldout/images`` and ``heldout/labels``: ``--heldout-warps`` other copies (other random draws,
  never seen in pre-training) and their label volumes (1 ventricles, 2 striatum, 3 thalamus, 4 corpus
  callosum: the structures of the 2-D demo, ``ld_ext.demos.mni.STRUCTURES``, warped with the image).

Pre-training is ``ld-ext pretrain --dims 3`` (``ld_ext.train.pretrain`` with ``dims=3``: the volume
cache in ``OUT/cache``, cubic patches of edge ``--size``, a fixed number of steps, every one run, with
``--lr LR_3D``).
Then the linear probe on volumes of ``ld-ext probe`` (``ld_ext.tasks.probe_volumes``: sliding windows,
3-D Dice per volume) on the held-out copies: half of them are the probe's test volumes, each seed
fits on one of the others; LD's frozen features against the same network at random initialisation,
intensity + local means and the position control (intensity, x, y, z and their products). The table
(structures x methods, Dice) is printed and written to ``OUT/probe``, with one line saying whether
LD beats the random-init network and the position control on every structure; the figure
``OUT/probe/slices.png`` shows an axial and a coronal slice of a held-out test copy with the ground
truth and the prediction per structure of LD's probe and the position control's (seed 0).

The same probe from the command line: ``ld-ext probe --checkpoint OUT/model.pt --images
OUT/volumes/heldout/images --masks OUT/volumes/heldout/labels --labels 1 2 3 4 --shots 1 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import viz
from ..atomic import atomic_savefig, atomic_write_bytes
from ..data.volumes import read_volume
from ..tasks import common as task_common
from ..tasks import probe
from ..tasks.linear_probe import DEFAULT_WEIGHT_DECAY, LinearProbe, choose_threshold
from ..tasks.probe_volumes import LazyFeatures, volume_feature_sets, volume_probe_experiments
from ..train import TrainConfig, pretrain
from .common import DemoDefault, demo_threads, plain_defaults
from .mni import STRUCTURES
from .progress import DemoProgress, Phase, format_seconds
from .warps3d import demo_grid, write_warps

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS_3D",
    "LR_3D",
    "SPACING",
    "TRAIN_WARPS",
    "HELDOUT_WARPS",
    "PROBE_SHOTS_3D",
    "PROBE_MAX_VOXELS",
    "FIGURE_METHODS",
    "add_volume_demo_arguments",
    "resolve_volume_args",
    "make_volumes",
    "load_heldout",
    "probe_heldout",
    "verdict",
    "save_slices_figure",
    "run_volume_demo",
]

# The 3-D demo's values of the flags it shares with the 2-D demo, used where the flag is left out:
# 80 training steps (4 stage-1 and 12 stage-2 epochs of 5 steps) of 2 pairs (10 patches of 32^3).
DEFAULTS_3D = {"size": 32, "batch_size": 2, "epochs1": 4, "epochs2": 12, "steps_per_epoch": 5, "lr_step": 6}
# Adam's learning rate of the demo's pre-training (``ld-ext pretrain --lr``; its default 1e-3 is the 2-D recipe's).
# Chosen on the warps of --seed 1 (protocols/demo3d_dev.py; benchmarks/RESULTS_3D.md): over 80 steps of batch 2,
# 3e-4 gave the best probe of LD's features of 1e-3, 3e-4 and 1e-4; the demo reports on the warps of --seed 0.
LR_3D = 3e-4
SPACING = 3.5  # mm: a 45 x 55 x 48 grid (12 windows of 32^3 per volume); a 32^3 patch spans 112 mm
TRAIN_WARPS = 12
HELDOUT_WARPS = 8
PROBE_SHOTS_3D = (1,)
# voxels a probe is fitted on (all of the structure, the rest background; its threshold is chosen on every voxel)
PROBE_MAX_VOXELS = 60_000
FIGURE_METHODS = ("LD", "position")
TEST_FRACTION = 0.5

# Prior seconds per step of each phase on an idle 2-core CPU (one thread); they shape the progress
# line's estimate of the time left only (it rescales them by the speed measured so far).
PHASE_SECONDS = {"making the volumes": 1.0, "pre-training": 2.5, "probe": 25.0, "figure": 3.0}


def add_volume_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``--dims 3`` (the others are the 2-D demo's, with ``DEFAULTS_3D`` where left out)."""
    parser.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="2 (default): the demo on axial slices; 3: on volumes (warped copies of the template, "
        f"pretrain --dims 3 with --size {DEFAULTS_3D['size']} patches, a probe on held-out copies)",
    )
    parser.add_argument(
        "--spacing", type=float, default=SPACING, metavar="MM", help=f"--dims 3: voxel size in mm (default {SPACING:g})"
    )
    parser.add_argument(
        "--warps",
        type=int,
        default=TRAIN_WARPS,
        help=f"--dims 3: unlabelled pre-training copies (default {TRAIN_WARPS})",
    )
    parser.add_argument(
        "--heldout-warps",
        type=int,
        default=HELDOUT_WARPS,
        help=f"--dims 3: held-out labelled copies of the probe, half of them its test set (default {HELDOUT_WARPS})",
    )


def resolve_volume_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``DEFAULTS_3D`` for the shared flags left out, checked; one-line errors for the rest."""
    if getattr(args, "task", "pretrain") != "pretrain":
        raise ValueError(f"--dims 3 runs the pre-training demo only, not --task {args.task}")
    if getattr(args, "checkpoint", None):
        raise ValueError("--checkpoint is for the task demos; --dims 3 pre-trains its own network")
    if not isinstance(args.centre_steps, DemoDefault) and args.centre_steps:
        raise ValueError("--centre-steps: stage 3 (the landmark term) is 2-D only; leave it out with --dims 3")
    if getattr(args, "max_minutes", None) is not None:
        raise ValueError("--max-minutes is for the 2-D demo; --dims 3 runs a fixed number of steps")
    for name, value in DEFAULTS_3D.items():
        if isinstance(getattr(args, name), DemoDefault):
            setattr(args, name, value)
    plain_defaults(args)
    for name in ("size", "batch_size", "epochs2", "steps_per_epoch", "clusters", "probe_seeds", "lr_step"):
        if int(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs1 < 0:
        raise ValueError(f"--epochs1 must be >= 0, got {args.epochs1}")
    if args.size < 16 or args.size % 16:
        raise ValueError(f"--size must be a multiple of 16 (>= 16) with --dims 3, got {args.size}")
    if args.warps < 1:
        raise ValueError(f"--warps must be >= 1, got {args.warps}")
    if args.heldout_warps < 2:
        raise ValueError(
            f"--heldout-warps must be >= 2 (one to fit the probe, one to test it), got {args.heldout_warps}"
        )
    demo_grid(args.spacing)  # checks --spacing
    return args


def make_volumes(out: Path, args: argparse.Namespace, on_step=None) -> dict:
    """The warped copies in ``OUT/volumes`` (module docstring), replacing those of an earlier run; the
    pre-training and held-out copies are drawn from different seeds. Returns their folders."""
    grid = demo_grid(args.spacing)
    root = out / "volumes"
    dirs = {"train": root / "train", "images": root / "heldout" / "images", "labels": root / "heldout" / "labels"}
    for folder in dirs.values():  # copies of an earlier run with other flags never join this one
        for old in folder.glob("warp_*.nii.gz") if folder.is_dir() else ():
            old.unlink()
    write_warps(dirs["train"], None, args.warps, 2 * args.seed, grid, on_step=on_step)
    write_warps(dirs["images"], dirs["labels"], args.heldout_warps, 2 * args.seed + 1, grid, on_step=on_step)
    logger.info(
        "MNI152 warped copies at %g mm (%s voxels): %d for pre-training, %d held out",
        args.spacing,
        "x".join(map(str, grid.shape)),
        args.warps,
        args.heldout_warps,
    )
    return dirs


def _train_config(args: argparse.Namespace, out: Path, data: Path) -> TrainConfig:
    return TrainConfig(
        data=[str(data)],
        out=str(out),
        dims=3,
        size=args.size,
        n_clusters=args.clusters,
        batch_size=args.batch_size,
        epochs1=args.epochs1,
        epochs2=args.epochs2,
        steps_per_epoch=args.steps_per_epoch,
        lr=LR_3D,
        lr_step=args.lr_step,
        seed=args.seed,
        device=args.device,
        loss_impl=args.loss_impl,
        progress=False,
        overwrite=True,  # the demo's folder: a rerun replaces its run
    )


def load_heldout(images: Path, labels: Path, percentiles=(0.5, 99.5)) -> tuple[list, list, list]:
    """(names, volumes read as pre-training reads them, label volumes) of the held-out copies."""
    names = sorted(p.name for p in images.iterdir() if p.name.endswith(".nii.gz"))
    vols = [read_volume(images / n, percentiles=percentiles).array for n in names]
    labs = [read_volume(labels / n, label=True).array.astype(np.uint8) for n in names]
    return names, vols, labs


def _structures(labels: list) -> list[tuple[str, list]]:
    return [(name, [lab == k + 1 for lab in labels]) for k, name in enumerate(STRUCTURES)]


def _figure_split(structures, seeds: int) -> tuple[int, int]:
    """(seed 0's training volume, the first test volume) of the probe's split (``common.split_indices``)."""
    has = np.array([all(m[i].any() for _, m in structures) for i in range(len(structures[0][1]))])
    test, trains = task_common.split_indices(len(has), 1, seeds, TEST_FRACTION, has_foreground=has)
    return int(trains[0][0]), int(test[0])


def _figure_predictions(feats: list, structures, train: int, show: int) -> dict:
    """Per structure: the prediction (bool volume) on volume ``show`` of a probe fitted as the table's seed-0
    probe of 1 shot is (on volume ``train``: every voxel of the structure and background voxels drawn up to
    ``PROBE_MAX_VOXELS`` in all; its threshold chosen on every voxel of that volume)."""
    preds = {}
    x = feats[train][None]
    flat = x.reshape(x.shape[1], -1)
    for name, masks in structures:
        m = np.asarray(masks[train], dtype=bool).reshape(-1)
        fg, bg = np.flatnonzero(m), np.flatnonzero(~m)
        rng = np.random.default_rng(0)
        bg = rng.choice(bg, min(len(bg), max(PROBE_MAX_VOXELS - len(fg), PROBE_MAX_VOXELS // 2)), replace=False)
        idx = torch.from_numpy(np.concatenate([fg, bg]))
        fitted = LinearProbe(weight_decay=DEFAULT_WEIGHT_DECAY).fit(
            flat[:, idx][None, :, :, None], m[idx.numpy()][None, :, None]
        )
        thr = choose_threshold(fitted.predict_proba(x)[0], masks[train])
        preds[name] = fitted.predict_proba(feats[show][None])[0] > thr
    return preds


def probe_heldout(model, vols: list, labels: list, args, on_step=None) -> tuple[list, dict]:
    """The probe of every structure on the held-out copies (``volume_probe_experiments``, 1 shot,
    ``args.probe_seeds`` seeds) and the figure's predictions per method of ``FIGURE_METHODS``;
    ``on_step()`` after each feature set is computed."""
    structures = _structures(labels)
    train, show = _figure_split(structures, args.probe_seeds)
    window = (args.size,) * 3
    figure: dict = {"train": train, "show": show, "preds": {}}

    def wrapped(name: str, src: LazyFeatures) -> LazyFeatures:
        def compute(seed: int) -> list:
            feats = src.compute(seed)
            if seed == 0 and name in FIGURE_METHODS:
                figure["preds"][name] = _figure_predictions(feats, structures, train, show)
            if on_step is not None:
                on_step()
            return feats

        return LazyFeatures(compute, per_seed=src.per_seed)

    sets = volume_feature_sets(model, vols, probe.DEFAULT_FEATURES, window)
    features = {name: wrapped(name, src) for name, src in sets.items()}
    results = volume_probe_experiments(
        features,
        structures,
        shots=PROBE_SHOTS_3D,
        seeds=args.probe_seeds,
        test_fraction=TEST_FRACTION,
        max_voxels=PROBE_MAX_VOXELS,
    )
    return results, figure


def _mean_dice(result: dict, method: str) -> float:
    return float(result["summary"][method][str(PROBE_SHOTS_3D[-1])]["mean"])


def verdict(results: list) -> tuple[bool, str]:
    """(whether LD's mean Dice is above the random-init network's and the position control's on every
    structure, one line saying so and naming any structure where it is not)."""
    losses = []
    for r in results:
        ld = _mean_dice(r, "LD")
        for m in ("random-init", "position"):
            if _mean_dice(r, m) >= ld:
                losses.append(f"{r['label']} ({m} {_mean_dice(r, m):.3f} >= LD {ld:.3f})")
    if not losses:
        return True, "LD's probe beats the random-init network and the position control on every structure."
    return False, "LD's probe does NOT beat the random-init network and the position control on: " + "; ".join(losses)


def _slice_rgb(labels: dict, shape2d, colors) -> np.ndarray:
    rgba = np.zeros(tuple(shape2d) + (4,), np.float32)
    for k, (_, m) in enumerate(labels.items()):
        rgba[m] = (*colors[k][:3], 0.75)
    return rgba


def save_slices_figure(path: Path, volume: np.ndarray, truth: dict, preds: dict, title: str) -> Path:
    """An axial and a coronal slice (through the centre of the structures) of ``volume`` (X, Y, Z), with the
    ground truth and each method's prediction of every structure in its own colour."""
    from matplotlib import colormaps  # lazy: optional package
    from matplotlib.patches import Patch

    union = np.any(np.stack(list(truth.values())), 0)
    cx, cy, cz = (int(round(c)) for c in np.argwhere(union).mean(0)) if union.any() else np.array(volume.shape) // 2
    colors = [colormaps["tab10"](k) for k in range(len(truth))]
    columns = [("ground truth", truth)] + [(f"{m} probe", p) for m, p in preds.items()]
    cuts = [("axial", lambda v: v[:, :, cz].T[::-1]), ("coronal", lambda v: v[:, cy, :].T[::-1])]
    fig = viz.new_figure(figsize=(3.2 * len(columns), 6.4))
    axes = fig.subplots(2, len(columns), squeeze=False)
    for r, (cut_name, cut) in enumerate(cuts):
        img = cut(volume)
        for c, (col_name, masks) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            sl = {n: cut(m) for n, m in masks.items()}
            ax.imshow(_slice_rgb(sl, img.shape, colors))
            ax.set_title(f"{col_name} ({cut_name})", fontsize=9)
            ax.axis("off")
    handles = [Patch(color=colors[k], label=n.replace("_", " ")) for k, n in enumerate(truth)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_savefig(fig, path, dpi=90)


def _phases(args) -> list[Phase]:
    steps = {
        "making the volumes": args.warps + args.heldout_warps,
        "pre-training": (args.epochs1 + args.epochs2) * args.steps_per_epoch,
        "probe": 3 + args.probe_seeds,
        "figure": 1,
    }
    return [Phase(name, n, PHASE_SECONDS[name]) for name, n in steps.items()]


def _timed(seconds: dict, name: str, bar: DemoProgress, fn):
    t = time.time()
    bar.start(name)
    out = fn()
    seconds[name] = round(time.time() - t, 1)
    return out


def run_volume_demo(args: argparse.Namespace) -> dict:
    """The 3-D demo (module docstring); returns the results dict (also written to ``OUT/demo_results.json``)."""
    t0 = time.time()
    args = resolve_volume_args(args)
    threads, why = demo_threads(getattr(args, "threads", None))
    torch.set_num_threads(threads)
    logger.info("torch CPU threads: %d (%s)", threads, why)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}
    with DemoProgress(_phases(args), enabled=not args.no_progress) as bar:
        dirs = _timed(seconds, "making the volumes", bar, lambda: make_volumes(out, args, on_step=bar.step))
        cfg = _train_config(args, out, dirs["train"])
        summary = _timed(seconds, "pre-training", bar, lambda: pretrain(cfg, on_step_end=lambda rec: bar.step()))
        model = summary["final_model"].cpu().eval()
        names, vols, labels = load_heldout(dirs["images"], dirs["labels"], cfg.percentiles)
        results, figure = _timed(
            seconds, "probe", bar, lambda: probe_heldout(model, vols, labels, args, on_step=bar.step)
        )
        for r in results:
            r["files"] = names
        bar.start("figure")
        t = time.time()
        md = probe.write_results(out / "probe", results, None, {"seeds": args.probe_seeds, "dims": 3})
        shown = figure["show"]
        truth = {n: labels[shown] == k + 1 for k, n in enumerate(STRUCTURES)}
        fig_path = save_slices_figure(
            out / "probe" / "slices.png",
            vols[shown],
            truth,
            figure["preds"],
            f"held-out copy {names[shown]} (a probe test volume): probes of 1 shot ({names[figure['train']]}), seed 0",
        )
        bar.step()
        seconds["figure"] = round(time.time() - t, 1)
    ok, line = verdict(results)
    res = _results(args, t0, threads, seconds, summary, results, ok, line, fig_path, dirs)
    atomic_write_bytes(out / "demo_results.json", json.dumps(res, indent=2).encode())
    print(f"The probe on {len(names)} held-out warped copies (never seen in pre-training), 3-D:\n", flush=True)
    print(md, flush=True)
    print(line + "\n", flush=True)
    print(f"figure: {fig_path}\nvolumes: {out / 'volumes'}\nnetwork: {out / 'model.pt'}", flush=True)
    print(f"done in {format_seconds(res['seconds_total'])}; the probe table and figure are in {out / 'probe'}")
    return res


def _results(args, t0, threads, seconds, summary, results, ok, line, fig_path, dirs) -> dict:
    recs = summary["records"]
    return {
        "dims": 3,
        "seconds_total": round(time.time() - t0, 1),
        "seconds_per_phase": seconds,
        "threads": threads,
        "settings": {
            **{
                k: getattr(args, k)
                for k in ("size", "spacing", "warps", "heldout_warps", "batch_size", "epochs1", "epochs2")
                + ("steps_per_epoch", "clusters", "probe_seeds", "seed")
            },
            "lr": LR_3D,
        },
        "first_epoch": recs[0] if recs else None,
        "last_epoch": recs[-1] if recs else None,
        "probe": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "ld_beats_random_init_and_position": ok,
        "verdict": line,
        "figure": str(fig_path),
        "volumes": {k: str(v) for k, v in dirs.items()},
        "model": summary["model"],
    }
