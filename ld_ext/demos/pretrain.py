"""``ld-ext demo`` (the default, ``--task pretrain``): pre-train LD on the MNI152 template shipped in \
nilearn and score its clusters.

Nothing is downloaded: the MNI152 2009a T1 template and its grey/white-matter probability maps
are files inside the ``nilearn`` wheel; they are read with nibabel. Axial slices that contain
brain are made 128x128 (padded to a square, resized); every 5th slice is held out. The network
is pre-trained (both stages, a small budget) on the other slices on the CPU; checkpoint, metrics
and overlays go to ``--out``. Then each method's cluster map on the held-out slices is scored
against tissue labels made from the probability maps (background outside the brain; inside,
the arg-max of CSF = 1 - GM - WM, GM and WM) by normalised mutual information (NMI, arithmetic
normalisation), for: the trained network (arg-max of its K cluster logits), the same network
untrained, and k-means (K clusters) on the raw intensities. On a T1 template the tissue classes
are intensity classes, so NMI favours k-means by construction; the demo therefore ends with a
second table that measures what a pixel representation is for: a linear probe
(``ld_ext.tasks.probe``) of small structures (ventricles, striatum, thalamus, corpus callosum;
``ld_ext.demos.mni.STRUCTURES``) on the held-out slices, LD's frozen embedding against the
untrained network, intensity + local means and a position control (``probe_scores``). Each table
is followed by one sentence saying what its numbers mean.
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
from ..atomic import atomic_write_bytes
from ..data import ImageFolderDataset
from ..models import LDNet
from ..tasks import probe
from ..train import TrainConfig, predict, pretrain
from .mni import STRUCTURES, load_mni_slices, tissue_labels

logger = logging.getLogger(__name__)

__all__ = [
    "normalized_mutual_info",
    "kmeans_1d",
    "cluster_map",
    "score_methods",
    "probe_scores",
    "nmi_sentence",
    "add_pretrain_demo_arguments",
    "run_pretrain_demo",
]


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two label maps, arithmetic normalisation: I(a;b) / ((H(a) + H(b)) / 2)."""
    a = a.reshape(-1).long()
    b = b.reshape(-1).long()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError("label maps must be non-empty and of equal size")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    joint = torch.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).double()
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)

    def h(q):
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha, hb = h(pa), h(pb)
    if ha + hb == 0:
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


