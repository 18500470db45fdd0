"""``ld-ext demo``: pre-train LD on the MNI152 template shipped in nilearn and score its clusters.

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
``ld_ext.tasks.demos.STRUCTURES``) on the held-out slices, LD's frozen embedding against the
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
import torch.nn.functional as F

from .checkpoint import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "mni_files",
    "load_mni_slices",
    "tissue_labels",
    "normalized_mutual_info",
    "kmeans_1d",
    "score_methods",
    "probe_scores",
    "nmi_sentence",
    "add_arguments",
    "add_pretrain_demo_arguments",
    "run_pretrain_demo",
    "run",
]

_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
LABEL_NAMES = ("background", "CSF", "GM", "WM")


def mni_files() -> dict[str, Path]:
    """Paths of the T1 template and GM/WM maps inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError as exc:
        raise ImportError("the demo needs the optional package 'nilearn' (pip install nilearn nibabel)") from exc
    data = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {"t1": data / _T1, "gm": data / _GM, "wm": data / _WM}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"nilearn {nilearn.__version__} does not ship the MNI152 2009a files: {missing}")
    return files


def _square_resize(x: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) -> pad to a square with ``value``, bilinear resize to size x size."""
    h, w = x.shape[-2:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    x = F.pad(x, (left, s - w - left, top, s - h - top), value=value)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=s > size)


def load_mni_slices(size: int = 128, axis: int = 2, min_brain: float = 0.05, holdout_every: int = 5,
                    structures: tuple = ()) -> dict:
    """Axial slices of the template with tissue probabilities, split into train / held-out.

    Returns ``images`` (N, 1, S, S) in [0, 1], ``probs`` (N, 4, S, S) (background, CSF, GM, WM),
    ``index`` (slice numbers), ``train``/``test`` boolean masks (every ``holdout_every``-th
    slice is held out) and, for each name in ``structures`` (``ld_ext.tasks.demos.STRUCTURES``),
    ``structures[name]`` (N, S, S) boolean masks.
    """
    import nibabel as nib

    from .data import scale_intensity

    f = mni_files()
    t1 = np.asarray(nib.load(str(f["t1"])).dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(f["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(f["wm"])).dataobj, dtype=np.float32) / 255.0
    brain = (t1 > 0).astype(np.float32)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    bg = 1.0 - brain
    t1 = scale_intensity(t1, (0.5, 99.5))
    other = tuple(a for a in range(3) if a != axis)
    keep = np.nonzero(brain.mean(axis=other) >= min_brain)[0].tolist()
    if not keep:
        raise ValueError("no template slice contains enough brain")

    def stack(vol):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, axis, 0)[keep]))

    images = _square_resize(stack(t1)[:, None], size).clamp(0, 1)
    probs = torch.cat(
        [
            _square_resize(stack(bg)[:, None], size, value=1.0),  # the padding is background
            _square_resize(torch.stack([stack(csf), stack(gm * brain), stack(wm * brain)], 1), size),
        ],
        1,
    )
    index = torch.tensor(keep)
    test = (torch.arange(len(keep)) % holdout_every) == (holdout_every // 2)
    out = {"images": images, "probs": probs, "index": index, "test": test, "train": ~test}
    if structures:
        from .tasks.demos import structure_volume

        out["structures"] = {
            name: _square_resize(stack(structure_volume(name))[:, None], size)[:, 0] > 0.5 for name in structures
        }
    return out


def tissue_labels(probs: torch.Tensor) -> torch.Tensor:
    """(N, 4, S, S) probabilities -> (N, S, S) labels 0..3 (background, CSF, GM, WM)."""
    return probs.argmax(1)


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


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 50, seed: int = 0, fit_samples: int = 50000) -> tuple[torch.Tensor, torch.Tensor]:
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
    from .train import predict

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


PROBE_SHOTS = (1, 5)
PROBE_SEEDS = 3
PROBE_MIN_PIXELS = 3


def probe_scores(trained, data: dict, seeds: int = PROBE_SEEDS, shots=PROBE_SHOTS, progress: bool = False,
                 holdout_every: int = 5) -> list:
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

    from .tasks import probe

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
        trains = [np.sort(np.random.default_rng(1000 + s).choice(pool, size=max(shots), replace=False)) for s in range(seeds)]
        split = {k: (test, [t[np.sort(np.random.default_rng(2000 + i).choice(len(t), k, replace=False))] for i, t in enumerate(trains)])
                 for k in shots}
        sel = np.union1d(test, pool)
        remap = {int(j): i for i, j in enumerate(sel)}
        split = {k: (np.array([remap[int(j)] for j in te]), [np.array([remap[int(j)] for j in t]) for t in trs])
                 for k, (te, trs) in split.items()}
        imgs = data["images"][torch.as_tensor(sel), 0]
        feats = probe.baseline_feature_sets(trained, imgs)
        r = probe.probe_experiment(feats, m[torch.as_tensor(sel)].numpy(), shots=shots, seeds=seeds, split=split,
                                   label=name, keep_predictions=True)
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
    parser.add_argument("--epochs1", type=int, default=4, help="stage-1 epochs")
    parser.add_argument("--epochs2", type=int, default=12, help="stage-2 epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=5, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=4, help="B pairs per step (5B images)")
    parser.add_argument("--clusters", type=int, default=16, help="K clusters")
    parser.add_argument("--lr-step", type=int, default=6, help="halve the learning rate every N epochs")
    parser.add_argument("--max-minutes", type=float, default=6.5,
                        help="training time budget in minutes, shared among the epochs of both stages (default 6.5; "
                        "the final probe table needs about a minute more on an idle 2-core machine)")
    parser.add_argument("--loss-impl", choices=("fused", "reference"), default="fused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--probe-seeds", type=int, default=PROBE_SEEDS,
                        help=f"seeds of the final linear-probe table (default {PROBE_SEEDS})")
    parser.add_argument("--no-progress", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .tasks import demos as task_demos

    parser.add_argument(
        "--task",
        choices=("pretrain",) + task_demos.TASKS,
        default="pretrain",
        help="pretrain (default): LD pre-training + cluster scores; or a downstream-task demo "
        "(give --checkpoint OUT/model.pt of a pretrain demo to skip its own pre-training)",
    )
    add_pretrain_demo_arguments(parser)
    task_demos.add_task_arguments(parser)


def run_pretrain_demo(args: argparse.Namespace) -> dict:
    """Pre-train on the template and score; returns the results dict (also written to OUT)."""
    from . import viz
    from .data import ImageFolderDataset
    from .models import LDNet
    from .train import TrainConfig, pretrain

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .tasks import probe as probe_mod
    from .tasks.demos import STRUCTURES

    data = load_mni_slices(args.size, structures=STRUCTURES)
    train_imgs = data["images"][data["train"]]
    test_imgs = data["images"][data["test"]]
    test_labels = tissue_labels(data["probs"][data["test"]])
    logger.info("MNI152 2009a: %d training and %d held-out axial slices at %dx%d", len(train_imgs), len(test_imgs), args.size, args.size)
    cfg = TrainConfig(
        out=str(out), size=args.size, channels=1, n_clusters=args.clusters, batch_size=args.batch_size,
        epochs1=args.epochs1, epochs2=args.epochs2, steps_per_epoch=args.steps_per_epoch, lr_step=args.lr_step,
        seed=args.seed, device=args.device, loss_impl=args.loss_impl, max_minutes=args.max_minutes,
        progress=not args.no_progress, overwrite=True,  # the demo's folder: a rerun replaces its run
    )
    vsel = torch.linspace(0, len(test_imgs) - 1, 4).round().long()
    summary = pretrain(cfg, dataset=ImageFolderDataset.from_tensor(train_imgs), val_images=test_imgs[vsel])
    trained = summary["final_model"].cpu().eval()
    torch.manual_seed(args.seed)
    untrained = LDNet(1, trained.emb_dim, args.clusters).eval()
    if trained.n_clusters is None:
        raise RuntimeError("the time budget ended before stage 2 started; raise --max-minutes")
    scores, maps = score_methods(trained, untrained, test_imgs, test_labels, args.clusters)
    t_probe = time.time()
    probe_res = probe_scores(trained, data, seeds=args.probe_seeds, progress=not args.no_progress)
    probe_seconds = time.time() - t_probe
    rows = []
    for i in vsel.tolist():
        img = test_imgs[i]
        rows.append([
            viz.overlay_clusters(img, torch.zeros_like(test_labels[i]), 1, alpha=0.0),
            viz.overlay_clusters(img, test_labels[i], 4, alpha=0.6),
            viz.overlay_clusters(img, maps["LD (trained)"][i], args.clusters),
            viz.overlay_clusters(img, maps["untrained network"][i], args.clusters),
            viz.overlay_clusters(img, list(maps.values())[2][i], args.clusters),
        ])
    columns = ["image", "tissue labels", "LD clusters", "untrained clusters", "k-means"]
    overlay = viz.save_grid(rows, out / "demo_clusters.png", titles=columns)
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
    if probe_res:
        pmd = probe_mod.write_results(out / "probe", probe_res, None, {"seeds": args.probe_seeds})
        print(f"Small structures of held-out slices ({', '.join(r['label'] for r in probe_res)}): "
              "which features make them linearly readable?\n")
        print(pmd)
    else:
        print("probe: no structure has enough slices at this size; no probe table")
    print(f"done in {results['seconds_total']:.0f} s; results in {out / 'demo_results.json'}, overlays in {overlay}")
    return results


def run(args: argparse.Namespace) -> int:
    if getattr(args, "task", "pretrain") != "pretrain":
        from .tasks import demos as task_demos

        return int(task_demos.run_task_demo(args.task, args) or 0)
    run_pretrain_demo(args)
    return 0
