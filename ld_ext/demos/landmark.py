"""``ld-ext demo --task landmark``: one-shot landmark localisation on the MNI152 T1 template
(the Dosenbach et al. (2010) ROI centres shipped with nilearn, those within 5 mm of the template
slice and inside the brain, projected onto it), LD against normalised cross-correlation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_write_png as _save_png
from ..checkpoint import save_checkpoint
from ..tasks import common
from ..tasks import landmarks as lm
from .common import PRETRAIN_Z, show_progress
from .mni import dosenbach_rois, mni_axial_slice, mni_slices, mni_to_pixel

__all__ = ["LANDMARK_Z", "landmark_data", "demo_landmark"]

LANDMARK_Z = 8.0


def landmark_data(size: int, z: float = LANDMARK_Z, max_points: int = 20):
    template = mni_axial_slice("t1", z, size)
    rois = [r for r in dosenbach_rois() if abs(r["z"] - z) <= 5]
    pts = mni_to_pixel([[r["x"], r["y"], z] for r in rois], size)
    keep = []
    for r, p in zip(rois, pts):
        ix, iy = int(round(p[0])), int(round(p[1]))
        if 2 <= ix < size - 2 and 2 <= iy < size - 2 and template[iy, ix] > 0.1:
            keep.append((r["name"], p))
    keep = keep[:max_points]
    return template, [k[0] for k in keep], np.array([k[1] for k in keep])


def _write_landmark_data(d: Path, template, names, points) -> None:
    """The template slice (PNG) and its landmarks (JSON) under ``d / "data"``."""
    _save_png(d / "data" / "template.png", template)
    common.atomic_write_json(
        d / "data" / "points.json",
        {"points": [{"name": n, "x": float(p[0]), "y": float(p[1])} for n, p in zip(names, points)]},
    )


def _centre_sensitive_model(args, model, d: Path, size: int):
    """The model with the optional centre-sensitive training term: read from ``d`` if saved, else trained
    on the pre-training slices (never the targets) and saved."""
    cs_path = d / "ld_centre_term.pt"
    cs_steps = 2 if args.quick else 1000  # 1000 > 600 > 300 > 150 on the development slices
    if cs_path.exists():
        return common.load_ld_model(cs_path)
    cs_model, hist = lm.train_centre_sensitive(
        model, mni_slices("t1", PRETRAIN_Z, size), steps=cs_steps, progress=show_progress(args)
    )
    save_checkpoint(cs_path, cs_model)
    print(f"centre-sensitive term: loss {np.mean(hist[:5]):.3f} -> {np.mean(hist[-5:]):.3f} in {cs_steps} steps")
    return cs_model


def _warp_settings(size: int) -> dict:
    """The evaluation settings (keyword arguments of ``landmarks.make_eval_targets``) by name."""
    strong = dict(bias=0.2, max_rotation_deg=30.0, scale_range=(0.85, 1.15), elastic_px=3.0)
    return {  # mild and hard warp the template slice itself: their ground truth is exact
        "mild": dict(sources=None, bias=0.0, max_rotation_deg=10.0, elastic_px=2.0),
        "hard": dict(sources=None, **strong),
        "cross-slice": dict(sources=[mni_axial_slice("t1", LANDMARK_Z + dz, size) for dz in (-4, -2, 2, 4)], **strong),
    }


def _intro_markdown(names, size: int, n_eval: int) -> str:
    """The paragraph that opens results.md: the data, the settings and the search."""
    return (
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


def _paired_differences(models, ev: dict) -> tuple[dict, str]:
    """Each model's centre-sensitive pooling against its uniform pooling and the best NCC, paired over
    targets: (differences by comparison, their markdown lines)."""
    errs = ev["errors"]
    best_ncc = min((r for r in ev["rows"] if r["method"].startswith("NCC")), key=lambda r: r["mre_px"])["method"]
    paired, md = {}, ""
    for label in models:
        cs = errs[f"{label} centre-sensitive"]
        for other in (f"{label} uniform pooling", best_ncc):
            pd = lm.paired_difference(cs, errs[other], ev["target"])
            paired[f"{label} centre-sensitive - {other}"] = pd
            md += (
                f"- {label} centre-sensitive minus {other}: {pd['mean_diff_px']:+.3f} px "
                f"(95% CI over targets {pd['ci95_px'][0]:+.3f}..{pd['ci95_px'][1]:+.3f}; "
                f"lower on {100 * pd['targets_a_better']:.0f}% of targets)\n"
            )
    return paired, md


def _plot_target(d: Path, cs_model, template, points, first) -> None:
    """landmarks.png: the LD+term and NCC predictions on one warped target."""
    target, gt = first
    te, _ = common.embed(cs_model, template[None])
    loc = lm.LandmarkLocator(**lm.SELECTED_LD["centre-sensitive"]).fit(te.double(), points)
    ncc_half = 4
    preds = {
        "LD+term centre-sensitive": loc.locate_image(cs_model, target),
        f"NCC {2 * ncc_half + 1}x{2 * ncc_half + 1}": lm.ncc_locate(
            template, points, target, ncc_half, **lm.SELECTED_NCC[ncc_half]
        ),
    }
    lm.plot_landmarks(d / "landmarks.png", template, points, target, gt, preds, "a warped target (hard setting)")


def demo_landmark(args, out: Path, ckpt: Path, size: int) -> dict:
    template, names, points = landmark_data(size)
    d = out / "landmark"
    _write_landmark_data(d, template, names, points)
    n_eval = 3 if args.quick else 30
    model = common.load_ld_model(ckpt)
    cs_model = _centre_sensitive_model(args, model, d, size)
    models = {"LD": model, "LD+term": cs_model}
    settings = _warp_settings(size)
    md = _intro_markdown(names, size, n_eval)
    all_rows, paired = {}, {}
    first = None
    for name, kw in settings.items():
        targets, gts = lm.make_eval_targets(template, points, n_eval, seed=1, **kw)
        ev = lm.evaluate_methods(
            models,
            template,
            points,
            targets,
            gts,
            ld_methods=lm.SELECTED_LD,
            ncc_methods=lm.SELECTED_NCC,
            progress=show_progress(args),
        )
        all_rows[name] = ev["rows"]
        md += f"**{name}**\n\n" + lm.table_markdown(ev["rows"]) + "\n"
        paired[name], paired_md = _paired_differences(models, ev)
        md += paired_md + "\n"
        if name == "hard":
            first = (targets[0], gts[0])  # the picture shows a hard target
    common.atomic_write_text(d / "results.md", md)
    common.atomic_write_json(
        d / "results.json", {"landmarks": names, "points": points, "rows": all_rows, "paired": paired}
    )
    _plot_target(d, cs_model, template, points, first)  # a picture of the first hard target
    print(md)
    return {"markdown": md}