def kmeans_1d(
    values: torch.Tensor, k: int, iters: int = 50, seed: int = 0, fit_samples: int = 50000
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on scalar values (quantile initialisation, fitted on a random subsample); (labels, centres)."""
    v = values.reshape(-1).double()
    g = torch.Generator().manual_seed(seed)
    fit = v[torch.randperm(v.numel(), generator=g)[:fit_samples]]
    centres = torch.quantile(fit, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        lab = (fit[:, None] - centres[None]).abs().argmin(1)
        counts = torch.bincount(lab, minlength=k).double()
        sums = torch.bincount(lab, weights=fit, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.allclose(new, centres):
            break
        centres = new
    lab = (v[:, None] - centres[None]).abs().argmin(1)
    return lab.reshape(values.shape), centres


@torch.no_grad()
def cluster_map(model, images: torch.Tensor) -> torch.Tensor:
    """Arg-max cluster of the model's clustering logits, (N, S, S)."""
    _, s = predict(model, images)
    if s is None:
        raise ValueError("the model has no clustering branch (stage 1)")
    return s.argmax(1)


def score_methods(trained, untrained, images: torch.Tensor, labels: torch.Tensor, k: int) -> dict:
    """NMI (all pixels and brain-only) of trained / untrained network clusters and k-means."""
    brain = labels > 0
    maps = {
        "LD (trained)": cluster_map(trained, images),
        "untrained network": cluster_map(untrained, images),
        f"k-means on intensities (K={k})": kmeans_1d(images[:, 0], k)[0],
    }
    out = {}
    for name, m in maps.items():
        out[name] = {
            "nmi": normalized_mutual_info(m, labels),
            "nmi_brain": normalized_mutual_info(m[brain], labels[brain]),
        }
    return out, maps


# The demo's training length is a fixed number of steps (all of them run, whatever the machine's
# load): 4 stage-1 and 12 stage-2 epochs of 5 steps, 80 steps of 5 x 4 images at 128x128, which
# with the final tables is under 5 minutes on 2 idle cores (README.md). A time budget
# (--max-minutes) is only used when asked for.
EPOCHS1, EPOCHS2, STEPS_PER_EPOCH = 4, 12, 5

PROBE_SHOTS = (1, 5)
PROBE_SEEDS = 3
PROBE_MIN_PIXELS = 3


def probe_scores(
    trained, data: dict, seeds: int = PROBE_SEEDS, shots=PROBE_SHOTS, progress: bool = False, holdout_every: int = 5
) -> list:
    """The linear probe of ``ld_ext.tasks.probe`` on the small structures of ``data``
    (``load_mni_slices(..., structures=...)``): LD's frozen embedding against the untrained
    network (a new draw per seed), intensity + local means and the position control; network
    features and probe settings are the probe's defaults (``probe.DEFAULT_FEATURES``).

    Held-out images: the held-out slices that contain the structure (>= PROBE_MIN_PIXELS pixels).
    Training images: drawn per seed among the training slices that contain it and lie two slices
    away from the held-out ones (slice index = 0 mod ``holdout_every``), so no training image is
    a direct neighbour of a held-out one. Labels are used by the probe only, never in pre-training.
    """
    from tqdm import tqdm

    n = data["images"].shape[0]
    pos = torch.arange(n) % holdout_every  # held-out slices sit at holdout_every // 2
    results = []
    names = list(data["structures"])
    for name in tqdm(names, desc="probe", disable=not progress):
        m = data["structures"][name]
        has = m.reshape(n, -1).sum(1) >= PROBE_MIN_PIXELS
        test = torch.nonzero(data["test"] & has)[:, 0].numpy()
        pool = torch.nonzero(data["train"] & has & (pos == 0))[:, 0].numpy()
        if len(test) == 0 or len(pool) < max(shots):
            continue
        trains = [
            np.sort(np.random.default_rng(1000 + s).choice(pool, size=max(shots), replace=False)) for s in range(seeds)
        ]
        split = {
            k: (
                test,
                [
                    t[np.sort(np.random.default_rng(2000 + i).choice(len(t), k, replace=False))]
                    for i, t in enumerate(trains)
                ],
            )
            for k in shots
        }
        sel = np.union1d(test, pool)
        remap = {int(j): i for i, j in enumerate(sel)}
        split = {
            k: (np.array([remap[int(j)] for j in te]), [np.array([remap[int(j)] for j in t]) for t in trs])
            for k, (te, trs) in split.items()
        }
        imgs = data["images"][torch.as_tensor(sel), 0]
        feats = probe.baseline_feature_sets(trained, imgs)
        r = probe.probe_experiment(
            feats,
            m[torch.as_tensor(sel)].numpy(),
            shots=shots,
            seeds=seeds,
            split=split,
            label=name,
            keep_predictions=True,
        )
        r["_images"], r["_masks"] = imgs.numpy(), m[torch.as_tensor(sel)].numpy()
        r["heldout_slices"], r["train_pool_slices"] = len(test), len(pool)
        results.append(r)
    return results


def nmi_sentence(scores: dict) -> str:
    """What the NMI table means, from its numbers."""
    names = list(scores)
    ld, unt, km = (scores[k]["nmi"] for k in names[:3])
    return (
        f"NMI scores how well the clusters reproduce four tissue classes that, on this T1 template, are intensity "
        f"classes: k-means on the intensities ({km:.2f}) is near the ceiling by construction, so LD ({ld:.2f}) "
        f"{'above' if ld > km else 'below'} it says little about LD; LD against the untrained network "
        f"({unt:.2f}) shows what the short pre-training learned."
    )


def _table(scores: dict) -> str:
    lines = ["| method | NMI (all pixels) | NMI (brain only) |", "|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['nmi']:.3f} | {s['nmi_brain']:.3f} |")
    return "\n".join(lines)


def add_pretrain_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The pre-training demo's flags (kept separate so other demos can add theirs beside them)."""
    parser.add_argument("--out", default="ld_demo", metavar="DIR", help="output folder (default: ld_demo)")
    parser.add_argument("--size", type=int, default=128, help="slice size (default 128)")
    parser.add_argument("--epochs1", type=int, default=EPOCHS1, help="stage-1 epochs")
    parser.add_argument("--epochs2", type=int, default=EPOCHS2, help="stage-2 epochs")
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=STEPS_PER_EPOCH,
        help=f"steps per epoch (default {STEPS_PER_EPOCH}: {(EPOCHS1 + EPOCHS2) * STEPS_PER_EPOCH} training steps "
        "in all, every one of them run)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="B pairs per step (5B images)")
    parser.add_argument("--clusters", type=int, default=16, help="K clusters")
    parser.add_argument("--lr-step", type=int, default=6, help="halve the learning rate every N epochs")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="optional training time budget in minutes, shared among the epochs of both stages; by "
        "default there is none and every step runs (a budget that cuts stage 1 short on a busy "
        "machine leaves LD's features weaker than the baselines in the final table)",
    )
    parser.add_argument("--loss-impl", choices=("fused", "reference"), default="fused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument(
        "--probe-seeds",
        type=int,
        default=PROBE_SEEDS,
        help=f"seeds of the final linear-probe table (default {PROBE_SEEDS})",
    )
    parser.add_argument("--no-progress", action="store_true")


