"""``ld-ext demo --task finetune|landmark|shape-guided``: the three downstream tasks on medical
images that ship inside packages (nothing is downloaded).

Data (all from the nilearn package, read with nibabel):

* images: axial slices of the ICBM152 2009a symmetric T1 template (1 mm, skull-stripped);
* tissue labels: its grey- and white-matter probability maps (> 0.5); "ventricles" (the small
  structure) = voxels inside the brain where 1 - GM - WM > 0.5, restricted to a central box
  (|x| <= 24 mm, -45 <= y <= 30 mm, -5 <= z <= 35 mm), i.e. the lateral and third ventricles;
* landmarks: the Dosenbach et al. (2010) ROI centres (MNI mm) shipped with nilearn, those
  within 5 mm of the template slice and inside the brain, projected onto it;
* shape priors: binarised white-matter probability maps (a tissue-classification map, not a T1
  image) taken from slices offset by 2 mm from every segmented T1 slice, so no segmented image
  has its own mask among the priors; they are shuffled and augmented, never paired.

An LD checkpoint is needed by all three: ``--checkpoint`` gives one; otherwise a short
pre-training run (the pipeline's ``ld_ext.train.pretrain``, both stages) on T1 slices is made
once and cached in ``OUT/pretrain/model.pt`` so the three demos share it.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import common

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "STRUCTURES", "add_task_arguments", "run_task_demo", "demo_checkpoint", "mni_slices", "ventricle_slice",
           "structure_volume", "structure_slices"]

TASKS = ("finetune", "landmark", "shape-guided", "probe")

PRETRAIN_Z = tuple(range(-40, 72, 2))  # mm
FINETUNE_Z = tuple(range(-24, 64, 4))
SHAPE_Z = tuple(range(-12, 52, 4))
SHAPE_PRIOR_Z = tuple(z + 2 for z in SHAPE_Z)
LANDMARK_Z = 8.0
# The shape-guided demo continues LD training of the pre-trained network (its 16-cluster branch)
# for SHAPE_STEPS steps with and without the prior. Departures from the published settings, for a
# CPU budget of minutes instead of 80 epochs (measurements in docs/tasks.md section 3): with the
# published discriminator learning rate (0.05 x the network's) the discriminator does not learn in
# time (no effect after 150 steps), so it trains at the network's rate (--d-lr-factor overrides);
# it has spectral normalisation; and since such short adversarial runs succeed for some seeds and
# not others, SHAPE_RESTARTS guided runs are made and the one with the lowest final adversarial
# loss is kept (no labels involved; every restart is reported).
SHAPE_STEPS = 100
SHAPE_D_LR_FACTOR = 1.0
SHAPE_RESTARTS = 3


def _add(parser: argparse.ArgumentParser, *flags, **kw) -> None:
    """Add an option unless the parser already has it (the plain demo may define it)."""
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kw)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--out", default="ld_demo", help="output folder (default ld_demo)")
    _add(parser, "--checkpoint", default=None, help="LD checkpoint to use instead of pre-training one")
    _add(parser, "--task-size", type=int, default=64, help="slice size for the task demos (default 64)")
    _add(parser, "--pretrain-steps", type=int, default=150, help="LD pre-training steps if no checkpoint (default 150)")
    _add(parser, "--task-steps", type=int, default=None, help="training steps of the task (default: per task)")
    _add(parser, "--quick", action="store_true", help="tiny settings (smoke test, numbers meaningless)")
    _add(parser, "--d-lr-factor", type=float, default=None,
         help="shape-guided: discriminator lr = FACTOR x the network's (published 0.05; the demo's short schedule uses 1)")
    _add(parser, "--instance-noise", type=float, default=0.0, help="shape-guided: noise sd on the discriminator's inputs")
    _add(parser, "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on an oversubscribed machine)")


# ----------------------------------------------------------------------------- data


def mni_slices(name: str, zs, size: int) -> np.ndarray:
    return np.stack([common.mni_axial_slice(name, float(z), size) for z in zs]).astype(np.float32)


def ventricle_slice(z: float, size: int) -> np.ndarray:
    """Boolean mask of the lateral/third ventricles at height z (see the module docstring)."""
    t1, aff = common.mni_volume("t1")
    gm, _ = common.mni_volume("gm")
    wm, _ = common.mni_volume("wm")
    cache = common._MNI_CACHE
    if "ventricles" not in cache:
        csf = (t1 > 0.02) & ((1.0 - gm - wm) > 0.5)
        ii, jj, kk = np.meshgrid(*[np.arange(n) for n in t1.shape], indexing="ij")
        x = aff[0, 0] * ii + aff[0, 3]
        y = aff[1, 1] * jj + aff[1, 3]
        zz = aff[2, 2] * kk + aff[2, 3]
        box = (np.abs(x) <= 24) & (y >= -45) & (y <= 30) & (zz >= -5) & (zz <= 35)
        cache["ventricles"] = (csf & box).astype(np.float32)
    return common.axial_slice(cache["ventricles"], aff, z, size) > 0.5


# Small structures for the linear probe, defined on the template's voxel grid from the shipped
# tissue maps and MNI boxes (mm); no atlas of deep nuclei ships with nilearn, so these are
# approximations: GM > 0.5 inside boxes around the striatum and the thalamus, WM > 0.5 near the
# midline (the corpus callosum and fornix), and the ventricles as above.
STRUCTURES = ("ventricles", "striatum", "thalamus", "corpus_callosum")


def structure_volume(name: str) -> np.ndarray:
    """Float32 (0/1) volume of a small structure on the T1 template's voxel grid (``STRUCTURES``)."""
    if name not in STRUCTURES:
        raise ValueError(f"name must be one of {STRUCTURES}, got {name!r}")
    cache = common._MNI_CACHE
    key = "structure_" + name
    if key not in cache:
        t1, aff = common.mni_volume("t1")
        gm, _ = common.mni_volume("gm")
        wm, _ = common.mni_volume("wm")
        ii, jj, kk = np.meshgrid(*[np.arange(n) for n in t1.shape], indexing="ij")
        x = aff[0, 0] * ii + aff[0, 3]
        y = aff[1, 1] * jj + aff[1, 3]
        z = aff[2, 2] * kk + aff[2, 3]
        if name == "ventricles":
            csf = (t1 > 0.02) & ((1.0 - gm - wm) > 0.5)
            m = csf & (np.abs(x) <= 24) & (y >= -45) & (y <= 30) & (z >= -5) & (z <= 35)
        else:
            deep = (gm > 0.5) & (np.abs(x) <= 31) & (z >= -6) & (z <= 22) & (y >= -38) & (y <= 28)
            if name == "striatum":
                m = deep & (y >= -8) & (np.abs(x) >= 6)
            elif name == "thalamus":
                m = deep & (y < -8) & (np.abs(x) <= 22)
            else:
                m = (wm > 0.5) & (np.abs(x) <= 10) & (z >= 4) & (z <= 30)
        cache[key] = m.astype(np.float32)
    return cache[key]