def _load_demo_slices(size: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, training images, held-out images, held-out tissue labels) of the MNI152 template."""
    data = load_mni_slices(size, structures=STRUCTURES)
    train_imgs = data["images"][data["train"]]
    test_imgs = data["images"][data["test"]]
    test_labels = tissue_labels(data["probs"][data["test"]])
    logger.info(
        "MNI152 2009a: %d training and %d held-out axial slices at %dx%d", len(train_imgs), len(test_imgs), size, size
    )
    return data, train_imgs, test_imgs, test_labels


def _train_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    """The pre-training configuration from the demo's flags."""
    return TrainConfig(
        out=str(out),
        size=args.size,
        channels=1,
        n_clusters=args.clusters,
        batch_size=args.batch_size,
        epochs1=args.epochs1,
        epochs2=args.epochs2,
        steps_per_epoch=args.steps_per_epoch,
        lr_step=args.lr_step,
        seed=args.seed,
        device=args.device,
        loss_impl=args.loss_impl,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        overwrite=True,  # the demo's folder: a rerun replaces its run
    )


def _save_overlays(out: Path, test_imgs, test_labels, maps: dict, vsel, clusters: int) -> tuple[Path, list]:
    """demo_clusters.png: per held-out slice of ``vsel``, the image, its tissue labels and each method's
    clusters; (its path, the column titles)."""
    rows = []
    for i in vsel.tolist():
        img = test_imgs[i]
        rows.append(
            [
                viz.overlay_clusters(img, torch.zeros_like(test_labels[i]), 1, alpha=0.0),
                viz.overlay_clusters(img, test_labels[i], 4, alpha=0.6),
                viz.overlay_clusters(img, maps["LD (trained)"][i], clusters),
                viz.overlay_clusters(img, maps["untrained network"][i], clusters),
                viz.overlay_clusters(img, list(maps.values())[2][i], clusters),
            ]
        )
    columns = ["image", "tissue labels", "LD clusters", "untrained clusters", "k-means"]
    overlay = viz.save_grid(rows, out / "demo_clusters.png", titles=columns)
    return overlay, columns


def _print_probe_and_budget_notes(args: argparse.Namespace, out: Path, probe_res: list, summary: dict) -> None:
    """Write and print the probe table (or say there is none), then a note if the time budget cut training."""
    if probe_res:
        pmd = probe.write_results(out / "probe", probe_res, None, {"seeds": args.probe_seeds})
        print(
            f"Small structures of held-out slices ({', '.join(r['label'] for r in probe_res)}): "
            "which features make them linearly readable?\n"
        )
        print(pmd)
    else:
        print("probe: no structure has enough slices at this size; no probe table")
    if summary["stopped_early"]:
        print(
            f"note: the time budget (--max-minutes {args.max_minutes:g}) stopped training after "
            f"{len(summary['records'])} of {args.epochs1 + args.epochs2} epochs; these tables describe a shorter "
            "pre-training than the demo's"
        )


def run_pretrain_demo(args: argparse.Namespace) -> dict:
    """Pre-train on the template and score; returns the results dict (also written to OUT)."""
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data, train_imgs, test_imgs, test_labels = _load_demo_slices(args.size)
    cfg = _train_config(args, out)
    vsel = torch.linspace(0, len(test_imgs) - 1, 4).round().long()
    summary = pretrain(cfg, dataset=ImageFolderDataset.from_tensor(train_imgs), val_images=test_imgs[vsel])
    trained = summary["final_model"].cpu().eval()
    torch.manual_seed(args.seed)
    untrained = LDNet(1, trained.emb_dim, args.clusters).eval()
    if trained.n_clusters is None:
        raise RuntimeError("the time budget (--max-minutes) ended before stage 2 started; raise it or leave it out")
    scores, maps = score_methods(trained, untrained, test_imgs, test_labels, args.clusters)
    t_probe = time.time()
    probe_res = probe_scores(trained, data, seeds=args.probe_seeds, progress=not args.no_progress)
    probe_seconds = time.time() - t_probe
    overlay, columns = _save_overlays(out, test_imgs, test_labels, maps, vsel, args.clusters)
    recs = summary["records"]
    results = {
        "seconds_total": round(time.time() - t0, 1),
        "seconds_training": round(summary["seconds"], 1),
        "train_slices": len(train_imgs),
        "heldout_slices": len(test_imgs),
        "stopped_early": summary["stopped_early"],
        "first_epoch": recs[0] if recs else None,
        "last_epoch": recs[-1] if recs else None,
        "scores": scores,
        "probe": [{k: v for k, v in r.items() if not k.startswith("_")} for r in probe_res],
        "seconds_probe": round(probe_seconds, 1),
        "overlay": str(overlay),
        "overlay_columns": columns,
        "model": summary["model"],
        "metrics": summary["metrics"],
    }
    atomic_write_bytes(out / "demo_results.json", json.dumps(results, indent=2).encode())
    table = _table(scores) + "\n\n" + nmi_sentence(scores) + "\n"
    atomic_write_bytes(out / "nmi.md", table.encode())
    print(table)
    _print_probe_and_budget_notes(args, out, probe_res, summary)
    print(f"done in {results['seconds_total']:.0f} s; results in {out / 'demo_results.json'}, overlays in {overlay}")
    return results