def structure_slices(name: str, zs, size: int) -> np.ndarray:
    """Boolean (len(zs), size, size) masks of a structure on axial slices (as ``mni_slices``)."""
    vol = structure_volume(name)
    _, aff = common.mni_volume("t1")
    return np.stack([common.axial_slice(vol, aff, float(z), size) > 0.5 for z in zs])


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    a = np.asarray(arr)
    a8 = (a.astype(np.uint8) * 255) if a.dtype == bool else np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(a8).save(tmp)
    tmp.replace(path)


def _progress(args) -> bool:
    """Progress bars unless --no-progress was given."""
    return not getattr(args, "no_progress", False)


def demo_checkpoint(args, out: Path, size: int) -> Path:
    """The checkpoint given with --checkpoint, or a cached / fresh short LD pre-training on T1 slices."""
    if getattr(args, "checkpoint", None):
        return Path(args.checkpoint)
    from ..data import ImageFolderDataset
    from ..train import TrainConfig, pretrain

    pdir = out / "pretrain"
    model = pdir / "model.pt"
    if model.exists():
        logger.info("using the cached pre-trained model %s", model)
        return model
    steps = 4 if args.quick else common.check_positive_int("--pretrain-steps", args.pretrain_steps)
    imgs = torch.from_numpy(mni_slices("t1", PRETRAIN_Z[:: (6 if args.quick else 1)], size))[:, None]
    ds = ImageFolderDataset.from_tensor(imgs)
    e1 = max(1, steps // 3)
    cfg = TrainConfig(
        out=str(pdir), size=size, epochs1=1, epochs2=1, steps_per_epoch=None, batch_size=2 if args.quick else 4,
        device="cpu", amp=False, val_images=2, progress=_progress(args), seed=0,
        overwrite=True,  # an interrupted earlier pre-training here is replaced
    )
    # two epochs: stage 1 gets a third of the steps, stage 2 the rest
    cfg.epochs1, cfg.epochs2 = 1, 2
    cfg.steps_per_epoch = e1 if not args.quick else 2
    t0 = time.perf_counter()
    logger.info("pre-training LD on %d MNI152 T1 slices (%dx%d), %d steps", imgs.shape[0], size, size, 3 * cfg.steps_per_epoch)
    pretrain(cfg, dataset=ds)
    logger.info("pre-training took %.0f s", time.perf_counter() - t0)
    return model


# ----------------------------------------------------------------------------- finetune


def demo_finetune(args, out: Path, ckpt: Path, size: int) -> dict:
    from . import segmentation as seg

    zs = FINETUNE_Z[::2] if args.quick else FINETUNE_Z
    images = mni_slices("t1", zs, size)
    targets = {
        "white_matter": mni_slices("wm", zs, size) > 0.5,
        "grey_matter": mni_slices("gm", zs, size) > 0.5,
        "ventricles": np.stack([ventricle_slice(z, size) for z in zs]),
    }
    data = out / "finetune" / "data"
    for z, im in zip(zs, images):
        _save_png(data / "images" / f"mni_z{z:+03d}.png", im)
        for name, m in targets.items():
            _save_png(data / f"masks_{name}" / f"mni_z{z:+03d}.png", m[zs.index(z)])
    steps = args.task_steps or (3 if args.quick else 50)
    seeds = 1 if args.quick else 3
    shots = 2 if args.quick else 5
    results = []
    for name in targets:
        pairs = common.pair_images_masks(data / "images", data / f"masks_{name}")
        imgs, msks = common.load_pairs(pairs)
        r = seg.transfer_experiment(imgs, msks, ckpt, shots=shots, seeds=seeds, steps=steps, label=name,
                                    progress=_progress(args))
        r["_images"], r["_masks"] = imgs, msks
        r["foreground_fraction"] = float(msks.mean())
        results.append(r)
    md = seg.write_results(out / "finetune", results, None, None, shots, seeds, {"steps": steps, "size": size})
    print(md)
    return {"markdown": md}


# ----------------------------------------------------------------------------- probe

# The probe protocol: settings (probe weight decay, network feature kind) are selected on the
# development slices (odd z in mm) and reported on the evaluation slices (even z), never the
# other way round. "warped" applies one random affine + elastic warp per image (same warp to its
# masks), i.e. images that are not registered to each other, so position alone tells less.
PROBE_DEV_Z = tuple(range(-7, 36, 2))
PROBE_EVAL_Z = tuple(range(-6, 36, 2))
PROBE_MIN_PIXELS = 3  # a slice "contains" a structure with at least this many mask pixels


def probe_data(zs, size: int, warped: bool = False, seed: int = 0, structures=STRUCTURES) -> dict:
    """T1 slices at heights ``zs`` and, per structure, (images, masks) of the slices that contain it."""
    images = mni_slices("t1", zs, size)
    masks = {name: structure_slices(name, zs, size) for name in structures}
    if warped:
        rng = np.random.default_rng(seed)
        for i in range(len(images)):
            w = common.random_warp((size, size), rng, max_rotation_deg=20.0, scale_range=(0.85, 1.15),
                                   max_shift=0.08 * size, elastic_px=0.03 * size, elastic_sigma=size / 8)
            images[i] = common.warp_image(images[i], w)
            for name in masks:
                masks[name][i] = common.warp_image(masks[name][i].astype(np.float32), w) > 0.5
    out = {}
    for name, m in masks.items():
        keep = m.reshape(len(m), -1).sum(1) >= PROBE_MIN_PIXELS
        out[name] = (images[keep], m[keep], [z for z, k in zip(zs, keep) if k])
    return out


def run_probe_protocol(model, size: int, zs, *, warped: bool, shots=(1, 5), seeds: int = 3, kind: str | None = None,
                       weight_decay: float | None = None, structures=STRUCTURES, label: str = "") -> list:
    """The probe (LD vs random-init vs intensity vs position) on each structure of ``probe_data``."""
    from . import probe

    data = probe_data(zs, size, warped=warped, structures=structures)
    kind = kind or probe.DEFAULT_FEATURES
    weight_decay = probe.DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
    results = []
    for name, (imgs, msks, used_z) in data.items():
        n = len(msks)
        n_test = min(n - 1, max(1, int(round(n * 0.5))))  # probe_splits' default held-out share
        if n < 2 or n - n_test < max(shots):
            logger.warning("probe: %s is on %d slice(s) only, too few for %d shot(s); left out", name, n, max(shots))
            continue
        feats = probe.baseline_feature_sets(model, imgs, kind)
        r = probe.probe_experiment(feats, msks, shots=shots, seeds=seeds, weight_decay=weight_decay, label=name)
        r["z_mm"] = used_z
        r["_images"], r["_masks"] = imgs, msks
        results.append(r)
    return results


def demo_probe(args, out: Path, ckpt: Path, size: int) -> dict:
    from . import probe

    model = common.load_ld_model(ckpt)
    d = out / "probe"
    seeds = 1 if args.quick else 3
    zs = PROBE_EVAL_Z[::2] if args.quick else PROBE_EVAL_Z
    shots = (1, 2) if args.quick else (1, 5)
    md = (f"Linear probe on the MNI152 T1 evaluation slices (z = {zs[0]}..{zs[-1]} mm, every 2 mm; settings "
          f"selected on the odd-z development slices), {size}x{size}, checkpoint {ckpt}.\n\n")
    res_all = {}
    for warped in (False, True):
        tag = "warped" if warped else "aligned"
        res = run_probe_protocol(model, size, zs, warped=warped, shots=shots, seeds=seeds,
                                 kind=probe.DEFAULT_FEATURES)
        if not res:
            md += f"**{tag}**: no structure on enough slices\n\n"
            continue
        sub = probe.write_results(d / tag, res, None, {"size": size, "checkpoint": str(ckpt), "setting": tag})
        md += f"**{tag}**\n\n{sub}\n"
        res_all[tag] = res
    common.atomic_write_text(d / "results.md", md)
    print(md)
    return {"markdown": md, "results": res_all}


# ----------------------------------------------------------------------------- landmarks


def landmark_data(size: int, z: float = LANDMARK_Z, max_points: int = 20):
    template = common.mni_axial_slice("t1", z, size)
    rois = [r for r in common.dosenbach_rois() if abs(r["z"] - z) <= 5]
    pts = common.mni_to_pixel([[r["x"], r["y"], z] for r in rois], size)
    keep = []
    for r, p in zip(rois, pts):
        ix, iy = int(round(p[0])), int(round(p[1]))
        if 2 <= ix < size - 2 and 2 <= iy < size - 2 and template[iy, ix] > 0.1:
            keep.append((r["name"], p))
    keep = keep[:max_points]
    return template, [k[0] for k in keep], np.array([k[1] for k in keep])


def demo_landmark(args, out: Path, ckpt: Path, size: int) -> dict:
    from . import landmarks as lm

    template, names, points = landmark_data(size)
    d = out / "landmark"
    _save_png(d / "data" / "template.png", template)
    common.atomic_write_json(
        d / "data" / "points.json",
        {"points": [{"name": n, "x": float(p[0]), "y": float(p[1])} for n, p in zip(names, points)]},
    )
    n_eval = 3 if args.quick else 30
    model = common.load_ld_model(ckpt)
    # the optional centre-sensitive training term, on the pre-training slices (never the targets)
    cs_path = d / "ld_centre_term.pt"
    cs_steps = 2 if args.quick else 1000  # 1000 > 600 > 300 > 150 on the development slices
    if cs_path.exists():
        cs_model = common.load_ld_model(cs_path)
    else:
        cs_model, hist = lm.train_centre_sensitive(model, mni_slices("t1", PRETRAIN_Z, size), steps=cs_steps,
                                                   progress=_progress(args))
        from ..checkpoint import save_checkpoint

        save_checkpoint(cs_path, cs_model)
        print(f"centre-sensitive term: loss {np.mean(hist[:5]):.3f} -> {np.mean(hist[-5:]):.3f} in {cs_steps} steps")
    models = {"LD": model, "LD+term": cs_model}
    strong = dict(bias=0.2, max_rotation_deg=30.0, scale_range=(0.85, 1.15), elastic_px=3.0)
    settings = {  # mild and hard warp the template slice itself: their ground truth is exact
        "mild": dict(sources=None, bias=0.0, max_rotation_deg=10.0, elastic_px=2.0),
        "hard": dict(sources=None, **strong),
        "cross-slice": dict(sources=[common.mni_axial_slice("t1", LANDMARK_Z + dz, size) for dz in (-4, -2, 2, 4)], **strong),
    }
    md = (
        f"One-shot landmarks: {len(names)} Dosenbach ROIs on the MNI152 T1 slice z = {LANDMARK_Z:+.0f} mm "
        f"({size}x{size} px, {233 / size:.2f} mm/px), {n_eval} warped targets per setting, radial errors in px. "
        "mild: the template slice, rotation +-10 deg, scale 0.9-1.1, shear +-0.05, shift +-4 px, elastic 2 px, "
        "gamma 0.8-1.25, noise 0.02. hard: the template slice, rotation +-30 deg, scale 0.85-1.15, elastic 3 px, "
        "20% bias field, same gamma/noise. In both the ground truth is exact (the landmarks carried through the "
        "known warp). cross-slice: the hard warps applied to a neighbouring slice (z +-2 or +-4 mm) with the "
        "landmarks at the same in-plane coordinates, so its ground truth is only approximate (a different "
        "section of the anatomy). "
        "Every method: the same consistent search (robust affine over all landmarks, second pass in the "
        "template frame), per-method settings selected on development slices (landmarks.SELECTED_*).\n\n"
    )
    all_rows, paired = {}, {}
    first = None
    for name, kw in settings.items():
        targets, gts = lm.make_eval_targets(template, points, n_eval, seed=1, **kw)
        ev = lm.evaluate_methods(models, template, points, targets, gts, ld_methods=lm.SELECTED_LD,
                                 ncc_methods=lm.SELECTED_NCC, progress=_progress(args))
        all_rows[name] = ev["rows"]
        md += f"**{name}**\n\n" + lm.table_markdown(ev["rows"]) + "\n"
        errs = ev["errors"]
        best_ncc = min((r for r in ev["rows"] if r["method"].startswith("NCC")), key=lambda r: r["mre_px"])["method"]
        paired[name] = {}
        for label in models:
            cs = errs[f"{label} centre-sensitive"]
            for other in (f"{label} uniform pooling", best_ncc):
                pd = lm.paired_difference(cs, errs[other], ev["target"])
                paired[name][f"{label} centre-sensitive - {other}"] = pd
                md += (f"- {label} centre-sensitive minus {other}: {pd['mean_diff_px']:+.3f} px "
                       f"(95% CI over targets {pd['ci95_px'][0]:+.3f}..{pd['ci95_px'][1]:+.3f}; "
                       f"lower on {100 * pd['targets_a_better']:.0f}% of targets)\n")
        md += "\n"
        if name == "hard":
            first = (targets[0], gts[0])  # the picture shows a hard target
    common.atomic_write_text(d / "results.md", md)
    common.atomic_write_json(d / "results.json", {"landmarks": names, "points": points, "rows": all_rows, "paired": paired})
    # a picture of the first target
    target, gt = first
    te, _ = common.embed(cs_model, template[None])
    loc = lm.LandmarkLocator(**lm.SELECTED_LD["centre-sensitive"]).fit(te.double(), points)
    ncc_half = 4
    preds = {
        "LD+term centre-sensitive": loc.locate_image(cs_model, target),
        f"NCC {2 * ncc_half + 1}x{2 * ncc_half + 1}": lm.ncc_locate(template, points, target, ncc_half, **lm.SELECTED_NCC[ncc_half]),
    }
    lm.plot_landmarks(d / "landmarks.png", template, points, target, gt, preds, "a warped target (hard setting)")
    print(md)
    return {"markdown": md}


# ----------------------------------------------------------------------------- shape-guided


def demo_shape_guided(args, out: Path, ckpt: Path, size: int) -> dict:
    from . import shape_guided as sg

    zs = SHAPE_Z[::3] if args.quick else SHAPE_Z
    pz = SHAPE_PRIOR_Z[::3] if args.quick else SHAPE_PRIOR_Z
    images = mni_slices("t1", zs, size)
    masks = mni_slices("wm", zs, size) > 0.5
    priors = mni_slices("wm", pz, size) > 0.5
    d = out / "shape_guided"
    for z, im, m in zip(zs, images, masks):
        _save_png(d / "data" / "images" / f"t1_z{z:+03d}.png", im)
        _save_png(d / "data" / "masks" / f"t1_z{z:+03d}.png", m)
    for z, p in zip(pz, priors):
        _save_png(d / "data" / "priors" / f"wm_prior_z{z:+03d}.png", p)
    steps = args.task_steps or (3 if args.quick else SHAPE_STEPS)
    d_lr = getattr(args, "d_lr_factor", None)
    res = sg.shape_guided_experiment(
        images, priors, masks, checkpoint=ckpt, steps=steps, batch=2 if args.quick else 4,
        d_lr_factor=SHAPE_D_LR_FACTOR if d_lr is None else d_lr,
        instance_noise=getattr(args, "instance_noise", 0.0) or 0.0,
        d_spectral_norm=True, restarts=1 if args.quick else SHAPE_RESTARTS, progress=_progress(args),
    )
    # context for reading the Dice values: how well the whole brain (a blob enclosing the white
    # matter) would score, and how much of the guided cluster 0 is just that blob
    brain = (mni_slices("gm", zs, size) + mni_slices("wm", zs, size)) > 0.5
    a0, s0 = res["_maps"][0][:, 0] > 0.5, res["_maps"][1][:, 0] > 0.5
    context = {
        "brain_mask_vs_white_matter": common.dice(brain, masks),
        "guided_a0_vs_brain_mask": common.dice(a0, brain),
        "guided_S0_vs_brain_mask": common.dice(s0, brain),
    }
    note = (
        "\nContext (not a method): the whole-brain mask (GM + WM > 0.5) scores Dice "
        f"{context['brain_mask_vs_white_matter']:.3f} against the white matter; the guided cluster 0 overlaps "
        f"that brain mask with Dice {context['guided_a0_vs_brain_mask']:.3f} (a > 0.5) and "
        f"{context['guided_S0_vs_brain_mask']:.3f} (S > 0.5).\n"
    )
    md = sg.write_results(d, res, images, masks, priors, note=note)
    common.atomic_write_json(d / "context.json", context)
    print(md)
    return {"markdown": md}


# ----------------------------------------------------------------------------- entry point


def run_task_demo(task: str, args: argparse.Namespace) -> int:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    size = common.check_positive_int("--task-size", getattr(args, "task_size", 64), 16)
    if not hasattr(args, "quick"):
        args.quick = False
    out = Path(getattr(args, "out", None) or "ld_demo")
    if getattr(args, "threads", None):
        torch.set_num_threads(common.check_positive_int("--threads", args.threads))
    t0 = time.perf_counter()
    ckpt = demo_checkpoint(args, out, size)
    t1 = time.perf_counter()
    fn = {"finetune": demo_finetune, "landmark": demo_landmark, "shape-guided": demo_shape_guided,
          "probe": demo_probe}[task]
    fn(args, out, ckpt, size)
    t2 = time.perf_counter()
    timing = {"task": task, "pretrain_seconds": t1 - t0, "task_seconds": t2 - t1, "total_seconds": t2 - t0}
    common.atomic_write_json(out / f"timing_{task.replace('-', '_')}.json", timing)
    print(json.dumps(timing))
    return 0
